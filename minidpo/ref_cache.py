"""Reference log-probs computed once (length-sorted, shared out across processes) and kept on disk across runs.

TRL's own cache lives beside the dataset's cache files, keyed by its fingerprint: in-memory datasets (what train.py
passes) get a random fingerprint in a per-process temporary folder, so every run recomputes and ranks other than 0
cannot find rank 0's file. This cache is keyed by content: the reference weights (TRL's hash of them), the encoded
ids and masks (so tokenizer, data, `max_length` and `mask_mode`), `length_normalize` and the autocast dtype. Rank 0
reads and writes; every rank gets the same values.

Location: `ref_cache_dir`, else `$MINIDPO_CACHE`, else `~/.cache/minidpo`; one `ref-logps/<key>.pt` file per set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list, gather_object
from datasets.fingerprint import Hasher

from minidpo.console import say
from minidpo.files import atomic_path, cache_root, remove_orphans
from minidpo.models import first_line
from minidpo.pairs import REF_COLUMNS, content_hash, pair_lengths
from minidpo.scoring import SCORING_VERSION, log_probs_only

_VERSION = "minidpo.ref-logps/2"  # bump when the values for the same key would change (2: the model's config)


def cache_file(model_hash, model, dataset, args) -> Path:
    """Where the reference log-probs of `dataset` (encoded pairs) under training config `args` are kept.

    `model_hash` is TRL's hash of the reference weights; the model's class and config join it, since equal weights
    score differently under another architecture (a Mistral's sliding window, a Llama's full attention), and so does
    the scoring code's version, since a change to how log-probs are computed must not reuse old values."""
    key = Hasher.hash((model_hash, architecture(model), content_hash(dataset), args.max_length, args.mask_mode,
                       args.length_normalize, args.bf16, args.fp16, _VERSION, SCORING_VERSION))
    root = Path(args.ref_cache_dir) if args.ref_cache_dir else cache_root()
    return root / "ref-logps" / f"{key}.pt"


def architecture(model) -> tuple:
    """The model's class and config values, without its name or path (a copy elsewhere scores the same)."""
    config = {k: v for k, v in model.config.to_dict().items()
              if not k.startswith("_") and k not in ("name_or_path", "transformers_version")}
    return type(model).__name__, json.dumps(config, sort_keys=True, default=str)


def _load(path: Path) -> torch.Tensor | None:
    """The tensor in `path`, or None when there is none or it cannot be read (a damaged file is recomputed)."""
    if not path.exists():
        return None
    try:
        logps = torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 -- any unreadable cache file means the same: compute again
        say(f"reference log-probs cache {path} cannot be read ({type(e).__name__}: {first_line(e)}): recomputing")
        return None
    return logps if isinstance(logps, torch.Tensor) and logps.ndim == 2 and logps.shape[1] == 2 else None


def read(path: Path, accelerator) -> torch.Tensor | None:
    """The cached `[pairs, 2]` tensor, or None; one decision for all ranks (they run forwards together)."""
    found = [_load(path) if accelerator.is_main_process else None]
    broadcast_object_list(found, from_process=0)
    return found[0]


def write(path: Path, logps: torch.Tensor, accelerator) -> None:
    """Store on the main process, atomically (a run killed mid-write leaves no half file under the key, and the
    next write removes what it left). A cache that cannot be written (read-only, full) is said in one line and
    training goes on: the values are in memory; only a later run loses them."""
    if not accelerator.is_main_process:
        return
    try:
        remove_orphans(path.parent)
        with atomic_path(path) as tmp:
            torch.save(logps, tmp)
    except (OSError, RuntimeError) as e:  # torch.save to a path reports a failed open or write as RuntimeError
        say(f"WARNING: cannot cache the reference log-probs in {path.parent} ({first_line(e)}): they are not kept "
            "for later runs; set ref_cache_dir (or MINIDPO_CACHE) to a writable folder")


def attach(dataset, logps: torch.Tensor):
    """`dataset` with `ref_chosen_logps` / `ref_rejected_logps` columns from a `[pairs, 2]` tensor (replaced if any)."""
    present = [c for c in REF_COLUMNS if c in dataset.column_names]
    if present:
        dataset = dataset.remove_columns(present)
    return dataset.add_column(REF_COLUMNS[0], logps[:, 0].tolist()).add_column(REF_COLUMNS[1], logps[:, 1].tolist())


@torch.no_grad()
def compute_sorted(dataset, batch_size: int, collate, score, accelerator) -> torch.Tensor:
    """`[len(dataset), 2]` reference log-probs (chosen, rejected) of encoded pairs: batches of similar length (less
    padding), dealt round-robin to the processes, gathered so every rank holds all of them. `score(batch)` returns
    the (chosen, rejected) log-probs of a collated batch (TRL's `compute_ref_log_probs`)."""
    lengths = pair_lengths(dataset)
    order = sorted(range(len(dataset)), key=lengths.__getitem__, reverse=True)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    world, rank = accelerator.num_processes, accelerator.process_index
    mine = batches[rank::world]
    # Sharded models (ZeRO-3, FSDP) run every forward collectively: all ranks take the same number of steps, the
    # ones out of batches repeat one whose result is dropped.
    steps = -(-len(batches) // world)
    results = []
    with log_probs_only():  # the policy model scores the reference here: TRL reads nothing but the log-probs
        for step in range(steps):
            idx = mine[step] if step < len(mine) else batches[0]
            batch = {k: v.to(accelerator.device) for k, v in collate([dataset[i] for i in idx]).items()}
            chosen, rejected = score(batch)
            if step < len(mine):
                results.append((idx, torch.stack([chosen, rejected], dim=1).float().cpu()))
    logps = torch.full((len(dataset), 2), float("nan"))
    for idx, values in gather_object(results) if world > 1 else results:
        logps[idx] = values
    return logps
