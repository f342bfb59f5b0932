"""Container image references and Kubernetes quantities: pure parsers shared by the settings and the admission
checks (:mod:`langmerge.admission`). No I/O."""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

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


# -- Kubernetes quantities -------------------------------------------------------------------------------------------
_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(?P<suffix>[a-zA-Z]*|[eE][+-]?[0-9]+)$", re.ASCII
)
#: Decimal suffixes (k = 10^3 ... E = 10^18) and binary ones (Ki = 2^10 ... Ei = 2^60), and milli.
_SUFFIXES = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    **{unit: Decimal(10) ** (3 * n) for n, unit in enumerate("kMGTPE", start=1)},
    **{f"{unit}i": Decimal(2) ** (10 * n) for n, unit in enumerate("KMGTPE", start=1)},
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


__all__ = ["ANY_REGISTRY", "DEFAULT_REGISTRY", "ImageError", "ImageRef", "parse_image", "parse_quantity"]
