"""A local cache of base models downloaded from S3, keyed by the model's digest.

Layout under the cache root (``LANGMERGE_MODEL_CACHE``, default ``~/.cache/langmerge/models``)::

    <digest>/                     a complete model folder (only ever created by an atomic rename)
    <digest>/.langmerge-complete  the completion marker: source URI, digest and file list
    .partial/<digest>/            a download in progress; ObjectStore.download_prefix resumes its files
    .locks/<digest>.lock          an flock held while downloading, so racing processes download once

A folder without its marker is never used: readers check the marker, and the folder only appears under its real name
after every file and the marker are in place.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from langmerge.store import ObjectStore

log = logging.getLogger(__name__)

ENV_CACHE = "LANGMERGE_MODEL_CACHE"
MARKER = ".langmerge-complete"
_SAFE_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelDigestMismatch(RuntimeError):
    """The objects under the model prefix no longer have the digest the task was computed for."""


def cache_root() -> Path:
    """The cache folder from ``LANGMERGE_MODEL_CACHE`` (default ``~/.cache/langmerge/models``)."""
    configured = os.environ.get(ENV_CACHE)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "langmerge" / "models"


def is_complete(folder: Path) -> bool:
    return (folder / MARKER).is_file()


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def ensure_model(
    store: ObjectStore,
    uri: str,
    digest: str | None = None,
    *,
    cache_dir: Path | None = None,
    verify: bool = True,
    progress: Callable[[str, int], None] | None = None,
) -> Path:
    """The local folder of the model under the s3:// prefix ``uri``, downloading it once.

    ``digest`` keys the cache (default: the listing digest of ``uri``, as ``ObjectStore.prefix_digest`` computes it).
    With ``verify`` and a given digest, the listing is checked against it before downloading, and a changed model
    raises :class:`ModelDigestMismatch` instead of caching different content under the old key. ``progress``
    follows a download (see ``ObjectStore.download_prefix``); a cached model downloads nothing.
    """
    root = cache_dir or cache_root()
    verify = verify and digest is not None
    if digest is None:
        digest, _count = store.prefix_digest(uri)
    if not _SAFE_KEY.match(digest):
        raise ValueError(f"model digest {digest!r} is not usable as a cache key")
    final = root / digest
    if is_complete(final):
        log.info("base model %s: cached at %s", uri, final)
        return final
    with _locked(root / ".locks" / f"{digest}.lock"):
        if is_complete(final):  # another process finished it while we waited
            return final
        if verify:
            actual, count = store.prefix_digest(uri)
            if count == 0:
                raise FileNotFoundError(f"no objects under the base model prefix {uri}")
            if actual != digest:
                raise ModelDigestMismatch(
                    f"the base model under {uri} has digest {actual}, the task expects {digest}: it changed after "
                    "the training fingerprint was computed"
                )
        partial = root / ".partial" / digest
        log.info("base model %s: downloading into %s", uri, partial)
        paths = store.download_prefix(uri, partial, progress=progress)
        if not paths:
            raise FileNotFoundError(f"no objects under the base model prefix {uri}")
        files = sorted(p.relative_to(partial).as_posix() for p in paths)
        (partial / MARKER).write_text(json.dumps({"uri": uri, "digest": digest, "files": files}, indent=2))
        if final.exists():  # a folder without a marker: left by something else, never trusted
            shutil.rmtree(final)
        partial.replace(final)
        log.info("base model %s: %d file(s) cached at %s", uri, len(files), final)
    return final
