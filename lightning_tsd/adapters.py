"""Models with another layout or output type, normalised once where they enter (plain torch).

The package calls every model as ``model(x)`` (or ``model(x, mask=mask)``) with ``x`` ``(B, C, T)`` and
takes logits ``(B, K)``. :func:`adapt_model` wraps any other model to that contract;
:func:`auto_adapt` does it for raw Hugging Face time-series classifiers (``past_values`` ``(B, T, C)`` in,
``prediction_logits`` / ``prediction_outputs`` / ``logits`` out) without importing ``transformers``.
The number of classes comes from the models' outputs (:func:`infer_num_classes_from_outputs`); what a
model declares (:func:`declared_num_classes`) is a hint only.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tsd._batch import call_model, model_logits
from lightning_tsd.attribution import eval_mode

__all__ = [
    "HF_OUTPUT_KEYS",
    "LAYOUTS",
    "ModelAdapter",
    "adapt_model",
    "auto_adapt",
    "declared_num_classes",
    "describe_forward_failure",
    "infer_num_classes_from_outputs",
    "is_hf_time_series_model",
]

LAYOUTS = ("BCT", "BTC")
HF_OUTPUT_KEYS = ("prediction_logits", "prediction_outputs", "logits")


def _pick_output(output: Any, keys: tuple[str, ...]) -> Any:
    """The first of ``keys`` that ``output`` holds (a mapping key or an attribute) and that is not None."""
    for key in keys:
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if value is not None:
            return value
    if isinstance(output, (Tensor, tuple, list)):  # e.g. a Hugging Face model with return_dict=False
        return output
    held = (
        sorted(output)
        if isinstance(output, Mapping)
        else sorted(k for k in vars(output) if not k.startswith("_"))
    )
    raise TypeError(
        f"the model's output ({type(output).__name__}) holds none of {list(keys)} (it holds {held}); "
        "pass output_key=<the name of its logits> to lightning_tsd.adapt_model"
    )


class ModelAdapter(nn.Module):
    """A model seen through the package's contract: ``forward(x, mask=None)`` with ``x`` ``(B, C, T)``
    returns logits ``(B, K)``. Built by :func:`adapt_model`; the wrapped model is the submodule ``model``
    (its parameters, modes and ``state_dict`` keys, prefixed ``model.``, are the adapter's).

    Example:
        >>> net = nn.Sequential(nn.Flatten(), nn.Linear(8 * 2, 3))
        >>> adapted = ModelAdapter(net, layout="BTC")
        >>> adapted(torch.randn(4, 2, 8)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        model: nn.Module,
        layout: str = "BCT",
        input_name: str | None = None,
        output_key: str | Sequence[str] | None = None,
        mask_name: str | None = None,
        mask_like_input: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"adapt_model needs a torch.nn.Module, got {type(model).__name__}")
        if layout not in LAYOUTS:
            raise ValueError(
                f"layout must be one of {list(LAYOUTS)} (the axes order the model takes), got {layout!r}"
            )
        keys = (output_key,) if isinstance(output_key, str) else tuple(output_key or ())
        if not all(isinstance(k, str) and k for k in keys):
            raise TypeError(f"output_key must be a name or a sequence of names, got {output_key!r}")
        for name, value in (("input_name", input_name), ("mask_name", mask_name)):
            if value is not None and not (isinstance(value, str) and value.isidentifier()):
                raise ValueError(f"{name} must be a keyword name of the model's forward, got {value!r}")
        self.model = model
        self.layout = layout
        self.input_name = input_name
        self.output_keys = keys
        self.mask_name = mask_name
        self.mask_like_input = mask_like_input

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Logits ``(B, K)`` for ``x`` ``(B, C, T)``; ``mask`` ``(B, T)`` (True on real steps) reaches
        the model only when the adapter has a ``mask_name``."""
        inputs = x.transpose(1, 2) if self.layout == "BTC" else x
        kwargs: dict[str, Any] = {}
        if mask is not None and self.mask_name is not None:
            if self.mask_like_input:  # e.g. Hugging Face past_observed_mask: the input's shape and dtype
                axis = 2 if self.layout == "BTC" else 1
                mask = mask.unsqueeze(axis).expand(inputs.shape).to(inputs.dtype)
            kwargs[self.mask_name] = mask
        output = (
            self.model(**{self.input_name: inputs}, **kwargs)
            if self.input_name
            else self.model(inputs, **kwargs)
        )
        if self.output_keys:
            output = _pick_output(output, self.output_keys)
        return model_logits(output)

    def extra_repr(self) -> str:
        parts = [f"layout={self.layout!r}"]
        if self.input_name is not None:
            parts.append(f"input_name={self.input_name!r}")
        if self.output_keys:
            keys = self.output_keys[0] if len(self.output_keys) == 1 else list(self.output_keys)
            parts.append(f"output_key={keys!r}")
        if self.mask_name is not None:
            parts.append(
                f"mask_name={self.mask_name!r}" + (", mask_like_input=True" if self.mask_like_input else "")
            )
        return ", ".join(parts)


def adapt_model(
    model: nn.Module,
    layout: str = "BCT",
    input_name: str | None = None,
    output_key: str | Sequence[str] | None = None,
    mask_name: str | None = None,
    *,
    mask_like_input: bool = False,
) -> ModelAdapter:
    """Wrap ``model`` so that it takes ``x`` ``(B, C, T)`` (and ``mask=``) and returns logits ``(B, K)``.

    Args:
        model: any ``nn.Module``.
        layout: the axes order ``model`` takes: ``"BCT"`` (as given) or ``"BTC"`` (``x`` is transposed).
        input_name: pass ``x`` as this keyword (e.g. ``"past_values"``); positionally when None.
        output_key: the attribute or key of the model's output that holds the logits (e.g.
            ``"prediction_logits"``), or a sequence of them (the first one present is taken). When None,
            the output is a tensor, a ``(logits, ...)`` tuple or a ``{"logits": ...}`` dict.
        mask_name: pass the ``(B, T)`` padding mask as this keyword; the mask is dropped when None.
        mask_like_input: broadcast the mask to the model's input shape and dtype (as Hugging Face's
            ``past_observed_mask`` wants) instead of passing it ``(B, T)`` bool.

    Example:
        >>> class TakesBTC(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.head = nn.Linear(2, 3)
        ...     def forward(self, inputs):
        ...         return {"scores": self.head(inputs.mean(dim=1))}
        >>> model = adapt_model(TakesBTC(), layout="BTC", input_name="inputs", output_key="scores")
        >>> model(torch.randn(4, 2, 10)).shape
        torch.Size([4, 3])
        >>> list(model.state_dict())
        ['model.head.weight', 'model.head.bias']
    """
    return ModelAdapter(model, layout, input_name, output_key, mask_name, mask_like_input)


def is_hf_time_series_model(model: Any) -> bool:
    """Whether ``model`` is a Hugging Face ``PreTrainedModel`` whose ``main_input_name`` is ``past_values``
    (read from its class hierarchy: ``transformers`` is never imported here).

    Example:
        >>> is_hf_time_series_model(nn.Linear(2, 2))
        False
    """
    hf = any(
        cls.__name__ == "PreTrainedModel" and cls.__module__.split(".")[0] == "transformers"
        for cls in type(model).__mro__
    )
    return hf and getattr(model, "main_input_name", None) == "past_values"


def _forward_parameters(model: nn.Module) -> Mapping[str, inspect.Parameter]:
    try:
        return inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}


def auto_adapt(model: nn.Module) -> nn.Module:
    """``model`` itself, unless it is a raw Hugging Face time-series classifier
    (:func:`is_hf_time_series_model`: ``PatchTSTForClassification``,
    ``PatchTSMixerForTimeSeriesClassification``, ...): then an adapter that passes ``x`` as ``past_values``
    ``(B, T, C)``, the padding mask as ``past_observed_mask`` (when the forward takes it) and returns the
    output's ``prediction_logits`` / ``prediction_outputs`` / ``logits``, whichever it holds.

    Example:
        >>> net = nn.Linear(4, 2)
        >>> auto_adapt(net) is net
        True
    """
    if isinstance(model, ModelAdapter) or not is_hf_time_series_model(model):
        return model
    takes_mask = "past_observed_mask" in _forward_parameters(model)
    return ModelAdapter(
        model,
        layout="BTC",
        input_name="past_values",
        output_key=HF_OUTPUT_KEYS,
        mask_name="past_observed_mask" if takes_mask else None,
        mask_like_input=takes_mask,
    )


def describe_forward_failure(model: nn.Module, x: Tensor, *, role: str = "model") -> str:
    """The note added to an error raised by ``model``'s forward on the first batch: the shape passed and
    how to adapt a model that expects something else.

    Example:
        >>> print(describe_forward_failure(nn.Linear(3, 2), torch.zeros(4, 1, 3), role="teacher"))  # doctest: +ELLIPSIS
        lightning-tsd called the teacher (Linear) as model(x) with x of shape (B, C, T) = (4, 1, 3) ...
    """
    inner = model.model if isinstance(model, ModelAdapter) else model
    params = [n for n, p in _forward_parameters(inner).items() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    first = params[0] if params else "x"
    suggestion = 'layout="BTC"'
    if first not in ("x", "input", "inputs"):
        suggestion += f", input_name={first!r}"
    if is_hf_time_series_model(inner):
        suggestion += f", output_key={list(HF_OUTPUT_KEYS)!r}"
    else:
        suggestion += ", output_key=..."
    return (
        f"lightning-tsd called the {role} ({type(inner).__name__}) as model(x) with x of shape (B, C, T) = "
        f"{tuple(x.shape)} and expects logits (B, K). If the model takes another layout (e.g. (B, T, C)), "
        "takes its input under another keyword, or returns an object holding the logits, wrap it once: "
        f"model = lightning_tsd.adapt_model(model, {suggestion})"
    )


def _output_classes(model: nn.Module, x: Tensor, mask: Tensor | None, role: str) -> int:
    try:
        with torch.no_grad(), eval_mode(model):
            return int(call_model(model, x, mask).shape[1])
    except Exception as err:
        _add_note(err, describe_forward_failure(model, x, role=role))
        raise


def _add_note(err: BaseException, note: str) -> None:
    """``err.add_note(note)`` (Python >= 3.11); on 3.10 the note joins a string message."""
    if hasattr(err, "add_note"):
        err.add_note(note)
    elif err.args and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]}\n{note}", *err.args[1:])


def infer_num_classes_from_outputs(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    mask: Tensor | None = None,
    teacher_classes: int | None = None,
) -> int:
    """The number of classes both models predict, from one no-grad, eval-mode forward of each on ``x``
    (``(B, C, T)``; every submodule's mode is restored, so train-mode BatchNorm statistics do not move).

    Raises:
        ValueError: when the two models predict different numbers of classes.

    An error raised by a model's forward gets a note (:func:`describe_forward_failure`).
    ``teacher_classes``, when the teacher's count is already known (from cached logits), spares its forward.

    Example:
        >>> t = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> s = nn.Sequential(nn.Flatten(), nn.Linear(8, 3))
        >>> infer_num_classes_from_outputs(t, s, torch.randn(2, 1, 8))
        3
    """
    k_teacher = teacher_classes or _output_classes(teacher, x, mask, "teacher")
    k_student = _output_classes(student, x, mask, "student")
    if k_teacher != k_student:
        raise ValueError(
            f"teacher and student predict different numbers of classes: teacher {k_teacher}, "
            f"student {k_student}; give the student a head with {k_teacher} outputs"
        )
    return k_teacher


def _positive_int(value: Any) -> int | None:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1:
        return int(value)
    return None


def declared_num_classes(model: nn.Module) -> int | None:
    """The number of classes ``model`` *declares*, a hint that never raises: ``model.num_classes`` or
    ``model.init_args["num_classes"]`` (the reference models), else its config's ``num_targets`` (Hugging
    Face time-series models) or ``num_labels``; seen through an adapter, and for an ensemble the count all
    its members declare. None when nothing is declared (layers are not counted: declaration order is not
    execution order).

    Example:
        >>> from lightning_tsd.models import FCN
        >>> declared_num_classes(FCN(in_channels=1, num_classes=4)), declared_num_classes(nn.Linear(3, 2))
        (4, None)
    """
    try:
        if isinstance(model, ModelAdapter):
            return declared_num_classes(model.model)
        members = getattr(model, "members", None)
        if isinstance(members, nn.ModuleList):
            hints = {declared_num_classes(m) for m in members}
            return hints.pop() if len(hints) == 1 else None
        init_args = getattr(model, "init_args", None)
        for found in (
            getattr(model, "num_classes", None),
            init_args.get("num_classes") if isinstance(init_args, Mapping) else None,
        ):
            if _positive_int(found) is not None:
                return _positive_int(found)
        config = getattr(model, "config", None)
        if config is None:
            return None
        for name in ("num_targets", "num_labels"):
            found = _positive_int(getattr(config, name, None))
            if found is not None:
                return found
    except Exception:  # noqa: BLE001 - a hint must never raise, whatever a model's properties do
        return None
    return None
