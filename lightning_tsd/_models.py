"""Turning what a user passes as a teacher or student into a module the distiller can call (plain torch).

A module is used as it is, unless it is a raw Hugging Face time-series classifier, which is adapted to
``(B, C, T) -> logits`` (:func:`lightning_tsd.adapters.auto_adapt`). A path is a teacher file, a
``{"class_path", "init_args"}`` dict is built, and a list of any of these is an ensemble
(:class:`lightning_tsd.ensemble.TeacherEnsemble`).
"""

from __future__ import annotations

import warnings
from typing import Any

from torch import nn

from lightning_tsd.adapters import auto_adapt, declared_num_classes, infer_num_classes_from_outputs
from lightning_tsd.checkpoint import build_from_spec, load_teacher

read_class_count = infer_num_classes_from_outputs

__all__ = [
    "agreed_hint",
    "declared_num_classes",
    "file_hparam",
    "infer_num_classes",
    "name_of",
    "read_class_count",
    "resolve_model",
]


def resolve_model(model: Any, role: str) -> nn.Module:
    """A module from a module, a teacher file, a spec dict, or (teachers) a list of those."""
    if isinstance(model, nn.Module):
        return auto_adapt(model)
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_teacher(model)
    if isinstance(model, dict) and "class_path" in model:
        return build_from_spec(model)
    if isinstance(model, (list, tuple)) and model and role == "teacher":
        from lightning_tsd.ensemble import TeacherEnsemble

        members = [resolve_model(member, role) for member in model]
        return members[0] if len(members) == 1 else TeacherEnsemble(members)
    raise TypeError(
        f"the {role} must be a torch.nn.Module, a path to a teacher file, or a "
        f"{{'class_path', 'init_args'}} dict{' (or a list of those: an ensemble)' if role == 'teacher' else ''}; "
        f"got {type(model).__name__}"
    )


def agreed_hint(teacher: nn.Module, student: nn.Module) -> int | None:
    """The class count both models declare (or the one that declares one); None when unknown or in conflict.
    A hint only: the distiller reads the real count from the outputs on the first batch."""
    hints = {k for k in (declared_num_classes(teacher), declared_num_classes(student)) if k is not None}
    return hints.pop() if len(hints) == 1 else None


def name_of(value: Any) -> str:
    """A string option as it is, a callable's ``__name__`` (for the hyperparameters)."""
    return value if isinstance(value, str) else getattr(value, "__name__", "callable")


def file_hparam(teacher: Any) -> Any:
    """What to record for the teacher in the hyperparameters when it was given as files or spec dicts."""
    if isinstance(teacher, (str, dict)):
        return teacher
    if isinstance(teacher, (list, tuple)) and all(isinstance(t, (str, dict)) for t in teacher):
        return list(teacher)
    return None


def infer_num_classes(model: nn.Module) -> int | None:
    """Deprecated (removed in 0.3.0): the class count a model *declares* (``num_classes``, a config's
    ``num_labels``), a hint only; use :func:`lightning_tsd.adapters.declared_num_classes`, or
    :func:`lightning_tsd.adapters.infer_num_classes_from_outputs` for the real count, which the distiller
    reads from the models' outputs on the first batch."""
    warnings.warn(
        "infer_num_classes is deprecated and will be removed in 0.3.0; use "
        "lightning_tsd.adapters.declared_num_classes (a declared hint) or "
        "lightning_tsd.adapters.infer_num_classes_from_outputs (the count the models output)",
        DeprecationWarning,
        stacklevel=2,
    )
    return declared_num_classes(model)
