#!/usr/bin/env python3
"""Fetch the pinned llama.cpp sources into vendor/llama.cpp (or another folder).

The pin lives in vendor/pin.toml: llama.cpp as shipped inside one llama-cpp-python sdist on
PyPI. This script downloads that sdist with pip (or takes a local copy), checks its sha256,
and extracts only the folders our build needs. The extraction goes to a temporary folder
beside the destination and is renamed into place at the end, so a failure never leaves a
half-extracted tree.

The build tree (not --all's) then gets the repository's patches/*.patch, unified diffs applied
in name order: our few changes to upstream's code, each one a performance fix explained in its
patch (kept outside vendor/, which holds no upstream file in git).
A patch that no longer applies exactly (after a pin bump) is an error, never skipped.

Two pitfalls of that sdist are handled here: its vendor/llama.cpp/.git is a file pointing at a
.git folder that is not shipped (dropped), and its member mtimes make ninja re-run CMake
forever ("build.ninja still dirty"), so every extracted file gets one fresh mtime.

With --ui it also builds llama-server's web UI from the same sdist (tools/ui, a SvelteKit app):
`npm ci` from upstream's lock file and upstream's `npm run build` in build/ui/, then every file
gzipped into pyllama/server/webui/ (git-ignored, carried by the sdist and every wheel) with
assets.json (names, types, ETags, sizes, build time) and THIRD_PARTY_LICENSES.txt (the npm
packages whose code the bundle contains). Without npm it says so and goes on (`--ui-required`:
fails instead); the server then serves the API only.

Usage:
    python vendor/fetch.py                   # build sources into vendor/llama.cpp
    python vendor/fetch.py --ui              # the same, then the web UI (needs Node.js 20+, npm)
    python vendor/fetch.py --all --dest DIR  # the whole upstream tree (yardstick builds, converters)
    python vendor/fetch.py --archive FILE    # use a local copy of the sdist instead of pip

Standard library only: it runs before anything else is installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import ast
import re
import time
import urllib.parse
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "pin.toml"
STAMP_NAME = ".pyllama-pin.json"
PATCHES = HERE.parent / "patches"
# Left out of --all: large, and nothing we build or run reads them.
FULL_TREE_EXCLUDE = ("models", "docs", "media", "benches", ".github", ".devops", ".git")


class FetchError(Exception):
    """A fetch failure, reported as one line that names the pin and the fix."""


def _parse_pin(text: str) -> dict:
    """Read pin.toml's one table of strings and string arrays (Python 3.10 has no tomllib)."""
    table, key, buf = {}, None, ""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or (line.startswith("[") and "=" not in line and not buf):
            continue
        if buf:
            buf += " " + line
        else:
            match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)\s*=\s*(.*)$", line)
            if not match:
                raise FetchError(f"{PIN_FILE}: cannot read line {line!r}")
            key, buf = match.group(1), match.group(2)
        if buf.count("[") == buf.count("]"):
            table[key] = ast.literal_eval(buf)
            buf = ""
    return table


def load_pin() -> dict:
    try:
        import tomllib
    except ImportError:
        return _parse_pin(PIN_FILE.read_text())
    with PIN_FILE.open("rb") as f:
        return tomllib.load(f)["llama_cpp"]


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "pyllama" / "sdist"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pin_name(pin: dict) -> str:
    return f"{pin['package']}=={pin['version']}"


def _pip_download(pin: dict, tmp: str) -> str | None:
    """Download the sdist with pip into tmp; return None on success, else pip's last line."""
    # Inside a PEP 517 build (pip install <clone>), PYTHONPATH hides the interpreter's own
    # site-packages and with them pip: run pip without that isolation.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
           "--no-binary", ":all:", "-d", tmp, pin_name(pin)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == 0 and (Path(tmp) / pin["filename"]).exists():
        return None
    return (proc.stderr.strip().splitlines() or ["no output"])[-1]


class _Links(HTMLParser):
    def __init__(self):
        super().__init__()
        self.hrefs = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.hrefs += [v for k, v in attrs if k == "href" and v]


def _index_download(pin: dict, tmp: str) -> str | None:
    """Download the sdist from the package index's simple page (PEP 503) with urllib."""
    index = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
    page_url = f"{index}/{pin['package']}/"
    try:
        with urllib.request.urlopen(page_url, timeout=60) as resp:
            links = _Links()
            links.feed(resp.read().decode("utf-8", "replace"))
        for href in links.hrefs:
            url = urllib.parse.urljoin(page_url, href)
            if urllib.parse.urlsplit(url).path.rsplit("/", 1)[-1] == pin["filename"]:
                with urllib.request.urlopen(url, timeout=300) as resp, \
                        open(Path(tmp) / pin["filename"], "wb") as out:
                    shutil.copyfileobj(resp, out)
                return None
        return f"{pin['filename']} is not listed on {page_url}"
    except OSError as exc:
        return f"{page_url}: {exc}"


def download(pin: dict) -> Path:
    """Return a cached copy of the pinned sdist, downloading it (pip, else urllib) if needed."""
    target = cache_dir() / pin["filename"]
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        pip_error = _pip_download(pin, tmp)
        index_error = _index_download(pin, tmp) if pip_error else None
        got = Path(tmp) / pin["filename"]
        if index_error or not got.exists():
            raise FetchError(
                f"could not download {pin_name(pin)} (pip: {pip_error}; index: {index_error}); "
                f"check the network or pass --archive with a local copy of {pin['filename']}")
        os.replace(got, target)
    return target


def check_hash(archive: Path, pin: dict) -> None:
    got = sha256_of(archive)
    if got != pin["sha256"]:
        raise FetchError(
            f"{archive} has sha256 {got}, but vendor/pin.toml pins {pin['filename']} at "
            f"{pin['sha256']}; delete that file and run again, or fix the pin")


def wanted(rel: str, include: list[str] | None) -> bool:
    """Say whether a path relative to the llama.cpp root is extracted."""
    if rel in ("", ".git"):
        return False
    top = rel.split("/", 1)[0]
    if include is None:
        return top not in FULL_TREE_EXCLUDE
    return any(rel == inc or rel.startswith(inc + "/") for inc in include)


def patch_files() -> list[Path]:
    return sorted(PATCHES.glob("*.patch")) if PATCHES.is_dir() else []


def patches_digest() -> str:
    """What the build tree's patches are: their names and contents (the stamp keeps it)."""
    digest = hashlib.sha256()
    for path in patch_files():
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def apply_patch(root: Path, patch: Path) -> None:
    """Apply one unified diff to the tree at `root`: each hunk's old lines must occur exactly
    once in their file (context included), and become the hunk's new lines."""
    files: dict[str, list[tuple[list[str], list[str]]]] = {}
    target = None
    hunk = None
    for line in patch.read_text().splitlines(keepends=True):
        if line.startswith("+++ "):
            name = line[4:].split("\t")[0].strip()
            target = name[2:] if name.startswith("b/") else name
            files[target] = []
            hunk = None
        elif line.startswith("--- "):
            hunk = None
        elif line.startswith("@@"):
            if target is None:
                raise FetchError(f"{patch.name}: a hunk before any file name")
            hunk = ([], [])
            files[target].append(hunk)
        elif hunk is not None and line[:1] in (" ", "-", "+"):
            if line[0] != "+":
                hunk[0].append(line[1:])
            if line[0] != "-":
                hunk[1].append(line[1:])
        elif hunk is not None and line.startswith("\\"):
            continue  # "\ No newline at end of file"
    for name, hunks in files.items():
        path = root / name
        try:
            text = path.read_text()
        except OSError as exc:
            raise FetchError(f"{patch.name}: {name}: {exc}")
        for old, new in hunks:
            old_text, new_text = "".join(old), "".join(new)
            if text.count(old_text) != 1:
                raise FetchError(f"{patch.name} does not apply to {name} of the pinned sources: "
                                 "update or drop the patch")
            text = text.replace(old_text, new_text)
        path.write_text(text)


def extract(archive: Path, pin: dict, dest: Path, include: list[str] | None, patched: bool = False) -> None:
    """Extract the pin's `include` folders (None: the whole tree) into `dest`; `patched`: the
    build tree, which gets patches/."""
    prefix = pin["prefix"].rstrip("/") + "/"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = []
                for member in tar.getmembers():
                    if not member.name.startswith(prefix):
                        continue
                    rel = member.name[len(prefix):]
                    if not wanted(rel, include):
                        continue
                    member.name = rel
                    members.append(member)
                if not members:
                    raise FetchError(
                        f"{archive} holds nothing under {prefix}; the pin's prefix is wrong")
                tar.extractall(tmp, members=members, filter="data")
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise FetchError(
                f"{archive} is not a readable {pin['filename']} ({exc}); delete it and run again")
        if include is not None:
            missing = [inc for inc in include if not (tmp / inc).exists()]
            if missing:
                raise FetchError(f"{pin['filename']} lacks {', '.join(missing)}; fix the pin")
        if patched:  # the build tree; --all's and the web UI's are upstream's code as it is
            for path in patch_files():
                apply_patch(tmp, path)
        # NOTE: one mtime for every file, so ninja never sees inputs newer than its outputs.
        now = time.time()
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                os.utime(os.path.join(root, name), (now, now), follow_symlinks=False)
        stamp = {"sha256": pin["sha256"], "version": pin["version"], "include": include,
                 "patches": patches_digest() if patched else None}
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def up_to_date(dest: Path, pin: dict, include: list[str] | None, patched: bool = False) -> bool:
    try:
        stamp = json.loads((dest / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sha256") == pin["sha256"] and stamp.get("include") == include and \
        stamp.get("patches") == (patches_digest() if patched else None)


# --- the web UI (--ui) -----------------------------------------------------------------------

REPO = HERE.parent
UI_DEST = REPO / "pyllama" / "server" / "webui"
UI_WORK = REPO / "build" / "ui"
UI_MANIFEST = "assets.json"
UI_LICENSES = "THIRD_PARTY_LICENSES.txt"
# Bump when what this step produces changes, so an older bundle is rebuilt.
UI_STEP_VERSION = 1
# What upstream's scripts/ui-assets.cmake (ui_validate_assets) requires of a build.
UI_REQUIRED = (("index.html", r"index\.html"), ("manifest.webmanifest", r"manifest\.webmanifest"),
               ("sw.js", r"sw\.js"), ("build.json", r"build\.json"), ("version.json", r"version\.json"),
               ("bundle[hash].js", r"bundle.*\.js"), ("bundle[hash].css", r"bundle.*\.css"),
               ("workbox[hash].js", r"workbox.*\.js"))
# Upstream's vite config with one plugin more: it lists the modules of every chunk the client
# build writes, for the licence file (only what the bundle contains, not all of node_modules).
UI_VITE_CONFIG = "pyllama-licenses.vite.config.ts"
UI_VITE_CONFIG_TEXT = """// Written by pyllama's vendor/fetch.py: upstream's vite.config.ts plus a plugin that records
// the modules each written chunk holds (PYLLAMA_UI_MODULES), for the bundle's licence file.
import { appendFileSync } from 'node:fs';
import type { Plugin, UserConfig } from 'vite';
import upstream from './vite.config';

function moduleList(): Plugin {
\treturn {
\t\tname: 'pyllama:module-list',
\t\tapply: 'build',
\t\tgenerateBundle(options, bundle) {
\t\t\tconst out = process.env.PYLLAMA_UI_MODULES;
\t\t\tif (!out) return;
\t\t\tconst ids: string[] = [];
\t\t\tfor (const item of Object.values(bundle)) {
\t\t\t\tif (item.type === 'chunk') ids.push(...item.moduleIds);
\t\t\t\telse ids.push(...(item.originalFileNames ?? []));
\t\t\t}
\t\t\tappendFileSync(out, JSON.stringify({ dir: options.dir ?? '', ids }) + '\\n');
\t\t}
\t};
}

export default (env: { mode: string; command: string }) => {
\tconst config = (typeof upstream === 'function' ? upstream(env) : upstream) as UserConfig;
\treturn { ...config, plugins: [...(config.plugins ?? []), moduleList()] };
};
"""
# Upstream's mime_from_ext (scripts/ui-assets.cmake): the types llama-server sends its UI with.
UI_TYPES = {"html": "text/html; charset=utf-8", "css": "text/css", "js": "application/javascript",
            "json": "application/json", "webmanifest": "application/manifest+json",
            "svg": "image/svg+xml", "png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg",
            "ico": "image/x-icon", "woff": "font/woff", "woff2": "font/woff2"}
LICENSE_NAMES = re.compile(r"^(licen[cs]e|copying|notice)([.-].*)?$", re.IGNORECASE)


def ui_key(pin: dict) -> str:
    """What a bundle is built from: the pinned sdist and this step's version."""
    return f"{pin['sha256']}/{UI_STEP_VERSION}"


def ui_up_to_date(dest: Path, pin: dict) -> bool:
    try:
        manifest = json.loads((dest / UI_MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("key") == ui_key(pin) and all(
        (dest / (a["name"] + ".gz")).is_file() for a in manifest.get("assets", []))


def _run(cmd: list[str], cwd: Path, env: dict, what: str) -> float:
    """Run one npm step (its output shown), return its seconds; FetchError if it fails."""
    print(f"vendor: ui: {what}: {' '.join(cmd)}", flush=True)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=cwd, env=env)
    if proc.returncode != 0:
        raise FetchError(f"{what} failed (exit {proc.returncode}) in {cwd}")
    return time.monotonic() - start


def _package_of(module_id: str) -> str | None:
    """The npm package a bundled module comes from: the folder after its last node_modules."""
    path = module_id.split("?", 1)[0].lstrip("\0")
    if "/node_modules/" not in path:
        return None
    rest = path.rsplit("/node_modules/", 1)[1].split("/")
    name = "/".join(rest[:2]) if rest[0].startswith("@") and len(rest) > 1 else rest[0]
    root = path[:path.rindex("/node_modules/")] + "/node_modules/" + name
    return root


def licence_text(app: Path, module_lists: Path) -> tuple[str, int]:
    """THIRD_PARTY_LICENSES.txt: the UI's own licence, then each npm package the bundle holds."""
    roots = set()
    for line in module_lists.read_text().splitlines():
        entry = json.loads(line)
        if "/.svelte-kit/output/server" in entry["dir"].replace(os.sep, "/"):
            continue  # the prerendering build: run at build time, not shipped
        roots.update(r for r in map(_package_of, entry["ids"]) if r)
    packages = {}
    for root in roots:
        try:
            meta = json.loads((Path(root) / "package.json").read_text())
        except (OSError, ValueError):
            continue
        name, version = meta.get("name") or Path(root).name, meta.get("version", "")
        texts = []
        for item in sorted(Path(root).iterdir()):
            if item.is_file() and LICENSE_NAMES.match(item.name):
                texts.append(item.read_text(errors="replace").strip())
        licence = meta.get("license") or meta.get("licenses") or \
            ("(no license field: see its licence file)" if texts else "UNKNOWN")
        if isinstance(licence, dict):
            licence = licence.get("type", "UNKNOWN")
        if isinstance(licence, list):
            licence = " OR ".join(x.get("type", "?") if isinstance(x, dict) else str(x) for x in licence)
        packages[(name, version)] = (licence, meta.get("repository"), texts)
    upstream_licence = (app.parents[1] / "LICENSE").read_text().strip()
    parts = [
        "Third-party software in pyllama's build of llama-server's web UI (pyllama/server/webui/)",
        "",
        "The UI is llama.cpp's tools/ui (https://github.com/ggml-org/llama.cpp), built by",
        "vendor/fetch.py --ui with npm from upstream's package-lock.json. The bundle contains code",
        f"of the {len(packages)} npm packages listed after llama.cpp's licence, each with the",
        "licence it declares and the licence files it ships.",
        "",
        "=" * 78, "llama.cpp (tools/ui)  MIT", "=" * 78, upstream_licence, ""]
    for (name, version), (licence, repo, texts) in sorted(packages.items()):
        if isinstance(repo, dict):
            repo = repo.get("url")
        parts += ["=" * 78, f"{name}@{version}  {licence}" + (f"  {repo}" if repo else ""), "=" * 78]
        parts += texts or [f"(no licence file in the package; it declares {licence})"]
        parts.append("")
    return "\n".join(parts), len(packages)


def build_ui(pin: dict, archive: Path, dest: Path, work: Path) -> None:
    """npm ci + upstream's build of tools/ui, then the gzipped bundle into `dest`."""
    import gzip

    npm = shutil.which("npm")
    if npm is None:
        raise FetchError("npm not found: install Node.js 20+ with npm and run `python vendor/fetch.py --ui`")
    source = work / "llama.cpp"
    include = ["LICENSE", "tools/ui"]
    if not up_to_date(source, pin, include):
        extract(archive, pin, source, include)  # node_modules of an older pin go with it
    app = source / "tools" / "ui"
    (app / UI_VITE_CONFIG).write_text(UI_VITE_CONFIG_TEXT)
    out = work / "dist"
    modules = work / "modules.jsonl"
    shutil.rmtree(out, ignore_errors=True)
    modules.unlink(missing_ok=True)
    # what upstream's CMake (scripts/ui-assets.cmake npm_build) passes to the build
    env = dict(os.environ, LLAMA_UI_OUT_DIR=str(out), LLAMA_UI_VERSION=f"b{pin['build_number']}",
               LLAMA_BUILD_NUMBER=str(pin["build_number"]), PYLLAMA_UI_MODULES=str(modules))
    marker = app / "node_modules" / ".package-lock.json"
    ci_s = 0.0
    if not marker.exists() or marker.stat().st_mtime < (app / "package-lock.json").stat().st_mtime:
        ci_s = _run([npm, "ci", "--no-audit", "--no-fund"], app, env, "npm ci")
    # upstream's "build" script (npm run build-pwa-assets && vite build), the vite step with the
    # module-listing config above
    build_s = _run([npm, "run", "build-pwa-assets"], app, env, "npm run build-pwa-assets")
    build_s += _run([str(app / "node_modules" / ".bin" / "vite"), "build", "--config", UI_VITE_CONFIG],
                    app, env, "vite build")
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    missing = [label for label, pattern in UI_REQUIRED
               if not any(re.fullmatch(pattern, f.rsplit("/", 1)[-1]) for f in files)]
    if missing:
        raise FetchError(f"the UI build in {out} lacks {', '.join(missing)}")
    licences, n_packages = licence_text(app, modules)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".tmp-", dir=dest.parent))
    try:
        assets, raw_total, gz_total = [], 0, 0
        for name in files:
            data = (out / name).read_bytes()
            # mtime 0: the same input gives the same bytes, so the same ETag (as upstream's
            # SOURCE_DATE_EPOCH=0)
            packed = gzip.compress(data, compresslevel=9, mtime=0)
            target = tmp / (name + ".gz")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(packed)
            ext = name.rsplit(".", 1)[-1] if "." in name.rsplit("/", 1)[-1] else ""
            assets.append({"name": name, "type": UI_TYPES.get(ext, "application/octet-stream"),
                           "etag": '"' + hashlib.sha256(packed).hexdigest() + '"',
                           "size": len(data), "gzip_size": len(packed)})
            raw_total += len(data)
            gz_total += len(packed)
        (tmp / UI_LICENSES).write_text(licences + "\n")
        manifest = {
            "key": ui_key(pin), "source": f"{pin_name(pin)} (llama.cpp {pin['commit']}, b{pin['build_number']}) tools/ui",
            "gzip": True, "bytes": raw_total, "gzip_bytes": gz_total, "npm_packages": n_packages,
            "npm_ci_seconds": round(ci_s, 1), "build_seconds": round(build_s, 1),
            "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "assets": assets,
        }
        (tmp / UI_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    print(f"vendor: ui: {len(assets)} assets, {raw_total / 1e6:.1f} MB ({gz_total / 1e6:.1f} MB gzipped), "
          f"{n_packages} npm packages bundled; npm ci {ci_s:.0f} s, build {build_s:.0f} s -> {dest}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=HERE / "llama.cpp",
                        help="where to extract (default: vendor/llama.cpp)")
    parser.add_argument("--all", action="store_true",
                        help="extract the whole upstream tree, not only what our build needs")
    parser.add_argument("--archive", type=Path,
                        help="a local copy of the pinned sdist (no download)")
    parser.add_argument("--force", action="store_true", help="extract even if up to date")
    parser.add_argument("--ui", action="store_true",
                        help="also build the web UI with npm into pyllama/server/webui/")
    parser.add_argument("--ui-required", action="store_true",
                        help="with --ui: fail when the UI cannot be built (no npm, a failed build)")
    parser.add_argument("--ui-dest", type=Path, default=UI_DEST, help=argparse.SUPPRESS)
    parser.add_argument("--ui-work", type=Path, default=UI_WORK, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.ui = args.ui or args.ui_required

    pin = load_pin()
    include = None if args.all else list(pin["build"])
    try:
        if not args.force and args.archive is None and up_to_date(args.dest, pin, include, include is not None):
            print(f"vendor: {args.dest} is up to date with {pin_name(pin)}")
        else:
            archive = args.archive or download(pin)
            check_hash(archive, pin)
            extract(archive, pin, args.dest, include, patched=include is not None)
            print(f"vendor: extracted llama.cpp {pin['commit']} from {pin_name(pin)} into {args.dest}")
    except FetchError as exc:
        print(f"vendor: error: llama.cpp pin {pin_name(pin)}: {exc}", file=sys.stderr)
        return 1
    if not args.ui:
        return 0
    if not args.force and ui_up_to_date(args.ui_dest, pin):
        print(f"vendor: ui: {args.ui_dest} is up to date with {pin_name(pin)}")
        return 0
    try:
        archive = args.archive or download(pin)
        check_hash(archive, pin)
        build_ui(pin, archive, args.ui_dest, args.ui_work)
    except FetchError as exc:
        if args.ui_required:
            print(f"vendor: error: web UI of {pin_name(pin)}: {exc}", file=sys.stderr)
            return 1
        print(f"vendor: ui: not built ({exc}); the server will serve the API without its web UI",
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
