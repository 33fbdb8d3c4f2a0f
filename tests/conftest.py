import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIDPO_SHARED", REPO.parent / "shared"))


def shared_path(*parts) -> Path:
    """A file under ../shared, or skip the test with the reason when it is absent (fresh clone outside CI)."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"{p} is missing: this test needs ../shared (MiniMind test data) beside the checkout")
    return p


def write_tiny_assets(root: Path, pairs: int, data_seed: int, model_dir: str = "base") -> Path:
    """`root/model_dir`: the embedded tokenizer + tiny Llama; `root/dpo.jsonl`: MiniMind-format pairs."""
    from minidpo import embedded

    embedded.save_base_model(root / model_dir)
    embedded.write_jsonl(embedded.make_preference_records(pairs, seed=data_seed), root / "dpo.jsonl")
    return root
