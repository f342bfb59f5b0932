"""Which S3 prefixes a namespace may use: the operator's URI policy. Pure; no I/O.

The operator lists, reads and writes S3 with its own credentials, so a URI in a custom resource is a request to act
with those credentials. The policy maps each namespace to the prefixes it may read (``read``) or also write
(``readWrite``):

* the default rule: ``<artifactsUri>/<namespace>/`` (readWrite; the template is a setting, empty disables it);
* grants per namespace, and grants to every namespace under the key ``*`` (e.g. shared base models, read only);
* the operator's own expert area ``<artifactsUri>/experts/`` is never a user URI (the operator addresses it itself);
* ``enforce`` (default) or ``off`` (single-tenant clusters: every URI is allowed, the expert area stays reserved).

Prefixes match on whole path segments: ``s3://b/team-a/`` allows ``s3://b/team-a`` and ``s3://b/team-a/x``, never
``s3://b/team-ab``. URIs with ``.`` or ``..`` segments, or empty ones (``//``), are refused: some S3 servers and tools
normalise them, so they would not mean what a prefix comparison sees.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

Access = Literal["read", "readWrite"]

ENFORCE = "enforce"
OFF = "off"
#: Key of grants that apply to every namespace.
EVERY_NAMESPACE = "*"
#: Placeholders of the default rule's template.
DEFAULT_NAMESPACE_PREFIX = "{artifactsUri}/{namespace}/"


class UriError(ValueError):
    """A URI that is not a plain ``s3://bucket/segments`` location."""


def uri_segments(uri: str) -> tuple[str, ...]:
    """``s3://bucket/a/b/`` -> ``("bucket", "a", "b")``. Raises :class:`UriError` for anything ambiguous."""
    if not uri.startswith("s3://"):
        raise UriError(f"{uri!r} is not an s3:// URI")
    rest = uri[len("s3://") :]
    if rest.endswith("/"):
        rest = rest[:-1]
    parts = tuple(rest.split("/"))
    if not parts[0]:
        raise UriError(f"{uri!r} has no bucket")
    for part in parts:
        if part in ("", ".", ".."):
            raise UriError(f"{uri!r} has an empty, '.' or '..' path segment")
    return parts


def is_under(uri: str, prefix: str) -> bool:
    """Whether ``uri`` is ``prefix`` or below it, segment by segment."""
    inner, outer = uri_segments(uri), uri_segments(prefix)
    return inner[: len(outer)] == outer


@dataclass(frozen=True)
class Grant:
    prefix: str
    access: Access
    #: Where the grant comes from, for messages: "default rule" or "grant".
    source: str

    def describe(self) -> str:
        mode = "read and write" if self.access == "readWrite" else "read only"
        return f"{self.prefix} ({self.source}, {mode})"


@dataclass(frozen=True)
class UriPolicy:
    """The operator's URI policy (see the module docstring)."""

    artifacts_uri: str
    mode: str = ENFORCE
    namespace_prefix: str = DEFAULT_NAMESPACE_PREFIX
    #: (namespace or "*", access, prefix)
    grants: tuple[tuple[str, Access, str], ...] = ()

    @property
    def reserved(self) -> str:
        """The operator's expert area: adapters, checkpoints and failure records it addresses itself."""
        return self.artifacts_uri.rstrip("/") + "/experts/"

    def grants_for(self, namespace: str) -> list[Grant]:
        out = []
        if self.namespace_prefix:
            prefix = self.namespace_prefix.format(artifactsUri=self.artifacts_uri.rstrip("/"), namespace=namespace)
            out.append(Grant(prefix, "readWrite", "default rule"))
        for ns, access, prefix in self.grants:
            if ns in (namespace, EVERY_NAMESPACE):
                out.append(Grant(prefix, access, "grant" if ns == namespace else "grant to every namespace"))
        return out

    def check(self, namespace: str, field: str, uri: str, *, write: bool) -> str | None:
        """None if ``namespace`` may use ``uri`` (to write when ``write``), else a message naming the rule."""
        try:
            uri_segments(uri)
        except UriError as err:
            return f"{field}: {err}"
        if is_under(uri, self.reserved):
            return (
                f"{field} {uri} is inside the operator's expert area {self.reserved}, which only the operator "
                "addresses; use a prefix outside it"
            )
        if self.mode == OFF:
            return None
        grants = self.grants_for(namespace)
        if any(is_under(uri, g.prefix) and (g.access == "readWrite" or not write) for g in grants):
            return None
        need = "write" if write else "read"
        rules = "; ".join(g.describe() for g in grants) or "no prefix at all"
        return (
            f"{field} {uri} is outside what namespace {namespace} may {need} (operator URI policy: {rules}); "
            "ask the operator's administrator for a grant (Helm value tenancy.grants)"
        )


def parse_grants(raw: str) -> tuple[tuple[str, Access, str], ...]:
    """``{"team-a": {"read": ["s3://shared/models/"], "readWrite": ["s3://b/x/"]}, "*": {...}}`` -> grant tuples.

    Raises ValueError naming the problem (unknown key, a URI that is not plain, a value that is not a list)."""
    if not raw.strip():
        return ()
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"not JSON: {err}") from err
    if not isinstance(value, dict):
        raise ValueError('expected an object {"<namespace>": {"read": [...], "readWrite": [...]}}')
    out: list[tuple[str, Access, str]] = []
    for namespace, modes in sorted(value.items()):
        if not isinstance(modes, dict):
            raise ValueError(f"{namespace}: expected an object with read and/or readWrite lists")
        for access, prefixes in sorted(modes.items()):
            if access not in ("read", "readWrite"):
                raise ValueError(f"{namespace}: unknown key {access!r} (read, readWrite)")
            if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
                raise ValueError(f"{namespace}.{access}: expected a list of s3:// prefixes")
            for prefix in prefixes:
                try:
                    uri_segments(prefix)
                except UriError as err:
                    raise ValueError(f"{namespace}.{access}: {err}") from err
                out.append((namespace, access, prefix))
    return tuple(out)
