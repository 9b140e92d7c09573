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
import time
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
PIN_FILE = HERE / "pin.toml"
STAMP_NAME = ".pyllama-pin.json"
# Left out of --all: large, and nothing we build or run reads them.
FULL_TREE_EXCLUDE = ("models", "docs", "media", "benches", ".github", ".devops", ".git")


class FetchError(Exception):
    """A fetch failure, reported as one line that names the pin and the fix."""


def load_pin() -> dict:
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


def download(pin: dict) -> Path:
    """Return a cached copy of the pinned sdist, downloading it with pip if needed."""
    target = cache_dir() / pin["filename"]
    if target.exists() and sha256_of(target) == pin["sha256"]:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
               "--no-binary", ":all:", "-d", tmp, pin_name(pin)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / pin["filename"]
        if proc.returncode != 0 or not got.exists():
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FetchError(
                f"could not download {pin_name(pin)} with pip ({last}); check the network "
                f"or pass --archive with a local copy of {pin['filename']}")
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
