"""Temporal saliency estimators: how much each input timestep matters to a model's prediction.

Every estimator has one signature, ``estimator(model, x, target, mask=..., create_graph=..., **options)``,
and returns ``(logits, saliency)``: the model's logits on ``x`` (``(B, K)``) and a map ``(B, T)``.
The logits and the map come from the same forward call, so a student's cross-entropy and its saliency
share one graph. With ``create_graph=True`` the map is differentiable with respect to the model's
parameters (double backward); without it, no parameter gradient is ever built.

Inputs are ``(B, C, T)`` tensors (a ``(B, T)`` tensor is univariate); the mask is ``(B, T)`` bool, True on
real steps, and padded steps get saliency 0.

Kernels without a double backward are avoided inside :func:`saliency_kernels`: fused attention runs on
the math backend, cuDNN RNNs run on the native implementation, and autocast is off (saliency is fp32).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tsd._batch import as_bct, call_model, check_mask

Estimator = Callable[..., tuple[Tensor, Tensor]]
ESTIMATORS: dict[str, Estimator] = {}


def _register(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


@contextlib.contextmanager
def saliency_kernels(device: torch.device | str) -> Iterator[None]:
    """Select kernels that support double backward, for the saliency forward only.

    * scaled-dot-product attention uses the math backend (the CPU flash kernel picked for dropout 0 or
      eval mode has no double backward);
    * cuDNN is off, so RNNs run the native implementation (cuDNN RNNs have no double backward, and no
      backward at all in eval mode);
    * autocast is off: saliency maps are computed in fp32 (fp16 input gradients underflow, and the inner
      ``autograd.grad`` is not loss-scaled).

    Example:
        >>> with saliency_kernels("cpu"):
        ...     pass
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    device_type = torch.device(device).type
    with contextlib.ExitStack() as stack:
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        if device_type == "cuda":
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        if device_type in ("cuda", "cpu"):
            stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
        yield


def unwrap_compiled(model: nn.Module) -> nn.Module:
    """Return the original module behind ``torch.compile`` (compiled graphs refuse double backward).

    The original module shares its parameters with the compiled one, so training it trains both.
    """
    return getattr(model, "_orig_mod", model)


def _has_train_mode_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


@contextlib.contextmanager
def _batchnorm_eval(model: nn.Module) -> Iterator[None]:
    """Put train-mode BatchNorm layers in eval mode (running statistics, no update) for a while."""
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]
    for m in layers:
        m.eval()
    try:
        yield
    finally:
        for m in layers:
            m.train()


def _forward_with_perturbations(
    model: nn.Module, x: Tensor, perturbed: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Logits on ``x`` ``(B, C, T)`` and on ``perturbed`` ``(P * B, C, T)``.

    One forward call on the concatenation, unless the model has BatchNorm in train mode: then the
    perturbed copies run in a second call with BatchNorm in eval mode, so that batch statistics and
    running statistics only ever see real samples.
    """
    repeats = perturbed.shape[0] // x.shape[0]
    perturbed_mask = None if mask is None else mask.repeat(repeats, 1)
    if _has_train_mode_batchnorm(model):
        logits = call_model(model, x, mask)
        with _batchnorm_eval(model):
            return logits, call_model(model, perturbed, perturbed_mask)
    both_mask = None if mask is None else torch.cat([mask, perturbed_mask])
    logits = call_model(model, torch.cat([x, perturbed]), both_mask)
    return logits[: x.shape[0]], logits[x.shape[0] :]


def _resolve_target(target: Tensor | int | None, logits: Tensor) -> Tensor:
    if target is None:
        return logits.detach().argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device)
    if target.ndim == 0:
        target = target.expand(logits.shape[0])
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must be a class index or a (B,) tensor, got shape {tuple(target.shape)}")
    if int(target.min()) < 0 or int(target.max()) >= logits.shape[1]:
        raise ValueError(f"target classes must lie in [0, {logits.shape[1]}), got {target.tolist()}")
    return target.long()


def _target_logit(logits: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, target.view(-1, 1)).squeeze(1)


def _input_gradient(output: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    # The gradient of the sum of per-sample target logits is the per-sample gradient when samples do not
    # interact: true in eval mode; train-mode BatchNorm adds O(1/B) cross-sample terms through the batch
    # statistics (student_train_mode=False in the distiller avoids them).
    (grad,) = torch.autograd.grad(output.sum(), inputs, create_graph=create_graph)
    return grad


def _logits_and_input_gradient(
    model: nn.Module, x: Tensor, target: Tensor | None, mask: Tensor | None, create_graph: bool
) -> tuple[Tensor, Tensor]:
    """One forward on ``x``: the logits and ``dz_k / dx`` for the target class."""
    x = x.detach().requires_grad_(True)
    logits = call_model(model, x, mask)
    target = _resolve_target(target, logits)
    return logits, _input_gradient(_target_logit(logits, target), x, create_graph)


@_register("gradient")
def gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """``s_t = sum_c |dz_k / dx_{c,t}|`` (captum ``Saliency`` with ``abs=True``, summed over channels)."""
    logits, grad = _logits_and_input_gradient(model, x, target, mask, create_graph)
    return logits, grad.abs().sum(dim=1)


@_register("input_x_gradient")
def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
) -> tuple[Tensor, Tensor]:
    """``s_t = sum_c |x_{c,t} * dz_k / dx_{c,t}|`` (captum ``InputXGradient``, abs, summed over channels)."""
    logits, grad = _logits_and_input_gradient(model, x, target, mask, create_graph)
    return logits, (x.detach() * grad).abs().sum(dim=1)


@_register("integrated_gradients")
def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    steps: int = 8,
) -> tuple[Tensor, Tensor]:
    """Integrated gradients from a zero baseline with ``steps`` midpoint-rule interpolants (captum's
    ``riemann_middle``): ``s_t = sum_c |x_{c,t} * mean_j dz_k(a_j x) / dx_{c,t}|``, ``a_j = (j - 1/2) / m``.

    All interpolants go through the model in one batched call together with ``x`` itself.
    """
    if steps < 1:
        raise ValueError(f"integrated_gradients needs steps >= 1, got {steps}")
    alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps
    scaled = (alphas.view(-1, 1, 1, 1) * x.detach().unsqueeze(0)).flatten(0, 1).requires_grad_(True)
    logits, scaled_logits = _forward_with_perturbations(model, x.detach(), scaled, mask)
    target = _resolve_target(target, logits)
    grad = _input_gradient(_target_logit(scaled_logits, target.repeat(steps)), scaled, create_graph)
    mean_grad = grad.view(steps, *x.shape).mean(dim=0)
    return logits, (x.detach() * mean_grad).abs().sum(dim=1)


def _occlusion_windows(length: int, window: int, stride: int, device: torch.device) -> Tensor:
    """``(W, T)`` float matrix: row w is 1 on the steps covered by the w-th window."""
    if not 1 <= window <= length:
        raise ValueError(f"occlusion window must lie in [1, T={length}], got {window}")
    if stride < 1:
        raise ValueError(f"occlusion stride must be >= 1, got {stride}")
    # As captum: ceil((T - w) / r) + 1 windows, the last one clipped at T, so every step is covered.
    starts = torch.arange(-(-(length - window) // stride) + 1, device=device) * stride
    steps = torch.arange(length, device=device)
    return ((steps >= starts[:, None]) & (steps < starts[:, None] + window)).float()


@_register("occlusion")
def occlusion(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    window: int = 8,
    stride: int = 4,
) -> tuple[Tensor, Tensor]:
    """Occlusion with a zero baseline (captum ``Occlusion``, all channels at once):
    ``s_t = mean over windows covering t of z_k(x) - z_k(x with the window zeroed)``.

    All occluded copies go through the model in one batched call; no autograd is needed, and the map
    is differentiable in the model's parameters whenever grad mode is on (``create_graph`` only decides
    whether the graph is kept).
    """
    batch, _, length = x.shape
    cover = _occlusion_windows(length, window, stride, x.device)  # (W, T)
    keep = (1.0 - cover).to(x.dtype)[:, None, None, :]  # (W, 1, 1, T)
    occluded = (x.detach().unsqueeze(0) * keep).flatten(0, 1)  # (W * B, C, T)
    with torch.set_grad_enabled(create_graph and torch.is_grad_enabled()):
        logits, occluded_logits = _forward_with_perturbations(model, x.detach(), occluded, mask)
        target = _resolve_target(target, logits)
        drop = _target_logit(logits, target).unsqueeze(0) - _target_logit(
            occluded_logits, target.repeat(cover.shape[0])
        ).view(cover.shape[0], batch)  # (W, B)
        counts = cover.sum(dim=0)
        saliency = (drop.transpose(0, 1) @ cover) / counts.clamp_min(1.0)
    return logits, saliency


def temporal_saliency(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    method: str = "gradient",
    create_graph: bool = False,
    mask: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Temporal saliency of ``model`` on ``x``, with the logits of the same forward.

    Args:
        model: any ``nn.Module`` mapping ``(B, C, T)`` (and optionally ``mask=``) to logits ``(B, K)``.
        x: ``(B, C, T)`` or ``(B, T)`` float tensor.
        target: class to explain, ``(B,)`` or an int; ``None`` explains the model's own prediction.
        method: ``"gradient"``, ``"input_x_gradient"``, ``"integrated_gradients"`` or ``"occlusion"``.
        create_graph: keep the graph so the map can be differentiated again (for a student).
        mask: ``(B, T)`` bool, True on real steps; padded steps get saliency 0.
        **options: ``steps`` (integrated gradients), ``window`` and ``stride`` (occlusion).

    Returns:
        ``(logits, saliency)``, shapes ``(B, K)`` and ``(B, T)``; saliency is fp32. Without
        ``create_graph`` both are detached.

    Works inside ``torch.no_grad()`` and ``torch.inference_mode()`` (as in Lightning's validation loop):
    gradients are re-enabled and an inference tensor is cloned out of inference mode.

    Example:
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        >>> logits, saliency = temporal_saliency(model, torch.randn(4, 1, 16), method="integrated_gradients", steps=4)
        >>> logits.shape, saliency.shape
        (torch.Size([4, 3]), torch.Size([4, 16]))
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {sorted(ESTIMATORS)}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    estimator = ESTIMATORS[method]
    accepted = set(inspect.signature(estimator).parameters) - {"model", "x", "target", "mask", "create_graph"}
    if set(options) - accepted:
        raise ValueError(
            f"option(s) {sorted(set(options) - accepted)} do not apply to saliency method {method!r}, "
            f"which takes {sorted(accepted) or 'no options'}"
        )
    model = unwrap_compiled(model)
    with torch.inference_mode(False), torch.enable_grad():
        x = as_bct(x)
        if x.is_inference():
            x = x.clone()
            mask = None if mask is None else mask.clone()
        mask = check_mask(mask, x)
        if target is not None and isinstance(target, Tensor) and target.is_inference():
            target = target.clone()
        with saliency_kernels(x.device):
            # fp32 for fp32 (and mixed-precision) models; a float64 or bf16/fp16 model gets its own dtype.
            dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
            logits, saliency = estimator(
                model, x.to(dtype), target, mask=mask, create_graph=create_graph, **options
            )
            saliency = saliency.float()
    if mask is not None:
        saliency = saliency * mask
    if not create_graph:
        # Nothing downstream may backpropagate through a graph that autograd.grad has already freed.
        logits, saliency = logits.detach(), saliency.detach()
    return logits, saliency
