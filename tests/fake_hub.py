"""A stand-in for the Hugging Face Hub's HTTP API on 127.0.0.1, for the publish tests.

It answers what huggingface_hub's whoami, create_repo, create_branch, repo_info and upload_folder
(without Xet: HF_HUB_DISABLE_XET=1) send -- repo create, branch, revision info, YAML validation,
preupload, the LFS batch API with its upload and verify, and the NDJSON commit -- keeps every
commit's tree, and records every request so tests can assert on what went over the wire.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_MIN_BYTES = 1_000_000  # the real Hub stores big and binary files in LFS; here, big ones
LFS_SUFFIXES = (".safetensors", ".gguf", ".png", ".bin")


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Commit:
    sha: str
    message: str
    description: str
    files: dict[str, bytes]


@dataclass
class Repo:
    owner: str
    private: bool
    branches: dict[str, list[Commit]] = field(default_factory=dict)

    def head(self, branch: str) -> Commit:
        return self.branches[branch][-1]


class FakeHub:
    def __init__(self, tokens: dict[str, str], orgs: dict[str, list[str]] | None = None):
        self.tokens = tokens  # token -> user name
        self.orgs = orgs or {}  # user name -> organizations
        self.read_only: set[str] = set()  # tokens whose role is "read"
        self.repos: dict[str, Repo] = {}
        self.lfs: dict[str, bytes] = {}
        self.requests: list[Request] = []
        self.reject_commits: str | None = None  # a message: commits fail with 400 (a rejected push)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def add_repo(self, repo_id: str, owner: str, private: bool = False, files: dict[str, bytes] | None = None) -> None:
        repo = Repo(owner=owner, private=private)
        repo.branches["main"] = [Commit(_sha(repo_id.encode()), "initial commit", "", dict(files or {}))]
        self.repos[repo_id] = repo

    # --- the API -------------------------------------------------------------------------------

    def handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, dict, dict]:
        """(status, JSON body, extra headers)"""
        token = headers.get("authorization", "").removeprefix("Bearer ")
        user = self.tokens.get(token)
        if path == "/api/whoami-v2" and method == "GET":
            return self._whoami(user, token in self.read_only)
        routes = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml", lambda user, body: (200, {"errors": [], "warnings": []}, {})),
            ("GET", r"/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>.+)", self._revision),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self._branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/lfs/verify", self._lfs_verify),
        ]
        for route_method, pattern, handler in routes:
            match = re.fullmatch(pattern, path)
            if match and method == route_method:
                args = {k: unquote(v) for k, v in match.groupdict().items()}
                with self._lock:
                    return handler(user, body, **args)
        return 404, {"error": f"fake hub: no route {method} {path}"}, {}

    def _whoami(self, user, read_only: bool):
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        role = "read" if read_only else "write"
        orgs = [{"name": org, "type": "org"} for org in self.orgs.get(user, [])]
        return 200, {"type": "user", "name": user, "orgs": orgs, "auth": {"accessToken": {"role": role}}}, {}

    def _create_repo(self, user, body):
        if user is None:
            return 401, {"error": "Invalid credentials in Authorization header"}, {}
        payload = json.loads(body)
        owner = payload.get("organization") or user
        repo_id = f"{owner}/{payload['name']}"
        if owner != user and owner not in self.orgs.get(user, []):
            return 403, {"error": f'You don\'t have the rights to create a model under the namespace "{owner}"'}, {}
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        self.add_repo(repo_id, owner, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    def _readable(self, user, repo_id: str):
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and not self._may_write(user, repo)):
            return None
        return repo

    def _may_write(self, user, repo: Repo) -> bool:
        return user is not None and (repo.owner == user or repo.owner in self.orgs.get(user, []))

    def _revision(self, user, body, repo, rev):
        found = self._readable(user, repo)
        if found is None:
            return 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"}
        if rev not in found.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
        head = found.head(rev)
        siblings = [{"rfilename": name} for name in sorted(head.files)]
        return 200, {"id": repo, "sha": head.sha, "private": found.private, "siblings": siblings}, {}

    def _writable(self, user, repo_id: str):
        """(repo, None) or (None, error response)"""
        if user is None:
            return None, (401, {"error": "Invalid credentials in Authorization header"}, {})
        repo = self._readable(user, repo_id)
        if repo is None:
            return None, (404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
        if not self._may_write(user, repo):
            return None, (403, {"error": f"You don't have write access to {repo_id}"}, {})
        return repo, None

    def _branch(self, user, body, repo, rev):
        found, error = self._writable(user, repo)
        if error:
            return error
        if rev in found.branches:
            return 409, {"error": f"Reference already exists: {rev}"}, {}
        found.branches[rev] = [found.head("main")]
        return 200, {}, {}

    def _preupload(self, user, body, repo, rev):
        found, error = self._writable(user, repo)
        if error:
            return error
        if rev not in found.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
        head = found.head(rev).files
        files = []
        for entry in json.loads(body)["files"]:
            lfs = entry["size"] >= LFS_MIN_BYTES or entry["path"].endswith(LFS_SUFFIXES)
            existing = head.get(entry["path"])
            oid = None
            if existing is not None:
                oid = hashlib.sha256(existing).hexdigest() if lfs else _git_hash(existing)
            files.append(
                {"path": entry["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        return 200, {"files": files, "commitOid": found.head(rev).sha}, {}

    def _lfs_batch(self, user, body, repo):
        found, error = self._writable(user, repo)
        if error:
            return error
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.lfs:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs/{obj['oid']}"},
                    "verify": {"href": f"{self.url}/lfs/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _lfs_put(self, user, body, oid):
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": "sha256 mismatch"}, {}
        self.lfs[oid] = body
        return 200, {}, {}

    def _lfs_verify(self, user, body):
        obj = json.loads(body)
        ok = obj["oid"] in self.lfs and len(self.lfs[obj["oid"]]) == obj["size"]
        return (200, {}, {}) if ok else (404, {"error": "object not found"}, {})

    def _commit(self, user, body, repo, rev):
        found, error = self._writable(user, repo)
        if error:
            return error
        if self.reject_commits:
            return 400, {"error": self.reject_commits}, {}
        if rev not in found.branches:
            return 404, {"error": f"Invalid rev id: {rev}"}, {"X-Error-Code": "RevisionNotFound"}
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = dict(found.head(rev).files)
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs:
                    return 422, {"error": f"LFS object {value['oid']} was never uploaded"}, {}
                files[value["path"]] = self.lfs[value["oid"]]
            elif line["key"] == "deletedFile":
                files.pop(value["path"], None)
        sha = _sha(json.dumps([found.head(rev).sha, header["summary"], sorted(files)]).encode())
        found.branches[rev].append(Commit(sha, header["summary"], header.get("description", ""), files))
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None}, {}


def _sha(data: bytes) -> str:
    return hashlib.sha1(data).hexdigest()


def _git_hash(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            body = self._body()
            headers = {k.lower(): v for k, v in self.headers.items()}
            path = urlsplit(self.path).path
            hub.requests.append(Request(self.command, path, headers, body))
            status, payload, extra = hub.handle(self.command, path, headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in extra.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while True:
                    size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                    if size == 0:
                        self.rfile.readline()
                        return b"".join(chunks)
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, *args) -> None:  # quiet: the tests read hub.requests
            pass

    return Handler
