"""Fixtures shared by several test files; plain helpers live in helpers.py."""

import os

import pytest

from helpers import write_tiny_assets


@pytest.fixture(scope="session", autouse=True)
def private_datasets_cache(tmp_path_factory):
    """minidpo's caches (prepared data, reference log-probs) and datasets' in folders of this session, inherited by
    the subprocesses tests start: no test reads what an earlier session left, none writes to the user's caches."""
    saved = {k: os.environ.get(k) for k in ("MINIDPO_CACHE", "HF_DATASETS_CACHE")}
    for key in saved:
        os.environ[key] = str(tmp_path_factory.mktemp(key.lower()))
    yield
    for key, old in saved.items():
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory):
    """A base model folder (`base`: tokenizer + tiny Llama) and 160 MiniMind-format pairs (`dpo.jsonl`) with a
    learnable preference. Read-only: tests that write put their outputs in their own tmp_path."""
    return write_tiny_assets(tmp_path_factory.mktemp("assets"), pairs=160, data_seed=1)


@pytest.fixture(scope="session")
def small_base(tmp_path_factory):
    """(folder, tokenizer): the embedded tokenizer and a 1-layer, 32-wide Llama saved together."""
    from minidpo import embedded

    d = tmp_path_factory.mktemp("small-base")
    tok = embedded.build_tokenizer(d)
    embedded.build_tiny_model(tok, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1,
                              intermediate_size=64).save_pretrained(d)
    return d, tok


@pytest.fixture(scope="session")
def converted(small_base, tmp_path_factory):
    """A `minidpo convert` directory of 96 pairs (about a quarter held out) from the embedded generator."""
    from minidpo import embedded
    from minidpo.convert import convert_file

    d = tmp_path_factory.mktemp("data")
    raw = embedded.write_jsonl(embedded.make_preference_records(96, seed=1), d / "dpo.jsonl")
    convert_file(raw, d / "conv", tokenizer=small_base[1], max_length=128, eval_fraction=0.25, seed=0,
                 progress=False)
    return d / "conv"


@pytest.fixture(scope="session")
def trained(small_base, converted, tmp_path_factory):
    """(output_dir, summary) of a 6-step train.py run on `converted`: evaluated and checkpointed every 3 steps."""
    from minidpo import train

    out = tmp_path_factory.mktemp("run") / "model"
    argv = ["--model_name_or_path", str(small_base[0]), "--dataset_name", str(converted), "--output_dir", str(out),
            "--max_steps", "6", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "64",
            "--learning_rate", "5e-3", "--logging_steps", "1", "--eval_strategy", "steps", "--eval_steps", "3",
            "--save_strategy", "steps", "--save_steps", "3", "--max_length", "128", "--report_to", "none",
            "--disable_tqdm", "true", "--dataloader_num_workers", "0", "--seed", "0"]
    summary = train.main(*train.parse(argv))
    return out, summary
