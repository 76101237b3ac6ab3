"""What the saliency callbacks share: the teacher/student protocol, their argument checks, the epoch grid."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

STAGES = ("validate", "test")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def on_epoch_grid(epoch: int, every_n_epochs: int, sanity_checking: bool) -> bool:
    """Whether validation epoch ``epoch`` (0-based) is one of every ``every_n_epochs``; never the sanity check.

    Example:
        >>> [e for e in range(6) if on_epoch_grid(e, 2, sanity_checking=False)]
        [1, 3, 5]
    """
    return not sanity_checking and (epoch + 1) % every_n_epochs == 0


def teacher_student(pl_module: LightningModule) -> tuple[nn.Module, nn.Module]:
    """The module's ``teacher`` and ``student``, or a ``MisconfigurationException`` saying what to add.

    Example:
        >>> module = LightningModule()
        >>> module.teacher, module.student = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> teacher_student(module)[1] is module.student
        True
    """
    teacher, student = getattr(pl_module, "teacher", None), getattr(pl_module, "student", None)
    if not (isinstance(teacher, nn.Module) and isinstance(student, nn.Module)):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} needs nn.Module attributes `teacher` and `student` for the "
            "saliency callbacks; add them (e.g. self.teacher = teacher; self.student = student)"
        )
    return teacher, student
