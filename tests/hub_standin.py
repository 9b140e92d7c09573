"""A stand-in for the Hugging Face Hub on 127.0.0.1, for download tests that reach no network.

It speaks the part of the Hub's API that huggingface_hub and llama.cpp use: GET
/api/models/<repo>/refs and /api/models/<repo>/tree/<rev>, HEAD/GET /<repo>/resolve/<rev>/<file>
(ETag, X-Repo-Commit, X-Linked-Etag, X-Linked-Size; LFS files redirect to a CDN path that honours
Range), the Hub's X-Error-Code on 404s. It also serves plain files (/files/<name>, for -mu) and a
Docker registry (/token, /v2/<repo>/manifests/<tag>, /v2/<repo>/blobs/<digest>, for -dr).
Every request is recorded; files can be served corrupt or cut off midway.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str
    headers: dict


@dataclass
class Repo:
    commit: str
    files: dict  # path -> bytes
    lfs: set = field(default_factory=set)  # paths stored in LFS (sha256 oid)


def git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class HubStandIn:
    """The stand-in server; `url` is its endpoint (HF_ENDPOINT / MODEL_ENDPOINT)."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.plain: dict[str, bytes] = {}  # /files/<name>
        self.etags: dict[str, str] = {}
        self.docker: dict[tuple, bytes] = {}  # (repo, tag) -> gguf bytes
        self.requests: list[Request] = []
        self.corrupt: set[str] = set()  # file names served with one byte flipped
        self.cut: dict[str, tuple[int, int]] = {}  # file name -> (byte offset, times left; -1 = always)
        self.token = ""  # when set, the Docker blob needs "Bearer <token>"
        self._lock = threading.Lock()
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                standin._handle(self, head=True)

            def do_GET(self):
                standin._handle(self, head=False)

        # the Hub, and its CDN on another origin (LFS redirects leave the Hub, as on huggingface.co)
        self.servers = [ThreadingHTTPServer(("127.0.0.1", 0), Handler) for _ in range(2)]
        for server in self.servers:
            server.daemon_threads = True
        self.url, self.cdn_url = (f"http://127.0.0.1:{s.server_address[1]}" for s in self.servers)
        self._threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in self.servers]

    def __enter__(self) -> HubStandIn:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        for server in self.servers:
            server.shutdown()
            server.server_close()

    # --- content ------------------------------------------------------------------------------
    def add_repo(self, repo: str, files: dict, commit: str | None = None) -> str:
        """Publish `files` ({path: bytes}); .gguf files go to LFS, as on the Hub. Returns the commit."""
        commit = commit or hashlib.sha1(repo.encode() + b"".join(files[p] for p in sorted(files))).hexdigest()
        self.repos[repo] = Repo(commit, dict(files), {p for p in files if p.endswith(".gguf")})
        return commit

    def file_requests(self) -> list[Request]:
        """The HEAD/GET requests for file bytes (resolve, CDN, plain files, Docker blobs)."""
        with self._lock:
            return [r for r in self.requests if "/resolve/" in r.path or r.path.startswith(("/cdn/", "/files/"))
                    or "/blobs/" in r.path]

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()

    # --- serving -----------------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        with self._lock:
            self.requests.append(Request(h.command, h.path, {k.lower(): v for k, v in h.headers.items()}))
        parts = urlsplit(h.path)
        path = unquote(parts.path)
        seg = path.strip("/").split("/")
        if seg[:2] == ["api", "models"] and len(seg) >= 5:
            return self._api(h, "/".join(seg[2:4]), seg[4], seg[5:])
        if len(seg) >= 5 and seg[2] == "resolve":
            return self._resolve(h, head, "/".join(seg[:2]), seg[3], "/".join(seg[4:]))
        if seg[0] == "cdn" and len(seg) >= 4:
            repo = self.repos.get("/".join(seg[1:3]))
            name = "/".join(seg[4:])
            if repo and name in repo.files:
                return self._bytes(h, head, repo.files[name], name, {"ETag": f'"{seg[3]}"'})
        if seg[0] == "files" and len(seg) == 2 and seg[1] in self.plain:
            return self._bytes(h, head, self.plain[seg[1]], seg[1],
                               {"ETag": self.etags.get(seg[1], f'"{git_oid(self.plain[seg[1]])}"')})
        if seg[0] == "token":
            scope = parse_qs(parts.query).get("scope", [""])[0]
            return self._json(h, head, {"token": self.token or "anonymous", "scope": scope})
        if seg[0] == "v2" and len(seg) >= 5:
            return self._registry(h, head, "/".join(seg[1:-2]), seg[-2], seg[-1])
        self._send(h, 404, b"not found", {})

    def _api(self, h, name: str, kind: str, rest: list) -> None:
        repo = self.repos.get(name)
        if repo is None:
            return self._send(h, 404, json.dumps({"error": "Repository not found"}).encode(),
                              {"X-Error-Code": "RepoNotFound", "Content-Type": "application/json"})
        if kind == "refs":
            return self._json(h, False, {"branches": [{"name": "main", "ref": "refs/heads/main",
                                                        "targetCommit": repo.commit}],
                                         "converts": [], "tags": []})
        if kind == "tree" and rest and rest[0] in (repo.commit, "main"):
            out, dirs = [], set()
            for p, data in repo.files.items():
                for i in range(1, p.count("/") + 1):
                    d = "/".join(p.split("/")[:i])
                    if d not in dirs:
                        dirs.add(d)
                        out.append({"type": "directory", "oid": git_oid(d.encode()), "size": 0, "path": d})
                entry = {"type": "file", "oid": git_oid(data), "size": len(data), "path": p}
                if p in repo.lfs:
                    entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
                out.append(entry)
            return self._json(h, False, out)
        self._send(h, 404, b"{}", {"X-Error-Code": "RevisionNotFound"})

    def _resolve(self, h, head: bool, name: str, rev: str, path: str) -> None:
        repo = self.repos.get(name)
        if repo is None:
            return self._send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"})
        if rev not in (repo.commit, "main"):
            return self._send(h, 404, b"Revision not found", {"X-Error-Code": "RevisionNotFound"})
        if path not in repo.files:
            return self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                           "X-Repo-Commit": repo.commit})
        data = repo.files[path]
        common = {"X-Repo-Commit": repo.commit}
        if path in repo.lfs:  # the Hub answers LFS files with a redirect to its CDN
            sha = hashlib.sha256(data).hexdigest()
            return self._send(h, 302, b"", {**common, "Location": f"{self.cdn_url}/cdn/{name}/{sha}/{path}",
                                            "ETag": f'"{git_oid(data)}"', "X-Linked-Etag": f'"{sha}"',
                                            "X-Linked-Size": str(len(data))}, head=True)
        self._bytes(h, head, data, path, {**common, "ETag": f'"{git_oid(data)}"'})

    def _registry(self, h, head: bool, repo: str, kind: str, ref: str) -> None:
        if kind == "manifests":
            data = self.docker.get((repo, ref))
            if data is None:
                return self._send(h, 404, b"{}", {})
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            return self._json(h, head, {"schemaVersion": 2, "layers": [
                {"mediaType": "application/vnd.docker.ai.license", "digest": "sha256:" + "0" * 64, "size": 1},
                {"mediaType": "application/vnd.docker.ai.gguf.v3", "digest": digest, "size": len(data)}]})
        if kind == "blobs":
            if self.token and h.headers.get("Authorization") != f"Bearer {self.token}":
                return self._send(h, 401, b"unauthorized", {})
            for (r, _), data in self.docker.items():
                if r == repo and ref == "sha256:" + hashlib.sha256(data).hexdigest():
                    return self._bytes(h, head, data, ref, {"ETag": f'"{ref}"'})
        self._send(h, 404, b"{}", {})

    def _json(self, h, head: bool, obj) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, head=head)

    def _bytes(self, h, head: bool, data: bytes, name: str, headers: dict) -> None:
        if name.rsplit("/", 1)[-1] in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        total, start, status = len(data), 0, 200
        rng = h.headers.get("Range", "")
        if rng.startswith("bytes=") and rng.endswith("-"):
            start, status = int(rng[6:-1]), 206
            headers = {**headers, "Content-Range": f"bytes {start}-{total - 1}/{total}"}
        body = data[start:]
        headers = {**headers, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        cut = None
        with self._lock:
            offset, times = self.cut.get(name.rsplit("/", 1)[-1], (0, 0))
            if times and not head:
                cut = max(offset - start, 0)
                if times > 0:
                    self.cut[name.rsplit("/", 1)[-1]] = (offset, times - 1)
        if cut is None:
            return self._send(h, status, body, headers, head=head)
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(body[:cut])
        h.wfile.flush()
        h.close_connection = True  # the rest never comes

    def _send(self, h, status: int, body: bytes, headers: dict, head: bool = False) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)
