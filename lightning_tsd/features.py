"""Feature distillation (FitNets hints, Romero et al. 2015): a student layer learns to match a teacher layer.

Layers are paired by module name (as in ``model.named_modules()``; for a model the package adapted, such as
a raw Hugging Face classifier, names relative to the model you passed work too) and read with forward hooks,
so no model needs changing. A pair's features are ``(B, D)`` or ``(B, C, T)`` (``layout="BTC"`` for
``(B, T, C)`` outputs such as an RNN's or a batch-first Transformer's; tuple outputs give their first tensor).
Where the widths differ a learned projector maps the student's features to the teacher's width (a ``1x1``
``Conv1d`` for ``(B, C, T)``, a ``Linear`` for ``(B, D)``); where the lengths differ the projected student
features are resampled to the teacher's length (linear interpolation). The loss is the sum over pairs of
the mean squared error between the projected student features and the (detached) teacher features, over
every position (a padding mask is not applied to features).

A hook keeps the first call of its module with at least ``B`` rows, and that call's first ``B`` rows: every
saliency estimator runs the batch itself first, alone or at the head of a concatenation with its perturbed
copies, so the student's features come from the same forward as its logits and saliency. Plain torch: no
Lightning import.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tsd.adapters import LAYOUTS, ModelAdapter
from lightning_tsd.attribution import eval_mode

__all__ = ["FeatureDistillation", "example_input", "find_module", "fitnets_loss", "make_projector"]


def find_module(model: nn.Module, name: str, role: str = "model") -> nn.Module:
    """The submodule of ``model`` called ``name``; a leading ``"{role}."`` and, for an adapted model, names
    relative to the wrapped model are accepted.

    Raises:
        ValueError: no such module (the message lists some of the names there are).

    Example:
        >>> net = nn.Sequential(nn.Conv1d(1, 4, 3), nn.ReLU())
        >>> find_module(net, "0"), find_module(net, "student.1", "student")
        (Conv1d(1, 4, kernel_size=(3,), stride=(1,)), ReLU())
    """
    modules = dict(model.named_modules())
    candidates = [name, name.removeprefix(f"{role}.")]
    if isinstance(model, ModelAdapter):
        candidates += [f"model.{c}" for c in candidates]
    for candidate in candidates:
        if candidate and candidate in modules:
            return modules[candidate]
    shown = [n for n in modules if n][:12]
    raise ValueError(
        f"the {role} has no module named {name!r}. Names are those of {role}.named_modules(), relative to the "
        f"{role} (e.g. 'blocks.1', not 'model.{role}.blocks.1'); some of its modules: {shown}"
        + (" ..." if len(modules) > 13 else "")
    )


def _first_tensor(output: Any, where: str) -> Tensor:
    """A module's output as one tensor: itself, or the first tensor of a tuple, list or mapping (a Hugging
    Face ``ModelOutput`` is a mapping)."""
    if isinstance(output, Tensor):
        return output
    values = list(output.values()) if isinstance(output, Mapping) else output
    if isinstance(values, (tuple, list)) and values and isinstance(values[0], Tensor):
        return values[0]
    raise TypeError(f"{where} returned {type(output).__name__}: pair a module whose output is a tensor")


def _as_bct(features: Tensor, layout: str, where: str) -> Tensor:
    """``(B, D)`` as it is, ``(B, C, T)`` from the pair's layout; any other rank is refused."""
    if features.ndim == 2:
        return features
    if features.ndim == 3:
        return features if layout == "BCT" else features.transpose(1, 2)
    raise ValueError(
        f"{where} gives features of shape {tuple(features.shape)}: feature distillation pairs (B, D) or "
        "(B, C, T) features; pick a layer with one of those outputs (for Hugging Face PatchTST/PatchTSMixer "
        "classifiers: 'head.flatten')"
    )


def make_projector(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> nn.Module:
    """The learned map from the student's feature width to the teacher's: ``Identity`` when they agree, a
    ``1x1`` ``Conv1d`` for ``(B, C, T)`` features, a ``Linear`` for ``(B, D)``.

    Example:
        >>> make_projector((2, 8, 50), (2, 32, 25)), make_projector((2, 16), (2, 16))
        (Conv1d(8, 32, kernel_size=(1,), stride=(1,)), Identity())
    """
    if len(student_shape) != len(teacher_shape):
        raise ValueError(
            f"student features {tuple(student_shape)} and teacher features {tuple(teacher_shape)} have "
            "different ranks: pair two (B, D) layers or two (B, C, T) layers"
        )
    width_s, width_t = int(student_shape[1]), int(teacher_shape[1])
    if width_s == width_t:
        return nn.Identity()
    return nn.Conv1d(width_s, width_t, 1) if len(student_shape) == 3 else nn.Linear(width_s, width_t)


def fitnets_loss(
    student_features: Tensor, teacher_features: Tensor, projector: nn.Module | None = None
) -> Tensor:
    """FitNets hint loss: the mean squared error between the projected student features and the teacher's
    (detached), after resampling the student's to the teacher's length when they differ.

    Example:
        >>> s, t = torch.randn(4, 8, 20), torch.randn(4, 8, 10)
        >>> loss = fitnets_loss(s, t)
        >>> torch.allclose(loss, ((torch.nn.functional.interpolate(s, size=10, mode="linear") - t) ** 2).mean())
        True
    """
    projected = student_features if projector is None else projector(student_features)
    if projected.ndim == 3 and projected.shape[-1] != teacher_features.shape[-1]:
        projected = F.interpolate(
            projected, size=teacher_features.shape[-1], mode="linear", align_corners=False
        )
    return F.mse_loss(projected.float(), teacher_features.detach().float())


def example_input(model: nn.Module, shape: Sequence[int] | None = None) -> Tensor:
    """Zeros ``(2, C, T)`` to read a model's feature shapes: ``shape=(C, T)`` when given, else ``C`` from
    what the model declares (``init_args["in_channels"]``, a Hugging Face config's ``num_input_channels``)
    and ``T`` from its config's ``context_length`` (else 64).

    Example:
        >>> from lightning_tsd.models import FCN
        >>> example_input(FCN(in_channels=3, num_classes=2)).shape
        torch.Size([2, 3, 64])
    """
    inner = model.model if isinstance(model, ModelAdapter) else model
    if shape is None:
        init_args = getattr(inner, "init_args", None) or {}
        config = getattr(inner, "config", None)
        channels = init_args.get("in_channels") or getattr(config, "num_input_channels", None)
        if channels is None:
            raise ValueError(
                f"cannot tell how many input channels {type(inner).__name__} takes, to size the feature "
                "projectors: pass feature_input_shape=(C, T) (FeatureDistillation(..., example_x=...))"
            )
        shape = (int(channels), int(getattr(config, "context_length", None) or 64))
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    return torch.zeros(2, *(int(s) for s in shape), dtype=dtype, device=device)


class FeatureDistillation(nn.Module):
    """FitNets hints between named layers of a student and a teacher, with learned projectors.

    The projectors are this module's parameters (train them with the student's); the models are not
    submodules. Feature shapes are read once, here, from a no-grad forward of both models in eval mode on
    ``example_x``.

    Args:
        student: the student model.
        teacher: the teacher model.
        pairs: ``{student_layer: teacher_layer}`` module names (see :func:`find_module`).
        example_x: an input ``(B, C, T)`` both models accept (zeros are fine; :func:`example_input`).
        layout: ``"BCT"`` or ``"BTC"``, the layout of 3-D features: one for both models, or a pair
            ``(student_layout, teacher_layout)``.

    Example:
        >>> from lightning_tsd.models import FCN, NarrowFCN
        >>> student, teacher = NarrowFCN(1, 2), FCN(1, 2, num_filters=16)
        >>> hints = FeatureDistillation(student, teacher, {"blocks.1": "blocks.1"}, torch.zeros(2, 1, 32))
        >>> hints.projectors[0]
        Conv1d(16, 32, kernel_size=(1,), stride=(1,))
        >>> x = torch.randn(4, 1, 32)
        >>> with hints.capture(batch_size=4) as features:
        ...     _ = student(x), teacher(x)
        >>> hints(features).shape
        torch.Size([])
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        pairs: Mapping[str, str],
        example_x: Tensor,
        layout: str | Sequence[str] = "BCT",
    ) -> None:
        super().__init__()
        if not isinstance(pairs, Mapping) or not pairs:
            raise ValueError(
                f"feature pairs must be a non-empty {{student_layer: teacher_layer}} dict, got {pairs!r}"
            )
        layouts = (layout, layout) if isinstance(layout, str) else tuple(layout)
        if len(layouts) != 2 or any(v not in LAYOUTS for v in layouts):
            raise ValueError(
                f"layout must be one of {list(LAYOUTS)} or a (student, teacher) pair, got {layout!r}"
            )
        self.pairs = {str(s): str(t) for s, t in pairs.items()}
        self.layouts = layouts
        # a plain list: the models are the caller's, not submodules of this one (no duplicate state dict keys)
        self._modules_by_role = [
            [find_module(student, s, "student") for s in self.pairs],
            [find_module(teacher, t, "teacher") for t in self.pairs.values()],
        ]
        with torch.no_grad(), eval_mode(student, teacher), self.capture(example_x.shape[0]) as probe:
            student(example_x)
            teacher(example_x)
        student_features, teacher_features = self._collected(probe)
        self.projectors = nn.ModuleList(
            make_projector(s.shape, t.shape) for s, t in zip(student_features, teacher_features, strict=True)
        )

    def _describe(self, role: int, i: int) -> str:
        names = list(self.pairs) if role == 0 else list(self.pairs.values())
        return f"the {('student', 'teacher')[role]}'s module {names[i]!r}"

    @contextmanager
    def capture(
        self, batch_size: int, student: bool = True, teacher: bool = True
    ) -> Iterator[dict[str, list[Tensor | None]]]:
        """Hooks on the paired layers (the student's, the teacher's, or both) while the block runs.

        Yields ``{"student": [...], "teacher": [...]}``, one slot per pair, filled with the layer's features
        (``(B, D)`` or ``(B, C, T)``; the teacher's detached) by its first call with at least ``batch_size``
        rows (None until then). The hooks are removed on exit.
        """
        store: dict[str, list[Tensor | None]] = {
            "student": [None] * len(self.pairs),
            "teacher": [None] * len(self.pairs),
        }
        handles = []
        for role, (key, wanted) in enumerate((("student", student), ("teacher", teacher))):
            for i, module in enumerate(self._modules_by_role[role] if wanted else []):

                def hook(
                    _: nn.Module, __: Any, output: Any, role: int = role, key: str = key, i: int = i
                ) -> None:
                    if store[key][i] is not None:
                        return
                    features = _first_tensor(output, self._describe(role, i))
                    if features.shape[0] >= batch_size:
                        features = _as_bct(features[:batch_size], self.layouts[role], self._describe(role, i))
                        store[key][i] = features.detach() if role == 1 else features

                handles.append(module.register_forward_hook(hook))
        try:
            yield store
        finally:
            for handle in handles:
                handle.remove()

    def _collected(
        self, features: Mapping[str, Sequence[Tensor | None]]
    ) -> tuple[list[Tensor], list[Tensor]]:
        """The student's and the teacher's features of every pair; an error names a layer that did not run."""
        for role, key in enumerate(("student", "teacher")):
            for i, value in enumerate(features[key]):
                if value is None:
                    raise RuntimeError(
                        f"{self._describe(role, i)} did not run on the batch: pair layers that the model's "
                        "forward calls on its input"
                    )
        return [cast(Tensor, f) for f in features["student"]], [cast(Tensor, f) for f in features["teacher"]]

    def forward(self, features: Mapping[str, Sequence[Tensor | None]]) -> Tensor:
        """The FitNets loss summed over the pairs, from what :meth:`capture` collected."""
        student, teacher = self._collected(features)
        losses = [
            fitnets_loss(s, t, projector)
            for s, t, projector in zip(student, teacher, self.projectors, strict=True)
        ]
        return torch.stack(losses).sum()
