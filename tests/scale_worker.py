"""The worker script tests/test_scale.py launches (`accelerate launch ... tests/scale_worker.py precompute CONFIG
DUMP`, or alone with python): each process builds MiniDPOTrainer and writes what it computed to DUMP.RANK.json,
which the test compares across processes. Not a test module: pytest does not collect it."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path


def precompute(config: str, dump: str):
    """Runs under `accelerate launch` (or alone): builds the trainer with precompute_ref_log_probs twice, on a
    disk-backed dataset and on an in-memory one (what train.py passes), and dumps per rank what was scored."""
    from datasets import Dataset

    from minidpo import train
    from minidpo.trainer import MiniDPOTrainer

    scored = []
    original = MiniDPOTrainer.compute_ref_log_probs

    def compute_ref_log_probs(self, model, inputs):
        scored.append(inputs["input_ids"].shape[0] // 2)  # chosen + rejected rows per pair
        return original(self, model, inputs)

    MiniDPOTrainer.compute_ref_log_probs = compute_ref_log_probs
    script_args, training_args, model_args = train.parse(["--config", config])
    tokenizer = train.prepare_tokenizer(model_args, False)
    pairs, _, _ = train.load_pairs(script_args, tokenizer, training_args)
    model = train.load_model(model_args, tokenizer, False)
    result = {}
    for kind in ("disk", "memory"):
        dataset = Dataset.from_list(pairs)
        if kind == "disk":  # an Arrow file every rank can read, like a dataset loaded with load_dataset
            arrow = Path(training_args.output_dir) / "pairs.arrow"
            with training_args.main_process_first():
                dataset = dataset.flatten_indices(cache_file_name=str(arrow))
        scored.clear()
        # A cache of its own per dataset kind: each must really be scored, not read back from the other's.
        training_args.ref_cache_dir = str(Path(dump).parent / f"ref-cache-{Path(dump).name}-{kind}")
        try:
            trainer = MiniDPOTrainer(model, args=training_args, train_dataset=dataset, processing_class=tokenizer)
        except Exception as e:  # noqa: BLE001 -- reported to the test
            result[kind] = {"error": f"{type(e).__name__}: {e}"}
            continue
        ds = trainer.train_dataset
        result[kind] = {
            "world": trainer.accelerator.num_processes, "scored_pairs": sum(scored), "forward_calls": len(scored),
            "chosen": list(ds["ref_chosen_logps"]), "rejected": list(ds["ref_rejected_logps"]),
            "ids": [hashlib.sha1(json.dumps(list(x)).encode()).hexdigest()[:12] for x in ds["chosen_input_ids"]],
        }
        rank = trainer.accelerator.process_index
    Path(f"{dump}.{rank}.json").write_text(json.dumps(result))


WORKERS = {"precompute": precompute}

if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in WORKERS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(WORKERS)}}} CONFIG DUMP")
    WORKERS[sys.argv[1]](sys.argv[2], sys.argv[3])
