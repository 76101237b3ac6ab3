"""Evaluation attributions: captum's methods reduced to temporal saliency maps ``(B, T)``.

The training estimators of :mod:`lightning_tsd.saliency` compute a student's saliency with a graph to
train through; this module computes the *evaluation* maps (monitors, map figures, the substitution
report) with captum, under the same names and options:

* ``"gradient"`` (captum ``Saliency``):               ``s_t = sum_c |dz_k / dx_{c,t}|``;
* ``"input_x_gradient"`` (``InputXGradient``):        ``s_t = sum_c |x_{c,t} dz_k / dx_{c,t}|``;
* ``"integrated_gradients"`` (``IntegratedGradients``, zero baseline, ``steps`` midpoints, captum's
  ``riemann_middle``): ``s_t = sum_c |x_{c,t} mean_a dz_k(a x) / dx_{c,t}|``;
* ``"occlusion"`` (``Occlusion``, zero baseline, all channels of a ``window`` of steps at once, moved by
  ``stride``): ``s_t`` = mean over the windows covering ``t`` of ``z_k(x) - z_k(x with the window zeroed)``;
* ``"feature_ablation"`` (``FeatureAblation``, all channels of one step at once): occlusion with
  ``window=1, stride=1``.

These are the maps of :func:`lightning_tsd.saliency.temporal_saliency` for the same method and options
(the perturbation maps are signed, the gradient maps are not). The defaults suit evaluation:
``steps=50``; ``window`` a tenth of ``T`` and ``stride`` half the window. Models run in eval mode
(every submodule's own ``training`` flag is restored), under
:func:`~lightning_tsd.kernels.saliency_kernels`, with gradients on and out of inference mode, so the
functions work inside Lightning's validation and test loops. Plain torch and captum: no Lightning.

Example:
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> temporal_attribution(model, torch.randn(3, 1, 16), method="occlusion", window=4, stride=2).shape
    torch.Size([3, 16])
"""

from __future__ import annotations

import contextlib
import numbers
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_tsd._batch import Batch, as_bct, call_model, check_mask, floating_dtype, unpack_batch
from lightning_tsd.kernels import saliency_kernels, unwrap_compiled

CAPTUM_METHODS = {
    "gradient": "Saliency",
    "input_x_gradient": "InputXGradient",
    "integrated_gradients": "IntegratedGradients",
    "occlusion": "Occlusion",
    "feature_ablation": "FeatureAblation",
}
"""Attribution method name -> the captum class that computes it."""
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {
    "gradient": (),
    "input_x_gradient": (),
    "integrated_gradients": ("steps", "internal_batch_size"),
    "occlusion": ("window", "stride"),
    "feature_ablation": (),
}
"""Attribution method name -> the options it takes."""
SALIENCY_TARGETS = ("teacher", "label")
IG_STEPS = 50
"""Default ``steps`` of integrated gradients for evaluation."""
_GRADIENT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients")
_DEPRECATED_METHODS = {"saliency": "gradient"}
_DEPRECATED_OPTIONS = {"n_steps": "steps"}
_CAPTUM_OPTIONS = {  # captum's own names -> the fix
    "sliding_window_shapes": "use window=<steps> (all channels of a window are occluded together)",
    "strides": "use stride=<steps>",
    "method": "the integration rule is fixed to captum's 'riemann_middle' (as in lightning_tsd.saliency)",
}


def _is_int(value: Any, least: int) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= least


_RULES = {
    "steps": (lambda v: _is_int(v, 2), "an integer >= 2 (captum's Riemann rules need two points)"),
    "window": (lambda v: _is_int(v, 1), "an integer >= 1 (and at most T)"),
    "stride": (lambda v: _is_int(v, 1), "an integer >= 1"),
    "internal_batch_size": (lambda v: v is None or _is_int(v, 1), "None or an integer >= 1"),
}


def check_attribution_options(
    method: str, options: Mapping[str, Any] | None = None, method_kwargs: Mapping[str, Any] | None = None
) -> tuple[str, dict[str, Any]]:
    """Check an attribution method and its options, and return them under their current names.

    Old names still work with a ``DeprecationWarning``: the method ``"saliency"`` (captum's name) is
    ``"gradient"``, the option ``n_steps`` is ``steps``, and ``method_kwargs`` (the old name of the
    callbacks' and the report's ``options`` argument) is merged into ``options``.

    Raises:
        ValueError: an unknown method, an option the method does not take, or a bad value.

    Example:
        >>> check_attribution_options("integrated_gradients", {"steps": 16})
        ('integrated_gradients', {'steps': 16})
        >>> check_attribution_options("gradient", {"window": 4})
        Traceback (most recent call last):
        ...
        ValueError: option(s) ['window'] do not apply to attribution method 'gradient', which takes no options
    """
    if method in _DEPRECATED_METHODS:
        new = _DEPRECATED_METHODS[method]
        warnings.warn(
            f"method={method!r} is deprecated and will be removed in 0.3.0; use {new!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        method = new
    if method not in CAPTUM_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; choose one of {list(CAPTUM_METHODS)}")
    if method_kwargs is not None:
        warnings.warn(
            "method_kwargs is deprecated and will be removed in 0.3.0; pass options=...",
            DeprecationWarning,
            stacklevel=3,
        )
    merged: dict[str, Any] = {}
    for name, value in {**(method_kwargs or {}), **(options or {})}.items():
        if name in _DEPRECATED_OPTIONS:
            warnings.warn(
                f"option {name!r} is deprecated and will be removed in 0.3.0; use {_DEPRECATED_OPTIONS[name]!r}",
                DeprecationWarning,
                stacklevel=3,
            )
            name = _DEPRECATED_OPTIONS[name]
        elif name in _CAPTUM_OPTIONS:
            raise ValueError(f"captum's option {name!r} is not taken here: {_CAPTUM_OPTIONS[name]}")
        merged[name] = value
    accepted = METHOD_OPTIONS[method]
    unknown = sorted(set(merged) - set(accepted))
    if unknown:
        takes = list(accepted) or "no options"
        raise ValueError(
            f"option(s) {unknown} do not apply to attribution method {method!r}, which takes {takes}"
        )
    for name, value in merged.items():
        ok, must = _RULES[name]
        if not ok(value):
            raise ValueError(f"attribution option {name}={value!r} of method {method!r} must be {must}")
    return method, merged


@contextlib.contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode, then restore every submodule's own ``training`` flag.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout()).train()
        >>> net[1].eval()
        Dropout(p=0.5, inplace=False)
        >>> with eval_mode(net):
        ...     net.training
        False
        >>> net.training, net[1].training
        (True, False)
    """
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


def eval_logits(model: nn.Module, x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The logits ``(B, K)`` of ``model`` on ``x`` in eval mode, without gradients.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
        >>> eval_logits(net, torch.randn(2, 1, 8)).shape
        torch.Size([2, 3])
    """
    with torch.no_grad(), eval_mode(model):
        return call_model(model, x, mask)


def _resolve_target(target: Tensor | int | None, model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    if target is None:
        return eval_logits(model, x, mask).argmax(1)
    target = torch.as_tensor(target, device=x.device)
    if target.ndim == 0:
        target = target.expand(x.shape[0])
    if target.shape != (x.shape[0],) or target.is_floating_point():
        raise ValueError(
            f"target must be a class index or an integer (B,) = ({x.shape[0]},) tensor, got "
            f"{target.dtype} {tuple(target.shape)}"
        )
    return target.long().clone()


def _captum_options(method: str, options: dict[str, Any], x: Tensor) -> dict[str, Any]:
    channels, length = x.shape[1:]
    if method == "integrated_gradients":
        return {
            "n_steps": options.get("steps", IG_STEPS),
            "method": "riemann_middle",
            "internal_batch_size": options.get("internal_batch_size"),
        }
    if method == "occlusion":
        window = options.get("window", max(1, length // 10))
        stride = options.get("stride", max(1, window // 2))
        if window > length:
            raise ValueError(f"occlusion window must lie in [1, T={length}], got {window}")
        return {"sliding_window_shapes": (channels, window), "strides": (channels, stride)}
    if method == "feature_ablation":
        return {"feature_mask": torch.arange(length, device=x.device).repeat(1, channels, 1)}
    return {}


def temporal_attribution(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    mask: Tensor | None = None,
    method: str = "integrated_gradients",
    **options: Any,
) -> Tensor:
    """The temporal saliency map of ``model`` for class ``target``, computed with captum.

    Args:
        model: maps ``(B, C, T)`` (and, if its ``forward`` takes it, ``mask=``) to logits ``(B, K)``.
        x: ``(B, C, T)`` or ``(B, T)`` float tensor.
        target: class to explain, ``(B,)`` or an int; None explains the model's own prediction.
        mask: ``(B, T)`` bool, True on real steps; padded steps get saliency 0.
        method: one of :data:`CAPTUM_METHODS` (see the module docstring for the maths).
        **options: integrated gradients: ``steps`` (default 50), ``internal_batch_size``; occlusion:
            ``window`` (default ``T // 10``) and ``stride`` (default ``window // 2``).

    Returns:
        ``(B, T)`` fp32, detached; the model's ``training`` flags are as before.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> x = torch.randn(3, 2, 8)
        >>> saliency = temporal_attribution(model, x, 1, method="gradient")
        >>> torch.allclose(saliency, model[1].weight[1].view(2, 8).abs().sum(0).expand(3, 8))
        True
    """
    method, options = check_attribution_options(method, options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    import captum.attr

    model = unwrap_compiled(model)
    explainer = getattr(captum.attr, CAPTUM_METHODS[method])

    def forward(inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return call_model(model, inputs, mask)

    x = as_bct(x)
    dtype = floating_dtype(model) or torch.float32
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(model), saliency_kernels(x.device):
        # Tensors made under inference mode cannot take part in autograd: clone them out of it.
        inputs = x.detach().to(dtype).clone().requires_grad_(method in _GRADIENT_METHODS)
        mask = None if mask is None else check_mask(mask.clone(), inputs)
        cls = _resolve_target(target, model, inputs.detach(), mask)
        extra = None if mask is None else (mask,)
        attribution = explainer(forward).attribute(
            inputs, target=cls, additional_forward_args=extra, **_captum_options(method, options, inputs)
        )
    attribution = attribution.detach().float()
    # gradient maps: |attribution| summed over channels; perturbation maps: every channel of a perturbed
    # step holds the same (signed) logit drop, so the map is that value.
    saliency = attribution.abs().sum(1) if method in _GRADIENT_METHODS else attribution.mean(1)
    return saliency if mask is None else saliency.masked_fill(~mask, 0.0)


class SaliencyPair(NamedTuple):
    """Both models' eval logits ``(B, K)`` and their saliency maps ``(B, T)`` for the same classes."""

    teacher_logits: Tensor
    student_logits: Tensor
    teacher_saliency: Tensor
    student_saliency: Tensor


def saliency_pair(
    teacher: nn.Module,
    student: nn.Module,
    batch: Any,
    *,
    method: str = "integrated_gradients",
    target: str = "teacher",
    **options: Any,
) -> SaliencyPair:
    """Eval logits of both models and their :func:`temporal_attribution` maps for the same classes.

    Args:
        teacher: the reference model.
        student: the model compared with it.
        batch: a tensor ``x``, a :class:`~lightning_tsd._batch.Batch`, or a batch ``(x, y)``, ``(x, y,
            index)`` or dict with ``x``, ``y``, ``mask``, ``index``.
        method: attribution method (see :func:`temporal_attribution`); ``options`` are its options.
        target: ``"teacher"`` explains the teacher's predicted class, ``"label"`` the label ``y``.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 2))
        >>> pair = saliency_pair(net, net, torch.randn(4, 1, 8), method="input_x_gradient")
        >>> torch.equal(pair.teacher_saliency, pair.student_saliency), tuple(pair.student_saliency.shape)
        (True, (4, 8))
    """
    method, options = check_attribution_options(method, options)
    if target not in SALIENCY_TARGETS:
        raise ValueError(f"target must be one of {list(SALIENCY_TARGETS)}, got {target!r}")
    b = batch if isinstance(batch, Batch) else unpack_batch(batch)
    teacher_logits = eval_logits(teacher, b.x, b.mask)
    student_logits = eval_logits(student, b.x, b.mask)
    if target == "teacher":
        cls = teacher_logits.argmax(1)
    elif b.y is None:
        raise ValueError(
            "target='label' needs labels y in the batch; use target='teacher' for unlabelled data"
        )
    else:
        cls = b.y
    maps = [
        temporal_attribution(m, b.x, cls, mask=b.mask, method=method, **options) for m in (teacher, student)
    ]
    return SaliencyPair(teacher_logits, student_logits, *maps)


__all__ = [
    "CAPTUM_METHODS",
    "IG_STEPS",
    "METHOD_OPTIONS",
    "SALIENCY_TARGETS",
    "SaliencyPair",
    "check_attribution_options",
    "eval_logits",
    "eval_mode",
    "saliency_pair",
    "temporal_attribution",
]
