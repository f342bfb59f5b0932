"""The only seam to S3. Everything that touches object storage, operator and trainer alike, goes through here.

It offers what the invariants need: paginated listings with a digest, plain and conditional puts (``IfNoneMatch='*'``
for commits, ``IfMatch`` for compare-and-swap), resumable prefix downloads and directory uploads.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from pydantic import BaseModel, ValidationError

from langmerge.fingerprint import objects_digest

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_URI = re.compile(r"^s3://(?P<bucket>[^/]+)/?(?P<key>.*)$")

ModelT = TypeVar("ModelT", bound=BaseModel)

#: Error codes of S3 answers that mean "the service is not answering properly right now", not "your request is wrong".
_UNAVAILABLE_CODES = frozenset({"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "503", "500"})


class StoreError(Exception):
    """An S3 request failed in a way the caller should report."""


class StorageUnavailable(StoreError):
    """S3 does not answer (connection refused or reset, timeout, 5xx): an outage that heals by itself."""

    def __init__(self, endpoint: str, detail: str) -> None:
        self.endpoint = endpoint
        self.detail = detail
        super().__init__(f"S3 at {endpoint} is unavailable: {detail}")


class BucketNotFound(StoreError):
    """The bucket of a URI does not exist: a user error (a wrong URI, or a bucket not created yet), not an outage."""

    def __init__(self, bucket: str, uri: str) -> None:
        self.bucket = bucket
        self.uri = uri
        super().__init__(f"S3 bucket {bucket!r} does not exist (needed for {uri})")


class MalformedRecord(StoreError):
    """An object holds something other than the JSON record expected there; names the key and the parse error."""

    def __init__(self, uri: str, detail: str) -> None:
        self.uri = uri
        self.detail = detail
        super().__init__(f"{uri} is malformed: {detail}")


class PreconditionFailed(StoreError):
    """A conditional put lost: the object exists (IfNoneMatch) or changed (IfMatch)."""


class NotFound(StoreError):
    pass


class UnsafeKey(StoreError):
    """An object key that would land outside the local folder it is downloaded into."""


def local_path(directory: Path, relative: str) -> Path:
    """``directory / relative`` for a key relative to a listed prefix; :class:`UnsafeKey` when the key is absolute,
    has empty, ``.`` or ``..`` segments (``prefix//etc/x``, ``a/../../x``), or resolves outside ``directory``."""
    parts = relative.split("/")
    if not relative or any(part in ("", ".", "..") for part in parts) or "\0" in relative:
        raise UnsafeKey(f"object key part {relative!r} is not a plain relative path; refusing to write it locally")
    target = directory / relative
    if not target.resolve().is_relative_to(directory.resolve()):
        raise UnsafeKey(f"object key part {relative!r} resolves outside {directory}; refusing to write it locally")
    return target


def describe_validation_error(err: ValidationError) -> str:
    """``files.a.size: Input should be a valid integer; fingerprint: missing`` — one line naming each bad field."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(record)"
        parts.append(f"{loc}: {'missing' if e['type'] == 'missing' else e['msg']}")
    return "; ".join(parts)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/a/b`` -> ``("bucket", "a/b")``."""
    match = _URI.match(uri)
    if not match:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return match["bucket"], match["key"]


def prefix_key(key: str) -> str:
    """A key prefix that lists the folder's contents and nothing beside it (``a/b`` -> ``a/b/``)."""
    return key.rstrip("/") + "/" if key else ""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    etag: str

    def relative_to(self, prefix: str) -> str:
        return self.key[len(prefix) :]


#: Seconds the health probe waits to connect, and for its answer (one try).
PROBE_TIMEOUT = 2.0


@dataclass(frozen=True)
class S3Config:
    """How to reach S3. Credentials come from the environment (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY)."""

    endpoint_url: str | None = None
    region: str = "us-east-1"
    #: Seconds to wait for a connection, and for each read of an answer: no request waits forever.
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    #: Tries per request (botocore's standard retry mode) before an error reaches the caller.
    max_attempts: int = 5

    @classmethod
    def from_env(cls) -> S3Config:
        return cls(
            endpoint_url=os.environ.get("LANGMERGE_S3_ENDPOINT") or os.environ.get("AWS_ENDPOINT_URL") or None,
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        )


def _code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", ""))


def _status(err: ClientError) -> int:
    return int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def is_unavailable(err: BaseException) -> bool:
    """Whether a botocore error means S3 is not answering (as opposed to answering "no")."""
    if isinstance(err, BotoConnectionError | HTTPClientError):
        return True
    if isinstance(err, ClientError):
        return _status(err) >= 500 or _code(err) in _UNAVAILABLE_CODES
    return False


class ObjectStore:
    """A thin, typed wrapper over an S3 client.

    Errors come out as :class:`StoreError` subclasses: :class:`StorageUnavailable` when S3 does not answer,
    :class:`BucketNotFound` for a missing bucket, :class:`MalformedRecord` for an object that does not parse, never
    as a raw botocore exception.
    """

    def __init__(self, client: S3Client, probe_client: S3Client | None = None) -> None:
        self.client = client
        #: The health probe's client: one try with short timeouts, so that an S3 that stopped answering (a paused or
        #: unreachable server, where connecting hangs instead of being refused) is noticed within seconds, not after
        #: the main client's connect timeouts and retries.
        self.probe_client = probe_client or client

    @property
    def endpoint(self) -> str:
        return str(self.client.meta.endpoint_url)

    def _fail(self, err: ClientError | BotoCoreError, what: str, uri: str) -> NoReturn:
        """Raise ``err`` as the matching :class:`StoreError` (``what`` names the request, e.g. ``get``)."""
        if is_unavailable(err):
            raise StorageUnavailable(self.endpoint, f"{what} {uri}: {err}") from err
        if isinstance(err, ClientError) and _code(err) == "NoSuchBucket":
            raise BucketNotFound(split_uri(uri)[0], uri) from err
        raise StoreError(f"{what} {uri} failed: {err}") from err

    def probe(self, bucket: str) -> None:
        """One cheap request: raises :class:`StorageUnavailable` if S3 does not answer (any answer, even "no such
        bucket" or "access denied", means it is back)."""
        try:
            self.probe_client.head_bucket(Bucket=bucket)
        except (ClientError, BotoCoreError) as err:
            if is_unavailable(err):
                raise StorageUnavailable(self.endpoint, str(err)) from err

    @classmethod
    def from_config(cls, config: S3Config | None = None, **credentials: str) -> ObjectStore:
        config = config or S3Config.from_env()

        def client(connect_timeout: float, read_timeout: float, max_attempts: int) -> S3Client:
            made: S3Client = boto3.client(  # type: ignore[call-overload]
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                config=Config(
                    s3={"addressing_style": "path"},
                    retries={"max_attempts": max_attempts, "mode": "standard"},
                    connect_timeout=connect_timeout,
                    read_timeout=read_timeout,
                    # Checksums on every request are supported by AWS but not by every S3-compatible server.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                ),
                **credentials,
            )
            return made

        return cls(
            client(config.connect_timeout, config.read_timeout, config.max_attempts),
            probe_client=client(min(config.connect_timeout, PROBE_TIMEOUT), min(config.read_timeout, PROBE_TIMEOUT), 1),
        )

    # -- reading -------------------------------------------------------------------------------------------------
    def list_objects(self, uri: str) -> list[ObjectInfo]:
        """Every object under the folder ``uri`` (paginated ListObjectsV2)."""
        return list(self.iter_objects(uri))

    def iter_objects(self, uri: str) -> Iterator[ObjectInfo]:
        bucket, key = split_uri(uri)
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix_key(key)):
                for obj in page.get("Contents", []):
                    yield ObjectInfo(key=obj["Key"], size=int(obj["Size"]), etag=str(obj.get("ETag", "")).strip('"'))
        except (ClientError, BotoCoreError) as err:
            self._fail(err, "listing", uri)

    def prefix_digest(self, uri: str, suffix: str | None = None) -> tuple[str, int]:
        """Digest over (relative key, size, ETag) of the objects under ``uri`` (optionally only ``*suffix``).

        Returns the digest and the number of objects.
        """
        _bucket, key = split_uri(uri)
        base = prefix_key(key)
        rows = [
            (o.relative_to(base), o.size, o.etag)
            for o in self.iter_objects(uri)
            if suffix is None or o.key.endswith(suffix)
        ]
        return objects_digest(rows), len(rows)

    def head(self, uri: str) -> ObjectInfo | None:
        bucket, key = split_uri(uri)
        try:
            resp = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            if isinstance(err, ClientError) and (_status(err) == 404 or _code(err) in ("404", "NoSuchKey", "NotFound")):
                return None
            self._fail(err, "head", uri)
        return ObjectInfo(key=key, size=int(resp["ContentLength"]), etag=str(resp.get("ETag", "")).strip('"'))

    def exists(self, uri: str) -> bool:
        return self.head(uri) is not None

    def get_bytes(self, uri: str) -> tuple[bytes, str]:
        """Object body and ETag. Raises :class:`NotFound`."""
        bucket, key = split_uri(uri)
        try:
            resp = self.client.get_object(Bucket=bucket, Key=key)
            body = resp["Body"].read()
        except (ClientError, BotoCoreError) as err:
            if isinstance(err, ClientError) and (_status(err) == 404 or _code(err) in ("NoSuchKey", "404")):
                raise NotFound(uri) from err
            self._fail(err, "get", uri)
        return body, str(resp.get("ETag", "")).strip('"')

    def get_json(self, uri: str) -> Any:
        """The decoded JSON object at ``uri``; :class:`MalformedRecord` if it is not JSON."""
        body, _ = self.get_bytes(uri)
        return _decode(uri, body)

    def get_json_or_none(self, uri: str) -> Any | None:
        try:
            return self.get_json(uri)
        except NotFound:
            return None

    def get_json_with_etag(self, uri: str) -> tuple[Any, str] | None:
        try:
            body, etag = self.get_bytes(uri)
        except NotFound:
            return None
        return _decode(uri, body), etag

    def get_record(self, uri: str, model: type[ModelT]) -> ModelT | None:
        """The record at ``uri`` parsed as ``model`` (None if absent); :class:`MalformedRecord` names the key and
        the parse error when it is not valid JSON or not a valid ``model``."""
        found = self.get_record_with_etag(uri, model)
        return found[0] if found is not None else None

    def get_record_with_etag(self, uri: str, model: type[ModelT]) -> tuple[ModelT, str] | None:
        found = self.get_json_with_etag(uri)
        if found is None:
            return None
        return parse_record(uri, found[0], model), found[1]

    # -- writing -------------------------------------------------------------------------------------------------
    def put_bytes(
        self,
        uri: str,
        data: bytes,
        *,
        if_none_match: bool = False,
        if_match: str | None = None,
        content_type: str = "application/octet-stream",
    ) -> str:
        """Put an object; returns its ETag. ``if_none_match`` commits only if absent; ``if_match`` is a CAS."""
        bucket, key = split_uri(uri)
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": key, "Body": data, "ContentType": content_type}
        if if_none_match:
            kwargs["IfNoneMatch"] = "*"
        if if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            resp = self.client.put_object(**kwargs)
        except (ClientError, BotoCoreError) as err:
            if isinstance(err, ClientError) and (
                _status(err) in (409, 412) or _code(err) in ("PreconditionFailed", "ConditionalRequestConflict")
            ):
                raise PreconditionFailed(f"conditional put of {uri} lost") from err
            self._fail(err, "put", uri)
        return str(resp.get("ETag", "")).strip('"')

    def put_json(self, uri: str, value: Any, **kwargs: Any) -> str:
        if hasattr(value, "to_json"):
            text = value.to_json()
        else:
            text = json.dumps(value, indent=2, sort_keys=True)
        return self.put_bytes(uri, text.encode(), content_type="application/json", **kwargs)

    def upload_file(self, path: Path, uri: str) -> None:
        bucket, key = split_uri(uri)
        try:
            self.client.upload_file(str(path), bucket, key)
        except (ClientError, BotoCoreError) as err:
            self._fail(err, f"upload of {path} to", uri)

    def upload_dir(self, directory: Path, uri: str) -> dict[str, tuple[int, str]]:
        """Upload every file under ``directory``; returns relative path -> (size, sha256)."""
        files: dict[str, tuple[int, str]] = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file()):
            rel = path.relative_to(directory).as_posix()
            self.upload_file(path, f"{uri.rstrip('/')}/{rel}")
            files[rel] = (path.stat().st_size, file_sha256(path))
        return files

    def download_prefix(
        self, uri: str, directory: Path, *, progress: Callable[[str, int], None] | None = None
    ) -> list[Path]:
        """Download every object under ``uri`` into ``directory``, resumably.

        A file already present with the object's size is kept; partial downloads land in ``*.part`` and are renamed
        when complete, so an interrupted download never leaves a truncated file under its real name. A key that
        would land outside ``directory`` (see :func:`local_path`) stops the download with :class:`UnsafeKey` before
        anything is written. ``progress(key, size)`` says how many bytes of the object ``key`` are on disk, as
        they land (a retry that resumes reports from where it resumes; a file kept reports its size once).
        """
        bucket, key = split_uri(uri)
        base = prefix_key(key)
        directory.mkdir(parents=True, exist_ok=True)
        objects = [o for o in self.iter_objects(uri) if o.relative_to(base) and not o.key.endswith("/")]
        targets = [(obj, local_path(directory, obj.relative_to(base))) for obj in objects]
        paths = []
        for obj, target in targets:
            paths.append(target)
            if target.exists() and target.stat().st_size == obj.size:
                if progress is not None:
                    progress(obj.key, obj.size)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            self._download_resumable(bucket, obj, part, progress)
            part.replace(target)
        return paths

    def _download_resumable(
        self, bucket: str, obj: ObjectInfo, part: Path, progress: Callable[[str, int], None] | None = None
    ) -> None:
        have = part.stat().st_size if part.exists() else 0
        if have > obj.size:
            part.unlink()
            have = 0
        if progress is not None:
            progress(obj.key, have)
        if have == obj.size:
            return
        kwargs: dict[str, Any] = {"Bucket": bucket, "Key": obj.key}
        if have:
            kwargs["Range"] = f"bytes={have}-"
            kwargs["IfMatch"] = obj.etag
        try:
            resp = self.client.get_object(**kwargs)
            landed = have
            with part.open("ab" if have else "wb") as fh:
                for chunk in resp["Body"].iter_chunks(chunk_size=1 << 20):
                    fh.write(chunk)
                    landed += len(chunk)
                    if progress is not None:
                        progress(obj.key, landed)
        except (ClientError, BotoCoreError) as err:
            if have and isinstance(err, ClientError) and _status(err) in (412, 416):
                part.unlink()
                return self._download_resumable(bucket, obj, part, progress)
            self._fail(err, "download of", f"s3://{bucket}/{obj.key}")

    def delete_prefix(self, uri: str) -> int:
        """Delete every object under the folder ``uri``; returns how many."""
        bucket, _ = split_uri(uri)
        keys = [o.key for o in self.iter_objects(uri)]
        self.delete_keys(bucket, keys)
        return len(keys)

    def delete_keys(self, bucket: str, keys: list[str]) -> None:
        """Delete these keys of ``bucket`` (batches of 1000)."""
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            try:
                self.client.delete_objects(
                    Bucket=bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            except (ClientError, BotoCoreError) as err:
                self._fail(err, "delete under", f"s3://{bucket}/{batch[0]}")

    def delete(self, uri: str) -> None:
        bucket, key = split_uri(uri)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError) as err:
            self._fail(err, "delete", uri)

    def ensure_bucket(self, bucket: str) -> None:
        try:
            self.client.head_bucket(Bucket=bucket)
        except ClientError:
            self.client.create_bucket(Bucket=bucket)


def _decode(uri: str, body: bytes) -> Any:
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise MalformedRecord(uri, f"not JSON: {err}") from err


def parse_record(uri: str, raw: Any, model: type[ModelT]) -> ModelT:
    """``raw`` (decoded JSON read from ``uri``) as ``model``, or :class:`MalformedRecord` naming what is wrong."""
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        raise MalformedRecord(uri, f"not a valid {model.__name__}: {describe_validation_error(err)}") from err


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(8 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_digest(files: dict[str, tuple[int, str]]) -> str:
    """Digest of a set of files from their relative names and sha256 (e.g. an adapter's digest)."""
    h = hashlib.sha256()
    for name in sorted(files):
        size, sha = files[name]
        h.update(f"{name}\0{size}\0{sha}\n".encode())
    return h.hexdigest()[:16]
