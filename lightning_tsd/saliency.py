"""Temporal saliency estimators: how much each input timestep matters to a model's prediction.

Every estimator has one signature, ``estimator(model, x, target, mask=..., create_graph=..., **options)``,
and returns ``(logits, saliency)``: the logits on ``x`` (``(B, K)``, from the same forward call as the map,
so a student's cross-entropy and its saliency share one graph) and a map ``(B, T)``. With
``create_graph=True`` the map is differentiable in the model's parameters (double backward); without it,
no parameter gradient is ever built. Inputs are ``(B, C, T)``; the mask is ``(B, T)`` bool, True on real
steps, and padded steps get saliency 0. Kernels without a double backward are avoided inside
:func:`~lightning_tsd.kernels.saliency_kernels`. Built-in estimators also take ``check_target``: False skips the host-side
check of a given target's class range (a device sync), for callers that checked it.
"""

from __future__ import annotations

import functools
import inspect
import numbers
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tsd._batch import as_bct, call_model, check_mask, floating_dtype
from lightning_tsd.kernels import batchnorm_eval, saliency_kernels, train_mode_batchnorms, unwrap_compiled

Estimator = Callable[..., tuple[Tensor, Tensor]]
ESTIMATORS: dict[str, Estimator] = {}


def _register(name: str) -> Callable[[Estimator], Estimator]:
    def wrap(fn: Estimator) -> Estimator:
        ESTIMATORS[name] = fn
        return fn

    return wrap


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
    if train_mode_batchnorms(model):
        logits = call_model(model, x, mask)
        with batchnorm_eval(model):
            return logits, call_model(model, perturbed, perturbed_mask)
    both_mask = None if mask is None else torch.cat([mask, mask.repeat(repeats, 1)])
    logits = call_model(model, torch.cat([x, perturbed]), both_mask)
    return logits[: x.shape[0]], logits[x.shape[0] :]


def _resolve_target(target: Tensor | int | None, logits: Tensor, check: bool = True) -> Tensor:
    """``(B,)`` long target; ``None`` is the model's prediction. ``check`` reads the class range on the
    host (a device sync), skipped for targets the caller has checked."""
    if target is None:
        return logits.detach().argmax(dim=1)
    target = torch.as_tensor(target, device=logits.device)
    if target.ndim == 0:
        target = target.expand(logits.shape[0])
    if target.shape != (logits.shape[0],):
        raise ValueError(f"target must be a class index or a (B,) tensor, got shape {tuple(target.shape)}")
    if check and bool(((target < 0) | (target >= logits.shape[1])).any()):
        raise ValueError(f"target classes must lie in [0, {logits.shape[1]}), got {target.tolist()}")
    return target.long()


OUTPUTS = ("logit", "log_prob", "margin")


def _target_logit(logits: Tensor, target: Tensor, output: str = "logit") -> Tensor:
    """The explained scalar per row: the target's logit ``z_k``, its log-probability ``log p_k``, or its
    margin ``z_k - logsumexp_{j != k} z_j`` (the decision against every other class; ``z_k`` when ``K = 1``).

    The logit alone can be moved by the other classes' logits without any change to ``z_k``; the
    log-probability and the margin see every logit the decision depends on.

    Example:
        >>> z = torch.tensor([[2.0, 0.0]])
        >>> _target_logit(z, torch.tensor([0]), "margin").tolist()
        [2.0]
    """
    chosen = logits.gather(1, target.view(-1, 1)).squeeze(1)
    if output == "logit" or (output == "margin" and logits.shape[1] == 1):
        return chosen
    if output == "log_prob":
        return chosen - torch.logsumexp(logits, dim=1)
    others = logits.scatter(1, target.view(-1, 1), float("-inf"))
    return chosen - torch.logsumexp(others, dim=1)


def _input_gradient(output: Tensor, inputs: Tensor, create_graph: bool) -> Tensor:
    # The gradient of the sum of per-sample target logits is the per-sample gradient when samples do not
    # interact: true in eval mode; train-mode BatchNorm adds O(1/B) cross-sample terms through the batch
    # statistics (student_train_mode=False in the distiller avoids them).
    (grad,) = torch.autograd.grad(output.sum(), inputs, create_graph=create_graph)
    return grad


def _logits_and_input_gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    mask: Tensor | None,
    create_graph: bool,
    check: bool,
    output: str = "logit",
) -> tuple[Tensor, Tensor]:
    """One forward on ``x``: the logits and ``dz_k / dx`` for the target class (``output``: what of it)."""
    x = x.detach().requires_grad_(True)
    logits = call_model(model, x, mask)
    target = _resolve_target(target, logits, check)
    return logits, _input_gradient(_target_logit(logits, target, output), x, create_graph)


@_register("gradient")
def gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    check_target: bool = True,
    output: str = "logit",
) -> tuple[Tensor, Tensor]:
    """``s_t = sum_c |dz_k / dx_{c,t}|`` (captum ``Saliency`` with ``abs=True``, summed over channels)."""
    logits, grad = _logits_and_input_gradient(model, x, target, mask, create_graph, check_target, output)
    return logits, grad.abs().sum(dim=1)


@_register("input_x_gradient")
def input_x_gradient(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    check_target: bool = True,
    output: str = "logit",
) -> tuple[Tensor, Tensor]:
    """``s_t = sum_c |x_{c,t} * dz_k / dx_{c,t}|`` (captum ``InputXGradient``, abs, summed over channels)."""
    logits, grad = _logits_and_input_gradient(model, x, target, mask, create_graph, check_target, output)
    return logits, (x.detach() * grad).abs().sum(dim=1)


IG_CHUNK_ROWS = 64  # teacher-side IG runs at most max(B, IG_CHUNK_ROWS) interpolant rows per forward
SAMPLINGS = ("midpoint", "uniform", "antithetic", "stratified")
# drawn from a generator (a student's maps; a teacher's stay deterministic)
RANDOM_SAMPLINGS = ("uniform", "antithetic", "stratified")


def _ig_alphas(steps: int, sampling: str, generator: torch.Generator | None, x: Tensor) -> Tensor:
    """``(steps, B)`` interpolation coefficients, per sample (column).

    ``"midpoint"``: ``(j - 1/2) / m``. The random ones are unbiased for the path mean (each coefficient is
    ``U(0, 1)`` on its own): ``"uniform"`` i.i.d. draws; ``"antithetic"`` pairs ``a`` and ``1 - a`` (an odd
    ``steps`` leaves one draw unpaired); ``"stratified"`` one draw in each stratum ``[(j - 1) / m, j / m)``.

    Example:
        >>> a = _ig_alphas(4, "antithetic", torch.Generator().manual_seed(0), torch.zeros(3, 1, 8))
        >>> a.shape, torch.allclose(a[:2] + a[2:], torch.ones(2, 3))
        (torch.Size([4, 3]), True)
        >>> s = _ig_alphas(4, "stratified", torch.Generator().manual_seed(0), torch.zeros(3, 1, 8))
        >>> bool(((s * 4).floor() == torch.arange(4.0).unsqueeze(1)).all())
        True
    """
    batch = x.shape[0]
    if sampling == "midpoint":
        alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps
        return alphas.unsqueeze(1).expand(steps, batch)
    device = x.device if generator is None else generator.device
    draws = (steps + 1) // 2 if sampling == "antithetic" else steps
    u = torch.rand(draws, batch, generator=generator, device=device, dtype=x.dtype).to(x.device)
    if sampling == "antithetic":
        return torch.cat([u, 1.0 - u])[:steps]
    if sampling == "stratified":
        return (torch.arange(steps, device=x.device, dtype=x.dtype).unsqueeze(1) + u) / steps
    return u


def _ig_mean_gradient_chunked(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None,
    alphas: Tensor,
    chunk: int,
    output: str = "logit",
) -> Tensor:
    """``mean_j dz_k(a_j x) / dx`` without a graph beyond one chunk of ``chunk`` interpolant rows.

    Row ``r`` of the ``steps * B`` interpolants is sample ``r % B`` at ``alphas.flatten()[r]``; each
    chunk's input gradient is added into its samples' rows and its graph is freed before the next one.
    """
    batch = x.shape[0]
    flat_alphas = alphas.reshape(-1)
    total = torch.zeros_like(x)
    with batchnorm_eval(model):  # interpolants never enter train-mode BatchNorm statistics
        for start in range(0, flat_alphas.shape[0], chunk):
            rows = torch.arange(start, min(start + chunk, flat_alphas.shape[0]), device=x.device) % batch
            scaled = (flat_alphas[start : start + chunk].view(-1, 1, 1) * x[rows]).requires_grad_(True)
            logits = call_model(model, scaled, None if mask is None else mask[rows])
            explained = _target_logit(logits, target[rows], output)
            total.index_add_(0, rows, _input_gradient(explained, scaled, False))
    return total / alphas.shape[0]


@_register("integrated_gradients")
def integrated_gradients(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    mask: Tensor | None = None,
    create_graph: bool = False,
    check_target: bool = True,
    steps: int = 8,
    sampling: str = "midpoint",
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    output: str = "logit",
) -> tuple[Tensor, Tensor]:
    """Integrated gradients from a zero baseline: ``s_t = sum_c |x_{c,t} * mean_j dz_k(a_j x) / dx_{c,t}|``.

    ``sampling="midpoint"``: the midpoint rule ``a_j = (j - 1/2) / m`` for ``j = 1..steps`` (captum's
    ``riemann_middle``; ``steps=1`` is the single midpoint ``a = 1/2``). ``sampling="uniform"``: per
    sample, ``steps`` i.i.d. ``a ~ U(0, 1)`` (an unbiased estimate of the path-mean gradient);
    ``"antithetic"``: pairs ``a, 1 - a`` (unbiased, lower variance where the gradient is monotone along the
    path); ``"stratified"``: ``a_j ~ U((j - 1) / m, j / m)`` (unbiased, never more variance than uniform). The
    random ones draw from ``generator`` (the global RNG when None; a generator on ``x``'s device avoids a
    host-device copy).

    With ``create_graph=True`` (a student) all interpolants go through the model in one batched call
    together with ``x`` (every graph must be kept anyway; ``internal_batch_size`` is not used). Without it
    (a teacher), ``x`` runs under ``no_grad`` and the interpolants run in chunks of at most
    ``internal_batch_size`` rows per forward (default ``max(B, IG_CHUNK_ROWS)``; unlike captum a chunk may
    split a step), so peak memory does not grow with ``steps``. Train-mode BatchNorm sees only ``x``.
    """
    x = x.detach()
    alphas = _ig_alphas(steps, sampling, generator, x)  # (steps, B)
    if not create_graph:
        with torch.no_grad():
            logits = call_model(model, x, mask)
        target = _resolve_target(target, logits, check_target)
        chunk = internal_batch_size or max(x.shape[0], IG_CHUNK_ROWS)
        mean_grad = _ig_mean_gradient_chunked(model, x, target, mask, alphas, chunk, output)
        return logits, (x * mean_grad).abs().sum(dim=1)
    scaled = (alphas[:, :, None, None] * x.unsqueeze(0)).flatten(0, 1).requires_grad_(True)
    logits, scaled_logits = _forward_with_perturbations(model, x, scaled, mask)
    target = _resolve_target(target, logits, check_target)
    explained = _target_logit(scaled_logits, target.repeat(steps), output)
    grad = _input_gradient(explained, scaled, create_graph)
    mean_grad = grad.view(steps, *x.shape).mean(dim=0)
    return logits, (x * mean_grad).abs().sum(dim=1)


def _occlusion_windows(length: int, window: int, stride: int, device: torch.device) -> Tensor:
    """``(W, T)`` float matrix: row w is 1 on the steps covered by the w-th window."""
    if window > length:
        raise ValueError(f"occlusion window must lie in [1, T={length}], got {window}")
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
    check_target: bool = True,
    window: int = 8,
    stride: int = 4,
    output: str = "logit",
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
        target = _resolve_target(target, logits, check_target)
        drop = _target_logit(logits, target, output).unsqueeze(0) - _target_logit(
            occluded_logits, target.repeat(cover.shape[0]), output
        ).view(cover.shape[0], batch)  # (W, B)
        counts = cover.sum(dim=0)
        saliency = (drop.transpose(0, 1) @ cover) / counts.clamp_min(1.0)
    return logits, saliency


_CALL_ARGUMENTS = frozenset({"model", "x", "target", "mask", "create_graph", "check_target"})


def _positive_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and int(value) >= 1


# option -> (accepts the value?, what it must be)
_OPTION_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (_positive_int, "an integer >= 1"),
    "window": (_positive_int, "an integer >= 1 (and at most T)"),
    "stride": (_positive_int, "an integer >= 1"),
    "internal_batch_size": (lambda v: v is None or _positive_int(v), "None or an integer >= 1"),
    "sampling": (lambda v: isinstance(v, str) and v in SAMPLINGS, f"one of {list(SAMPLINGS)}"),
    "generator": (lambda v: v is None or isinstance(v, torch.Generator), "None or a torch.Generator"),
    "output": (lambda v: isinstance(v, str) and v in OUTPUTS, f"one of {list(OUTPUTS)}"),
}


@functools.cache
def _signature(estimator: Estimator) -> tuple[frozenset[str], bool]:
    """The options an estimator accepts, and whether it takes ``check_target``."""
    params = set(inspect.signature(estimator).parameters)
    return frozenset(params - _CALL_ARGUMENTS), "check_target" in params


def check_saliency_options(method: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` unless ``method`` is a known estimator and ``options`` are options it takes,
    each of the right type and range (``window <= T`` can only be checked with the input).

    Call it once where the options are set (a constructor), then pass ``validated=True`` to
    :func:`temporal_saliency` on every step.

    Example:
        >>> check_saliency_options("integrated_gradients", {"steps": 2, "sampling": "uniform"})
        >>> check_saliency_options("integrated_gradients", {"steps": 0})
        Traceback (most recent call last):
        ...
        ValueError: saliency option steps=0 of method 'integrated_gradients' must be an integer >= 1 ...
    """
    if method not in ESTIMATORS:
        raise ValueError(f"unknown saliency method {method!r}; choose one of {sorted(ESTIMATORS)}")
    accepted, _ = _signature(ESTIMATORS[method])
    takes = sorted(accepted) or "no options"
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"option(s) {unknown} do not apply to saliency method {method!r}, which takes {takes}"
        )
    for name, value in options.items():
        ok, must = _OPTION_RULES.get(name, (lambda v: True, ""))
        if not ok(value):
            raise ValueError(
                f"saliency option {name}={value!r} of method {method!r} must be {must} "
                f"(the method takes {takes})"
            )


def temporal_saliency(
    model: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    method: str = "gradient",
    create_graph: bool = False,
    mask: Tensor | None = None,
    *,
    validated: bool = False,
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
        validated: the caller vouches for what would otherwise be checked on every call (each check
            that reads a device value is a host sync): ``options`` passed :func:`check_saliency_options`
            for ``method``; ``x`` is a finite float ``(B, C, T)`` tensor; ``mask`` is None or a ``(B, T)``
            bool tensor on ``x``'s device with a real step in every row; a tensor ``target`` holds classes
            in ``[0, K)``. Unchecked bad input then fails later with a less clear error.
        **options: integrated gradients: ``steps``, ``sampling``, ``generator``, ``internal_batch_size``
            (see :func:`integrated_gradients`); occlusion: ``window`` and ``stride``.

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
    if not validated or method not in ESTIMATORS:
        check_saliency_options(method, options)
    estimator = ESTIMATORS[method]
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if _signature(estimator)[1]:
        options = {**options, "check_target": not validated}
    model = unwrap_compiled(model)
    with torch.inference_mode(False), torch.enable_grad():
        x = x if validated else as_bct(x)
        if x.is_inference():
            x = x.clone()
            mask = None if mask is None else mask.clone()
        mask = mask if validated else check_mask(mask, x)
        if target is not None and isinstance(target, Tensor) and target.is_inference():
            target = target.clone()
        with saliency_kernels(x.device):
            # fp32 for fp32 (and mixed-precision) models; a float64 or bf16/fp16 model gets its own dtype.
            dtype = floating_dtype(model) or torch.float32
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
