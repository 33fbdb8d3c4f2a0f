"""Helpers the test files share: paths, tiny offline assets, subprocess environments and the one-line-error check.

Independent references live in references.py, preference records and their Hypothesis strategies in records_data.py,
the stand-in Hub in fake_hub.py.

Nothing here imports minidpo at module level, so a test file's own imports decide what it loads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MINIDPO_SHARED", REPO.parent / "shared"))
# What the repository ships itself (the MiniMind2 tokenizer, Apache-2.0, see its NOTICE), laid out as ../shared is,
# so a test that needs only that reads it on a fresh clone, and on the GPU machine, where ../shared does not travel.
SHIPPED = REPO / "scripts" / "assets"
TRAIN_PY = REPO / "minidpo" / "train.py"
# Hang guard of a subprocess (a training launch, a bench run): each takes seconds to a minute on 2 idle cores, and
# must not fail only because the machine is busy (load 8 on 2 cores is 4x slower), so ten times that and more.
SUBPROCESS_TIMEOUT = 900
PNG = b"\x89PNG\r\n\x1a\n"


def shared_path(*parts) -> Path:
    """A file the repository ships under scripts/assets/, else one under ../shared, else skip the test with the
    reason (a fresh clone outside CI has no ../shared)."""
    if SHIPPED.joinpath(*parts).exists():
        return SHIPPED.joinpath(*parts)
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


def save_small_model(path: Path, tokenizer_edit=None, vocab_size=None) -> Path:
    """The embedded tokenizer beside a 1-layer, 32-wide Llama in one folder; `tokenizer_edit(tok)` alters the
    tokenizer before saving, `vocab_size` resizes the model's embedding."""
    from minidpo import embedded

    tok = embedded.build_tokenizer()
    if tokenizer_edit:
        tokenizer_edit(tok)
    model = embedded.build_tiny_model(embedded.build_tokenizer(), hidden_size=32, num_layers=1, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64)
    if vocab_size:
        model.resize_token_embeddings(vocab_size)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def is_png(path) -> bool:
    """A PNG file with a picture in it (an empty figure is under 2 kB)."""
    return path.is_file() and path.read_bytes()[:8] == PNG and path.stat().st_size > 2000


def subprocess_env(tmp_path: Path | None = None, threads: int | None = None) -> dict:
    """The environment of a minidpo subprocess: offline, the checkout importable, no user-level accelerate config,
    and with `tmp_path` a private HF_HOME."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               HF_HUB_DISABLE_TELEMETRY="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               HF_DATASETS_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("ACCELERATE_CONFIG_FILE", None)
    if tmp_path is not None:
        env["HF_HOME"] = str(tmp_path / "hf-home")
    if threads is not None:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def read_jsonl(path) -> list:
    # Split on "\n" only: contents may hold U+0085/U+2028, which str.splitlines() would also split on.
    return [json.loads(x) for x in Path(path).read_bytes().decode("utf-8").split("\n") if x]


def assert_one_line_error(stderr: str, *needles: str) -> str:
    """stderr ends with exactly one `error:` line, no traceback, holding every needle; returns that line."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, stderr
    assert stderr.rstrip().splitlines()[-1] == errors[0], "the error must be the last thing printed"
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# Preference records and input files
