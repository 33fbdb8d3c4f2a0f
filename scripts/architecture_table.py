"""Print, per family of tests/families.py, the scoring path minidpo takes and the largest difference of its
per-sequence log-probs (default options, averaged and summed) from a plain full-logit forward of each sequence alone.

    python scripts/architecture_table.py [FAMILY ...]

The numbers behind docs/coming-from-trl.md "Architectures"; tests/test_architectures.py asserts them (within 1e-5).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import tempfile  # noqa: E402

import torch  # noqa: E402
from transformers.utils import logging  # noqa: E402

import test_architectures as matrix  # noqa: E402
from minidpo import scoring  # noqa: E402


def max_difference(family, average):
    trainer = matrix._trainer(Path(tempfile.mkdtemp()), family, **({} if average else {"length_normalize": False}))
    encoded = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        chosen, rejected = trainer.compute_ref_log_probs(trainer.model, trainer.data_collator(encoded))
        expected, _ = matrix._independent(trainer.model.eval(), trainer.model, encoded, average)
    return (torch.stack([chosen, rejected], 1) - expected[:, :2]).abs().max().item(), trainer.model


def main():
    logging.set_verbosity_error()
    print("| family | model type | path | max diff, averaged | max diff, summed |")
    print("| --- | --- | --- | ---: | ---: |")
    for family in sys.argv[1:] or matrix.FAMILIES:
        averaged, model = max_difference(family, True)
        summed, _ = max_difference(family, False)
        refusal = scoring.packed_rows_refusal(model)
        path = "packed pair rows" if refusal is None else "two rows per pair"
        print(f"| {family} | {model.config.model_type} | {path} | {averaged:.1e} | {summed:.1e} |", flush=True)


if __name__ == "__main__":
    main()
