"""Hub push, offline: train.py pushes to a stand-in Hub on 127.0.0.1 that records every request (tests/fake_hub.py).
Anything the stand-in does not know gets a 404 and fails the test.
"""

import json
import os
import secrets
import subprocess
import sys

import pytest
import yaml

from fake_hub import StandInHub
from helpers import REPO, SUBPROCESS_TIMEOUT, write_tiny_assets

REPO_ID = "tester/minidpo-test"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub-assets")
    return write_tiny_assets(root, pairs=64, data_seed=2)


def test_push_to_hub_commits_weights_tokenizer_and_card_without_leaking_the_token(assets, tmp_path):
    token = "hf_" + secrets.token_hex(16)
    out = tmp_path / "out"
    cfg = {
        "model_name_or_path": str(assets / "base"), "dataset_name": str(assets / "dpo.jsonl"),
        "output_dir": str(out), "eval_fraction": 0.25,
        "max_steps": 4, "per_device_train_batch_size": 8, "max_length": 96, "learning_rate": 5.0e-3,
        "logging_steps": 2, "save_strategy": "steps", "save_steps": 2, "report_to": "none", "disable_tqdm": True,
        "push_to_hub": True, "hub_model_id": REPO_ID, "hub_strategy": "checkpoint", "hub_private_repo": True,
    }
    (tmp_path / "push.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")

    with StandInHub() as hub:
        env = dict(os.environ)
        for key in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            env.pop(key, None)
        env.update(HF_ENDPOINT=hub.url, HF_TOKEN=token, HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
                   HF_HOME=str(tmp_path / "hf-home"), HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                   NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        proc = subprocess.run([sys.executable, "minidpo/train.py", "--config", str(tmp_path / "push.yaml")],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT)
        requests = list(hub.requests)

    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert not hub.unknown, f"requests the stand-in does not know: {hub.unknown}"

    # The repo was created, private.
    creates = [r for r in requests if r["path"] == "/api/repos/create"]
    assert creates, [r["path"] for r in requests]
    payload = json.loads(creates[0]["body"])
    assert (payload["organization"], payload["name"], payload["visibility"]) == ("tester", "minidpo-test", "private")
    assert payload.get("type", "model") == "model"
    assert hub.repos[REPO_ID]["private"]

    # Checkpoint pushes during training (hub_strategy=checkpoint) and the final push.
    assert hub.commits and all(c["repo"] == REPO_ID for c in hub.commits)
    assert any(p.startswith("last-checkpoint/") for c in hub.commits for p in c["files"]), \
        [sorted(c["files"]) for c in hub.commits]
    final = hub.commits[-1]
    assert final["summary"] == "End of training"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert name in final["files"], f"{name} not in the final commit: {sorted(final['files'])}"
    assert final["files"]["model.safetensors"] == (out / "model.safetensors").read_bytes()
    card = final["files"]["README.md"].decode("utf-8")
    assert "## minidpo" in card, "the pushed model card lost minidpo's data/config/metrics sections"
    # Checkpoint pushes carry the card of their step, minidpo's sections included (create_model_card override).
    checkpoint_cards = [c["files"]["README.md"].decode("utf-8") for c in hub.commits[:-1] if "README.md" in c["files"]]
    assert checkpoint_cards and all(c.count("## minidpo") == 1 for c in checkpoint_cards)

    # The token went in the Authorization header of every request, and nowhere else.
    api = [r for r in requests if r["path"].startswith("/api/")]
    assert api and all(r["headers"].get("authorization") == f"Bearer {token}" for r in api), \
        [(r["path"], r["headers"].get("authorization", "")[:10]) for r in api]
    assert token not in log
    leaked = [str(p) for p in out.rglob("*") if p.is_file() and token.encode() in p.read_bytes()]
    assert not leaked, f"token written to {leaked}"
    pushed = [p for c in hub.commits for p, data in c["files"].items() if token.encode() in data]
    assert not pushed, f"token pushed in {pushed}"
