"""A stand-in Hugging Face Hub on 127.0.0.1 that records every request, for tests/test_hub.py.

It answers the endpoints huggingface_hub uses to create a repo and commit files (create, YAML validation,
preupload, NDJSON commit, repo info), with "regular" upload mode for every file so content travels inline in the
commit and no LFS/Xet storage is involved. Anything else gets a 404 and is recorded in `unknown`.
"""

import base64
import json
import re
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
