"""A Hugging Face Hub-protocol server for the tests: the subset of the Hub API that the real huggingface_hub
client (2.x) uses to create repos, commit (preupload, LFS batch + PUT + verify, NDJSON commit), tag, branch,
list refs and trees, report repo/revision info, validate card YAML and download (resolve HEAD/GET with
X-Repo-Commit, ETag, X-Linked-Etag, X-Linked-Size, Range). Errors carry X-Error-Code (RepoNotFound,
RevisionNotFound, EntryNotFound, GatedRepo) and X-Error-Message as the real Hub does, because the client
decides the exception class from those headers.

Started by the tests on 127.0.0.1 on a random port (stdlib ThreadingHTTPServer, HTTP/1.1 keep-alive). LFS
blobs live on disk under ``root``; everything else in memory. Hooks for hostile-server tests:
``inject_commit`` (arbitrary file names, e.g. ``../escape``), ``corrupt_blob`` and ``hostile``, a dict read on
every request:

* ``hostile["sha"]``: the commit id repo info answers, whatever the revision (any JSON value: ``"../.."``);
* ``hostile["tree"]``: {path: {field: value}} merged into (or added to) the tree listing's entries;
* ``hostile["download"]``: {path: {"length": Content-Length to announce (None: none, the body runs until the
  connection closes), "body": bytes to send instead, "repeat": how many times to send body, "hang_up": close
  the connection after sending}}; ``hostile_sent`` counts the body bytes actually sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
LFS_THRESHOLD = 10 * 1024 * 1024
GITATTRIBUTES = (
    b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
)
POINTER_SIZE = 134


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    size: int
    oid: str  # git blob id (for LFS files: of the pointer, as the Hub reports it)
    sha256: str | None = None  # LFS files only
    data: bytes | None = None  # regular files only


@dataclass
class Commit:
    sha: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    owner: str
    private: bool = False
    gated: bool = False
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    created: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()))

    def resolve(self, rev: str) -> str | None:
        if rev in self.branches:
            return self.branches[rev]
        if rev in self.tags:
            return self.tags[rev]
        return rev if rev in self.commits else None


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class HubServer:
    """``with HubServer(root, tokens={"hf_x": ("alice", True)}) as hub: hub.url``; tokens map to (user, can
    write). Every request is appended to ``requests`` as (method, path)."""

    def __init__(
        self, root: str | os.PathLike[str], tokens: dict[str, tuple[str, bool]] | None = None
    ) -> None:
        self.root = Path(root)
        (self.root / "lfs").mkdir(parents=True, exist_ok=True)
        (self.root / "incoming").mkdir(parents=True, exist_ok=True)
        self.tokens = dict(tokens or {})
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []
        self.hostile: dict[str, Any] = {}
        self.hostile_sent = 0
        self.lock = threading.RLock()
        self._counter = 0
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------
    def start(self) -> HubServer:
        self._thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- state -----------------------------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "lfs" / sha256

    def _new_sha(self, *parts: object) -> str:
        self._counter += 1
        return hashlib.sha1(json.dumps([self._counter, *map(str, parts)]).encode()).hexdigest()

    def commit(self, repo: Repo, branch: str, files: dict[str, Blob], message: str) -> str:
        with self.lock:
            parent = repo.branches.get(branch)
            sha = self._new_sha(repo.repo_id, parent, message, sorted((p, b.oid) for p, b in files.items()))
            repo.commits[sha] = Commit(sha, parent, message, files)
            repo.branches[branch] = sha
            return sha

    def create(self, repo_id: str, owner: str, *, private: bool = False, gated: bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, owner, private=private, gated=gated)
            self.repos[repo_id] = repo
            self.commit(
                repo,
                "main",
                {".gitattributes": Blob(len(GITATTRIBUTES), git_oid(GITATTRIBUTES), data=GITATTRIBUTES)},
                "initial commit",
            )
            return repo

    def inject_commit(
        self, repo_id: str, files: dict[str, bytes], message: str = "injected", branch: str = "main"
    ) -> str:
        """A commit the real Hub would refuse (any names: '../x', '/abs'); regular files, on ``branch``."""
        repo = self.repos[repo_id]
        with self.lock:
            head = dict(repo.commits[repo.branches[branch]].files)
            for name, data in files.items():
                head[name] = Blob(len(data), git_oid(data), data=data)
            return self.commit(repo, branch, head, message)

    def corrupt_blob(self, sha256: str) -> None:
        """Flip one byte near the end of a stored LFS blob (inside the tensor data)."""
        path = self.blob_path(sha256)
        data = bytearray(path.read_bytes())
        data[-3] ^= 0xFF
        path.write_bytes(bytes(data))


# --- request handling ---------------------------------------------------------------------------------------


def _handler_for(hub: HubServer) -> type[BaseHTTPRequestHandler]:
    class Handler(_Handler):
        server_hub = hub

    return Handler


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_hub: HubServer

    def log_message(self, format: str, *args: Any) -> None:  # keep pytest output clean
        pass

    # -- plumbing --------------------------------------------------------------------------------------------
    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _iter_body(self) -> Any:
        """The request body in pieces (uploads are streamed to disk, never held in memory)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return
                yield from self._read_exactly(size)
                self.rfile.readline()
        else:
            yield from self._read_exactly(int(self.headers.get("Content-Length") or 0))

    def _read_exactly(self, size: int) -> Any:
        """``size`` bytes of the body in pieces of at most 1 MiB (fewer if the client hangs up)."""
        left = size
        while left:
            piece = self.rfile.read(min(left, 1 << 20))
            if not piece:
                return
            left -= len(piece)
            yield piece

    def _json_body(self) -> Any:
        raw = self._read_body()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "body is not JSON") from None

    def _send(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _send_json(self, obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode(), headers)

    def _fail(self, err: HubError) -> None:
        # the request body may be unread: close the connection rather than misparse it as the next request
        self.close_connection = True
        headers = {"X-Error-Message": err.message, "Connection": "close"}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_json({"error": err.message}, err.status, headers)

    def _user(self) -> tuple[str, bool] | None:
        """(user, can write) for a valid token, None without one; a token that is not valid is a 401."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        if token not in self.server_hub.tokens:
            raise HubError(401, "Invalid credentials in Authorization header")
        return self.server_hub.tokens[token]

    def _writer(self, repo_id: str | None = None) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, "You must be authenticated to write")
        if not user[1]:
            token = (self.headers.get("Authorization") or "").removeprefix("Bearer ").strip()
            # a careless server echoing the token back: clients must never print it
            raise HubError(403, f"token {token} has read access only and cannot write to {repo_id}")
        return user[0]

    def _repo(self, repo_id: str, *, read_files: bool = False) -> Repo:
        user = self._user()
        repo = self.server_hub.repos.get(repo_id)
        if repo is None or (repo.private and (user is None or user[0] != repo.owner)):
            raise HubError(401 if user is None else 404, "Repository not found", "RepoNotFound")
        if read_files and repo.gated and (user is None or user[0] != repo.owner):
            raise HubError(
                403, f"Access to model {repo_id} is restricted. You must have access to it.", "GatedRepo"
            )
        return repo

    def _commit_of(self, repo: Repo, rev: str) -> Commit:
        sha = repo.resolve(rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return repo.commits[sha]

    def _dispatch(self) -> None:
        hub = self.server_hub
        split = urlsplit(self.path)
        hub.requests.append((self.command, split.path))
        segs = [unquote(s) for s in split.path.split("/")[1:]]
        query = parse_qs(split.query)
        method = self.command
        try:
            if segs[:2] == ["api", "repos"] and segs[2:] == ["create"] and method == "POST":
                return self._create_repo()
            if segs[:2] == ["api", "validate-yaml"] and method == "POST":
                return self._validate_yaml()
            if segs[:2] == ["api", "models"] and len(segs) >= 4:
                repo_id, rest = f"{segs[2]}/{segs[3]}", segs[4:]
                return self._model_api(repo_id, rest, method, query)
            if segs[:1] == ["lfs-upload"] and method == "PUT":
                return self._lfs_put(segs[1])
            if segs[:1] == ["lfs-verify"] and method == "POST":
                return self._lfs_verify()
            if (
                len(segs) >= 5
                and segs[1].endswith(".git")
                and segs[2:] == ["info", "lfs", "objects", "batch"]
            ):
                return self._lfs_batch(f"{segs[0]}/{segs[1][:-4]}")
            if len(segs) >= 5 and segs[2] == "resolve" and method in ("GET", "HEAD"):
                return self._resolve(f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
            raise HubError(404, f"no route for {method} {split.path}")
        except HubError as err:
            self._fail(err)

    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_HEAD = do_GET

    # -- API -------------------------------------------------------------------------------------------------
    def _create_repo(self) -> None:
        body = self._json_body()
        owner = self._writer()
        org, name = body.get("organization") or owner, body.get("name")
        if not name or not re.match(r"^[\w.-]+$", name):
            raise HubError(400, "invalid repo name")
        repo_id = f"{org}/{name}"
        url = f"{self.server_hub.url}/{repo_id}"
        with self.server_hub.lock:
            if repo_id in self.server_hub.repos:
                return self._send_json({"error": "You already created this model repo", "url": url}, 409)
            self.server_hub.create(
                repo_id, owner, private=body.get("visibility") == "private" or bool(body.get("private"))
            )
        self._send_json({"url": url, "name": repo_id, "id": repo_id})

    def _validate_yaml(self) -> None:
        body = self._json_body()
        content = body.get("content", "")
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        errors = []
        if match:
            try:
                data = yaml.safe_load(match.group(1))
            except yaml.YAMLError as exc:
                data, errors = {}, [{"message": f"invalid YAML: {exc}"}]
            if not isinstance(data, dict):
                errors.append({"message": "metadata must be a mapping"})
            else:
                for key in ("license", "library_name", "pipeline_tag", "base_model_relation"):
                    if key in data and not isinstance(data[key], str):
                        errors.append({"message": f"{key} must be a string"})
                if "tags" in data and not (
                    isinstance(data["tags"], list) and all(isinstance(t, str) for t in data["tags"])
                ):
                    errors.append({"message": "tags must be a list of strings"})
                if data.get("base_model_relation") not in (None, "adapter", "merge", "quantized", "finetune"):
                    errors.append({"message": "base_model_relation is not a known relation"})
                if "base_model_relation" in data and not data.get("base_model"):
                    errors.append({"message": "base_model_relation needs base_model"})
        self._send_json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def _model_api(self, repo_id: str, rest: list[str], method: str, query: dict[str, list[str]]) -> None:
        hub = self.server_hub
        if method == "GET" and (not rest or rest[0] == "revision"):
            repo = self._repo(repo_id)
            commit = self._commit_of(repo, rest[1] if rest else "main")
            return self._send_json(self._info(repo, commit))
        if method == "GET" and rest[:1] == ["tree"]:
            repo = self._repo(repo_id, read_files=True)
            commit = self._commit_of(repo, rest[1])
            prefix = "/".join(rest[2:])
            entries = [
                self._tree_entry(path, blob)
                for path, blob in sorted(commit.files.items())
                if not prefix or path.startswith(prefix + "/")
            ]
            for path, fields in hub.hostile.get("tree", {}).items():
                found = [e for e in entries if e["path"] == path]
                if found:
                    found[0].update(fields)
                else:
                    entries.append({"type": "file", "path": path, **fields})
            return self._send_json(entries)
        if method == "GET" and rest == ["refs"]:
            repo = self._repo(repo_id)

            def refs(kind: str, items: dict[str, str]) -> list[dict[str, str]]:
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c}
                    for n, c in sorted(items.items())
                ]

            return self._send_json(
                {"branches": refs("heads", repo.branches), "tags": refs("tags", repo.tags), "converts": []}
            )
        if method != "POST" or len(rest) < 2:
            raise HubError(404, "unknown model API route")
        body_reader = self._read_body if rest[0] == "commit" else self._json_body
        body = body_reader()
        self._writer(repo_id)
        repo = self._repo(repo_id)
        action, rev = rest[0], rest[1]
        with hub.lock:
            if action == "preupload":
                commit = self._commit_of(repo, rev)
                files = []
                for f in body.get("files", []):
                    lfs = f["path"].endswith(LFS_SUFFIXES) or int(f.get("size", 0)) >= LFS_THRESHOLD
                    existing = commit.files.get(f["path"])
                    oid = None if existing is None else (existing.sha256 or existing.oid)
                    files.append(
                        {
                            "path": f["path"],
                            "uploadMode": "lfs" if lfs else "regular",
                            "shouldIgnore": False,
                            "oid": oid,
                        }
                    )
                return self._send_json({"files": files, "commitOid": commit.sha})
            if action == "commit":
                return self._commit(repo, rev, body)
            if action == "tag":
                target = self._commit_of(repo, rev)
                tag = body.get("tag")
                if not tag:
                    raise HubError(400, "tag is required")
                if tag in repo.tags or tag in repo.branches:
                    raise HubError(409, "Tag already exists")
                repo.tags[tag] = target.sha
                return self._send_json({"name": tag})
            if action == "branch":
                if rev in repo.branches:
                    raise HubError(409, "Reference already exists")
                start = self._commit_of(repo, body.get("startingPoint") or "main")
                repo.branches[rev] = start.sha
                return self._send_json({"name": rev})
        raise HubError(404, "unknown model API route")

    def _info(self, repo: Repo, commit: Commit) -> dict[str, Any]:
        card = None
        readme = commit.files.get("README.md")
        if readme is not None and readme.data:
            m = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.data.decode("utf-8", "replace"), re.S)
            if m:
                try:
                    card = yaml.safe_load(m.group(1))
                except yaml.YAMLError:
                    card = None
        return {
            "_id": repo.repo_id,
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.owner,
            "sha": self.server_hub.hostile.get("sha", commit.sha),
            "lastModified": repo.created,
            "createdAt": repo.created,
            "private": repo.private,
            "gated": "auto" if repo.gated else False,
            "disabled": False,
            "tags": (card or {}).get("tags", []) if isinstance(card, dict) else [],
            "cardData": card if isinstance(card, dict) else None,
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }

    @staticmethod
    def _tree_entry(path: str, blob: Blob) -> dict[str, Any]:
        entry: dict[str, Any] = {"type": "file", "oid": blob.oid, "size": blob.size, "path": path}
        if blob.sha256:
            entry["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": POINTER_SIZE}
        return entry

    def _commit(self, repo: Repo, rev: str, raw: bytes) -> None:
        hub = self.server_hub
        if "application/x-ndjson" not in (self.headers.get("Content-Type") or ""):
            raise HubError(400, "commit payload must be application/x-ndjson")
        if rev not in repo.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.commits[repo.branches[rev]]
        files, summary = dict(head.files), ""
        for line in raw.splitlines():
            if not line.strip():
                continue
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                summary = value.get("summary", "")
                parent = value.get("parentCommit")
                if parent and parent != head.sha:
                    raise HubError(412, "A commit has happened since. Please refresh and try again.")
            elif key == "file":
                data = base64.b64decode(value["content"])
                files[value["path"]] = Blob(len(data), git_oid(data), data=data)
            elif key == "lfsFile":
                path, oid, size = value["path"], value["oid"], int(value["size"])
                blob = hub.blob_path(oid)
                if not blob.exists() or blob.stat().st_size != size:
                    raise HubError(422, f"LFS object {oid} was not uploaded")
                pointer = (
                    f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()
                )
                files[path] = Blob(size, git_oid(pointer), sha256=oid)
            elif key in ("deletedFile", "deletedFolder"):
                files = {
                    p: b for p, b in files.items() if p != value["path"] and not p.startswith(value["path"])
                }
            else:
                raise HubError(400, f"unknown commit operation {key!r}")
        if not summary:
            raise HubError(400, "commit summary is required")
        sha = hub.commit(repo, rev, files, summary)
        self._send_json(
            {
                "success": True,
                "commitOid": sha,
                "commitUrl": f"{hub.url}/{repo.repo_id}/commit/{sha}",
                "commitMessage": summary,
                "hookOutput": "",
            }
        )

    # -- LFS -------------------------------------------------------------------------------------------------
    def _lfs_batch(self, repo_id: str) -> None:
        body = self._json_body()
        self._writer(repo_id)
        self._repo(repo_id)
        if body.get("operation") != "upload":
            raise HubError(400, "only uploads are supported")
        objects = []
        for obj in body.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            blob = self.server_hub.blob_path(oid)
            if not (blob.exists() and blob.stat().st_size == size):
                base = self.server_hub.url
                entry["actions"] = {
                    "upload": {"href": f"{base}/lfs-upload/{oid}?size={size}"},
                    "verify": {"href": f"{base}/lfs-verify"},
                }
            objects.append(entry)
        self._send(
            200,
            json.dumps({"transfer": "basic", "objects": objects}).encode(),
            content_type="application/vnd.git-lfs+json",
        )

    def _lfs_put(self, oid: str) -> None:
        hub = self.server_hub
        tmp = hub.root / "incoming" / uuid.uuid4().hex
        digest, size = hashlib.sha256(), 0
        with open(tmp, "wb") as f:
            for piece in self._iter_body():
                digest.update(piece)
                f.write(piece)
                size += len(piece)
        if digest.hexdigest() != oid:
            tmp.unlink()
            raise HubError(400, "uploaded content does not match its oid")
        os.replace(tmp, hub.blob_path(oid))
        self._send(200, b"", content_type="text/plain")

    def _lfs_verify(self) -> None:
        body = self._json_body()
        self._writer()
        blob = self.server_hub.blob_path(body.get("oid", ""))
        if not blob.exists() or blob.stat().st_size != int(body.get("size", -1)):
            raise HubError(404, "object not found or of another size")
        self._send_json({"ok": True})

    # -- downloads -------------------------------------------------------------------------------------------
    def _resolve(self, repo_id: str, rev: str, path: str) -> None:
        repo = self._repo(repo_id, read_files=True)
        commit = self._commit_of(repo, rev)
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "Entry not found", "EntryNotFound")
        etag = blob.sha256 or blob.oid
        headers = {"X-Repo-Commit": commit.sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"}
        if blob.sha256:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)})
        evil = self.server_hub.hostile.get("download", {}).get(path)
        if evil is not None and self.command == "GET":
            return self._send_hostile(evil, headers)
        start, end = 0, blob.size
        status = 200
        rng = re.match(r"bytes=(\d+)-(\d*)$", self.headers.get("Range") or "")
        if rng and self.command == "GET":
            start = int(rng.group(1))
            end = int(rng.group(2)) + 1 if rng.group(2) else blob.size
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{blob.size}"
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        if blob.data is not None:
            self.wfile.write(blob.data[start:end])
            return
        with open(self.server_hub.blob_path(blob.sha256 or ""), "rb") as f:
            self.wfile.flush()
            self.connection.sendfile(f, start, end - start)

    def _send_hostile(self, evil: dict[str, Any], headers: dict[str, str]) -> None:
        """A download answer that lies: an announced length, a body of another size, a dropped connection."""
        body, repeat = evil.get("body", b""), int(evil.get("repeat", 1))
        length = evil.get("length", len(body) * repeat)
        hang_up = length is None or evil.get("hang_up", True)
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        if length is not None:  # without a length the body runs until the connection closes
            self.send_header("Content-Length", str(length))
        if hang_up:  # announced, so the client never reuses a connection this answer closes
            self.send_header("Connection", "close")
            self.close_connection = True
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        try:
            for _ in range(repeat):
                self.wfile.write(body)
                self.server_hub.hostile_sent += len(body)
            self.wfile.flush()
        except OSError:  # the client stopped reading: what a careful client does
            pass
