"""The router's view of the Hugging Face cache: POST /models' name check, DELETE /models' removal.

`check_repo_name` is the part of post_router_models' validation that can fail (upstream's
common_download_split_repo_tag throws std::invalid_argument: a 400); `remove_cached` is
common_download_remove: "user/model:QUANT" deletes that quant's snapshot entries and the blobs
no other entry still links to, "user/model" the whole repo folder.
Imports: `errors`, `downloads` (its cache helpers; nothing here reaches the network), stdlib.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from pyllama import downloads
from pyllama.errors import InvalidRequestError, ModelDownloadError

logger = logging.getLogger(__name__)


def check_repo_name(name: str) -> None:
    """Raise InvalidRequestError unless `name` is <user>/<model>[:quant]."""
    try:
        downloads.split_repo_tag(name)
    except ModelDownloadError as exc:
        raise InvalidRequestError(str(exc)) from None


def _link_target(path: Path) -> Path | None:
    try:
        return Path(os.path.normpath(path.parent / os.readlink(path)))
    except OSError:
        return None


def remove_cached(hf_repo_with_tag: str) -> bool:
    """Delete a cache model's files (common_download_remove); False when nothing was there."""
    try:
        repo, tag = downloads.split_repo_tag(hf_repo_with_tag)
    except ModelDownloadError as exc:
        logger.warning("cannot remove %s from the cache: %s", hf_repo_with_tag, exc)
        return False
    if not tag:  # hf_cache::remove_cached_repo
        folder = downloads.hf_cache_dir() / downloads.repo_folder(repo)
        if not folder.exists():
            return False
        try:
            shutil.rmtree(folder)
        except OSError as exc:
            logger.error("failed to remove repo cache %s: %s", folder, exc)
            return False
        return True
    tag = tag.upper()
    files = downloads.cached_files(repo)
    to_remove = [f.local_path for f in files if downloads.gguf_name(f.path).tag == tag]
    if not to_remove:
        return False
    blobs = [t for t in (_link_target(p) for p in to_remove if p.is_symlink()) if t is not None]
    for path in to_remove:
        try:
            path.unlink()
        except OSError as exc:
            logger.warning("failed to remove %s: %s", path, exc)
    still_linked = {t for t in (_link_target(f.local_path) for f in downloads.cached_files(repo)
                                if f.local_path.is_symlink()) if t is not None}
    for blob in blobs:
        if blob not in still_linked:
            try:
                blob.unlink()
            except OSError as exc:
                logger.warning("failed to remove blob %s: %s", blob, exc)
    return True
