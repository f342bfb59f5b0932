"""Per-run upload prefixes: each run of a Job uploads under ``<prefix>/attempts/<n>-<run>/`` (see
:mod:`langmerge.artifacts`); after a commit, the uploads of the runs that did not commit are deleted."""

from __future__ import annotations

import logging

from langmerge.artifacts import ATTEMPTS, join
from langmerge.store import ObjectStore, prefix_key, split_uri

log = logging.getLogger(__name__)


def stale_runs(store: ObjectStore, prefix: str, committed_uri: str) -> list[str]:
    """The ``attempts/<n>-<run>`` prefixes under ``prefix`` other than the one holding ``committed_uri``."""
    root = join(prefix, ATTEMPTS)
    _bucket, key = split_uri(root)
    base = prefix_key(key)
    runs = {o.key[len(base) :].split("/", 1)[0] for o in store.iter_objects(root)}
    keep = committed_uri.rstrip("/") + "/"
    return [join(root, run) for run in sorted(runs) if run and not keep.startswith(join(root, run) + "/")]


def delete_stale_runs(store: ObjectStore, prefix: str, committed_uri: str) -> int:
    """Delete the uploads of every run under ``prefix`` but the committed one; returns how many objects went."""
    deleted = 0
    for run in stale_runs(store, prefix, committed_uri):
        count = store.delete_prefix(run)
        log.info("deleted %s (%d object(s)): the uploads of a run that did not commit", run, count)
        deleted += count
    return deleted
