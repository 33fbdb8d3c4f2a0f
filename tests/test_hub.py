"""Hub push, offline: train.py pushes to a stand-in Hub on 127.0.0.1 that records every request.

The stand-in answers the endpoints huggingface_hub uses to create a repo and commit files (create, YAML
validation, preupload, NDJSON commit, repo info), with "regular" upload mode for every file so content travels
inline in the commit and no LFS/Xet storage is involved. Anything else gets a 404 and fails the test.
"""

import base64
import json
import os
import re
import secrets
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from helpers import REPO, SUBPROCESS_TIMEOUT, write_tiny_assets

REPO_ID = "tester/minidpo-test"


class StandInHub:
    """A minimal Hub: records requests (method, path, headers, body) and keeps the committed files per repo."""

    def __init__(self):
        self.requests: list[dict] = []
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.commits: list[dict] = []  # {"repo", "revision", "summary", "files": {path: bytes}}
        self.unknown: list[str] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # keep the test output quiet
                pass

            def _body(self) -> bytes:
                n = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(n) if n else b""

            def _reply(self, status: int, obj) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                with hub.lock:
                    hub.requests.append({"method": self.command, "path": self.path,
                                         "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
                    status, obj = hub.route(self.command, self.path.split("?")[0], body)
                self._reply(status, obj)

            do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)  # port 0: a free port
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def route(self, method: str, path: str, body: bytes):
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/(.+)", path)
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            repo = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
            if repo in self.repos:
                return 409, {"error": "You already created this model repo"}
            self.repos[repo] = {"private": payload.get("visibility") == "private", "files": {}, "payload": payload}
            return 200, {"url": f"{self.url}/{repo}", "name": repo}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "GET" and path == "/api/whoami-v2":
            return 200, {"type": "user", "name": "tester", "orgs": [], "auth": {"type": "access_token"}}
        if m and m.group(1) not in self.repos:
            return 404, {"error": "Repository not found"}
        if method == "POST" and m and m.group(2) == "preupload":
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                                   for f in files]}
        if method == "POST" and m and m.group(2) == "commit":
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
            header = next(x["value"] for x in lines if x["key"] == "header")
            files = {}
            for x in lines:
                if x["key"] == "file":
                    assert x["value"]["encoding"] == "base64"
                    files[x["value"]["path"]] = base64.b64decode(x["value"]["content"])
                elif x["key"] != "header":
                    self.unknown.append(f"commit operation {x['key']}")
            self.repos[m.group(1)]["files"].update(files)
            oid = secrets.token_hex(20)
            self.commits.append({"repo": m.group(1), "revision": m.group(3), "summary": header["summary"],
                                 "files": files})
            return 200, {"commitUrl": f"{self.url}/{m.group(1)}/commit/{oid}", "commitOid": oid,
                         "pullRequestUrl": None}
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/.+)?", path)
        if method == "GET" and m and m.group(1) in self.repos:
            repo = self.repos[m.group(1)]
            return 200, {"id": m.group(1), "modelId": m.group(1), "sha": "0" * 40, "private": repo["private"],
                         "siblings": [{"rfilename": p} for p in sorted(repo["files"])]}
        self.unknown.append(f"{method} {path}")
        return 404, {"error": f"stand-in Hub: no route for {method} {path}"}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


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
