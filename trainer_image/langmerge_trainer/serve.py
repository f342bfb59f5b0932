"""``langmerge-trainer serve``: a KServe model server for one published revision of a MergedModel.

``--storage-uri`` is what an InferenceService's ``spec.predictor.model.storageUri`` holds for the ``langmerge``
runtime: a merge prefix ``s3://<bucket>/<output>/merges/<fingerprint>`` (``manifest.json``, a
:class:`langmerge.artifacts.MergeManifest`, and ``model/``), or a plain model folder with ``config.json`` (full
weights, as KServe's huggingface runtime takes them). It may also be a local folder (a path or a ``file://`` URI)
holding either layout: on a cluster, KServe's storage initializer downloads the InferenceService's ``storageUri``
into ``/mnt/models`` before this server starts, and the runtime passes ``--storage-uri=/mnt/models``. Folders in S3
come through the model cache (:mod:`langmerge_trainer.modelcache`); a local model folder loads in place. Either
loads as the merge Job's evaluation loads them (:func:`langmerge_trainer.merge.evaluation.load_model`): a
``peft-adapter`` output on its base model (the manifest's ``base_model``, fetched from S3 through the model cache and
checked against its digest, also for a local merge), a ``full-weights`` output or a plain folder on its own.

A causal LM answers with its greedy continuation, a sequence classifier with a label and its probability. A
classifier's labels are, in this order: the model folder's ``config.json`` (``id2label`` of a
``...ForSequenceClassification`` architecture: full weights), the labels of the merge's input adapters (their
:class:`langmerge.artifacts.AdapterManifest`, read from S3), or the labels the manifest's ``head_support`` names.

HTTP (KServe's v1/v2 protocols, :class:`kserve.ModelServer`), on ``--host`` (default 127.0.0.1; a KServe pod passes
0.0.0.0)::

    GET  /v2/health/ready, /v2/models/NAME/ready
    POST /v1/models/NAME:predict  {"instances": ["text", {"text": "..."}], "parameters": {"max_new_tokens": 32}}
      -> {"predictions": [{"generated_text": "..."}] or [{"label": "...", "probability": 0.83}],
          "model_version": "<the merge fingerprint, or the digest of a plain folder's files>"}

gRPC (KServe's v2 service: health and metadata) listens on ``--host`` too. The server only listens once the model has
loaded: a model that cannot load (no manifest nor config.json, missing or broken weights, S3 unreadable, a port
taken) ends the process before it is ever ready, with one line on stderr saying why and exit status 1 (S3 or a port:
another start may work) or 4 (the published revision itself cannot load); a bad command line exits with 2.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.grpc.server import GRPCServer

from langmerge import artifacts
from langmerge.api.expert import TaskType
from langmerge.api.merged import OutputFormat
from langmerge.artifacts import AdapterManifest, MergeManifest
from langmerge.constants import EXIT_FAILED, EXIT_USAGE, EXIT_USER_ERROR
from langmerge.fingerprint import objects_digest
from langmerge.store import ObjectStore, StorageUnavailable, StoreError, parse_record

log = logging.getLogger(__name__)

#: The interface the servers listen on unless ``--host`` names another (a KServe pod passes 0.0.0.0).
DEFAULT_HOST = "127.0.0.1"
#: ``parameters.max_new_tokens`` of a causal LM when a request gives none, and the most a request may ask for.
DEFAULT_MAX_NEW_TOKENS = 32
MAX_NEW_TOKENS_LIMIT = 1024
#: A classifier's input length when no input adapter records its ``training.maxSeqLength``.
DEFAULT_MAX_SEQ_LENGTH = 1024
#: The longest reason printed when the model cannot load (it ends up in the InferenceService's status).
MAX_REASON = 600


class LoadError(Exception):
    """The model cannot be served; the message says why in one line. ``exit_code``: EXIT_FAILED where another start
    may work (S3 did not answer, a port was taken), EXIT_USER_ERROR where the published revision itself is at fault."""

    def __init__(self, message: str, exit_code: int = EXIT_USER_ERROR) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def one_line(text: str, limit: int = MAX_REASON) -> str:
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# -- what the storage URI holds -----------------------------------------------------------------------------------------
#: S3 as :func:`resolve` and :func:`load_published` reach it: a store, or a function that makes one (once, from the
#: environment) when it is first needed, so that a local folder needing nothing from S3 never asks for it.
StoreSource = ObjectStore | Callable[[], ObjectStore]
#: The model folder inside a merge prefix of a manifest that does not say where (:func:`model_folder`).
MODEL_FOLDER = "model"


def model_folder(manifest: MergeManifest) -> str:
    """Where the committed model lies inside its merge prefix: the manifest's ``model_uri`` relative to
    ``merges/<fingerprint>/`` (a merge Job uploads each run under ``attempts/<n>-<run>/model``), so the same path
    holds in S3 and in a local copy of the prefix."""
    marker = f"/{manifest.fingerprint}/"
    if marker in manifest.model_uri:
        return manifest.model_uri.rstrip("/").split(marker, 1)[1]
    return MODEL_FOLDER


def _store(source: StoreSource) -> ObjectStore:
    return source if isinstance(source, ObjectStore) else source()


def local_folder(storage_uri: str) -> Path | None:
    """The local folder ``storage_uri`` names (a path, or a ``file://`` URI), absolute; None for an ``s3://`` URI.
    Raises ValueError for any other scheme."""
    if storage_uri.startswith("s3://"):
        return None
    parts = urlsplit(storage_uri)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"a file:// URI names a local folder (file:///mnt/models), not {storage_uri!r}")
        path = unquote(parts.path)
    elif parts.scheme or not storage_uri.strip():
        raise ValueError(f"an s3:// URI or a local folder (a path or a file:// URI), not {storage_uri!r}")
    else:
        path = storage_uri
    return Path(path).expanduser().absolute()


@dataclass(frozen=True)
class Published:
    """A storage URI resolved, before any weights are read."""

    storage_uri: str
    #: The folder to load: the merge prefix's ``model/``, or the storage URI itself for a plain folder.
    model_uri: str
    #: The digest of the objects (or local files) under ``model_uri`` (the model cache's key).
    model_digest: str
    #: The base model a PEFT adapter output loads onto (None for full weights); always in S3.
    base: artifacts.BaseModelIdentity | None
    #: ``model_version`` of every answer: the merge fingerprint, or the digest of a plain folder's objects (files).
    version: str
    #: A sequence classifier's labels (None: a causal LM).
    labels: list[str] | None = None
    #: A classifier's input length in tokens (longer texts are cut, as in training).
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH
    #: ``model_uri`` on local disk, loaded in place (None: it is in S3 and comes through the model cache).
    model_dir: Path | None = None


class _Folder(Protocol):
    """What :func:`resolve` reads of a storage URI, in S3 or on local disk; ``relative`` is a path inside it."""

    def name(self, relative: str = "") -> str:
        """The URI (or path) of ``relative``, for messages and :attr:`Published.model_uri`."""
        ...

    def json(self, relative: str) -> Any | None:
        """The decoded JSON file ``relative`` (None where there is none)."""
        ...

    def manifest(self) -> MergeManifest | None: ...

    def digest(self, relative: str = "") -> str:
        """The digest of what lies under ``relative``; :class:`LoadError` when nothing does."""
        ...

    def local(self, relative: str = "") -> Path | None:
        """``relative`` on local disk (None: in S3)."""
        ...


@dataclass(frozen=True)
class _S3Folder:
    store: ObjectStore
    uri: str

    def name(self, relative: str = "") -> str:
        return artifacts.join(self.uri, relative) if relative else self.uri

    def json(self, relative: str) -> Any | None:
        return self.store.get_json_or_none(self.name(relative))

    def manifest(self) -> MergeManifest | None:
        return self.store.get_record(self.name(artifacts.MANIFEST), MergeManifest)

    def digest(self, relative: str = "") -> str:
        digest, count = self.store.prefix_digest(self.name(relative))
        if count == 0:
            raise LoadError(f"no objects under {self.name(relative)}")
        return digest

    def local(self, relative: str = "") -> Path | None:
        return None


@dataclass(frozen=True)
class _LocalFolder:
    """A local copy of either layout (e.g. what KServe's storage initializer left in ``/mnt/models``)."""

    root: Path

    def __post_init__(self) -> None:
        if not self.root.is_dir():
            raise LoadError(f"{self.root} is not a folder" if self.root.exists() else f"there is no folder {self.root}")

    def name(self, relative: str = "") -> str:
        return str(self.root / relative) if relative else str(self.root)

    def json(self, relative: str) -> Any | None:
        path = self.root / relative
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_bytes())
        except (UnicodeDecodeError, ValueError) as err:
            raise LoadError(f"{path} is not JSON: {err}") from err

    def manifest(self) -> MergeManifest | None:
        raw = self.json(artifacts.MANIFEST)
        if raw is None:
            return None
        try:
            return parse_record(self.name(artifacts.MANIFEST), raw, MergeManifest)
        except StoreError as err:
            raise LoadError(str(err)) from err

    def digest(self, relative: str = "") -> str:
        """Over the relative names and sizes of the files under ``relative``: cheap, and the same for every copy of
        the folder (KServe downloads it afresh into each pod)."""
        top = self.root / relative
        rows = []
        for folder, _dirs, files in os.walk(top):
            for file in files:
                path = Path(folder, file)
                if path.is_file():
                    rows.append((path.relative_to(top).as_posix(), path.stat().st_size, ""))
        if not rows:
            raise LoadError(f"no files under {top}")
        return objects_digest(rows)

    def local(self, relative: str = "") -> Path | None:
        return self.root / relative if relative else self.root


def _config_labels(config: dict[str, Any] | None) -> list[str] | None:
    """A full classifier's labels from its ``config.json`` (None for any other architecture)."""
    if not config or not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        return None
    id2label = config.get("id2label") or {}
    try:
        return [str(id2label[key]) for key in sorted(id2label, key=int)]
    except (TypeError, ValueError) as err:
        raise LoadError(f"config.json has an unreadable id2label: {id2label!r}") from err


def _position_limit(config: dict[str, Any] | None) -> int:
    """The model's longest input: its ``max_position_embeddings`` when it has one (a BERT's 512 ...)."""
    limit = (config or {}).get("max_position_embeddings")
    return min(DEFAULT_MAX_SEQ_LENGTH, int(limit)) if isinstance(limit, int) and limit > 0 else DEFAULT_MAX_SEQ_LENGTH


def _input_labels(store: StoreSource, manifest: MergeManifest) -> tuple[list[str] | None, int | None]:
    """The labels of the merge's classifier inputs (from their adapter manifests in S3, where those still exist) and
    the longest ``training.maxSeqLength`` among them."""
    from langmerge.tryout import adapter_manifest_uri

    labels: list[str] | None = None
    lengths: list[int] = []
    for item in manifest.inputs:
        try:
            record = _store(store).get_record(adapter_manifest_uri(item.adapter_uri), AdapterManifest)
        except StorageUnavailable:
            raise
        except StoreError as err:  # a manifest gone bad: the merge's own record may still name the labels
            log.warning("the adapter manifest of %s cannot be read: %s", item.expert, one_line(str(err)))
            continue
        if record is None or record.task_type != TaskType.SEQUENCE_CLASSIFICATION or not record.labels:
            continue
        labels = labels or list(record.labels)
        length = record.training.get("max_seq_length")
        if isinstance(length, int) and length > 0:
            lengths.append(length)
    return labels, max(lengths) if lengths else None


def _is_classifier_adapter(adapter_config: dict[str, Any] | None) -> bool:
    from langmerge_trainer.classify import HEAD_MODULES

    if not adapter_config:
        return False
    heads = set(adapter_config.get("modules_to_save") or []) & set(HEAD_MODULES)
    return adapter_config.get("task_type") == "SEQ_CLS" or bool(heads)


def resolve(store: StoreSource, storage_uri: str) -> Published:
    """What ``storage_uri`` (an ``s3://`` URI or a local folder) holds: a merge prefix (its manifest decides how it
    loads) or a plain model folder. Raises :class:`LoadError` when it holds neither, or the merge's output is
    incomplete. A local folder asks S3 only for what is not in it: a PEFT adapter's base model and input labels."""
    try:
        path = local_folder(storage_uri)
    except ValueError as err:
        raise LoadError(f"--storage-uri must be {err}", EXIT_USAGE) from err
    folder: _Folder = _S3Folder(_store(store), storage_uri.rstrip("/")) if path is None else _LocalFolder(path)
    uri = folder.name()
    manifest = folder.manifest()
    if manifest is None:
        config = folder.json("config.json")
        if config is None:
            raise LoadError(f"{uri} holds neither a merge ({artifacts.MANIFEST}) nor a model folder (config.json)")
        digest = folder.digest()
        labels = _config_labels(config)
        return Published(uri, uri, digest, None, digest, labels, _position_limit(config), folder.local())

    model = model_folder(manifest)
    model_uri, model_dir = folder.name(model), folder.local(model)
    digest = folder.digest(model)
    if manifest.output_format == OutputFormat.FULL_WEIGHTS:
        config = folder.json(f"{model}/config.json")
        if config is None:
            raise LoadError(f"the full-weights merge {uri} has no model/config.json")
        labels = _config_labels(config)
        length: int | None = None
        if labels is None and manifest.inputs:
            labels, length = _input_labels(store, manifest)
        length = length or _position_limit(config)
        return Published(uri, model_uri, digest, None, manifest.fingerprint, labels, length, model_dir)
    if manifest.output_format != OutputFormat.PEFT_ADAPTER:
        raise LoadError(f"the merge {uri} has output format {manifest.output_format!r}, not one this server loads")
    adapter_config = folder.json(f"{model}/adapter_config.json")
    if adapter_config is None:
        raise LoadError(f"the peft-adapter merge {uri} has no model/adapter_config.json")
    labels, length = _input_labels(store, manifest)
    if labels is None and manifest.head_support:
        labels = list(manifest.head_support)
    if labels is None and _is_classifier_adapter(adapter_config):
        raise LoadError(
            f"the merge {uri} is a classifier adapter, but neither its input adapters' manifests nor its own record "
            "name the labels"
        )
    if labels is not None and length is None:
        base_config = _store(store).get_json_or_none(artifacts.join(manifest.base_model.uri, "config.json"))
        length = _position_limit(base_config)
    return Published(
        uri,
        model_uri,
        digest,
        manifest.base_model,
        manifest.fingerprint,
        labels,
        length or DEFAULT_MAX_SEQ_LENGTH,
        model_dir,
    )


# -- loading ------------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: Any
    tokenizer: Any


def load_published(store: StoreSource, published: Published, device_name: str | None = None) -> Loaded:
    """Load the model and its tokenizer, in eval mode, on ``device_name`` (default: cuda if available, else cpu): a
    local model folder in place, one in S3 and any base model through the model cache."""
    from langmerge_trainer.modelcache import ensure_model

    started = time.monotonic()
    model_dir = published.model_dir or ensure_model(_store(store), published.model_uri, published.model_digest)
    base = published.base
    base_dir = None if base is None else ensure_model(_store(store), base.uri, base.digest)
    from transformers.utils import logging as hf_logging

    from langmerge_trainer.evaluate import _has_tokenizer, load_tokenizer, peft_compat, pick_device
    from langmerge_trainer.merge.evaluation import load_model

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()  # e.g. no load report for a classifier base's fresh head (the adapter has it)
    device = pick_device(device_name)
    if base_dir is None:
        model = load_model(model_dir, device, published.labels)
        tokenizer = load_tokenizer(model_dir)
    else:
        from peft import PeftModel

        model = load_model(base_dir, device, published.labels)
        with peft_compat():
            model = PeftModel.from_pretrained(model, str(model_dir))
        model.eval()
        tokenizer = load_tokenizer(model_dir if _has_tokenizer(model_dir) else base_dir)
    log.info("loaded %s in %.1fs", published.storage_uri, time.monotonic() - started)
    return Loaded(model, tokenizer)


# -- requests -----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """A decoded v1 predict request."""

    texts: list[str]
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS


def parse_request(payload: Any) -> Request:
    """``{"instances": ["text" | {"text": "..."}, ...], "parameters": {"max_new_tokens": N}}`` (bytes or a dict);
    :class:`kserve.errors.InvalidInput` (HTTP 400) says what is wrong."""
    if isinstance(payload, bytes | bytearray | str):
        try:
            payload = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as err:
            raise InvalidInput(f"the request body is not JSON: {err}") from None
    if not isinstance(payload, dict):
        raise InvalidInput(
            'this server answers the v1 protocol: POST /v1/models/NAME:predict with {"instances": ["text", ...]}'
        )
    instances = payload.get("instances")
    if not isinstance(instances, list):
        raise InvalidInput('"instances" must be a list of texts or {"text": ...} objects')
    texts = []
    for index, instance in enumerate(instances):
        text = instance.get("text") if isinstance(instance, dict) else instance
        if not isinstance(text, str):
            raise InvalidInput(f'instance {index} is neither a text nor an object with a "text" string')
        texts.append(text)
    parameters = payload.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise InvalidInput('"parameters" must be an object')
    max_new_tokens = parameters.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InvalidInput(f'"parameters.max_new_tokens" must be a positive integer, not {max_new_tokens!r}')
    if max_new_tokens > MAX_NEW_TOKENS_LIMIT:
        raise InvalidInput(f'"parameters.max_new_tokens" is at most {MAX_NEW_TOKENS_LIMIT}')
    return Request(texts, max_new_tokens)


def _label_and_probability(shown: str) -> dict[str, Any]:
    """``{"label", "probability"}`` from :func:`langmerge_trainer.tryout.classify`'s ``label (0.83)``."""
    label, _, probability = shown.rpartition(" (")
    return {"label": label, "probability": float(probability.rstrip(")"))}


# -- the KServe model ---------------------------------------------------------------------------------------------------
class PublishedModel(kserve.Model):
    """One published revision behind KServe's endpoints. :meth:`load` raises :class:`LoadError`."""

    def __init__(
        self, name: str, storage_uri: str, *, device: str | None = None, store: ObjectStore | None = None
    ) -> None:
        super().__init__(name)
        self.storage_uri = storage_uri.rstrip("/") or storage_uri
        self.device_name = device
        self.store = store
        self.published: Published | None = None
        self.loaded: Loaded | None = None
        #: One request at a time on the model (generation is not made for concurrent calls); the event loop stays
        #: free for health checks meanwhile.
        self._lock = threading.Lock()

    def _s3(self) -> ObjectStore:
        """The store given, or one from the environment, made on first use (a local full-weights folder needs none)."""
        if self.store is None:
            self.store = ObjectStore.from_config()
        return self.store

    def load(self) -> bool:
        from botocore.exceptions import BotoCoreError

        try:
            self.published = resolve(self._s3, self.storage_uri)  # records only: a wrong URI fails before torch loads
            kind = f"classifier over {', '.join(self.published.labels)}" if self.published.labels else "causal LM"
            log.info("loading %s as a %s (model_version %s)", self.storage_uri, kind, self.published.version)
            self.loaded = load_published(self._s3, self.published, self.device_name)
        except LoadError:
            raise
        except StorageUnavailable as err:
            raise LoadError(f"S3 is not reachable: {err}", EXIT_FAILED) from err
        except (StoreError, BotoCoreError) as err:
            raise LoadError(f"S3: {err}") from err
        except Exception as err:
            raise LoadError(f"{type(err).__name__}: {err}") from err
        self.ready = True
        return self.ready

    async def preprocess(self, payload: Any, headers: dict[str, str] | None = None) -> Any:
        return parse_request(payload)

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: dict[str, str] | None = None
    ) -> dict[str, Any]:
        request = payload if isinstance(payload, Request) else parse_request(payload)
        predictions = await asyncio.get_running_loop().run_in_executor(None, self.answer, request)
        assert self.published is not None
        return {"predictions": predictions, "model_version": self.published.version}

    def answer(self, request: Request) -> list[dict[str, Any]]:
        from langmerge_trainer.tryout import classify, generate

        assert self.published is not None and self.loaded is not None
        model, tokenizer, labels = self.loaded.model, self.loaded.tokenizer, self.published.labels
        with self._lock:
            if labels is not None:
                length = self.published.max_seq_length
                return [_label_and_probability(classify(model, tokenizer, t, labels, length)) for t in request.texts]
            return [{"generated_text": generate(model, tokenizer, t, request.max_new_tokens)} for t in request.texts]


# -- the servers --------------------------------------------------------------------------------------------------------
def _address(host: str, port: int) -> str:
    """``host:port``, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LocalGRPCServer(GRPCServer):
    """KServe's gRPC (v2) server, listening on ``host`` only (KServe's listens on every interface), and alone on its
    port (gRPC would otherwise share a port another server holds, through SO_REUSEPORT)."""

    def __init__(self, *args: Any, host: str = DEFAULT_HOST, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = host

    async def start(self, max_workers: int) -> None:
        from grpc import aio
        from kserve.protocol.grpc import grpc_predict_v2_pb2_grpc
        from kserve.protocol.grpc.interceptors import ExceptionToStatusInterceptor, LoggingInterceptor
        from kserve.protocol.grpc.servicer import InferenceServicer

        self._server = aio.server(
            futures.ThreadPoolExecutor(max_workers=max_workers),
            interceptors=(LoggingInterceptor(), ExceptionToStatusInterceptor()),
            options=[
                ("grpc.max_send_message_length", self._kwargs.get("grpc_max_send_message_length")),
                ("grpc.max_receive_message_length", self._kwargs.get("grpc_max_receive_message_length")),
                ("grpc.so_reuseport", 0),
            ],
        )
        servicer = InferenceServicer(self._data_plane, self._model_repository_extension)
        grpc_predict_v2_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, self._server)
        self._server.add_insecure_port(_address(self.host, self._port))
        log.info("gRPC server on %s", _address(self.host, self._port))
        await self._server.start()
        await self._server.wait_for_termination()


class LocalModelServer(kserve.ModelServer):
    """:class:`kserve.ModelServer` with one REST worker and the gRPC server, both on ``host`` only."""

    def __init__(self, *args: Any, host: str = DEFAULT_HOST, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.host = host

    def start(self, models: list[Any]) -> None:
        from kserve.constants.constants import FASTAPI_APP_IMPORT_STRING
        from kserve.model_server import args as kserve_args
        from kserve.protocol.rest.server import RESTServer

        self._register_and_check_atleast_one_model_is_ready(models)
        self._rest_server = RESTServer(
            FASTAPI_APP_IMPORT_STRING,
            self.dataplane,
            self.model_repository_extension,
            self.http_port,
            access_log_format=self.access_log_format,
            workers=1,
            grace_period=self.grace_period,
            event_loop=self.event_loop,
            timeout_keep_alive=self.timeout_keep_alive,
        )
        self._rest_server.config.host = self.host  # uvicorn binds when it starts serving, below
        self.servers.append(self._rest_server.start())
        self._grpc_server = LocalGRPCServer(
            self.grpc_port,
            self.dataplane,
            self.model_repository_extension,
            kwargs=vars(kserve_args),
            grace_period=self.grace_period,
            host=self.host,
        )
        self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def check_port(port: int, what: str, host: str = DEFAULT_HOST) -> None:
    """Fail before loading when another server listens on ``host:port`` (sockets in TIME_WAIT do not count)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
            sock.listen(1)
        except OSError as err:
            raise LoadError(
                f"the {what} port {_address(host, port)} cannot be used: {err.strerror or err}", EXIT_FAILED
            ) from err


# -- CLI ----------------------------------------------------------------------------------------------------------------
def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def _host(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address (127.0.0.1, 0.0.0.0, ::)") from None


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``langmerge-trainer serve`` (also what a KServe runtime's container args must parse)."""
    parser = argparse.ArgumentParser(prog="langmerge-trainer serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", required=True, help="the name in the endpoints' paths (/v1/models/NAME)")
    parser.add_argument(
        "--storage-uri",
        required=True,
        help="s3:// merge prefix (manifest.json + model/) or model folder (config.json), or a local folder holding "
        "either (a path or file:// URI, e.g. /mnt/models)",
    )
    parser.add_argument("--http-port", required=True, type=_port, help="HTTP port")
    parser.add_argument("--grpc-port", required=True, type=_port, help="gRPC port")
    parser.add_argument(
        "--host",
        default=DEFAULT_HOST,
        type=_host,
        help=f"the IP address both servers listen on (default {DEFAULT_HOST}; 0.0.0.0 in a KServe pod)",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        local_folder(args.storage_uri)
    except ValueError as err:
        print(f"langmerge-trainer serve: --storage-uri must be {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.http_port == args.grpc_port:
        print("langmerge-trainer serve: --http-port and --grpc-port must differ", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never ask a model hub anything
    started = time.monotonic()
    model = PublishedModel(args.model_name, args.storage_uri, device=args.device)
    try:
        check_port(args.http_port, "HTTP", args.host)
        check_port(args.grpc_port, "gRPC", args.host)
        model.load()
    except LoadError as err:
        print(f"langmerge-trainer serve: cannot load {args.storage_uri}: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    log.info(
        "loaded in %.1fs; serving %s on http://%s",
        time.monotonic() - started,
        args.model_name,
        _address(args.host, args.http_port),
    )
    # Quiet per request: no latency lines (uvicorn's access log stays); kserve's own use of a deprecated FastAPI
    # response class is not ours to act on.
    logging.getLogger("kserve.trace").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message="ORJSONResponse is deprecated")
    server = LocalModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        workers=1,
        enable_docs_url=False,
        enable_latency_logging=False,
        host=args.host,
    )
    try:
        server.start([model])
    except SystemExit as exc:  # uvicorn exits when it cannot listen
        if exc.code in (None, 0):
            return 0
        print(f"langmerge-trainer serve: the server stopped: exit status {exc.code}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as err:  # e.g. a port taken between the check and the server's start
        print(
            f"langmerge-trainer serve: the server stopped: {type(err).__name__}: {one_line(str(err))}", file=sys.stderr
        )
        return EXIT_FAILED
    return 0
