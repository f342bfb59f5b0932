"""``langmerge-trainer serve``: a KServe model server for one published revision of a MergedModel.

``--storage-uri`` is what an InferenceService's ``spec.predictor.model.storageUri`` holds for the ``langmerge``
runtime: a merge prefix ``s3://<bucket>/<output>/merges/<fingerprint>`` (``manifest.json``, a
:class:`langmerge.artifacts.MergeManifest`, and ``model/``), or a plain model folder with ``config.json`` (full
weights, as KServe's huggingface runtime takes them). The folders come through the model cache
(:mod:`langmerge_trainer.modelcache`) and load as the merge Job's evaluation loads them
(:func:`langmerge_trainer.merge.evaluation.load_model`): a ``peft-adapter`` output on its base model (the manifest's
``base_model``, checked against its digest), a ``full-weights`` output or a plain folder on its own.

A causal LM answers with its greedy continuation, a sequence classifier with a label and its probability. A
classifier's labels are, in this order: the model folder's ``config.json`` (``id2label`` of a
``...ForSequenceClassification`` architecture: full weights), the labels of the merge's input adapters (their
:class:`langmerge.artifacts.AdapterManifest`), or the labels the manifest's ``head_support`` names.

HTTP (KServe's v1/v2 protocols, :class:`kserve.ModelServer`), on 127.0.0.1 only::

    GET  /v2/health/ready, /v2/models/NAME/ready
    POST /v1/models/NAME:predict  {"instances": ["text", {"text": "..."}], "parameters": {"max_new_tokens": 32}}
      -> {"predictions": [{"generated_text": "..."}] or [{"label": "...", "probability": 0.83}],
          "model_version": "<the merge fingerprint, or the digest of a plain folder's objects>"}

gRPC (KServe's v2 service: health and metadata) listens on 127.0.0.1 too. The server only listens once the model has
loaded: a model that cannot load (no manifest nor config.json, missing or broken weights, S3 unreadable, a port
taken) ends the process before it is ever ready, with one line on stderr saying why and exit status 1 (S3 or a port:
another start may work) or 4 (the published revision itself cannot load).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import kserve
from kserve.errors import InvalidInput
from kserve.protocol.grpc.server import GRPCServer

from langmerge import artifacts
from langmerge.api.expert import TaskType
from langmerge.api.merged import OutputFormat
from langmerge.artifacts import AdapterManifest, MergeManifest
from langmerge.constants import EXIT_FAILED, EXIT_USAGE, EXIT_USER_ERROR
from langmerge.store import ObjectStore, StorageUnavailable, StoreError

log = logging.getLogger(__name__)

#: The only interface the servers listen on.
HOST = "127.0.0.1"
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
@dataclass(frozen=True)
class Published:
    """A storage URI resolved in S3, before anything is downloaded."""

    storage_uri: str
    #: The folder to load: the merge prefix's ``model/``, or the storage URI itself for a plain folder.
    model_uri: str
    #: The digest of the objects under ``model_uri`` (the model cache's key).
    model_digest: str
    #: The base model a PEFT adapter output loads onto (None for full weights).
    base: artifacts.BaseModelIdentity | None
    #: ``model_version`` of every answer: the merge fingerprint, or the digest of a plain folder's objects.
    version: str
    #: A sequence classifier's labels (None: a causal LM).
    labels: list[str] | None = None
    #: A classifier's input length in tokens (longer texts are cut, as in training).
    max_seq_length: int = DEFAULT_MAX_SEQ_LENGTH


def _model_listing(store: ObjectStore, uri: str) -> str:
    digest, count = store.prefix_digest(uri)
    if count == 0:
        raise LoadError(f"no objects under {uri}")
    return digest


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


def _input_labels(store: ObjectStore, manifest: MergeManifest) -> tuple[list[str] | None, int | None]:
    """The labels of the merge's classifier inputs (from their adapter manifests, where those still exist) and the
    longest ``training.maxSeqLength`` among them."""
    from langmerge.tryout import adapter_manifest_uri

    labels: list[str] | None = None
    lengths: list[int] = []
    for item in manifest.inputs:
        try:
            record = store.get_record(adapter_manifest_uri(item.adapter_uri), AdapterManifest)
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


def resolve(store: ObjectStore, storage_uri: str) -> Published:
    """What ``storage_uri`` holds: a merge prefix (its manifest decides how it loads) or a plain model folder.
    Raises :class:`LoadError` when it holds neither, or the merge's output is incomplete."""
    uri = storage_uri.rstrip("/")
    manifest = store.get_record(artifacts.join(uri, artifacts.MANIFEST), MergeManifest)
    if manifest is None:
        config = store.get_json_or_none(artifacts.join(uri, "config.json"))
        if config is None:
            raise LoadError(f"{uri} holds neither a merge ({artifacts.MANIFEST}) nor a model folder (config.json)")
        digest = _model_listing(store, uri)
        labels = _config_labels(config)
        return Published(uri, uri, digest, None, digest, labels, _position_limit(config))

    model_uri = artifacts.merged_model_uri(uri)
    digest = _model_listing(store, model_uri)
    if manifest.output_format == OutputFormat.FULL_WEIGHTS:
        config = store.get_json_or_none(artifacts.join(model_uri, "config.json"))
        if config is None:
            raise LoadError(f"the full-weights merge {uri} has no model/config.json")
        labels = _config_labels(config)
        length: int | None = None
        if labels is None and manifest.inputs:
            labels, length = _input_labels(store, manifest)
        return Published(uri, model_uri, digest, None, manifest.fingerprint, labels, length or _position_limit(config))
    if manifest.output_format != OutputFormat.PEFT_ADAPTER:
        raise LoadError(f"the merge {uri} has output format {manifest.output_format!r}, not one this server loads")
    adapter_config = store.get_json_or_none(artifacts.join(model_uri, "adapter_config.json"))
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
        length = _position_limit(store.get_json_or_none(artifacts.join(manifest.base_model.uri, "config.json")))
    return Published(
        uri, model_uri, digest, manifest.base_model, manifest.fingerprint, labels, length or DEFAULT_MAX_SEQ_LENGTH
    )


# -- loading ------------------------------------------------------------------------------------------------------------
@dataclass
class Loaded:
    model: Any
    tokenizer: Any


def load_published(store: ObjectStore, published: Published, device_name: str | None = None) -> Loaded:
    """Download (through the model cache) and load the model and its tokenizer, in eval mode, on ``device_name``
    (default: cuda if available, else cpu)."""
    from langmerge_trainer.modelcache import ensure_model

    started = time.monotonic()
    model_dir = ensure_model(store, published.model_uri, published.model_digest)
    base_dir = None if published.base is None else ensure_model(store, published.base.uri, published.base.digest)
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
        self.storage_uri = storage_uri.rstrip("/")
        self.device_name = device
        self.store = store
        self.published: Published | None = None
        self.loaded: Loaded | None = None
        #: One request at a time on the model (generation is not made for concurrent calls); the event loop stays
        #: free for health checks meanwhile.
        self._lock = threading.Lock()

    def load(self) -> bool:
        from botocore.exceptions import BotoCoreError

        try:
            store = self.store or ObjectStore.from_config()
            self.published = resolve(store, self.storage_uri)  # S3 only: a wrong URI fails before torch is imported
            kind = f"classifier over {', '.join(self.published.labels)}" if self.published.labels else "causal LM"
            log.info("loading %s as a %s (model_version %s)", self.storage_uri, kind, self.published.version)
            self.loaded = load_published(store, self.published, self.device_name)
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
class LocalGRPCServer(GRPCServer):
    """KServe's gRPC (v2) server, listening on :data:`HOST` only (KServe's listens on every interface), and alone on
    its port (gRPC would otherwise share a port another server holds, through SO_REUSEPORT)."""

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
        self._server.add_insecure_port(f"{HOST}:{self._port}")
        log.info("gRPC server on %s:%d", HOST, self._port)
        await self._server.start()
        await self._server.wait_for_termination()


class LocalModelServer(kserve.ModelServer):
    """:class:`kserve.ModelServer` with one REST worker and the gRPC server, both on :data:`HOST` only."""

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
        self._rest_server.config.host = HOST  # uvicorn binds when it starts serving, below
        self.servers.append(self._rest_server.start())
        self._grpc_server = LocalGRPCServer(
            self.grpc_port,
            self.dataplane,
            self.model_repository_extension,
            kwargs=vars(kserve_args),
            grace_period=self.grace_period,
        )
        self.servers.append(self._grpc_server.start(self.max_threads))
        self.setup_event_loop()
        self.register_signal_handler()
        asyncio.run(self._serve())


def check_port(port: int, what: str) -> None:
    """Fail before loading when another server listens on ``port`` (sockets in TIME_WAIT do not count)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
            sock.listen(1)
        except OSError as err:
            raise LoadError(
                f"the {what} port {HOST}:{port} cannot be used: {err.strerror or err}", EXIT_FAILED
            ) from err


# -- CLI ----------------------------------------------------------------------------------------------------------------
def _port(value: str) -> int:
    port = int(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a TCP port")
    return port


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="langmerge-trainer serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-name", required=True, help="the name in the endpoints' paths (/v1/models/NAME)")
    parser.add_argument("--storage-uri", required=True, help="s3:// merge prefix (manifest.json + model/) or folder")
    parser.add_argument("--http-port", required=True, type=_port, help="HTTP port on 127.0.0.1")
    parser.add_argument("--grpc-port", required=True, type=_port, help="gRPC port on 127.0.0.1")
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    args = parser.parse_args(list(argv))
    if not args.storage_uri.startswith("s3://"):
        print(f"langmerge-trainer serve: --storage-uri must be an s3:// URI, not {args.storage_uri!r}", file=sys.stderr)
        return EXIT_USAGE
    if args.http_port == args.grpc_port:
        print("langmerge-trainer serve: --http-port and --grpc-port must differ", file=sys.stderr)
        return EXIT_USAGE
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local folders only: never ask a model hub anything
    started = time.monotonic()
    model = PublishedModel(args.model_name, args.storage_uri, device=args.device)
    try:
        check_port(args.http_port, "HTTP")
        check_port(args.grpc_port, "gRPC")
        model.load()
    except LoadError as err:
        print(f"langmerge-trainer serve: cannot load {args.storage_uri}: {one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    log.info(
        "loaded in %.1fs; serving %s on http://%s:%d", time.monotonic() - started, args.model_name, HOST, args.http_port
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
