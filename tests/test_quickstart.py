"""`minidpo quickstart`: the whole pipeline on the embedded default, offline, reaching the promised accuracy."""

import json
from pathlib import Path

import pytest

from minidpo.commands.quickstart import quickstart


@pytest.mark.slow
def test_quickstart_reaches_accuracy_and_writes_what_it_promises(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    out = tmp_path / "qs"
    result = quickstart(output=str(out))
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["eval_rewards/accuracies"] >= 0.9, summary
    assert summary["eval_pairs"] > 0 and summary["paths"] == result["paths"]
    for name, path in summary["paths"].items():
        assert Path(path).exists(), f"{name}: {path} promised but missing"
    model = out / "model"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "README.md", "summary.json"):
        assert (model / name).is_file(), name
    assert (out / "data" / "train.jsonl").is_file() and (out / "data" / "eval.jsonl").is_file()
