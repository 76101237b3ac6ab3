"""How the TSD gradient joins the base-loss gradient: a plain sum, a projection, or a fixed norm ratio.

With ``L = L_base + w * L_TSD`` the student follows ``g_base + w * g_tsd``. When the two conflict (a negative
inner product), the TSD term can undo what KD teaches, which shows as lost agreement. Two alternatives:

* ``"project"`` (PCGrad, Yu et al. 2020): where ``<g_tsd, g_base> < 0`` the conflicting component is removed,
  ``g_tsd <- g_tsd - <g_tsd, g_base> / ||g_base||^2 * g_base``, so the update never has a negative inner
  product with ``g_base`` and, to first order (plain gradient descent), cannot raise the base loss;
* ``"balance"``: the TSD gradient is rescaled to ``w * ||g_base||``, so ``w`` is the fraction of the base
  gradient's norm that TSD may contribute, whatever the scale of the saliency loss.

Both need the two gradients separately (one extra backward). :func:`surrogate_loss` hands the combined
gradient to any training loop (Lightning's automatic optimisation, DDP's all-reduce) as a loss whose value
is the real loss and whose gradient is the combined one. Plain torch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
from torch import Tensor

TSD_GRADIENTS = ("sum", "project", "balance")


def _flat(grads: Sequence[Tensor]) -> Tensor:
    """All gradients as one vector, in float32 at least (float64 stays float64)."""
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    return torch.cat([g.reshape(-1).to(dtype) for g in grads])


def combine_gradients(
    base: Sequence[Tensor], tsd: Sequence[Tensor], weight: float, mode: str = "sum", eps: float = 1e-12
) -> list[Tensor]:
    """``g_base + weight * g_tsd``, with ``g_tsd`` projected (``"project"``) or rescaled (``"balance"``).

    The inner product and norms are over all parameters together. No value is read back to the host.

    Example:
        >>> base, tsd = [torch.tensor([1.0, 0.0])], [torch.tensor([-1.0, 1.0])]
        >>> combine_gradients(base, tsd, 1.0, "sum")[0].tolist()
        [0.0, 1.0]
        >>> combine_gradients(base, tsd, 1.0, "project")[0].tolist()  # the conflicting -1 along g_base is removed
        [1.0, 1.0]
        >>> [round(v, 4) for v in combine_gradients(base, tsd, 0.5, "balance")[0].tolist()]
        [0.6464, 0.3536]
    """
    if mode not in TSD_GRADIENTS:
        raise ValueError(f"tsd_gradient must be one of {list(TSD_GRADIENTS)}, got {mode!r}")
    if len(base) != len(tsd):
        raise ValueError(f"got {len(base)} base gradients and {len(tsd)} TSD gradients")
    if mode == "sum":
        return [b + weight * t for b, t in zip(base, tsd, strict=True)]
    flat_base, flat_tsd = _flat(base), _flat(tsd)
    if mode == "project":
        dot = torch.dot(flat_base, flat_tsd)
        coef = dot.clamp(max=0.0) / flat_base.square().sum().clamp_min(eps)  # 0 unless they conflict
        return [b + weight * (t - coef.to(t.dtype) * b) for b, t in zip(base, tsd, strict=True)]
    scale = flat_base.norm() / flat_tsd.norm().clamp_min(eps)
    return [b + weight * scale.to(t.dtype) * t for b, t in zip(base, tsd, strict=True)]


def surrogate_loss(loss: Tensor, params: Sequence[Tensor], grads: Sequence[Tensor]) -> Tensor:
    """A scalar whose value is ``loss`` and whose gradient with respect to ``params`` is ``grads``.

    Example:
        >>> p = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> s = surrogate_loss(torch.tensor(5.0), [p], [torch.tensor([0.5, -1.0])])
        >>> s.backward()
        >>> float(s), p.grad.tolist()
        (5.0, [0.5, -1.0])
    """
    # A Tensor for any non-empty params (sum() of nothing is the int 0)
    linear = cast(Tensor, sum((p * g.detach()).sum() for p, g in zip(params, grads, strict=True)))
    return loss.detach() + (linear - linear.detach())  # exactly 0 in value, the gradient in backward


def weighted_sum(parts: dict[str, Tensor], weights: dict[str, float]) -> Tensor | None:
    """``sum_k weights[k] * parts[k]`` (None for no parts)."""
    terms = [weights[name] * value for name, value in parts.items()]
    return sum(terms[1:], terms[0]) if terms else None


def combined_loss(
    base: Tensor | None,
    tsd: Tensor | None,
    weight: float,
    mode: str,
    params: Sequence[Tensor],
    logits: Tensor,
    reduce: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """The step's loss ``base + weight * tsd``; for ``mode`` other than ``"sum"``, a loss of that value whose
    gradient is :func:`combine_gradients` of the two (one extra backward).

    ``logits`` are tied in with weight 0 when there is no base term: parameters that only shift the logits
    (an output bias) get no gradient from a saliency map, and DDP must see every parameter used.

    ``reduce`` (data parallelism): maps a flat vector to its mean over the processes. The two gradients are
    averaged with it before they are joined, so every process projects (or rescales) the gradients of the
    whole global batch, as one process would; without it each process would join its own shard's gradients,
    a different update. The distiller passes it whenever its trainer has more than one process.

    Example:
        >>> w = torch.tensor([1.0, -1.0], requires_grad=True)
        >>> base, tsd = (w * torch.tensor([1.0, 0.0])).sum(), (w * torch.tensor([-1.0, 1.0])).sum()
        >>> loss = combined_loss(base, tsd, 1.0, "project", [w], w)
        >>> loss.backward()
        >>> float(loss.detach()), w.grad.tolist()
        (-1.0, [1.0, 1.0])
    """
    if tsd is None:
        return base if base is not None else 0.0 * logits.sum()
    if base is None:
        return weight * tsd + 0.0 * logits.sum()
    total = base + weight * tsd
    if mode == "sum":
        return total
    g_base: Sequence[Tensor] = torch.autograd.grad(base, params, retain_graph=True, allow_unused=True)
    g_tsd: Sequence[Tensor] = torch.autograd.grad(tsd, params, allow_unused=True)
    g_base = [torch.zeros_like(p) if g is None else g for g, p in zip(g_base, params, strict=True)]
    g_tsd = [torch.zeros_like(p) if g is None else g for g, p in zip(g_tsd, params, strict=True)]
    if reduce is not None:  # one collective for both: the global batch's gradients on every process
        flat = reduce(torch.cat([g.reshape(-1) for g in (*g_base, *g_tsd)]))
        parts = flat.split([g.numel() for g in (*g_base, *g_tsd)])
        g_base = [v.view_as(g) for v, g in zip(parts[: len(g_base)], g_base, strict=True)]
        g_tsd = [v.view_as(g) for v, g in zip(parts[len(g_base) :], g_tsd, strict=True)]
    return surrogate_loss(total, params, combine_gradients(g_base, g_tsd, weight, mode))
