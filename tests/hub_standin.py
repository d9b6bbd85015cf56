"""A local stand-in for the few Hugging Face hub endpoints a push calls, for tests without network.

``HubStandIn()`` serves on 127.0.0.1 (a free port) in a thread; point ``HF_ENDPOINT`` (a subprocess) or
``HfApi(endpoint=...)`` at ``stand_in.url``. It implements, as huggingface_hub's client expects them:

* ``GET /api/agent-harnesses``: a registry the client reads for its user-agent string (answered empty);
* ``POST /api/repos/create``: records the repository (name, organization, visibility);
* ``POST /api/validate-yaml``: the client checks a README.md's metadata before committing it; the stand-in
  parses the front matter and checks the shape of ``model-index`` as the hub documents it (400 otherwise);
* ``POST /api/models/{repo}/preupload/{revision}``: answers "regular" for every file, so file contents arrive
  inline in the commit (the real hub sends large files to its LFS/Xet storage instead);
* ``POST /api/models/{repo}/commit/{revision}``: reads the NDJSON commit and stores the files.

Every request must carry ``Authorization: Bearer <token>``; a wrong token gets 401 as from the hub. Any other
request is answered 404 and listed in ``unexpected`` so that a test can fail on it.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml


class HubStandIn:
    def __init__(self, token: str = "hf_standin_token") -> None:
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}  # repo id -> create payload
        self.files: dict[str, dict[str, bytes]] = {}  # repo id -> path -> content
        self.commits: list[dict[str, Any]] = []  # {"repo", "revision", "summary", "paths"}
        self.unexpected: list[str] = []
        self.requests: list[str] = []
        self.validated: list[str] = []  # README.md contents checked by /api/validate-yaml
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> HubStandIn:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self) -> None:
                hub.requests.append(f"GET {self.path}")
                if self.path == "/api/agent-harnesses":
                    self._reply(200, {"standardEnvVars": [], "harnesses": {}})
                    return
                hub.unexpected.append(f"GET {self.path}")
                self._reply(404, {"error": "not implemented by the stand-in"})

            def do_POST(self) -> None:
                hub.requests.append(f"POST {self.path}")
                body = self._body()
                if self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return
                path = self.path.split("?")[0]
                if path == "/api/validate-yaml":
                    content = json.loads(body)["content"]
                    hub.validated.append(content)
                    errors = metadata_errors(content)
                    self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
                    return
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo = f"{payload['organization']}/{payload['name']}"
                    hub.repos[repo] = payload
                    hub.files.setdefault(repo, {})
                    self._reply(200, {"url": f"{hub.url}/{repo}", "name": repo})
                    return
                match = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
                if match is None or match.group(1) not in hub.repos:
                    hub.unexpected.append(f"POST {self.path}")
                    self._reply(404, {"error": "Repository not found"})
                    return
                repo, kind, revision = match.groups()
                if kind == "preupload":
                    files = json.loads(body)["files"]
                    self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                 "oid": None} for f in files]})
                    return
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(item["value"] for item in lines if item["key"] == "header")
                paths = []
                for item in lines:
                    if item["key"] == "file":
                        value = item["value"]
                        assert value["encoding"] == "base64", value["encoding"]
                        hub.files[repo][value["path"]] = base64.b64decode(value["content"])
                        paths.append(value["path"])
                    elif item["key"] != "header":
                        hub.unexpected.append(f"commit item {item['key']}")
                oid = f"{len(hub.commits) + 1:040x}"
                hub.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "paths": paths})
                self._reply(200, {"commitUrl": f"{hub.url}/{repo}/commit/{oid}", "commitOid": oid, "success": True,
                                  "pullRequestUrl": None})

        return Handler


def metadata_errors(readme: str) -> list[str]:
    """What is wrong with a README.md's YAML front matter: it must be a mapping; a ``model-index`` entry needs
    a name and results with task.type, dataset.name/type and metrics with type and a numeric value."""
    if not readme.startswith("---\n") or "\n---\n" not in readme[4:]:
        return ["no YAML front matter (--- ... ---) at the top"]
    try:
        meta = yaml.safe_load(readme[4:readme.index("\n---\n", 4)])
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if not isinstance(meta, Mapping):
        return ["the front matter is not a mapping"]
    errors = []
    for entry in meta.get("model-index") or []:
        if not entry.get("name"):
            errors.append("model-index entry without a name")
        for result in entry.get("results") or []:
            if not (result.get("task") or {}).get("type"):
                errors.append("model-index result without task.type")
            dataset = result.get("dataset") or {}
            if not (dataset.get("name") and dataset.get("type")):
                errors.append("model-index result without dataset.name and dataset.type")
            for metric in result.get("metrics") or []:
                if not metric.get("type") or not isinstance(metric.get("value"), (int, float)):
                    errors.append(f"model-index metric without a type or a numeric value: {metric}")
    return errors
