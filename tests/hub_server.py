"""A loopback Hugging Face Hub stand-in for push tests (test code only; never shipped).

Implements the endpoints the real huggingface_hub client calls to create a repo, commit (inline and LFS files),
read repo info and trees, and download files, storing everything in memory. Repos named in `gated` answer 403
GatedRepo; `fail_commits` makes every commit fail with a 500.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlparse

import yaml

LFS_THRESHOLD = 1_000_000


class HubState:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}      # repo -> {"files": {path: bytes}, "sha": str, "private": bool}
        self.blobs: dict[str, bytes] = {}     # sha256 -> bytes (LFS uploads)
        self.gated: set[str] = set()
        self.fail_commits = False
        self.commits = 0
        self.committed_with: dict[str, str] = {}  # repo -> the bearer token of its last commit (tests check whose)
        self.lock = threading.Lock()


def _sha1(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, *args) -> None:  # keep test output quiet
        pass

    # -- helpers -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head and body:
            self.wfile.write(body)

    def _json(self, status: int, obj, headers: dict | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _error(self, status: int, code: str, message: str, head: bool = False) -> None:
        self._send(status, b"" if head else json.dumps({"error": message}).encode(),
                   {"X-Error-Code": code, "X-Error-Message": message, "Content-Type": "application/json"}, head)

    def _body(self) -> bytes:
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def _repo(self, repo: str, head: bool = False):
        if repo in self.state.gated:
            self._error(403, "GatedRepo", f"Access to model {repo} is restricted.", head)
            return None
        entry = self.state.repos.get(repo)
        if entry is None:
            self._error(404, "RepoNotFound", f"Repository {repo} not found", head)
        return entry

    def _endpoint(self) -> str:
        return f"http://{self.headers['Host']}"

    # -- routes --------------------------------------------------------------------------------------------------
    def do_POST(self) -> None:
        path = unquote(urlparse(self.path).path)
        body = self._body()
        if path == "/api/repos/create":
            data = json.loads(body)
            repo = f"{data.get('organization') or 'user'}/{data['name']}"
            url = f"{self._endpoint()}/{repo}"
            with self.state.lock:
                if repo in self.state.repos:
                    return self._json(409, {"error": "exists", "url": url})
                self.state.repos[repo] = {"files": {}, "sha": _sha1(repo.encode()), "private":
                                          data.get("visibility") == "private"}
            return self._json(200, {"url": url})
        if path == "/api/validate-yaml":  # the client checks README.md metadata before committing it
            content = json.loads(body)["content"]
            match = re.match(r"^---\n(.*?)\n---\n", content, re.S)
            try:
                if match is None or not isinstance(yaml.safe_load(match[1]), dict):
                    raise yaml.YAMLError("no YAML mapping in the front matter")
            except yaml.YAMLError as error:
                return self._json(400, {"errors": [{"message": str(error)}], "warnings": []})
            return self._json(200, {"errors": [], "warnings": []})
        if m := re.fullmatch(r"/api/models/(.+?)/preupload/([^/]+)", path):
            if self._repo(m[1]) is None:
                return
            files = json.loads(body)["files"]
            return self._json(200, {"files": [{"path": f["path"], "shouldIgnore": False,
                                               "uploadMode": "lfs" if f["size"] > LFS_THRESHOLD else "regular"}
                                              for f in files]})
        if m := re.fullmatch(r"/(.+?)\.git/info/lfs/objects/batch", path):
            objects = []
            for obj in json.loads(body)["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"]}
                if obj["oid"] not in self.state.blobs:
                    entry["actions"] = {"upload": {"href": f"{self._endpoint()}/lfs-upload/{obj['oid']}"}}
                objects.append(entry)
            return self._json(200, {"transfer": "basic", "objects": objects})
        if m := re.fullmatch(r"/api/models/(.+?)/commit/([^/]+)", path):
            entry = self._repo(m[1])
            if entry is None:
                return
            if self.state.fail_commits:
                return self._error(500, "InternalError", "commit failed on purpose")
            files = dict(entry["files"])
            for line in body.decode().splitlines():
                if not line.strip():
                    continue
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    files[value["path"]] = self.state.blobs[value["oid"]]
                elif item["key"] == "deletedFile":
                    files.pop(value["path"], None)
            with self.state.lock:
                entry["files"] = files
                entry["sha"] = _sha1(entry["sha"].encode() + json.dumps(sorted(files)).encode())
                self.state.commits += 1
                self.state.committed_with[m[1]] = self.headers.get("Authorization", "").removeprefix("Bearer ")
            return self._json(200, {"commitOid": entry["sha"], "commitUrl": f"{self._endpoint()}/{m[1]}/commit/"
                                                                             f"{entry['sha']}"})
        self._error(404, "EntryNotFound", f"no route {path}")

    def do_PUT(self) -> None:
        path = urlparse(self.path).path
        body = self._body()
        if m := re.fullmatch(r"/lfs-upload/([0-9a-f]{64})", path):
            if hashlib.sha256(body).hexdigest() != m[1]:
                return self._error(400, "BadRequest", "sha256 mismatch")
            self.state.blobs[m[1]] = body
            return self._send(200)
        self._error(404, "EntryNotFound", f"no route {path}")

    def _resolve(self, head: bool) -> bool:
        path = unquote(urlparse(self.path).path)
        m = re.fullmatch(r"/(?:api/models/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if not m:
            return False
        entry = self._repo(m[1], head)
        if entry is None:
            return True
        if m[2] not in ("main", entry["sha"]):
            self._error(404, "RevisionNotFound", f"revision {m[2]} not found", head)
            return True
        data = entry["files"].get(m[3])
        if data is None:
            self._error(404, "EntryNotFound", f"{m[3]} not found", head)
            return True
        etag = hashlib.sha256(data).hexdigest() if len(data) > LFS_THRESHOLD else _sha1(data)
        self._send(200, data, {"X-Repo-Commit": entry["sha"], "ETag": f'"{etag}"',
                               "Content-Type": "application/octet-stream"}, head)
        return True

    def do_HEAD(self) -> None:
        if not self._resolve(head=True):
            self._error(404, "EntryNotFound", "not found", head=True)

    def do_GET(self) -> None:
        if self._resolve(head=False):
            return
        url = urlparse(self.path)
        path = unquote(url.path)
        if path == "/api/models":  # search: the public repos whose id contains the text
            text = parse_qs(url.query).get("search", [""])[0].lower()
            public = [repo for repo, entry in sorted(self.state.repos.items()) if not entry["private"]]
            found = [{"id": repo, "modelId": repo, "private": False} for repo in public if text in repo.lower()]
            return self._json(200, found)
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?", path):
            entry = self._repo(m[1])
            if entry is None:
                return
            return self._json(200, {"id": m[1], "modelId": m[1], "sha": entry["sha"], "private": entry["private"],
                                    "siblings": [{"rfilename": p} for p in sorted(entry["files"])]})
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(?:/.*)?", path):
            entry = self._repo(m[1])
            if entry is None:
                return
            tree = []
            for name, data in sorted(entry["files"].items()):
                item = {"type": "file", "path": name, "size": len(data), "oid": _sha1(data)}
                if len(data) > LFS_THRESHOLD:
                    item["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                tree.append(item)
            return self._json(200, tree)
        self._error(404, "EntryNotFound", f"no route {path}")


def start() -> tuple[ThreadingHTTPServer, HubState, str]:
    """Start the server on a free loopback port; return (server, state, endpoint URL)."""
    state = HubState()
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state, f"http://127.0.0.1:{server.server_address[1]}"
