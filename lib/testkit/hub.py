"""A loopback stand-in for the Hugging Face Hub's file protocol, refusals included, for download tests.

Two hosts, as on the Hub: the origin (127.0.0.1) answers `/{repo_id}/resolve/{revision}/{path}`, and a CDN
(127.0.0.2, a second loopback address, so clients see another host) serves LFS files by signed URL.

Origin, GET or HEAD:
- regular files (configs, tokenizer files): 200 with `ETag: "<git blob SHA-1 of the content>"`,
  `X-Repo-Commit`, `Content-Length`, `Accept-Ranges: bytes` (206 for a Range);
- LFS files (`*.safetensors`): 302 to a signed CDN URL, with `X-Linked-Etag: "<sha256>"`, `X-Linked-Size`,
  `X-Repo-Commit` and `ETag` (the sha256 again);
- a revision is a branch (`main`) or a full commit id; unknown: 404 `X-Error-Code: RevisionNotFound`;
- a file not in the repo at that commit: 404 `X-Error-Code: EntryNotFound`; an unknown repo: 401
  `X-Error-Code: RepoNotFound`;
- a gated repo without its token: 401 `X-Error-Code: GatedRepo` and an `X-Error-Message`.
CDN: GET only. HEAD is refused (403: the signature covers GET), a request that carries `Authorization` is
refused (400: a signed URL admits no second authentication), an expired or forged signature is refused (403);
Range requests get 206.

Repos are folders in the Hub layout (`root/<repo_id>/<path>`, e.g. scripts/make_tiny_weights.py's output; all of
them, or those in `repo_ids`);
`push()` makes a new commit on `main` with changed files, the older commits keep serving what they had.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from lib.weights.download import git_blob_sha1

CDN_HOST = "127.0.0.2"
SECRET = b"stand-in signing key"


@dataclass(frozen=True)
class Blob:
    data: bytes
    sha256: str
    git_sha1: str

    @classmethod
    def of(cls, data: bytes) -> "Blob":
        return cls(data, hashlib.sha256(data).hexdigest(), git_blob_sha1(data))


@dataclass
class Seen:
    host: str  # "origin" or "cdn"
    method: str
    path: str
    authorization: str | None
    range: str | None
    status: int = 0


def is_lfs(path: str) -> bool:
    return path.endswith(".safetensors")


class FakeHub:
    """The two servers. `url` is the origin (WEIGHTS_BASE_URL); `log` lists every request both hosts saw."""

    def __init__(
        self,
        root: Path,
        repo_ids=None,
        *,
        gated: dict[str, str] | None = None,
        url_ttl: float = 3600.0,
        cdn_rate: float | None = None,
    ):
        self.repos: dict[str, dict] = {}  # repo_id -> {"branches": {name: commit}, "commits": {commit: {path: Blob}}}
        self.blobs: dict[str, Blob] = {}  # sha256 -> Blob (the CDN's store)
        self.gated = dict(gated or {})  # repo_id -> the token that may read it
        self.url_ttl, self.cdn_rate = url_ttl, cdn_rate
        self.corrupt: set[str] = set()  # "repo_id/path" or an LFS sha256: bytes served with one byte flipped
        self.log: list[Seen] = []
        self.lock = threading.Lock()
        root = Path(root)
        for repo_id in repo_ids or sorted(
            f"{o.name}/{r.name}" for o in root.iterdir() if o.is_dir() for r in o.iterdir() if r.is_dir()
        ):
            repo = root / repo_id
            self.push(
                repo_id,
                {str(f.relative_to(repo)): f.read_bytes() for f in sorted(repo.rglob("*")) if f.is_file()},
                message="initial",
            )
        self.origin = self._serve("127.0.0.1", self._origin)
        self.cdn = self._serve(CDN_HOST, self._cdn)
        self.url = f"http://127.0.0.1:{self.origin.server_address[1]}"

    # -- repos -----------------------------------------------------------------------------------------------
    def push(self, repo_id: str, files: dict[str, bytes], message: str = "update", drop=()) -> str:
        """A new commit on main: the previous tree with `files` changed (or added) and `drop` removed."""
        repo = self.repos.setdefault(repo_id, {"branches": {}, "commits": {}})
        head = repo["branches"].get("main")
        tree = dict(repo["commits"][head]) if head else {}
        for path in drop:
            tree.pop(path, None)
        for path, data in files.items():
            tree[path] = blob = Blob.of(data)
            self.blobs[blob.sha256] = blob
        commit = hashlib.sha1(
            f"{repo_id}\n{head}\n{message}\n{sorted((p, b.sha256) for p, b in tree.items())}".encode()
        ).hexdigest()
        repo["commits"][commit] = tree
        repo["branches"]["main"] = commit
        return commit

    def head(self, repo_id: str) -> str:
        return self.repos[repo_id]["branches"]["main"]

    def file(self, repo_id: str, path: str, commit: str | None = None) -> Blob:
        return self.repos[repo_id]["commits"][commit or self.head(repo_id)][path]

    def seen(self, host: str | None = None, method: str | None = None, contains: str = "") -> list[Seen]:
        with self.lock:
            return [s for s in self.log if host in (None, s.host) and method in (None, s.method) and contains in s.path]

    def close(self) -> None:
        for server in (self.origin, self.cdn):
            server.shutdown()
            server.server_close()

    def __enter__(self) -> "FakeHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- the two hosts ---------------------------------------------------------------------------------------
    def _serve(self, host: str, handle) -> http.server.ThreadingHTTPServer:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                self._do("GET")

            def do_HEAD(self):
                self._do("HEAD")

            def _do(self, method: str) -> None:
                seen = Seen(
                    "origin" if host != CDN_HOST else "cdn",
                    method,
                    self.path,
                    self.headers.get("Authorization"),
                    self.headers.get("Range"),
                )
                with hub.lock:
                    hub.log.append(seen)
                try:
                    seen.status = handle(self, method)
                except (BrokenPipeError, ConnectionResetError):
                    pass

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer((host, 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _origin(self, h, method: str) -> int:
        url = urllib.parse.urlsplit(h.path)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", urllib.parse.unquote(url.path))
        if not m:
            return _answer(h, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        repo_id, revision, path = m.groups()
        repo = self.repos.get(repo_id)
        if repo is None:
            return _answer(h, 401, {"X-Error-Code": "RepoNotFound", "X-Error-Message": "Repository not found"})
        if repo_id in self.gated and h.headers.get("Authorization") != f"Bearer {self.gated[repo_id]}":
            return _answer(
                h,
                401,
                {
                    "X-Error-Code": "GatedRepo",
                    "X-Error-Message": f"Access to model {repo_id} is restricted. You must have access to it and be "
                    "authenticated to access it. Please log in.",
                },
            )
        commit = repo["branches"].get(revision) or (revision if revision in repo["commits"] else None)
        if commit is None:
            return _answer(
                h, 404, {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id: " + revision}
            )
        blob = repo["commits"][commit].get(path)
        if blob is None:
            return _answer(
                h, 404, {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found", "X-Repo-Commit": commit}
            )
        if is_lfs(path):
            expires = round(time.time() + self.url_ttl, 3)
            query = urllib.parse.urlencode({"Expires": expires, "Signature": _sign(blob.sha256, expires)})
            location = f"http://{CDN_HOST}:{self.cdn.server_address[1]}/{blob.sha256}?{query}"
            return _answer(
                h,
                302,
                {
                    "Location": location,
                    "X-Linked-Etag": f'"{blob.sha256}"',
                    "X-Linked-Size": str(len(blob.data)),
                    "X-Repo-Commit": commit,
                    "ETag": f'"{blob.sha256}"',
                },
            )
        return _send(
            h,
            method,
            blob,
            {"ETag": f'"{blob.git_sha1}"', "X-Repo-Commit": commit},
            corrupt=f"{repo_id}/{path}" in self.corrupt,
        )

    def _cdn(self, h, method: str) -> int:
        url = urllib.parse.urlsplit(h.path)
        if h.headers.get("Authorization"):
            return _answer(
                h,
                400,
                {},
                b"<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed</Message></Error>",
            )
        if method != "GET":
            return _answer(h, 403, {}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
        query = dict(urllib.parse.parse_qsl(url.query))
        sha = url.path.lstrip("/")
        try:
            expires = float(query["Expires"])
        except (KeyError, ValueError):
            return _answer(h, 403, {}, b"<Error><Code>AccessDenied</Code></Error>")
        if not hmac.compare_digest(query.get("Signature", ""), _sign(sha, expires)) or sha not in self.blobs:
            return _answer(h, 403, {}, b"<Error><Code>SignatureDoesNotMatch</Code></Error>")
        if time.time() > expires:
            return _answer(
                h, 403, {}, b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"
            )
        return _send(h, method, self.blobs[sha], {"ETag": f'"{sha}"'}, corrupt=sha in self.corrupt, rate=self.cdn_rate)


def _sign(sha256: str, expires: float) -> str:
    return hmac.new(SECRET, f"{sha256}:{expires}".encode(), hashlib.sha256).hexdigest()


def _answer(h, code: int, headers: dict, body: bytes = b"") -> int:
    h.send_response(code)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)
    return code


def _send(h, method: str, blob: Blob, headers: dict, corrupt: bool = False, rate: float | None = None) -> int:
    data = blob.data
    if corrupt and data:  # what a broken proxy would deliver: the headers still describe the true file
        data = bytes([data[0] ^ 0xFF]) + data[1:]
    start, end, code = 0, len(data), 200
    m = re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range") or "")
    if m:
        start, end, code = int(m[1]), min(len(data), int(m[2]) + 1 if m[2] else len(data)), 206
        if start >= len(data):
            return _answer(h, 416, {"Content-Range": f"bytes */{len(data)}"})
    h.send_response(code)
    for k, v in headers.items():
        h.send_header(k, v)
    h.send_header("Accept-Ranges", "bytes")
    h.send_header("Content-Length", str(end - start))
    if code == 206:
        h.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
    h.end_headers()
    if method == "GET":
        step = 1 << 16
        started = time.monotonic()
        for off in range(start, end, step):
            h.wfile.write(data[off : min(end, off + step)])
            if rate:
                time.sleep(max(0.0, (off + step - start) / rate - (time.monotonic() - started)))
    return code
