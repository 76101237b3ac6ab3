"""The hand-written floor: plain-PyTorch saliency and alignment losses, the same math as the package's with
none of its checks or bookkeeping. A package step is compared with the step built from these."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def _set_train(layers: list[nn.Module], mode: bool) -> None:
    for m in layers:
        m.train(mode)


def _pick(logits: Tensor, target: Tensor) -> Tensor:
    return logits.gather(1, target[:, None])[:, 0]


def _with_copies(model: nn.Module, x: Tensor, copies: Tensor) -> tuple[Tensor, Tensor]:
    """Logits on x and on the perturbed copies: one call, or two with the copies in eval-mode BN."""
    bns = _bn_layers(model)
    if not bns:
        both = model(torch.cat([x, copies]))
        return both[: x.shape[0]], both[x.shape[0] :]
    logits = model(x)
    _set_train(bns, False)
    copy_logits = model(copies)
    _set_train(bns, True)
    return logits, copy_logits


def gradient_maps(model, x, target, create_graph, times_input=False):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    target = logits.detach().argmax(1) if target is None else target
    (g,) = torch.autograd.grad(_pick(logits, target).sum(), x, create_graph=create_graph)
    return logits, ((x.detach() * g) if times_input else g).abs().sum(1), target


def _alphas(steps: int, sampling: str, batch: int, x: Tensor, generator) -> Tensor:
    if sampling == "uniform":
        device = x.device if generator is None else generator.device
        return torch.rand(steps, batch, generator=generator, device=device, dtype=x.dtype).to(x.device)
    return ((torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps)[:, None].expand(steps, batch)


def ig_maps(
    model, x, target, create_graph, steps=8, sampling="midpoint", generator=None, internal_batch_size=None
):
    """IG from a zero baseline. A teacher (no graph) runs its interpolants in chunks of at most
    ``internal_batch_size`` rows (default max(B, 64)); a student runs them in one call with x."""
    B = x.shape[0]
    a = _alphas(steps, sampling, B, x, generator)
    if create_graph:
        scaled = (a[:, :, None, None] * x.unsqueeze(0)).flatten(0, 1).requires_grad_(True)
        logits, scaled_logits = _with_copies(model, x, scaled)
        target = logits.detach().argmax(1) if target is None else target
        (g,) = torch.autograd.grad(
            _pick(scaled_logits, target.repeat(steps)).sum(), scaled, create_graph=True
        )
        return logits, (x * g.view(steps, *x.shape).mean(0)).abs().sum(1), target
    with torch.no_grad():
        logits = model(x)
    target = logits.argmax(1) if target is None else target
    chunk, flat, total = internal_batch_size or max(B, 64), a.reshape(-1), torch.zeros_like(x)
    bns = _bn_layers(model)
    _set_train(bns, False)
    for start in range(0, flat.shape[0], chunk):
        rows = torch.arange(start, min(start + chunk, flat.shape[0]), device=x.device) % B
        scaled = (flat[start : start + chunk, None, None] * x[rows]).requires_grad_(True)
        (g,) = torch.autograd.grad(_pick(model(scaled), target[rows]).sum(), scaled)
        total.index_add_(0, rows, g)
    _set_train(bns, True)
    return logits, (x * total / steps).abs().sum(1), target


def occlusion_maps(model, x, target, create_graph, window=8, stride=4):
    """Batched occlusion: mean over the windows covering t of z_k(x) - z_k(x with the window zeroed)."""
    B, _, T = x.shape
    starts = torch.arange(-(-(T - window) // stride) + 1, device=x.device) * stride
    t = torch.arange(T, device=x.device)
    cover = ((t >= starts[:, None]) & (t < starts[:, None] + window)).to(x.dtype)  # (W, T)
    occluded = (x.unsqueeze(0) * (1 - cover)[:, None, None, :]).flatten(0, 1)
    with torch.set_grad_enabled(create_graph):
        logits, occ_logits = _with_copies(model, x, occluded)
        target = logits.detach().argmax(1) if target is None else target
        drop = _pick(logits, target)[None] - _pick(occ_logits, target.repeat(len(starts))).view(-1, B)
        return logits, (drop.T @ cover) / cover.sum(0).clamp_min(1), target


def hand_saliency(method: str, model, x, target, create_graph, **options):
    """``(logits, saliency, target)`` of one of the package's estimators, written by hand."""
    if method in ("gradient", "input_x_gradient"):
        return gradient_maps(model, x, target, create_graph, times_input=method == "input_x_gradient")
    if method == "integrated_gradients":
        return ig_maps(model, x, target, create_graph, **options)
    if method == "occlusion":
        return occlusion_maps(model, x, target, create_graph, **options)
    raise ValueError(f"no hand-written floor for saliency method {method!r}")


def _zscore(s: Tensor) -> Tensor:
    s = s - s.mean(1, keepdim=True)
    return s / s.pow(2).mean(1, keepdim=True).clamp_min(1e-16).sqrt()


def alignment_loss(alignment: str, s_student: Tensor, s_teacher: Tensor, temperature: float = 1.0) -> Tensor:
    """The package's alignments by hand: pearson, kl (z-scored maps, softmax over time) or cosine."""
    s_teacher = s_teacher.detach()
    if alignment == "pearson":
        cos = F.cosine_similarity(_zscore(s_student), _zscore(s_teacher), dim=1, eps=1e-12)
        return (1 - cos).clamp_min(0).mean()
    if alignment == "kl":
        log_p = F.log_softmax(_zscore(s_teacher) / temperature, 1)
        log_q = F.log_softmax(_zscore(s_student) / temperature, 1)
        return (log_p.exp() * (log_p - log_q)).sum(1).mean()
    if alignment == "cosine":
        return (1 - F.cosine_similarity(s_student, s_teacher, dim=1, eps=1e-12)).mean()
    raise ValueError(f"no hand-written floor for alignment {alignment!r}")


def occlusion_loop_maps(model: nn.Module, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """The naive baseline: one student forward per timestep (that step zeroed), all kept in the graph;
    |z_k(x) - z_k(x with step t zeroed)|, the occluded passes with BatchNorm in eval mode."""
    logits = model(x)
    ref = _pick(logits, target)
    bns = _bn_layers(model)
    _set_train(bns, False)
    cols = []
    for t in range(x.shape[-1]):
        x_occ = x.clone()
        x_occ[..., t] = 0
        cols.append((ref - _pick(model(x_occ), target)).abs())
    _set_train(bns, True)
    return logits, torch.stack(cols, 1)
