"""Ownership of S3 prefixes: exactly one custom resource may write, pin and delete under a prefix.

The operator acts with its own credentials, so without this any MergedModel naming another's ``output.uri`` could
move that model's ``current.json`` and garbage-collect its merge outputs. The owner is recorded in
``<prefix>/.langmerge-owner.json`` (kind, namespace, name, uid), written with ``If-None-Match: *`` by the first
object that reconciles the prefix, and read before anything is written, pinned or deleted there.

Another object naming an owned prefix gets a refusal naming the owner, and the operator touches nothing there for
it. When the recorded owner no longer exists in the API server (deleted, or deleted and re-created: a new uid) or
no longer names the prefix (it moved to another output), an object *of the same namespace* takes the prefix over with
a compare-and-swap on the record, so a GitOps re-create or a rename keeps its published history. Another namespace never takes a prefix over by itself: deleting the record (a
deliberate act of whoever administers the bucket) hands it over.

A prefix published before ownership records existed is claimed only by the object named in its published merge
manifest (``legacy_owner``).

One owner covers everything under its prefix, so a prefix is also refused when it lies inside another live owner's
prefix or contains one (whole path segments, as the URI policy compares them: ``b-prod2`` is beside ``b-prod``, not
in it). Deleting under a prefix (garbage collection, an expert's clean-up) leaves everything under another owner's
record alone, live or not: that data is not ours to delete.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from langmerge import artifacts
from langmerge.artifacts import OwnerRecord
from langmerge.store import ObjectStore, PreconditionFailed, split_uri
from langmerge.tenancy import uri_segments


@dataclass(frozen=True)
class Claim:
    """The outcome of :func:`claim_prefix`."""

    owned: bool
    #: The owner on record (``me`` when owned).
    owner: OwnerRecord
    #: When ``me`` just took the prefix over: the previous owner, which no longer exists.
    adopted_from: OwnerRecord | None = None
    #: Why not, when not owned.
    message: str = ""


def read_owner(store: ObjectStore, prefix: str) -> tuple[OwnerRecord, str] | None:
    return store.get_record_with_etag(artifacts.owner_uri(prefix), OwnerRecord)


def claim_prefix(
    store: ObjectStore,
    prefix: str,
    me: OwnerRecord,
    *,
    exists: Callable[[OwnerRecord], bool],
    legacy_owner: Callable[[], tuple[str, str] | None] | None = None,
    what: str = "prefix",
    exists_at: Callable[[OwnerRecord, str], bool] | None = None,
) -> Claim:
    """Make sure ``me`` owns ``prefix`` (claim it if free, take it over if its owner is gone), or say who does.

    ``exists(record)``: whether the recorded object (same kind, namespace, name and uid) still exists.
    ``legacy_owner()``: for a prefix without a record, the (namespace, name) that published there before records
    existed, if any. ``what`` names the prefix in messages, e.g. ``spec.output.uri``. ``exists_at(record, prefix)``:
    whether the owner of another prefix above or below this one still exists and names it (default: ``exists``).
    """
    around = exists_at or (lambda record, _: exists(record))
    nested = nested_owner(store, prefix, me, around, what=what)
    if nested is not None:
        return nested
    uri = artifacts.owner_uri(prefix)
    for _ in range(5):
        found = read_owner(store, prefix)
        if found is None:
            legacy = legacy_owner() if legacy_owner is not None else None
            if legacy is not None and legacy != (me.namespace, me.name):
                previous = OwnerRecord(
                    api_version=me.api_version, kind=me.kind, namespace=legacy[0], name=legacy[1], uid=""
                )
                if exists(previous) or previous.namespace != me.namespace:
                    return Claim(False, previous, message=_refusal(what, prefix, previous, alive=exists(previous)))
            try:
                store.put_json(uri, me, if_none_match=True)
            except PreconditionFailed:
                continue  # another object claimed it first: read who
            return _settle_race(store, prefix, me, around, what=what)
        record, etag = found
        if record.same_object(me):
            return Claim(True, record)
        alive = exists(record)
        if alive or record.namespace != me.namespace:
            return Claim(False, record, message=_refusal(what, prefix, record, alive=alive))
        try:
            store.put_json(uri, me, if_match=etag)
        except PreconditionFailed:
            continue  # the record changed meanwhile: decide again on the new one
        return Claim(True, me, adopted_from=record)
    raise PreconditionFailed(f"{uri} kept changing while it was claimed")


def _settle_race(
    store: ObjectStore, prefix: str, me: OwnerRecord, exists_at: Callable[[OwnerRecord, str], bool], *, what: str
) -> Claim:
    """Just claimed: an object that claimed a prefix above or below at the same moment saw no record of ours, as we
    saw none of its. Both records are there now, and both claimants decide alike: the older record (then the lower
    uid) keeps its prefix; the other takes its record back and is refused."""
    nested = nested_owner(store, prefix, me, exists_at, what=what)
    if nested is None or (nested.owner.created_at, nested.owner.uid) > (me.created_at, me.uid):
        return Claim(True, me)
    store.delete(artifacts.owner_uri(prefix))
    return nested


def owners_around(store: ObjectStore, prefix: str) -> list[tuple[str, OwnerRecord, bool]]:
    """The owner records on the path above ``prefix`` (nearest first) and anywhere below it, not its own:
    ``(their prefix, record, above)``."""
    segments = uri_segments(prefix)
    found: list[tuple[str, OwnerRecord, bool]] = []
    for depth in range(len(segments) - 1, 0, -1):
        above = "s3://" + "/".join(segments[:depth])
        record = store.get_record(artifacts.owner_uri(above), OwnerRecord)
        if record is not None:
            found.append((above, record, True))
    bucket, _ = split_uri(prefix)
    own = artifacts.owner_uri(prefix)
    for obj in store.iter_objects(prefix):
        if obj.key.rsplit("/", 1)[-1] != artifacts.OWNER or f"s3://{bucket}/{obj.key}" == own:
            continue
        below = f"s3://{bucket}/{obj.key.rsplit('/', 1)[0]}"
        record = store.get_record(f"s3://{bucket}/{obj.key}", OwnerRecord)
        if record is not None:
            found.append((below, record, False))
    return found


def nested_owner(
    store: ObjectStore,
    prefix: str,
    me: OwnerRecord,
    exists_at: Callable[[OwnerRecord, str], bool],
    *,
    what: str = "prefix",
) -> Claim | None:
    """A refusal when ``prefix`` lies inside, or contains, a prefix that another live object owns; None when not."""
    for other, record, above in owners_around(store, prefix):
        if record.same_object(me) or not exists_at(record, other):
            continue
        relation = "lies inside" if above else "contains"
        return Claim(
            False,
            record,
            message=(
                f"{what} {prefix} {relation} {other}, which belongs to {record.describe()}: one object owns everything "
                "under its prefix; the operator writes, pins and deletes nothing there for this object: choose a "
                "prefix beside it"
            ),
        )
    return None


def delete_owned(store: ObjectStore, prefix: str) -> tuple[int, list[str]]:
    """Delete everything under ``prefix`` except what lies under another owner's record below it (its own record, at
    ``prefix`` itself, goes too). Returns (objects deleted, the prefixes kept)."""
    bucket, key = split_uri(prefix)
    own = key.rstrip("/") + "/" + artifacts.OWNER
    keys = [o.key for o in store.iter_objects(prefix)]
    kept = sorted(k.rsplit("/", 1)[0] + "/" for k in keys if k.rsplit("/", 1)[-1] == artifacts.OWNER and k != own)
    doomed = [k for k in keys if not any(k.startswith(p) for p in kept)]
    store.delete_keys(bucket, doomed)
    return len(doomed), [f"s3://{bucket}/{p.rstrip('/')}" for p in kept]


def _refusal(what: str, prefix: str, owner: OwnerRecord, *, alive: bool) -> str:
    if alive:
        return (
            f"{what} {prefix} belongs to {owner.describe()}; the operator writes, pins and deletes nothing there for "
            "this object: choose another prefix"
        )
    return (
        f"{what} {prefix} belonged to {owner.describe()}, which no longer exists or no longer names it; a prefix "
        f"passes to another namespace only by hand: delete {artifacts.owner_uri(prefix)} to hand it over, or choose "
        "another prefix"
    )


def live_owner(store: ObjectStore, prefix: str, exists: Callable[[OwnerRecord], bool]) -> OwnerRecord | None:
    """Before deleting a prefix for an object that is gone: the live owner that forbids it, or None."""
    found = read_owner(store, prefix)
    if found is None:
        return None
    record, _ = found
    return record if exists(record) else None
