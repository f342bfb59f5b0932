"""Admission checks: what must hold before a Job may be created for a custom resource. Pure; no I/O.

A spec the API server accepted can still ask for things the operator must not do on its behalf: read or write S3
prefixes of another namespace (:mod:`langmerge.tenancy`), run an image from any registry with the namespace's S3 keys,
or request resources a Job could never get. These checks run when the spec is parsed, before any S3 request or Job;
a failure is a :class:`Refusal` the reconcilers report as a condition and an Event. The checks that need the API
server (the S3 Secret exists, the namespace's share of Job slots) run just before a Job is created
(:meth:`langmerge.controller.reconcile.ReconcilePass.launch_job`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from langmerge.references import ANY_REGISTRY, ImageError, parse_image, parse_quantity

if TYPE_CHECKING:
    from langmerge.api.common import Resources
    from langmerge.settings import Settings


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
