"""Model downloads at start-up: -hf/-hff/-hft, -mu, -dr, --offline and -cl, as llama-server does them.

`prepare_model(settings)` runs once, in the process that starts the server and before gunicorn
forks (cli.server_main, server/wsgi.py). It resolves the model the flags name to a local file,
downloading it when the cache lacks it, and returns the Settings with `model` set to that file.
The layouts are upstream's, so llama-server and pyllama share one cache:

- `-hf` uses the Hugging Face hub cache (common/hf-cache.cpp): `<cache>/models--<user>--<model>/`
  with `blobs/<sha256 or git oid>`, `snapshots/<commit>/<file>` as a relative symlink to the blob,
  and `refs/<branch>` holding the commit. `<cache>` is $LLAMA_CACHE, else $HF_HUB_CACHE,
  $HUGGINGFACE_HUB_CACHE, $HF_HOME/hub, $XDG_CACHE_HOME/huggingface/hub, ~/.cache/huggingface/hub
  (what huggingface_hub itself uses when LLAMA_CACHE is unset).
- `-mu` and `-dr` use llama.cpp's own cache folder (common.cpp fs_get_cache_directory):
  $LLAMA_CACHE, else $XDG_CACHE_HOME/llama.cpp or ~/.cache/llama.cpp (macOS ~/Library/Caches/llama.cpp),
  one file per URL named after its last path segment, and `<file>.etag` with the server's ETag.

A download goes to `<target>.downloadInProgress` (upstream's name, so either program resumes the
other's partial file), resumes with a Range request, is checked against the hub's sha256 (or git
oid) and only then renamed into place: the cache never holds a half-written or corrupt model.
The hub is reached through huggingface_hub (HfApi for refs and tree listings, its http_get for
the bytes: retries, resume, the progress bar); MODEL_ENDPOINT or HF_ENDPOINT picks the hub.
Imports: stdlib, huggingface_hub, `errors`, `presets`, `settings`. No server or engine code.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from pyllama import __version__
from pyllama.errors import ModelDownloadError
from pyllama.presets import PRESETS
from pyllama.settings import Settings

logger = logging.getLogger(__name__)

# common/download.cpp common_docker_resolve_model: Docker Hub's token service and registry
DOCKER_AUTH_URL = "https://auth.docker.io/token"
DOCKER_REGISTRY_URL = "https://registry-1.docker.io"
PART_SUFFIX = ".downloadInProgress"  # common_download_file_single_online's temporary file
_SIDECARS = ("mmproj", "imatrix", "mtp-", "eagle3-", "dflash-", "dspark-")


# --- where things are cached -------------------------------------------------------------------
def _home() -> Path:
    home = os.environ.get("USERPROFILE" if os.name == "nt" else "HOME")
    if home:
        return Path(home)
    import pwd

    return Path(pwd.getpwuid(os.getuid()).pw_dir)


def hf_cache_dir() -> Path:
    """The hub cache, in hf-cache.cpp get_cache_directory's order of variables."""
    for var, sub in (("LLAMA_CACHE", ()), ("HF_HUB_CACHE", ()), ("HUGGINGFACE_HUB_CACHE", ()),
                     ("HF_HOME", ("hub",)), ("XDG_CACHE_HOME", ("huggingface", "hub"))):
        if os.environ.get(var):
            return Path(os.environ[var], *sub)
    return _home() / ".cache" / "huggingface" / "hub"


def llama_cache_dir() -> Path:
    """llama.cpp's own cache folder (common.cpp fs_get_cache_directory): -mu and -dr files."""
    if os.environ.get("LLAMA_CACHE"):
        return Path(os.environ["LLAMA_CACHE"])
    if os.name == "nt":
        return Path(os.environ["LOCALAPPDATA"]) / "llama.cpp"
    if sys.platform == "darwin":
        return _home() / "Library" / "Caches" / "llama.cpp"
    return Path(os.environ.get("XDG_CACHE_HOME") or _home() / ".cache") / "llama.cpp"


def model_endpoint() -> str:
    """common_get_model_endpoint: $MODEL_ENDPOINT, else $HF_ENDPOINT, else huggingface.co."""
    return (os.environ.get("MODEL_ENDPOINT") or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def repo_folder(repo: str) -> str:
    return "models--" + repo.replace("/", "--")


# --- names: repos, commits, GGUF files (download.cpp, hf-cache.cpp) ----------------------------
def split_repo_tag(spec: str) -> tuple[str, str]:
    """"user/model:Q8_0" -> ("user/model", "Q8_0") (common_download_split_repo_tag).

    Raises:
        ModelDownloadError: not <user>/<model>[:quant].
    """
    parts = spec.split(":")
    repo, tag = parts[0], (parts[-1] if len(parts) > 1 else "")
    if len(repo.split("/")) != 2 or not _valid_repo_id(repo):
        raise ModelDownloadError(f"invalid HF repo format {spec!r}, expected <user>/<model>[:quant]")
    return repo, tag


def _valid_repo_id(repo: str) -> bool:
    # is_valid_repo_id: [A-Za-z0-9_] runs joined by single '/', '.' or '-', exactly one '/'
    return len(repo) <= 256 and re.fullmatch(r"[A-Za-z0-9_]+(?:[/.-][A-Za-z0-9_]+)*", repo) is not None \
        and repo.count("/") == 1


def _is_hex(s: str, *lengths: int) -> bool:
    return len(s) in lengths and re.fullmatch(r"[0-9a-fA-F]+", s) is not None


def _valid_subpath(sub: str) -> bool:
    parts = sub.replace("\\", "/").split("/")
    return bool(sub) and not os.path.isabs(sub) and ".." not in parts and "" not in parts


def _valid_token(token: str) -> bool:
    return 37 <= len(token) <= 256 and token.startswith("hf_") and token[3:].isalnum()


@dataclass(frozen=True)
class GgufName:
    """get_gguf_split_info: a GGUF path's prefix (quant included), quant tag and split position."""

    prefix: str
    tag: str
    index: int
    count: int


def gguf_name(path: str) -> GgufName:
    if not path.endswith(".gguf"):
        return GgufName("", "", 0, 0)
    prefix, index, count = path[:-len(".gguf")], 1, 1
    m = re.fullmatch(r"(.+)-([0-9]{5})-of-([0-9]{5})", prefix, re.I)
    if m:
        prefix, index, count = m.group(1), int(m.group(2)), int(m.group(3))
    m = re.search(r"[-.]([A-Z0-9_]+)$", prefix, re.I)
    return GgufName(prefix, m.group(1).upper() if m else "", index, count)


def _is_model_file(path: str) -> bool:
    """gguf_filename_is_model: a GGUF that is not a projector, imatrix or speculative sidecar."""
    return path.endswith(".gguf") and not any(k in path.rsplit("/", 1)[-1] for k in _SIDECARS)


@dataclass(frozen=True)
class HubFile:
    """One file of a repo (hf_cache::hf_file): where it is on the hub and in the cache."""

    repo: str
    path: str  # in the repo, '/'-separated
    url: str = ""
    final_path: Path = Path()  # snapshots/<commit>/<path>
    local_path: Path = Path()  # what is downloaded: blobs/<oid>, or final_path without an oid
    oid: str = ""  # the LFS sha256, or the git blob sha1 of a small file
    size: int | None = None


def find_best_model(files: list[HubFile], tag: str) -> HubFile | None:
    """The file a quant tag picks (download.cpp find_best_model): Q4_K_M, then Q8_0, then the first."""
    def first_part(f):
        name = gguf_name(f.path)
        return not (name.count > 1 and name.index != 1)

    for t in [tag] if tag else ["Q4_K_M", "Q8_0"]:
        try:
            pattern = re.compile(t + "[.-]", re.I)
        except re.error:
            raise ModelDownloadError(f"invalid quant tag {t!r}") from None
        for f in files:
            if _is_model_file(f.path) and pattern.search(f.path) and first_part(f):
                return f
    if not tag:
        return next((f for f in files if _is_model_file(f.path) and first_part(f)), None)
    return None


def split_files(files: list[HubFile], primary: HubFile) -> list[HubFile]:
    """Every split of the primary's model (get_split_files), or just the primary."""
    name = gguf_name(primary.path)
    if name.count <= 1:
        return [primary]
    return [f for f in files if (n := gguf_name(f.path)).count == name.count and n.prefix == name.prefix]


# --- the hub cache -----------------------------------------------------------------------------
def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cached_ref(repo_dir: Path) -> str:
    """get_cached_ref: the commit refs/main names, else the first valid ref."""
    fallback = ""
    try:
        entries = list(os.scandir(repo_dir / "refs"))
    except OSError:
        return ""
    for entry in entries:
        if not entry.is_file():
            continue
        try:
            commit = Path(entry.path).read_text().splitlines()[0].strip()
        except (OSError, IndexError):
            continue
        if not _is_hex(commit, 40):
            continue
        if entry.name == "main":
            return commit
        fallback = fallback or commit
    return fallback


def _walk(root: str):
    # std::filesystem::recursive_directory_iterator's order: each entry, then its contents
    for entry in os.scandir(root):
        yield entry
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(entry.path)


def cached_files(repo: str = "") -> list[HubFile]:
    """The files of the cached snapshot of `repo` (or of every repo), as hf_cache::get_cached_files."""
    cache = hf_cache_dir()
    out = []
    try:
        repos = list(os.scandir(cache))
    except OSError:
        return out
    for entry in repos:
        if not entry.is_dir() or not entry.name.startswith("models--"):
            continue
        repo_id = entry.name[len("models--"):].replace("--", "/")
        if not _valid_repo_id(repo_id) or (repo and repo_id != repo):
            continue
        commit = _cached_ref(Path(entry.path))
        snapshot = Path(entry.path, "snapshots", commit)
        if not commit or not snapshot.is_dir():
            continue
        for item in _walk(str(snapshot)):
            if item.is_file() or item.is_symlink():
                rel = Path(item.path).relative_to(snapshot).as_posix()
                out.append(HubFile(repo_id, rel, final_path=Path(item.path), local_path=Path(item.path)))
    return out


def cached_models() -> list[tuple[str, str]]:
    """(repo, quant) of each cached model, as common_list_cached_models."""
    seen, out = set(), []
    for f in cached_files():
        name = gguf_name(f.path)
        if name.index != 1 or not name.tag or any(k in name.prefix for k in _SIDECARS if k != "imatrix"):
            continue
        if (f.repo, name.tag) not in seen:
            seen.add((f.repo, name.tag))
            out.append((f.repo, name.tag))
    return out


def format_cache_list() -> str:
    """What `-cl` prints (arg.cpp's --cache-list handler)."""
    models = cached_models()
    lines = [f"number of models in cache: {len(models)}"]
    lines += [f"{i:4d}. {repo}:{tag}" for i, (repo, tag) in enumerate(models, 1)]
    return "\n".join(lines) + "\n"


def _api(endpoint: str, token: str):
    from huggingface_hub import HfApi

    if token and not _valid_token(token):  # hf-cache.cpp api_get drops a malformed token
        logger.warning("invalid Hugging Face token, authentication disabled for the hub API")
        token = ""
    return HfApi(endpoint=endpoint, token=token or False, library_name="pyllama", library_version=__version__)


def remote_files(repo: str, token: str, endpoint: str) -> list[HubFile]:
    """The repo's files at its main branch (hf_cache::get_repo_files), recording refs/<branch>.

    Raises:
        Exception: whatever huggingface_hub raises for an unreachable hub or repo.
    """
    from huggingface_hub import hf_hub_url

    api = _api(endpoint, token)
    branch = commit = ""
    for ref in api.list_repo_refs(repo).branches:  # get_repo_commit: main, else the first valid
        if not _is_hex(ref.target_commit, 40) or not _valid_subpath(ref.name):
            continue
        if ref.name == "main" or not branch:
            branch, commit = ref.name, ref.target_commit
        if ref.name == "main":
            break
    if not commit:
        raise ModelDownloadError(f"repository {repo} has no valid branch")
    repo_dir = hf_cache_dir() / repo_folder(repo)
    _write_atomic(repo_dir / "refs" / branch, commit)
    out = []
    for entry in api.list_repo_tree(repo, revision=commit, recursive=True):
        if not hasattr(entry, "blob_id") or not _valid_subpath(entry.path):
            continue  # a folder, or a path that would leave the snapshot
        lfs = getattr(entry, "lfs", None)
        oid = (lfs.sha256 if lfs else entry.blob_id) or ""
        if oid and not _is_hex(oid, 40, 64):
            logger.warning("%s: skipping %s, invalid oid %s", repo, entry.path, oid)
            continue
        final = repo_dir / "snapshots" / commit / Path(*entry.path.split("/"))
        local = repo_dir / "blobs" / oid if oid and not final.exists() else final
        out.append(HubFile(repo, entry.path, hf_hub_url(repo, entry.path, revision=commit, endpoint=endpoint),
                           final, local, oid.lower(), lfs.size if lfs else entry.size))
    return out


def _describe(exc: BaseException) -> str:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if isinstance(exc, GatedRepoError):
        return "the repository is gated: accept its conditions on the hub and pass -hft or HF_TOKEN"
    if isinstance(exc, RepositoryNotFoundError):
        return "repository not found (or private: pass -hft or HF_TOKEN)"
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


# --- fetching bytes ----------------------------------------------------------------------------
def _size(n: int | None) -> str:
    if n is None:
        return "? B"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


@functools.cache
def _progress_class():
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Progress(hf_tqdm):
        """huggingface_hub's bar on a terminal; elsewhere a log line per 10% or per minute."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._lines = bool(self.disable)
            self._desc = kwargs.get("desc") or ""
            self._done = kwargs.get("initial") or 0
            self._total = kwargs.get("total")
            self._next_pct = (self._done * 100 // self._total // 10 * 10 + 10) if self._total else 10
            self._last = time.monotonic()

        def update(self, n=1):
            if self._lines and n:
                self._done += n
                now = time.monotonic()
                pct = self._done * 100 // self._total if self._total else 0
                if (self._total and pct >= self._next_pct and self._done < self._total) or now - self._last >= 60:
                    logger.info("downloading %s: %s of %s (%d%%)", self._desc, _size(self._done),
                                _size(self._total), pct)
                    self._next_pct = pct // 10 * 10 + 10
                    self._last = now
            return super().update(n)

    return Progress


def _checksum(path: Path, oid: str) -> str:
    # a 64-digit oid is the LFS sha256; a 40-digit one the git blob sha1 of a small file
    h = hashlib.sha256() if len(oid) == 64 else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


def _fetch(url: str, target: Path, *, headers: dict, size: int | None, oid: str = "",
           resumable: bool = True, name: str = "") -> None:
    """Download `url` to `target` through `target`.downloadInProgress, resuming, checked, renamed.

    Raises:
        ModelDownloadError: an HTTP error, a broken connection, or a checksum mismatch.
    """
    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.file_download import http_get

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + PART_SUFFIX)
    done = part.stat().st_size if part.exists() else 0
    if done and (not resumable or (size is not None and done > size)):
        part.unlink()
        done = 0
    if done:
        logger.info("resuming %s at %s of %s", url, _size(done), _size(size))
    else:
        logger.info("downloading %s (%s) to %s", url, _size(size), target)
    # NOTE(downloads): http_get takes a tqdm_class in newer huggingface_hub releases (not 1.0)
    progress = {"tqdm_class": _progress_class()} if "tqdm_class" in inspect.signature(http_get).parameters else {}
    for attempt in range(3):  # common_download_file_single_online: 3 attempts, 2 s then 4 s apart
        try:
            with open(part, "ab") as fh:
                http_get(url, fh, resume_size=done, headers=headers, expected_size=size,
                         displayed_filename=name or target.name, **progress)
            break
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else "?"
            raise ModelDownloadError(f"download of {url} failed (HTTP {status}): {_describe(exc)}") from None
        except Exception as exc:  # NOTE(downloads): httpx/OS errors of any kind end the start-up alike
            if size is not None and part.exists() and part.stat().st_size > size:
                part.unlink()
            kept = part.stat().st_size if part.exists() else 0
            if attempt < 2 and kept > done:  # some progress: resume (http_get's own retries are spent)
                logger.warning("download of %s broke off at %s: resuming in %d s", url, _size(kept), 2 << attempt)
                time.sleep(2 << attempt)
                done = kept
                continue
            hint = f"; run again to resume from {_size(kept)}" if kept else ""
            raise ModelDownloadError(f"download of {url} failed: {_describe(exc) or type(exc).__name__}{hint}") \
                from None
    if oid:
        got = _checksum(part, oid)
        if got != oid.lower():
            part.unlink()
            raise ModelDownloadError(f"download of {url} is corrupt: its {'sha256' if len(oid) == 64 else 'git oid'} "
                                     f"is {got}, the hub says {oid}; the file was deleted, run again to retry")
    os.replace(part, target)
    logger.info("downloaded %s", target)


def _link(blob: Path, final: Path) -> None:
    """hf_cache::finalize_file: snapshots/<commit>/<file> -> ../../blobs/<oid>, else move the blob."""
    if blob == final or final.exists():
        return
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_symlink():
        final.unlink()  # a link to a blob that is gone
    try:
        os.symlink(os.path.relpath(blob, final.parent), final)
        return
    except OSError as exc:
        logger.warning("cannot create a symlink in the cache (%s): moving the file into the snapshot", exc)
    try:
        os.replace(blob, final)
    except OSError:
        shutil.copyfile(blob, final)


# --- -hf ---------------------------------------------------------------------------------------
def _quant_bits(path: str) -> int:
    # extract_quant_bits: the first number of the quant tag (Q4_K_M -> 4, F16 -> 16)
    m = re.search(r"[0-9]+", gguf_name(path).tag)
    return int(m.group(0)) if m else 0


def find_best_mmproj(files: list[HubFile], model: str) -> HubFile | None:
    """The projector shipped beside a model (download.cpp find_best_sibling with "mmproj"): a
    GGUF named *mmproj* in the model's folder or above it, the deepest first, then the one
    whose quant bits are closest to the model's."""
    model_dir = model.split("/")[:-1]
    best, best_key = None, None
    for f in files:
        if not f.path.endswith(".gguf") or "mmproj" not in f.path:
            continue
        sib_dir = f.path.split("/")[:-1]
        if model_dir[:len(sib_dir)] != sib_dir:
            continue
        key = (-len(sib_dir), abs(_quant_bits(f.path) - _quant_bits(model)))
        if best_key is None or key < best_key:
            best, best_key = f, key
    return best


def resolve_hf(spec: str, hf_file: str = "", *, token: str = "", offline: bool = False) -> str:
    """The local path of the model `-hf spec [-hff hf_file]` names, downloaded if needed.

    Mirrors common_download_get_hf_plan + common_models_handler_apply: list the repo on the hub
    (or, offline or when the hub fails, the cached snapshot), pick the file, fetch its splits.

    Raises:
        ModelDownloadError: a bad name, nothing on the hub or in the cache, a failed download.
    """
    return resolve_hf_files(spec, hf_file, token=token, offline=offline)[0]


def resolve_hf_files(spec: str, hf_file: str = "", *, token: str = "", offline: bool = False,
                     mmproj: bool = False) -> tuple[str, str]:
    """resolve_hf, and with `mmproj` the repository's multimodal projector too (--mmproj-auto):
    (model path, projector path or "")."""
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    repo, tag = split_repo_tag(spec)
    endpoint = model_endpoint()
    files, error = [], ""
    if not offline:
        try:
            files = remote_files(repo, token, endpoint)
        except Exception as exc:  # NOTE(downloads): as upstream, any failure falls back to the cache
            error = _describe(exc)
            logger.warning("cannot list %s on %s: %s", repo, endpoint, error)
    if not files:
        files = cached_files(repo)
        if files and not offline:
            logger.warning("using the cached snapshot of %s", repo)
    if not files:
        where = f"not in the cache ({hf_cache_dir()})"
        raise ModelDownloadError(f"cannot get {repo}: {error}, and it is {where}" if error else
                                 f"{repo} is {where}, and --offline forbids downloading it" if offline else
                                 f"repository {repo} has no files")
    if any(f.path == "preset.ini" for f in files):
        raise ModelDownloadError(f"{repo} is a preset repository (preset.ini), which starts llama-server in "
                                 "router mode: pyllama does not support router mode")
    ggufs = ", ".join(f.path for f in files if f.path.endswith(".gguf")) or "none"
    if hf_file:
        primary = next((f for f in files if f.path == hf_file), None)
        if primary is None:
            raise ModelDownloadError(f"file {hf_file!r} not found in repository {repo} "
                                     f"(available GGUF files: {ggufs})")
    else:
        primary = find_best_model(files, tag)
        if primary is None:
            raise ModelDownloadError(f"no GGUF file{f' for quant {tag}' if tag else ''} found in repository "
                                     f"{repo} (available GGUF files: {ggufs})")
    projector = find_best_mmproj(files, primary.path)
    if projector is not None and not mmproj:
        logger.info("%s ships a multimodal projector (%s): not downloaded (--no-mmproj, or --mmproj given)",
                    repo, projector.path)
    parts = split_files(files, primary)
    for f in parts + ([projector] if projector is not None and mmproj else []):
        if f.final_path.exists():
            continue
        if offline or not f.url:
            raise ModelDownloadError(f"{f.path} of {repo} is not in the cache ({f.final_path})"
                                     + (" and --offline forbids downloading it" if offline else ""))
        # NOTE(downloads): built here, not earlier: huggingface_hub's user agent may reach the hub
        headers = build_hf_headers(token=token or False, library_name="pyllama", library_version=__version__)
        if f.local_path != f.final_path:
            lock = hf_cache_dir() / ".locks" / repo_folder(repo) / f"{f.oid}.lock"
            lock.parent.mkdir(parents=True, exist_ok=True)
            with WeakFileLock(lock):  # the lock huggingface_hub takes for the same blob
                if not f.local_path.exists():
                    _fetch(f.url, f.local_path, headers=headers, size=f.size, oid=f.oid,
                           name=f.path.rsplit("/", 1)[-1])
            _link(f.local_path, f.final_path)
        else:
            _fetch(f.url, f.final_path, headers=headers, size=f.size, oid=f.oid)
    if len(parts) < gguf_name(primary.path).count:
        raise ModelDownloadError(f"{repo}: {primary.path} is split in {gguf_name(primary.path).count} files, "
                                 f"only {len(parts)} are there")
    return str(primary.final_path), str(projector.final_path) if projector is not None and mmproj else ""


# --- -mu and -dr -------------------------------------------------------------------------------
def url_parts(url: str) -> list[str]:
    """Every split of a multi-part GGUF URL (common_download_get_all_parts), or just the URL."""
    name = gguf_name(url)
    if name.count <= 1:
        return [url]
    return [f"{name.prefix}-{i:05d}-of-{name.count:05d}.gguf" for i in range(1, name.count + 1)]


def default_local_path(url: str) -> Path:
    """arg.cpp get_default_local_path: the URL's last path segment in llama.cpp's cache folder."""
    name = url.split("#")[0].split("?")[0].split("/")[-1]
    if not name:
        raise ModelDownloadError(f"cannot name a cache file after {url!r}")
    return llama_cache_dir() / name


def fetch_url(url: str, path: Path, *, offline: bool = False, bearer: str = "", sha256: str = "") -> None:
    """Make `path` the file at `url`, as common_download_file_single (with its .etag file).

    A cached file is kept when the server is unreachable, has no ETag, or has the same ETag;
    otherwise it is downloaded again.

    Raises:
        ModelDownloadError: offline without the file, an HTTP error, a failed download.
    """
    from huggingface_hub import constants
    from huggingface_hub.utils import http_backoff

    exists = path.exists()
    if offline:
        if not exists:
            raise ModelDownloadError(f"required file is not available in cache (offline mode): {path}")
        return
    headers = {"User-Agent": f"pyllama/{__version__}"}
    if bearer:
        headers["Authorization"] = f"Bearer {bearer}"
    etag_path = path.with_name(path.name + ".etag")
    try:
        head = http_backoff("HEAD", url, headers=headers, follow_redirects=True, timeout=constants.HF_HUB_ETAG_TIMEOUT,
                            retry_on_exceptions=(), retry_on_status_codes=())
        status, error = head.status_code, ""
    except Exception as exc:  # NOTE(downloads): unreachable: keep a cached file, as upstream
        head, status, error = None, None, _describe(exc)
    if head is None or not 200 <= status < 300:
        if exists:
            logger.warning("cannot check %s (%s): using the cached %s", url, error or f"HTTP {status}", path)
            return
        raise ModelDownloadError(f"cannot download {url}: {error or f'HTTP {status}'}")
    etag = head.headers.get("ETag", "")
    if exists:
        try:
            last = etag_path.read_text().splitlines()[0] if etag_path.exists() else ""
        except (OSError, IndexError):
            last = ""
        if not etag or etag == last:
            return
        logger.info("%s changed on the server (ETag %s, was %s): downloading it again", path.name, etag, last or "none")
        path.unlink()
    length = head.headers.get("Content-Length")
    ranges = head.headers.get("Accept-Ranges", "none") != "none"
    _fetch(url, path, headers=headers, size=int(length) if length and length.isdigit() else None,
           oid=sha256, resumable=ranges)
    if etag:
        _write_atomic(etag_path, etag)


def resolve_url(url: str, model: str = "", *, offline: bool = False, bearer: str = "") -> str:
    """The local path of `-mu url` (every split of a multi-part model), downloaded if needed.

    Mirrors arg.cpp build_url_tasks: one file goes to -m when given, else to the cache; the
    splits go to -m's folder when given, else to the cache.
    """
    parts = url_parts(url)
    if len(parts) == 1:
        paths = [Path(model) if model else default_local_path(url)]
    else:
        base = Path(model).parent if model else None
        paths = [base / default_local_path(p).name if base else default_local_path(p) for p in parts]
    for part, path in zip(parts, paths):
        fetch_url(part, path, offline=offline, bearer=bearer)
    return str(paths[0])


def resolve_docker(spec: str, *, offline: bool = False) -> str:
    """The local path of `-dr [<repo>/]<model>[:quant]` (common_docker_resolve_model).

    Raises:
        ModelDownloadError: offline without the file, a registry error, no GGUF layer.
    """
    from huggingface_hub.utils import http_backoff

    repo, colon, tag = spec.partition(":")
    tag = tag if colon else "latest"
    if "/" not in spec:
        repo = "ai/" + repo
    path = llama_cache_dir() / f"{repo.replace('/', '_')}_{tag}.gguf"
    if offline:  # NOTE(downloads): upstream asks the registry even with --offline; this does not
        fetch_url("", path, offline=True)
        return str(path)
    logger.info("downloading Docker model %s:%s", repo, tag)
    agent = {"User-Agent": f"pyllama/{__version__}"}

    def get_json(url: str, headers: dict, what: str) -> dict:
        try:
            resp = http_backoff("GET", url, headers={**agent, **headers}, follow_redirects=True)
        except Exception as exc:
            raise ModelDownloadError(f"cannot get the Docker {what} of {repo}:{tag}: {_describe(exc)}") from None
        if resp.status_code != 200:
            raise ModelDownloadError(f"cannot get the Docker {what} of {repo}:{tag}: HTTP {resp.status_code}")
        try:
            return resp.json()
        except ValueError:
            raise ModelDownloadError(f"the Docker {what} of {repo}:{tag} is not JSON") from None

    token = get_json(f"{DOCKER_AUTH_URL}?service=registry.docker.io&scope=repository:{repo}:pull", {},
                     "registry token").get("token")
    if not isinstance(token, str):
        raise ModelDownloadError("Docker registry token response missing 'token' field")
    manifest = get_json(f"{DOCKER_REGISTRY_URL}/v2/{repo}/manifests/{tag}", {
        "Authorization": f"Bearer {token}",
        "Accept": "application/vnd.docker.distribution.manifest.v2+json,application/vnd.oci.image.manifest.v1+json",
    }, "manifest")
    digest = next((layer.get("digest", "") for layer in manifest.get("layers", [])
                   if "gguf" in str(layer.get("mediaType", ""))), None)
    if digest is None:
        raise ModelDownloadError("No GGUF layer found in Docker manifest")
    if not re.fullmatch(r"sha256:[0-9a-fA-F]{64}", digest):
        raise ModelDownloadError(f"Invalid OCI digest format received in manifest: {digest}")
    digest = digest.lower()
    fetch_url(f"{DOCKER_REGISTRY_URL}/v2/{repo}/blobs/{digest}", path, bearer=token, sha256=digest[7:])
    return str(path)


# --- start-up ----------------------------------------------------------------------------------
def needs_download(settings: Settings) -> bool:
    """Whether the flags name a model by repo or URL rather than by file."""
    return bool(settings.hf_repo or settings.docker_repo or settings.model_url or settings.mmproj_url)


def _route_library_logs() -> None:
    """huggingface_hub's warnings through our handlers only (it adds a stderr handler of its own),
    and httpx's line per request only with -v."""
    import huggingface_hub.utils.logging  # noqa: F401  (adds the handler when first imported)

    hub = logging.getLogger("huggingface_hub")
    for handler in [h for h in hub.handlers if type(h) is logging.StreamHandler]:
        hub.removeHandler(handler)
    if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
        for name in ("httpx", "httpx2"):
            if logging.getLogger(name).level == logging.NOTSET:
                logging.getLogger(name).setLevel(logging.WARNING)


def log_unapplied_presets(settings: Settings) -> None:
    for f in fields(Settings):
        if f.metadata.get("kind") == "preset" and getattr(settings, f.name):
            flag = f.metadata["names"][0]
            for item in PRESETS[flag].unapplied:
                logger.warning("%s: not applied: %s", flag, item)


def prepare_model(settings: Settings) -> Settings:
    """Resolve -hf/-dr/-mu to a local file before the server starts, downloading it once.

    Call in the process that starts the server, before gunicorn forks. The result has `model`
    set to the file, the download flags cleared (so a second call does nothing) and, as
    llama-server's server.cpp does, `alias` set to the repo name when -a is not given: /props'
    model_alias and /v1/models' id show "user/model:quant", model_path the snapshot file.

    Raises:
        ModelDownloadError: the model cannot be found, downloaded, or (offline) is not cached.
    """
    log_unapplied_presets(settings)
    if settings.spec_draft_hf:  # -hfd: the draft model (-md names its file, as upstream's hf_file)
        _route_library_logs()
        draft = resolve_hf(settings.spec_draft_hf, settings.spec_draft_model, token=settings.hf_token,
                           offline=settings.offline)
        logger.info("draft model %s: %s", settings.spec_draft_hf, draft)
        settings = replace(settings, spec_draft_model=draft, spec_draft_hf="")
    if not needs_download(settings):
        return settings
    _route_library_logs()
    changes = {}
    if settings.mmproj_url:  # -mmu: to --mmproj's path when given, else the cache (handle_url)
        mmproj = settings.mmproj or str(default_local_path(settings.mmproj_url))
        fetch_url(settings.mmproj_url, Path(mmproj), offline=settings.offline, bearer=settings.hf_token)
        logger.info("multimodal projector %s: %s", settings.mmproj_url, mmproj)
        changes = {"mmproj": mmproj, "mmproj_url": ""}
        if not (settings.hf_repo or settings.docker_repo or settings.model_url):
            return replace(settings, **changes)
    if settings.hf_repo:  # as upstream, -hf wins over -dr, and -dr over -mu
        name = settings.hf_repo
        # --mmproj-auto: the repo's projector too, unless one is named (download_mmproj)
        want = settings.mmproj_auto and not settings.mmproj and not changes
        path, mmproj = resolve_hf_files(settings.hf_repo, settings.hf_file, token=settings.hf_token,
                                        offline=settings.offline, mmproj=want)
        if mmproj:
            logger.info("multimodal projector of %s: %s", name, mmproj)
            changes["mmproj"] = mmproj
    elif settings.docker_repo:
        name = settings.docker_repo
        path = resolve_docker(settings.docker_repo, offline=settings.offline)
    else:
        name = ""  # upstream names a -mu model by its local path
        path = resolve_url(settings.model_url, settings.model, offline=settings.offline, bearer=settings.hf_token)
    logger.info("model %s: %s", name or settings.model_url, path)
    return replace(settings, model=path, alias=settings.alias or name, hf_repo="", hf_file="",
                   docker_repo="", model_url="", **changes)
