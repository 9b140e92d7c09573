"""--path DIR: static files, served as llama-server's HTTP library serves its mount point.

server-http.cpp mounts DIR at `<api-prefix>/` (only while the UI is on, the default), and
cpp-httplib's Server::handle_file_request answers a GET or HEAD before any route is matched:
so a file shadows a route of the same name. The request path (percent-decoded) is checked
with detail::is_valid_path (no `..` above the root, no backslash, no NUL), a path ending in
`/` gets `index.html`, a resolved path outside the folder's real path (a symlink out) is a bare
403, a folder is a 301 to the same path with a `/`, a file is sent with its extension's type
(application/octet-stream otherwise), a weak ETag and Last-Modified; If-None-Match /
If-Modified-Since give a 304, and Range (with If-Range) a 206, multipart for several ranges, or
a bare 416. Anything else falls through to the routes (and so to 404).
The middleware runs after CORS, the loading check and the API key, as upstream's pre-routing
handler does.

The folder replaces the built-in UI (server/ui.py). While the UI is off or replaced by --path,
`/sw.js` answers a service worker that removes itself, as upstream does, so a browser that used
the built-in UI stops showing it; a sw.js in DIR is served first.
Imports: falcon, stdlib.
"""

from __future__ import annotations

import email.utils
import os
import re
import secrets
import stat
import string
import time

import falcon

# detail::find_content_type
CONTENT_TYPES = {
    "css": "text/css", "csv": "text/csv", "htm": "text/html", "html": "text/html",
    "js": "text/javascript", "mjs": "text/javascript", "txt": "text/plain", "vtt": "text/vtt",
    "apng": "image/apng", "avif": "image/avif", "bmp": "image/bmp", "gif": "image/gif",
    "png": "image/png", "svg": "image/svg+xml", "webp": "image/webp", "ico": "image/x-icon",
    "tif": "image/tiff", "tiff": "image/tiff", "jpg": "image/jpeg", "jpeg": "image/jpeg",
    "mp4": "video/mp4", "mpeg": "video/mpeg", "webm": "video/webm",
    "mp3": "audio/mp3", "mpga": "audio/mpeg", "weba": "audio/webm", "wav": "audio/wave",
    "otf": "font/otf", "ttf": "font/ttf", "woff": "font/woff", "woff2": "font/woff2",
    "7z": "application/x-7z-compressed", "atom": "application/atom+xml", "pdf": "application/pdf",
    "json": "application/json", "rss": "application/rss+xml", "tar": "application/x-tar",
    "xht": "application/xhtml+xml", "xhtml": "application/xhtml+xml",
    "xslt": "application/xslt+xml", "xml": "application/xml", "gz": "application/gzip",
    "zip": "application/zip", "wasm": "application/wasm",
}
DEFAULT_TYPE = "application/octet-stream"
INTERNAL = "pyllama.internal"  # set in the environ of a request /predict makes: routes only
_EXTENSION = re.compile(r"\.([a-zA-Z0-9]+)$")

SW_REMOVE_JS = """
self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (e) => e.waitUntil((async () => {
    await self.registration.unregister();
    for (const key of await caches.keys()) await caches.delete(key);
    for (const c of await self.clients.matchAll({ type: 'window' })) c.navigate(c.url);
})()));
"""


def is_valid_path(path: str) -> bool:
    """detail::is_valid_path: no component climbs above the root; no backslash or NUL."""
    level = 0
    for part in path.split("/"):
        if not part or part == ".":
            continue
        if "\0" in part or "\\" in part:
            return False
        if part == "..":
            if level == 0:
                return False
            level -= 1
        else:
            level += 1
    return True


def content_type(path: str) -> str:
    match = _EXTENSION.search(path)
    return CONTENT_TYPES.get(match.group(1), DEFAULT_TYPE) if match else DEFAULT_TYPE


def etag(st: os.stat_result) -> str:
    """detail::compute_etag: W/"<mtime hex>-<size hex>"."""
    return f'W/"{int(st.st_mtime):x}-{st.st_size:x}"'


def _not_modified(req: falcon.Request, tag: str, mtime: int) -> bool:
    """Server::check_if_not_modified: If-None-Match (exact or *) first, else If-Modified-Since."""
    inm = req.get_header("If-None-Match")
    if inm is not None:
        return any(v.strip() in ("*", tag) for v in inm.split(","))
    ims = req.get_header("If-Modified-Since")
    if ims:
        try:
            return mtime <= int(email.utils.parsedate_to_datetime(ims).timestamp())
        except (TypeError, ValueError, IndexError, OverflowError):
            return False
    return False


RANGE_MAX_COUNT = 1024  # CPPHTTPLIB_RANGE_MAX_COUNT


def parse_ranges(value: str) -> list | None:
    """detail::parse_range_header: [(first, last)] with -1 for an absent end; None if invalid."""
    if len(value) <= 7 or not value.startswith("bytes="):
        return None
    out = []
    for part in value[6:].split(","):
        lhs, dash, rhs = part.partition("-")
        if not dash or not (lhs.isdigit() or not lhs) or not (rhs.isdigit() or not rhs) \
                or not lhs.isascii() or not rhs.isascii():
            return None
        first = int(lhs) if lhs else -1
        last = int(rhs) if rhs else -1
        if (first == -1 and last == -1) or (first != -1 and last != -1 and first > last):
            return None
        out.append((first, last))
    return out or None


def resolve_ranges(ranges: list, size: int) -> list | None:
    """detail::range_error + coalesce_ranges: absolute (first, last) ranges, None if unsatisfiable."""
    if len(ranges) > RANGE_MAX_COUNT:
        return None
    done, overlaps = [], 0
    for first, last in ranges:
        if first == -1:
            first, last = size - last, size - 1
        if last == -1 or last >= size:
            last = size - 1
        if not 0 <= first <= last <= size - 1:
            return None
        for a, b in done:
            if not (last < a or first > b):
                overlaps += 1
                if overlaps > 2:
                    return None
                break
        done.append((first, last))
    merged: list = []
    for first, last in sorted(done, key=lambda r: r[0]):
        if merged and first <= merged[-1][1] + 1 and (first, last) != merged[-1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], last))
        else:
            merged.append((first, last))
    return merged


def _if_range_holds(req: falcon.Request, tag: str, mtime: int) -> bool:
    """Server::check_if_range: a strong ETag must match (ours are weak), or a date not older."""
    value = req.get_header("If-Range")
    if value is None:
        return True
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        return value == tag
    if value.startswith('W/"'):
        return False
    try:
        return mtime <= int(email.utils.parsedate_to_datetime(value).timestamp())
    except (TypeError, ValueError, IndexError, OverflowError):
        return False


def _send_ranges(resp: falcon.Response, fh, size: int, ctype: str, ranges: list) -> None:
    def piece(first, last):
        fh.seek(first)
        return fh.read(last - first + 1)

    resp.status = falcon.HTTP_206
    if len(ranges) == 1:
        first, last = ranges[0]
        resp.content_type = ctype
        resp.set_header("Content-Range", f"bytes {first}-{last}/{size}")
        resp.data = piece(first, last)
    else:  # make_multipart_ranges_data
        boundary = "--cpp-httplib-multipart-data-" + "".join(
            secrets.choice(string.ascii_letters + string.digits) for _ in range(16))
        parts = []
        for first, last in ranges:
            parts.append(f"--{boundary}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Range: bytes {first}-{last}/{size}\r\n\r\n".encode())
            parts.append(piece(first, last) + b"\r\n")
        parts.append(f"--{boundary}--".encode())
        resp.content_type = f"multipart/byteranges; boundary={boundary}"
        resp.data = b"".join(parts)
    fh.close()


class StaticFiles:
    """The mount of --path DIR at `<api-prefix>/` (Server::set_mount_point + handle_file_request)."""

    def __init__(self, folder: str, api_prefix: str = "") -> None:
        self.folder = folder
        self.mount = api_prefix.rstrip("/") + "/"
        real = os.path.realpath(folder)
        self.real = real if real.endswith("/") else real + "/"

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        if req.method != "GET" or resp.complete or req.env.get(INTERNAL):  # HEAD comes as GET
            return
        # the decoded path as sent: Falcon's req.path has its trailing slash stripped
        path = req.env.get("PATH_INFO", "").encode("latin-1").decode("utf-8", "surrogateescape")
        if not path.startswith(self.mount):
            return
        sub = "/" + path[len(self.mount):]
        if not is_valid_path(sub):
            return
        full = self.folder + sub
        if full.endswith("/"):
            full += "index.html"
        # defense in depth upstream: a symlink may still lead out of the folder
        if os.path.exists(full) and not os.path.realpath(full).startswith(self.real):
            resp.status = falcon.HTTP_403
            resp.data = b""
            resp.complete = True
            return
        try:
            st = os.stat(full)
        except (OSError, ValueError):
            return  # not there: the routes (and 404) answer
        if stat.S_ISDIR(st.st_mode):
            resp.status = falcon.HTTP_301
            resp.set_header("Location", sub + "/")
            resp.data = b""
            resp.complete = True
            return
        if not stat.S_ISREG(st.st_mode):
            return
        tag = etag(st)
        mtime = int(st.st_mtime)
        try:
            fh = open(full, "rb")
        except OSError:
            return
        resp.set_header("ETag", tag)
        resp.set_header("Last-Modified", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(mtime)))
        resp.complete = True
        if _not_modified(req, tag, mtime):
            fh.close()
            resp.status = falcon.HTTP_304
            return
        ranges = req.get_header("Range")
        if ranges is not None and st.st_size:
            wanted = parse_ranges(ranges)
            wanted = resolve_ranges(wanted, st.st_size) if wanted is not None else None
            if wanted is None:  # a bare 416
                fh.close()
                resp.status = falcon.HTTP_416
                resp.data = b""
                return
            if _if_range_holds(req, tag, mtime):
                _send_ranges(resp, fh, st.st_size, content_type(full), wanted)
                return
        resp.status = falcon.HTTP_200
        resp.content_type = content_type(full)
        resp.set_stream(fh, st.st_size)


class ServiceWorkerResource:
    """GET /sw.js: a service worker that unregisters itself and clears its caches."""

    sleep_bypass = ("GET",)

    def on_get(self, req, resp):
        resp.status = falcon.HTTP_200
        resp.set_header("Cache-Control", "no-cache")
        resp.content_type = "application/javascript"
        resp.text = SW_REMOVE_JS
