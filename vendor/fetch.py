#!/usr/bin/env python3
"""Fetch the pinned llama.cpp sources into vendor/llama.cpp (or another folder).

The pin lives in vendor/pin.toml: llama.cpp as shipped inside one llama-cpp-python sdist on
PyPI. This script downloads that sdist with pip (or takes a local copy), checks its sha256,
and extracts only the folders our build needs. The extraction goes to a temporary folder
beside the destination and is renamed into place at the end, so a failure never leaves a
half-extracted tree.

Two pitfalls of that sdist are handled here: its vendor/llama.cpp/.git is a file pointing at a
.git folder that is not shipped (dropped), and its member mtimes make ninja re-run CMake
forever ("build.ninja still dirty"), so every extracted file gets one fresh mtime.

Usage:
    python vendor/fetch.py                   # build sources into vendor/llama.cpp
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


def extract(archive: Path, pin: dict, dest: Path, include: list[str] | None) -> None:
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
        # NOTE: one mtime for every file, so ninja never sees inputs newer than its outputs.
        now = time.time()
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                os.utime(os.path.join(root, name), (now, now), follow_symlinks=False)
        stamp = {"sha256": pin["sha256"], "version": pin["version"], "include": include}
        (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def up_to_date(dest: Path, pin: dict, include: list[str] | None) -> bool:
    try:
        stamp = json.loads((dest / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return False
    return stamp.get("sha256") == pin["sha256"] and stamp.get("include") == include


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dest", type=Path, default=HERE / "llama.cpp",
                        help="where to extract (default: vendor/llama.cpp)")
    parser.add_argument("--all", action="store_true",
                        help="extract the whole upstream tree, not only what our build needs")
    parser.add_argument("--archive", type=Path,
                        help="a local copy of the pinned sdist (no download)")
    parser.add_argument("--force", action="store_true", help="extract even if up to date")
    args = parser.parse_args(argv)

    pin = load_pin()
    include = None if args.all else list(pin["build"])
    try:
        if not args.force and args.archive is None and up_to_date(args.dest, pin, include):
            print(f"vendor: {args.dest} is up to date with {pin_name(pin)}")
            return 0
        archive = args.archive or download(pin)
        check_hash(archive, pin)
        extract(archive, pin, args.dest, include)
    except FetchError as exc:
        print(f"vendor: error: llama.cpp pin {pin_name(pin)}: {exc}", file=sys.stderr)
        return 1
    print(f"vendor: extracted llama.cpp {pin['commit']} from {pin_name(pin)} into {args.dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
