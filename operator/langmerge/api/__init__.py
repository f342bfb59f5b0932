"""The langmerge API (group ``langmerge.dev``, version ``v1alpha1``), defined once as pydantic models."""

from langmerge.api.common import BaseModelRef, Condition, LabelSelector, Resources
from langmerge.api.expert import LanguageExpertSpec, LanguageExpertStatus
from langmerge.api.merged import MergedModelSpec, MergedModelStatus

__all__ = [
    "BaseModelRef",
    "Condition",
    "LabelSelector",
    "LanguageExpertSpec",
    "LanguageExpertStatus",
    "MergedModelSpec",
    "MergedModelStatus",
    "Resources",
]
