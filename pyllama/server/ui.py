"""llama-server's built-in web UI: the bundle vendor/fetch.py --ui built, served as upstream does.

The bundle is upstream's tools/ui (a SvelteKit app) built with npm from the pinned sources and
gzipped into pyllama/server/webui/ (assets.json lists every file with its type and ETag, the
SHA-256 of the gzipped bytes, as upstream's scripts/ui-assets.cmake embeds them). It travels in
the sdist and the wheels; a build without npm has none, and the server then serves the API only
(`log_startup` says so once).

server_http_context::init registers, while the UI is on and no --path is given:
`/` and `/index.html` (ETag/304, the cross-origin isolation headers, `no-cache`), then every
other file at `/<name>`: sw.js, manifest.webmanifest, _app/version.json and build.json with
`no-cache`, the rest (content-hashed) `public, max-age=31536000, immutable` with ETag/304.
Every answer is `Content-Encoding: gzip`; a client whose Accept-Encoding lacks gzip gets 415.
`frontend_paths` is upstream's set of the same name: `/` and each file, public under
--api-key and served while the model loads (middleware.CorsAndAuth).
Imports: falcon, stdlib.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import falcon

logger = logging.getLogger(__name__)

WEBUI_DIR = Path(__file__).with_name("webui")
MANIFEST = "assets.json"
BUILD_HINT = ("run `python vendor/fetch.py --ui` (needs Node.js 20+ and npm) in a checkout, then "
              "reinstall (`make build`), or install a pyllama-serve wheel")
CACHE_IMMUTABLE = "public, max-age=31536000, immutable"
CACHE_REVALIDATE = "no-cache"
# PWA revalidation files (server-http.cpp's no_cache_names)
NO_CACHE_NAMES = frozenset({"sw.js", "manifest.webmanifest", "_app/version.json", "build.json"})


@dataclass(frozen=True)
class Asset:
    """One file of the bundle: its gzipped bytes, content type and ETag (quoted)."""

    name: str
    type: str
    etag: str
    data: bytes


class Bundle:
    """The built UI: every asset by name, read into memory once (upstream embeds them)."""

    def __init__(self, folder: Path, manifest: dict) -> None:
        self.folder = folder
        self.manifest = manifest
        self.assets = {}
        for item in manifest["assets"]:
            data = (folder / (item["name"] + ".gz")).read_bytes()
            self.assets[item["name"]] = Asset(item["name"], item["type"], item["etag"], data)

    @classmethod
    def load(cls, folder: Path = WEBUI_DIR) -> Bundle | None:
        """The bundle in `folder`, or None when the UI was not built (or is unreadable)."""
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
            bundle = cls(folder, manifest)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("the web UI in %s is unreadable (%s): %s", folder, exc, BUILD_HINT)
            return None
        return bundle if "index.html" in bundle.assets else None


_bundle: Bundle | None = None
_loaded = False


def bundle() -> Bundle | None:
    """The installed bundle (read on first use). Thread-safe once loaded."""
    global _bundle, _loaded
    if not _loaded:
        _bundle, _loaded = Bundle.load(), True
    return _bundle


def frontend_paths(b: Bundle | None) -> frozenset:
    """server-http.cpp's frontend_paths: `/` and `/<name>` of each embedded asset."""
    return frozenset({"/"} | {"/" + name for name in (b.assets if b else ())})


def serves_builtin(settings) -> bool:
    """Whether the built-in UI answers: the UI on, no --path, and a bundle built."""
    return bool(settings.webui and not settings.path and bundle() is not None)


def log_startup(settings) -> None:
    """Upstream's start-up lines about the UI, and ours when the build has none."""
    if not settings.webui:
        logger.info("The UI is disabled")
        logger.info("Use --ui/--no-ui (or deprecated --webui/--no-webui) to enable/disable")
    elif not settings.path and bundle() is None:
        logger.warning("the web UI was not built into this pyllama (no %s): serving the API only; "
                       "to build it, %s", WEBUI_DIR / MANIFEST, BUILD_HINT)


class AssetResource:
    """GET one UI file as server-http.cpp's serve_asset_cached / serve_asset_nocache."""

    sleep_bypass = ("GET",)  # static bytes: reading the page never wakes a sleeping model

    def __init__(self, asset: Asset, cached: bool, isolation: bool = False,
                 cache_control: str = CACHE_IMMUTABLE) -> None:
        self.asset = asset
        self.cached = cached
        self.isolation = isolation
        self.cache_control = cache_control

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        # handle_gzip_header: the assets exist only gzipped
        if "gzip" not in (req.get_header("Accept-Encoding") or ""):
            resp.status = falcon.HTTP_415
            resp.content_type = "text/plain"
            resp.text = "Error: gzip is not supported by this browser"
            return
        resp.set_header("Content-Encoding", "gzip")
        a = self.asset
        if not self.cached:
            resp.set_header("Cache-Control", CACHE_REVALIDATE)
        else:
            resp.set_header("ETag", a.etag)
            inm = req.get_header("If-None-Match")
            if inm and inm in (a.etag, "W/" + a.etag):
                resp.status = falcon.HTTP_304
                return
            if self.isolation:
                resp.set_header("Cross-Origin-Embedder-Policy", "require-corp")
                resp.set_header("Cross-Origin-Opener-Policy", "same-origin")
            resp.set_header("Cache-Control", self.cache_control)
        resp.status = falcon.HTTP_200
        resp.content_type = a.type
        resp.data = a.data


def add_routes(app: falcon.App, prefix: str, b: Bundle) -> None:
    """Register the UI's routes, as server_http_context::init does."""
    index = b.assets["index.html"]
    page = AssetResource(index, cached=True, isolation=True, cache_control=CACHE_REVALIDATE)
    # Falcon strips the trailing slash (strip_url_path_trailing_slash): `<prefix>/` arrives as
    # `<prefix>`, which then serves the page too
    app.add_route(prefix or "/", page)
    app.add_route(prefix + "/index.html", page)
    for name, asset in sorted(b.assets.items()):
        if name == "index.html":
            continue
        resource = AssetResource(asset, cached=name not in NO_CACHE_NAMES)
        app.add_route(prefix + "/" + name, resource)
