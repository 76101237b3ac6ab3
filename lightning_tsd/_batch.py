"""Batch unpacking and input validation shared by every layer (plain torch, no Lightning).

A batch is ``(x, y)``, ``(x, y, index)`` or a mapping with keys ``x``, ``y`` and optionally ``mask``
(bool, True on real steps) and ``index`` (each sample's position in its dataset). ``x`` is
``(B, C, T)``; a ``(B, T)`` tensor is univariate and gets a channel axis.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor


class InvalidBatchError(ValueError):
    """A batch (or one of its tensors) that the distiller cannot use; the message names the problem."""


class NonFiniteLossError(InvalidBatchError):
    """A training step whose loss came out NaN or infinite (from finite inputs: values too large for the
    models' precision, or a diverged student); raised before the optimizer step, so nothing is updated."""


class Batch(NamedTuple):
    """A validated batch: ``x`` is ``(B, C, T)`` float, ``mask`` ``(B, T)`` bool or None."""

    x: Tensor
    y: Tensor | None
    mask: Tensor | None
    index: Tensor | None  # type: ignore[assignment]  # a field named like tuple.index (public name)


def as_bct(x: Tensor, *, where: str = "x") -> Tensor:
    """Return ``x`` as a float ``(B, C, T)`` tensor, raising :class:`InvalidBatchError` if it cannot be.

    Example:
        >>> as_bct(torch.zeros(4, 10)).shape
        torch.Size([4, 1, 10])
    """
    if not isinstance(x, Tensor):
        raise InvalidBatchError(f"{where} must be a torch.Tensor, got {type(x).__name__}")
    if not torch.is_floating_point(x):
        raise InvalidBatchError(
            f"{where} must be a floating-point tensor, got dtype {x.dtype}; convert it with x.float()"
        )
    if x.ndim == 2:
        x = x.unsqueeze(1)
    if x.ndim != 3:
        raise InvalidBatchError(
            f"{where} must have shape (B, C, T) or (B, T), got rank {x.ndim} with shape {tuple(x.shape)}"
        )
    if x.shape[0] == 0:
        raise InvalidBatchError(f"{where} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[-1] == 0:
        raise InvalidBatchError(f"{where} has no timesteps (shape {tuple(x.shape)})")
    return x


def check_finite(x: Tensor, *, where: str = "x") -> None:
    """Raise :class:`InvalidBatchError` naming how many values of ``x`` are NaN or infinite."""
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        raise InvalidBatchError(f"{where} contains {bad} non-finite value(s) (NaN or Inf) out of {x.numel()}")


def check_mask(mask: Tensor | None, x: Tensor, *, check_rows: bool = True) -> Tensor | None:
    """Validate a padding mask against ``x`` (``(B, C, T)``) and return it as bool ``(B, T)``.

    ``check_rows=False`` leaves the data-dependent check (every row has a real step) to :func:`value_flags`.
    """
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise InvalidBatchError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != (x.shape[0], x.shape[-1]):
        raise InvalidBatchError(
            f"mask must have shape (B, T) = {(x.shape[0], x.shape[-1])}, got {tuple(mask.shape)}"
        )
    mask = mask.to(device=x.device, dtype=torch.bool)
    if not check_rows:
        return mask
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = torch.nonzero(empty).flatten().tolist()
        raise InvalidBatchError(f"mask has no real step for sample(s) at batch position(s) {rows}")
    return mask


def check_labels(y: Tensor | None, num_classes: int | None, *, check_range: bool = True) -> None:
    """Raise :class:`InvalidBatchError` if labels are not integers in ``[0, num_classes)``."""
    if y is None:
        return
    if torch.is_floating_point(y) or y.dtype == torch.bool:
        raise InvalidBatchError(f"labels y must be an integer tensor, got dtype {y.dtype}")
    if num_classes is None or not check_range:
        return
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise InvalidBatchError(
            f"labels must lie in [0, {num_classes}), got values in [{int(y.min())}, {int(y.max())}]"
        )


def unpack_batch(batch: Any, *, num_classes: int | None = None, deferred: bool = False) -> Batch:
    """Unpack and validate a batch into a :class:`Batch`.

    Args:
        batch: ``(x, y)``, ``(x, y, index)``, ``x`` alone, or a mapping with ``x``, ``y``, ``mask``, ``index``.
        num_classes: when given, labels are checked to lie in ``[0, num_classes)``.
        deferred: check only types and shapes here, nothing that reads values back from the device; the
            caller checks values later with :func:`value_flags` (the training step reads them once).

    Example:
        >>> b = unpack_batch({"x": torch.randn(2, 8), "y": torch.tensor([0, 1])})
        >>> b.x.shape, b.mask
        (torch.Size([2, 1, 8]), None)
    """
    mask = index = y = None
    if isinstance(batch, Mapping):
        if "x" not in batch:
            raise InvalidBatchError(f"a dict batch needs the key 'x', got keys {sorted(batch)}")
        x, y, mask, index = batch["x"], batch.get("y"), batch.get("mask"), batch.get("index")
    elif isinstance(batch, (tuple, list)):
        if not 1 <= len(batch) <= 3:
            raise InvalidBatchError(
                f"a tuple batch must be (x,), (x, y) or (x, y, index), got {len(batch)} items"
            )
        x = batch[0]
        y = batch[1] if len(batch) > 1 else None
        index = batch[2] if len(batch) > 2 else None
    else:
        x = batch
    x = as_bct(x)
    if not deferred:
        check_finite(x)
    mask = check_mask(mask, x, check_rows=not deferred)
    if y is not None:
        y = torch.as_tensor(y, device=x.device)
        if y.shape != (x.shape[0],):
            raise InvalidBatchError(f"labels y must have shape (B,) = ({x.shape[0]},), got {tuple(y.shape)}")
        check_labels(y, num_classes, check_range=not deferred)
    if index is not None:
        index = torch.as_tensor(index, device=x.device)
        if index.shape != (x.shape[0],) or torch.is_floating_point(index):
            raise InvalidBatchError(
                f"index must be an integer tensor of shape ({x.shape[0]},), got {index.dtype} {tuple(index.shape)}"
            )
    return Batch(x, y, mask, index)


def value_flags(b: Batch, num_classes: int | None) -> dict[str, Tensor]:
    """The data-dependent checks of a batch as 0-dim bool device tensors, to be read back together.

    Keys: ``x`` (all finite), ``y`` (labels in ``[0, K)``, when both are known), ``mask`` (every row has a
    real step, when a mask is given). Nothing is read back here.

    Example:
        >>> b = unpack_batch({"x": torch.tensor([[0.0, float("nan")]]), "y": torch.tensor([3])}, deferred=True)
        >>> {k: bool(v) for k, v in value_flags(b, num_classes=2).items()}
        {'x': False, 'y': False}
    """
    flags = {"x": torch.isfinite(b.x).all()}
    if b.y is not None and num_classes is not None:
        flags["y"] = (
            ((b.y >= 0) & (b.y < num_classes)).all() if b.y.numel() else torch.ones((), dtype=torch.bool)
        )
    if b.mask is not None:
        flags["mask"] = b.mask.any(dim=1).all()
    return flags


def explain_values(b: Batch, num_classes: int | None, ok: Mapping[str, bool]) -> InvalidBatchError | None:
    """The error for the first failed check in ``ok`` (as read back from :func:`value_flags`), with the
    details the eager checks give (how many values, which rows); None when the batch's values are fine."""
    checks = (
        ("x", lambda: check_finite(b.x)),
        ("y", lambda: check_labels(b.y, num_classes)),
        ("mask", lambda: check_mask(b.mask, b.x)),
    )
    for key, check in checks:
        if not ok.get(key, True):
            try:
                check()
            except InvalidBatchError as err:
                return err
    return None


def clamp_labels(b: Batch, num_classes: int | None) -> Batch:
    """The batch with labels clamped into ``[0, K)``: the losses of a step whose labels are checked only
    after its single host read must not crash (or assert on a GPU) on a bad label before that read."""
    if b.y is None or num_classes is None:
        return b
    return b._replace(y=b.y.clamp(0, num_classes - 1))


def check_batchnorm_batch(model: torch.nn.Module, x: Tensor, where: str) -> None:
    """Train-mode BatchNorm cannot normalise a single value per channel: say so before torch does."""
    if x.shape[0] * x.shape[-1] > 1 or not model.training:
        return
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        raise InvalidBatchError(
            f"bad {where}: the student has BatchNorm in train mode, which needs more than one value per "
            f"channel, but the batch holds one sample of one step (shape {tuple(x.shape)}). Use "
            "DataLoader(drop_last=True), a larger batch, or student_train_mode=False"
        )


def model_logits(output: Any) -> Tensor:
    """Extract logits ``(B, K)`` from a model output: a tensor, a tuple/list (first item), or a mapping
    with key ``logits``. Anything else raises a ``TypeError`` saying what is accepted."""
    if isinstance(output, Tensor):
        logits = output
    elif isinstance(output, Mapping) and "logits" in output:
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
        logits = output[0]
    else:
        raise TypeError(
            "a model must return logits as a (B, K) tensor, a tuple whose first item is the logits, or a "
            f"dict with key 'logits'; got {type(output).__name__}"
        )
    if logits.ndim != 2:
        raise InvalidBatchError(f"a model must return logits of shape (B, K), got {tuple(logits.shape)}")
    return logits


def floating_dtype(model: torch.nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter (the precision it computes in); None when it
    has none (a parameter-free or integer-only model: callers pick their default, e.g. ``or torch.float32``).

    Example:
        >>> floating_dtype(torch.nn.Linear(2, 2).double()), floating_dtype(torch.nn.ReLU())
        (torch.float64, None)
    """
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def _signature_accepts_mask(forward: Any) -> bool:
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return "mask" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


@functools.lru_cache(maxsize=256)
def _class_accepts_mask(cls: type[torch.nn.Module]) -> bool:
    return _signature_accepts_mask(cls.forward)


def accepts_mask(model: Any) -> bool:
    """Whether ``model.forward`` takes a ``mask`` keyword (the reference models do); read once per class."""
    if isinstance(model, torch.nn.Module) and "forward" not in vars(model):
        return _class_accepts_mask(type(model))  # type: ignore[arg-type]  # mypy#11470: a class is Hashable
    return _signature_accepts_mask(getattr(model, "forward", model))


def call_model(model: Any, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Run ``model`` on ``x`` (``(B, C, T)``), passing ``mask`` when given and accepted, and return logits.

    Example:
        >>> call_model(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3)), torch.randn(2, 1, 8)).shape
        torch.Size([2, 3])
    """
    if mask is not None and accepts_mask(model):
        return model_logits(model(x, mask=mask))
    return model_logits(model(x))
