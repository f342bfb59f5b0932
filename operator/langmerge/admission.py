"""Admission checks: what must hold before a Job may be created for a custom resource. Pure; no I/O.

A spec the API server accepted can still ask for things the operator must not do on its behalf: read or write S3
prefixes of another namespace (:mod:`langmerge.tenancy`), run an image from any registry with the namespace's S3 keys,
or request resources a Job could never get. These checks run when the spec is parsed, before any S3 request or Job;
a failure is a :class:`Refusal` the reconcilers report as a condition and an Event. The checks that need the API
server (the S3 Secret exists, the namespace's share of Job slots) run just before a Job is created
(:meth:`langmerge.controller.reconcile.ReconcilePass.launch_job`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from langmerge.api.common import Resources
    from langmerge.settings import Settings

# -- container image references (the grammar of github.com/distribution/reference) -------------------------------
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(
    rf"^(?P<name>(?:(?P<domain>{_DOMAIN})/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
    rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$",
    re.ASCII,
)
#: The registry of references without one (``busybox``, ``library/busybox``).
DEFAULT_REGISTRY = "docker.io"
_DOCKER_HUB_ALIASES = {"index.docker.io", "registry-1.docker.io"}
#: In ``allowed_registries``: any registry (reference syntax is still checked).
ANY_REGISTRY = "*"


class ImageError(ValueError):
    pass


@dataclass(frozen=True)
class ImageRef:
    registry: str
    repository: str

    @property
    def location(self) -> str:
        """``registry/repository`` without tag or digest, e.g. ``docker.io/library/busybox``."""
        return f"{self.registry}/{self.repository}"


def parse_image(image: str) -> ImageRef:
    """Registry and repository of an image reference; :class:`ImageError` if it is not a valid reference."""
    if len(image) > 4096 or not image:
        raise ImageError(f"{image[:80]!r} is not a valid image reference")
    match = _REFERENCE.match(image)
    if match is None:
        raise ImageError(
            f"{image!r} is not a valid image reference ([registry[:port]/]repository[:tag][@digest], "
            "repository in lower case)"
        )
    name = match["name"]
    if len(name) > 255:
        raise ImageError(f"{image[:80]!r}...: the repository name is longer than 255 characters")
    first, sep, rest = name.partition("/")
    # As docker does: the first component is a registry if it has a '.' or ':', is localhost, or is not lower case.
    if sep and ("." in first or ":" in first or first == "localhost" or first.lower() != first):
        registry, repository = first, rest
    else:
        registry, repository = DEFAULT_REGISTRY, name
    if registry in _DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
    if registry == DEFAULT_REGISTRY and "/" not in repository:
        repository = f"library/{repository}"
    return ImageRef(registry=registry, repository=repository)


def allowed_image_prefixes(settings: Settings) -> tuple[str, ...]:
    """The allowed registries (or ``registry/path`` prefixes): the setting, else the trainer image's registry."""
    if settings.allowed_registries:
        return settings.allowed_registries
    return (parse_image(settings.trainer_image).registry,)


def check_image(image: str, allowed: tuple[str, ...]) -> str | None:
    """None if ``image`` is a valid reference from an allowed registry, else why not."""
    try:
        ref = parse_image(image)
    except ImageError as err:
        return str(err)
    if ANY_REGISTRY in allowed:
        return None
    for entry in allowed:
        entry = entry.rstrip("/")
        if ref.registry == entry or ref.location.startswith(entry + "/"):
            return None
    return (
        f"image {image} is from {ref.registry}, which the operator does not allow (allowed: {', '.join(allowed)}; "
        "Helm value jobs.allowedRegistries)"
    )


# -- Kubernetes quantities -------------------------------------------------------------------------------------------
_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>[a-zA-Z]*|[eE][+-]?[0-9]+)$", re.ASCII
)
_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10) ** 3,
    "M": Decimal(10) ** 6,
    "G": Decimal(10) ** 9,
    "T": Decimal(10) ** 12,
    "P": Decimal(10) ** 15,
    "E": Decimal(10) ** 18,
    "Ki": Decimal(2) ** 10,
    "Mi": Decimal(2) ** 20,
    "Gi": Decimal(2) ** 30,
    "Ti": Decimal(2) ** 40,
    "Pi": Decimal(2) ** 50,
    "Ei": Decimal(2) ** 60,
}


def parse_quantity(value: str) -> Decimal:
    """A Kubernetes quantity (``500m``, ``32Gi``, ``1e3``) as a number; ValueError if it is not one."""
    match = _QUANTITY.match(value.strip()) if len(value) <= 64 else None
    if match is None:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    suffix = match["suffix"]
    try:
        number = Decimal(match["number"])
        if suffix[:1] in ("e", "E") and suffix[1:].lstrip("+-").isdigit():
            exponent = int(suffix[1:])
            if abs(exponent) > 100:
                raise ValueError(f"{value!r}: exponent out of range")
            return number * (Decimal(10) ** exponent)
    except InvalidOperation as err:
        raise ValueError(f"{value!r} is not a Kubernetes quantity") from err
    if suffix not in _SUFFIXES:
        raise ValueError(f"{value!r}: unknown suffix {suffix!r} (m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)")
    return number * _SUFFIXES[suffix]


def check_quantity(field: str, value: str, maximum: str, setting: str) -> str | None:
    try:
        amount = parse_quantity(value)
    except ValueError as err:
        return f"{field}: {err}"
    if amount <= 0:
        return f"{field} {value} must be positive"
    if amount > parse_quantity(maximum):
        return f"{field} {value} is more than the operator allows for one Job ({maximum}; Helm value {setting})"
    return None


@dataclass(frozen=True)
class Refusal:
    """Why no Job may be created: ``reason`` for the condition and the Event, ``message`` for the user."""

    reason: str
    message: str


def check_job_spec(
    image: str, image_field: str, resources: Resources, field: str, settings: Settings
) -> Refusal | None:
    """The image and the resources a Job would get: the first problem, or None."""
    problem = check_image(image, allowed_image_prefixes(settings))
    if problem is not None:
        return Refusal("ImageNotAllowed", f"{image_field}: {problem}")
    for name, value, maximum, setting in (
        ("cpu", resources.cpu, settings.max_job_cpu, "jobs.maxCpu"),
        ("memory", resources.memory, settings.max_job_memory, "jobs.maxMemory"),
    ):
        problem = check_quantity(f"{field}.{name}", value, maximum, setting)
        if problem is not None:
            return Refusal("InvalidResources", problem)
    return None


def check_uris(settings: Settings, namespace: str, uris: list[tuple[str, str | None, bool]]) -> Refusal | None:
    """``uris``: (field, uri or None, written). The first URI the namespace may not use, or None."""
    policy = settings.policy
    for field, uri, write in uris:
        if uri is None:
            continue
        problem = policy.check(namespace, field, uri, write=write)
        if problem is not None:
            return Refusal("UriNotAllowed", problem)
    return None
