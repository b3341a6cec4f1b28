"""Test-only stand-in for the Hugging Face Hub's *write* API, in front of an ``olah`` mirror.

No Hub server that accepts uploads can be installed offline; ``olah`` (PyPI) serves downloads
from plain git repositories laid out as ``MIRRORS/models/<org>/<repo>/``. This module fills the
gap for the tests and nothing else (it is never imported by ``mergehub``):

* it implements the endpoints ``huggingface_hub`` calls for ``create_repo``, ``create_branch``
  and ``create_commit`` — ``/api/repos/create``, ``/api/models/<id>/branch/<b>``,
  ``/api/models/<id>/preupload/<rev>``, the git-LFS batch API with single-part PUT uploads,
  ``/api/models/<id>/commit/<rev>`` (ndjson) and ``/api/validate-yaml`` — and writes each commit
  into the git repository under the mirrors folder with git plumbing (a temporary index, then
  one compare-and-swap ``update-ref``, so a commit lands whole or not at all). LFS files are
  committed as standard pointer files with their objects in ``.git/lfs/objects/``, which is
  where olah looks for them;
* a download of a file the repo lacks at that revision gets the Hub's 404 ``EntryNotFound``
  (olah answers 401, which e.g. transformers' ``push_to_hub`` does not expect);
* every other request (reads: refs, trees, paths-info, resolve) is forwarded to olah, so the
  client talks to one ``HF_ENDPOINT`` and every push -> pull crosses real HTTP through the real
  ``huggingface_hub`` client on both sides;
* write requests need ``Authorization: Bearer <token>`` with a token the server was given as
  ``write``; a ``read`` token gets 403 and no token 401, like the Hub. LFS content goes to an
  upload URL the (authorized) batch call hands out with a secret in its query, as the Hub's
  presigned storage URLs are.

Not implemented (not needed by the tests): Xet uploads (tests set ``HF_HUB_DISABLE_XET``),
multi-part LFS uploads, copies, pull requests, tags, repo types other than models, private repos
being hidden (``private`` is accepted and ignored), the ``oid`` of existing files in the
preupload answer (so unchanged files are committed again rather than skipped).

A test can make read requests fail: paths containing a string in :attr:`StandInHub.fail` get
404 (how the tests cut a pull short).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import subprocess
import tempfile
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack",
                ".onnx", ".zst")
GITATTRIBUTES = b"".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n".encode()
                         for s in LFS_SUFFIXES)
#: the tokens the test servers accept: one with write access, one read-only
WRITE_TOKEN = "hf_writeTOKENsecret" + uuid.uuid4().hex
READ_TOKEN = "hf_readonlyTOKENsecret" + uuid.uuid4().hex


def new_repo_id(tag: str) -> str:
    """A repo id no other test uses: ``org/<tag>-<random>``."""
    return f"org/{tag}-{uuid.uuid4().hex[:8]}"


_GIT_ENV = {"GIT_AUTHOR_NAME": "stand-in hub", "GIT_AUTHOR_EMAIL": "hub@localhost",
            "GIT_COMMITTER_NAME": "stand-in hub", "GIT_COMMITTER_EMAIL": "hub@localhost"}


def git(repo: Path, *args: str, data: bytes | None = None, env: dict[str, str] | None = None,
        check: bool = True) -> str:
    """Run git in ``repo``; return stdout (stripped)."""
    proc = subprocess.run(["git", "-C", str(repo), *args], input=data, capture_output=True,
                          env={**os.environ, **_GIT_ENV, **(env or {})})
    if check and proc.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {proc.stderr.decode().strip()}")
    return proc.stdout.decode().strip()


def lfs_pointer(oid: str, size: int) -> bytes:
    """A git-LFS pointer file (what the Hub stores in git for an LFS file)."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


class _HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra: object):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


class StandInHub:
    """The write API on 127.0.0.1 (a free port), forwarding reads to ``olah_url``.

    ``tokens`` maps token strings to ``"write"`` or ``"read"``. ``requests`` records
    ``(method, path, headers)`` of every request (header names in lower case), for tests
    that check what was sent.
    """

    def __init__(self, mirrors: Path, olah_url: str, tokens: dict[str, str]):
        self.mirrors = Path(mirrors)
        self.olah = urlsplit(olah_url)
        self.tokens = tokens
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        #: substrings of read paths to answer 404 (a test's way to cut a download short)
        self.fail: set[str] = set()
        self._lock = threading.Lock()
        self._signatures: dict[str, str] = {}  # LFS oid -> secret of its upload URL
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                hub.requests.append((self.command, self.path,
                                     {k.lower(): v for k, v in self.headers.items()}))
                body = self._body()
                if self.command in ("GET", "HEAD") and any(x in self.path for x in hub.fail):
                    self._reply(404, {"error": "injected failure"}, "EntryNotFound")
                    return
                if self.command in ("GET", "HEAD") and hub._absent_file(self.path):
                    self._reply(404, {"error": "Entry not found"}, "EntryNotFound")
                    return
                try:
                    route = hub._route(self.command, urlsplit(self.path).path)
                    if route is None:
                        return hub._forward(self, body)
                    if not urlsplit(self.path).path.startswith("/lfs-upload/"):
                        hub._authorize(self.headers.get("Authorization"))
                    status, payload = route(self, body)
                except _HubError as e:
                    self._reply(e.status, {"error": str(e), **e.extra}, e.code)
                    return
                except Exception as e:  # noqa: BLE001  (a bug here: tell the client, not hang)
                    self._reply(500, {"error": f"stand-in hub: {type(e).__name__}: {e}"})
                    return
                self._reply(status, payload)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    parts = []
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        parts.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(parts)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _reply(self, status: int, payload: object, code: str | None = None) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if code and isinstance(payload, dict):
                    self.send_header("X-Error-Code", code)
                    self.send_header("X-Error-Message", str(payload.get("error", "")))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_HEAD = do_POST = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- plumbing -----------------------------------------------------------------------------

    def _authorize(self, header: str | None) -> None:
        token = header.removeprefix("Bearer ").strip() if header else None
        if not token:
            raise _HubError(401, "Invalid username or password.")
        if self.tokens.get(token) != "write":
            raise _HubError(403, "You don't have the rights to write to this repository "
                                 "(token without write permission).")

    def _route(self, method: str, path: str):  # noqa: ANN202  (a bound handler or None)
        path = unquote(path)
        table = [
            ("POST", r"/api/repos/create", self._create_repo),
            ("POST", r"/api/validate-yaml",
             lambda h, b, **_: (200, {"errors": [], "warnings": []})),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>.+)", self._create_branch),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>.+)", self._preupload),
            ("POST", r"/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>.+)", self._commit),
            ("POST", r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects/batch", self._lfs_batch),
            ("PUT", r"/lfs-upload/(?P<repo>[^/]+/[^/]+)/(?P<oid>[0-9a-f]{64})", self._lfs_put),
            ("POST", r"/lfs-verify/(?P<repo>[^/]+/[^/]+)", lambda h, b, **_: (200, {})),
        ]
        for verb, pattern, fn in table:
            m = re.fullmatch(pattern, path)
            if verb == method and m:
                return lambda handler, body: fn(handler, body, **m.groupdict())
        return None

    def _absent_file(self, raw_path: str) -> bool:
        """Whether ``raw_path`` resolves a file that its repo lacks at that revision: the Hub
        answers 404 EntryNotFound (which clients such as transformers rely on), olah 401."""
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", unquote(urlsplit(raw_path).path))
        if not m or not (self.repo_path(m[1]) / ".git").is_dir():
            return False
        repo, rev, file = self.repo_path(m[1]), m[2], m[3]
        return bool(git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}",
                        check=False)) and not git(repo, "ls-tree", "--name-only", rev, "--", file,
                                                  check=False)

    def _forward(self, handler: BaseHTTPRequestHandler, body: bytes) -> None:
        """Relay a read request to olah and its answer back, unchanged."""
        conn = http.client.HTTPConnection(self.olah.hostname, self.olah.port, timeout=60)
        headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host",)}
        conn.request(handler.command, handler.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        handler.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection"):
                handler.send_header(key, value)
        length = resp.getheader("Content-Length")
        handler.send_header("Content-Length", length if handler.command == "HEAD" and length
                            else str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
        conn.close()

    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def _repo(self, repo_id: str) -> Path:
        path = self.repo_path(repo_id)
        if not (path / ".git").is_dir():
            raise _HubError(404, f"Repository {repo_id} not found", "RepoNotFound")
        return path

    def _head(self, repo: Path, rev: str) -> str:
        sha = git(repo, "rev-parse", "--verify", "--quiet", f"refs/heads/{rev}^{{commit}}",
                  check=False)
        if not sha:
            raise _HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha

    # --- endpoints ------------------------------------------------------------------------------

    def _create_repo(self, handler, body: bytes) -> tuple[int, dict]:
        req = json.loads(body)
        repo_id = f"{req['organization']}/{req['name']}" if req.get("organization") else req["name"]
        if "/" not in repo_id:
            repo_id = f"user/{repo_id}"
        path = self.repo_path(repo_id)
        with self._lock:
            if path.exists():
                raise _HubError(409, "You already created this model repo",
                                url=f"{self.url}/{repo_id}")
            path.mkdir(parents=True)
            git(path, "init", "-q", "-b", "main")
            self._write_commit(path, "main", None, {".gitattributes": GITATTRIBUTES}, [],
                               "initial commit")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def _create_branch(self, handler, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
        path = self._repo(repo)
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        with self._lock:
            if git(path, "rev-parse", "--verify", "--quiet", f"refs/heads/{rev}", check=False):
                raise _HubError(409, f"Branch {rev} already exists")
            sha = git(path, "rev-parse", "--verify", "--quiet", f"{start}^{{commit}}", check=False)
            if not sha:
                raise _HubError(404, f"Invalid rev id: {start}", "RevisionNotFound")
            git(path, "update-ref", f"refs/heads/{rev}", sha, "")
        return 200, {}

    def _preupload(self, handler, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
        self._head(self._repo(repo), rev)
        files = []
        for f in json.loads(body)["files"]:
            sample = base64.b64decode(f["sample"])
            lfs = f["path"].endswith(LFS_SUFFIXES) or b"\0" in sample or f["size"] >= 10 << 20
            files.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular",
                          "shouldIgnore": False})
        return 200, {"files": files, "commitOid": None}

    def _lfs_object(self, repo: Path, oid: str) -> Path:
        return repo / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def _lfs_batch(self, handler, body: bytes, repo: str) -> tuple[int, dict]:
        path = self._repo(repo)
        out = []
        for obj in json.loads(body)["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"]}
            if not self._lfs_object(path, obj["oid"]).is_file():
                sig = self._signatures.setdefault(obj["oid"], uuid.uuid4().hex)
                item["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-upload/{repo}/{obj['oid']}?sig={sig}"},
                    "verify": {"href": f"{self.url}/lfs-verify/{repo}"}}
            out.append(item)
        return 200, {"transfer": "basic", "objects": out}

    def _lfs_put(self, handler, body: bytes, repo: str, oid: str) -> tuple[int, dict]:
        """The upload URL the batch answer handed out: like the Hub's presigned storage URLs,
        it is authorized by the secret in its query, not by the token."""
        path = self._repo(repo)
        if parse_qs(urlsplit(handler.path).query).get("sig") != [self._signatures.get(oid)]:
            raise _HubError(403, "upload URL signature does not match")
        if hashlib.sha256(body).hexdigest() != oid:
            raise _HubError(400, f"uploaded content does not match oid {oid}")
        target = self._lfs_object(path, oid)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(body)
        os.replace(tmp, target)
        return 200, {}

    def _commit(self, handler, body: bytes, repo: str, rev: str) -> tuple[int, dict]:
        path = self._repo(repo)
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        files: dict[str, bytes] = {}
        deletes: list[str] = []
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                obj = self._lfs_object(path, value["oid"])
                if not obj.is_file():
                    raise _HubError(422, f"LFS object {value['oid']} of {value['path']} was "
                                         "never uploaded")
                files[value["path"]] = lfs_pointer(value["oid"], obj.stat().st_size)
            elif key in ("deletedFile", "deletedFolder"):
                deletes.append(value["path"])
        message = header["summary"] + (f"\n\n{header['description']}" if header.get("description")
                                       else "")
        with self._lock:
            parent = self._head(path, rev)
            if header.get("parentCommit") and not parent.startswith(header["parentCommit"]):
                raise _HubError(412, f"parent commit {header['parentCommit']} is not the head "
                                     f"of {rev}")
            sha = self._write_commit(path, rev, parent, files, deletes, message)
        return 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha,
                     "pullRequestUrl": None}

    def _write_commit(self, repo: Path, branch: str, parent: str | None,
                      files: dict[str, bytes], deletes: list[str], message: str) -> str:
        """One commit on ``branch`` (parent ``parent``) adding ``files`` and removing
        ``deletes``, built in a temporary index; the branch moves only if still at ``parent``."""
        with tempfile.TemporaryDirectory() as tmp:
            env = {"GIT_INDEX_FILE": str(Path(tmp) / "index")}
            if parent:
                git(repo, "read-tree", parent, env=env)
            for p in deletes:
                listed = git(repo, "ls-files", "--", p, env=env).splitlines()
                if not listed:
                    raise _HubError(404, f"A file with this name doesn't exist: {p}",
                                    "EntryNotFound")
                git(repo, "update-index", "--force-remove", "--", *listed, env=env)
            entries = []
            for p, content in files.items():
                blob = git(repo, "hash-object", "-w", "--stdin", data=content)
                entries.append(f"100644 {blob}\t{p}")
            if entries:
                git(repo, "update-index", "--index-info", data="\n".join(entries).encode() + b"\n",
                    env=env)
            tree = git(repo, "write-tree", env=env)
            sha = git(repo, "commit-tree", tree, *(["-p", parent] if parent else []),
                      data=message.encode())
            git(repo, "update-ref", f"refs/heads/{branch}", sha, parent or "")
        return sha
