"""Behavioural checks: does the student give the teacher's answer when the input is not clean, and for the
teacher's reasons?

* :func:`perturb` corrupts series (Gaussian noise, a masked window, a time shift) and
  :func:`perturbed_agreement` measures how often the student's top-1 class equals the teacher's on the same
  corrupted input;
* :func:`deletion_curve` deletes the top-k% real steps of a ranking (or keeps only them) and measures how often
  the student still gives the teacher's prediction on the clean input (ERASER's comprehensiveness and
  sufficiency, read through agreement). The teacher's ranking comes from :func:`teacher_ranking`, an
  estimator other than the one TSD trains with (captum occlusion by default); :func:`random_ranking` is the
  comparison;
* :func:`measure_behaviour` runs all of them over a bounded number of series and returns a
  :class:`Behaviour`, the numbers the substitution report judges.

Deleted, masked and occluded steps are set to 0 on every channel (the occlusion baseline); padded steps
(``mask`` False) are never perturbed, never ranked and never counted. "Real steps" ``L`` below is the number
of True entries of a series' mask (``T`` without a mask); counts are ``round(fraction * L)``, rounded half
to even like Python's ``round``. Plain torch (and captum through :mod:`lightning_tsd.attribution`): no
Lightning.

Example:
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    >>> x = torch.randn(8, 1, 16)
    >>> float(perturbed_agreement(net, net, x, "noise", 0.5))
    1.0
"""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_tsd._batch import Batch, as_bct, check_mask, unpack_batch
from lightning_tsd.attribution import check_attribution_options, eval_logits, temporal_attribution

__all__ = [
    "DELETION_FRACTIONS",
    "DELETION_MODES",
    "PERTURBATIONS",
    "Behaviour",
    "check_behaviour_options",
    "deletion_curve",
    "measure_behaviour",
    "perturb",
    "perturbed_agreement",
    "random_ranking",
    "teacher_ranking",
    "top_steps",
]

PERTURBATIONS = ("noise", "mask", "shift")
"""The kinds of :func:`perturb`."""
DELETION_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.5)
"""Default fractions of the real steps that :func:`deletion_curve` deletes (or keeps)."""
DELETION_MODES = ("delete", "keep")
"""``"delete"``: the top-k steps are set to 0 (comprehensiveness); ``"keep"``: all but them (sufficiency)."""
_LEVELS = {  # kind -> (upper bound of level, what level means)
    "noise": (math.inf, "a multiple of each series' std, >= 0 (e.g. 0.5)"),
    "mask": (1.0, "the fraction of each series' real steps to mask, in [0, 1] (e.g. 0.1)"),
    "shift": (1.0, "the shift as a fraction of each series' real steps, in [0, 1] (e.g. 0.05)"),
}


def _real(x: Tensor, mask: Tensor | None) -> Tensor:
    """``(B, T)`` bool, True on real steps."""
    if mask is None:
        return torch.ones(x.shape[0], x.shape[-1], dtype=torch.bool, device=x.device)
    return mask


def _draw(fn: Any, shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """``fn(shape)`` (``torch.rand`` / ``torch.randn``) drawn on the generator's device, moved to ``device``."""
    where = generator.device if generator is not None else device
    return fn(tuple(shape), generator=generator, device=where).to(device)


def _counts(real: Tensor, fraction: float) -> Tensor:
    """``round(fraction * L)`` per series, ``(B,)`` long (half to even, like Python's ``round``)."""
    return torch.round(real.sum(1, dtype=torch.float64) * fraction).long()


def _real_order(real: Tensor) -> Tensor:
    """``(B, T)`` step indices with each series' real steps first, in time order (then its padded ones)."""
    return torch.argsort((~real).to(torch.uint8), dim=1, stable=True)


def _check_level(kind: str, level: float) -> float:
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation kind {kind!r}; choose one of {list(PERTURBATIONS)}")
    high, meaning = _LEVELS[kind]
    if (
        isinstance(level, bool)
        or not isinstance(level, numbers.Real)
        or not 0 <= level <= high
        or math.isinf(level)
    ):
        raise ValueError(f"perturbation level {level!r} is out of range for kind {kind!r}: pass {meaning}")
    return float(level)


def perturb(
    x: Tensor,
    kind: str,
    level: float,
    *,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """A corrupted copy of ``x``; padded steps (``mask`` False) are left as they are.

    * ``"noise"``: add Gaussian noise whose std is ``level`` times each channel's population std over the
      series' real steps;
    * ``"mask"``: set a contiguous window of ``round(level * L)`` real steps, at a uniformly random start, to 0
      on every channel (the occlusion baseline);
    * ``"shift"``: move each series ``round(level * L)`` steps later or earlier (random sign per series), and
      fill the vacated steps with the edge value. Padded steps in the middle of a series are skipped: the
      window and the shift run over the real steps in time order.

    Args:
        x: ``(B, C, T)`` (or univariate ``(B, T)``) float series.
        kind: one of :data:`PERTURBATIONS`.
        level: the noise std in series stds (``>= 0``), or the fraction of the real steps masked or shifted
            (in ``[0, 1]``).
        generator: source of the random draws (None: torch's global one).
        mask: ``(B, T)`` bool, True on real steps.

    Returns:
        A new tensor shaped like ``x``.

    Raises:
        ValueError: an unknown ``kind`` or a ``level`` out of its range.

    Example:
        >>> x = torch.arange(1.0, 7.0).view(1, 1, 6)
        >>> perturb(x, "mask", 0.5, generator=torch.Generator().manual_seed(0))
        tensor([[[1., 0., 0., 0., 5., 6.]]])
        >>> perturb(x, "shift", 0.34, generator=torch.Generator().manual_seed(0)).tolist() in (
        ...     [[[1.0, 1.0, 1.0, 2.0, 3.0, 4.0]]], [[[3.0, 4.0, 5.0, 6.0, 6.0, 6.0]]])
        True
        >>> perturb(x, "noise", -1.0)
        Traceback (most recent call last):
        ...
        ValueError: perturbation level -1.0 is out of range for kind 'noise': pass a multiple of each series' std, >= 0 (e.g. 0.5)
    """
    level = _check_level(kind, level)
    shape = x.shape
    x = as_bct(x)
    real = _real(x, check_mask(mask, x))
    device = x.device
    if kind == "noise":
        weight = real.unsqueeze(1).to(x.dtype)
        n = weight.sum(-1, keepdim=True)
        mean = (x * weight).sum(-1, keepdim=True) / n
        std = (((x - mean) * weight).square().sum(-1, keepdim=True) / n).sqrt()
        noise = _draw(torch.randn, x.shape, generator, device).to(x.dtype)
        return torch.where(real.unsqueeze(1), x + level * std * noise, x).view(shape)
    lengths = real.sum(1)
    rank = real.long().cumsum(1) - 1  # position of each real step among its series' real steps
    k = _counts(real, level)
    if kind == "mask":
        start = (_draw(torch.rand, lengths.shape, generator, device) * (lengths - k + 1)).long()
        start = torch.minimum(start, lengths - k)  # rand < 1, but rounding could reach the bound
        window = real & (rank >= start[:, None]) & (rank < (start + k)[:, None])
        return x.masked_fill(window.unsqueeze(1), 0.0).view(shape)
    sign = torch.where(_draw(torch.rand, lengths.shape, generator, device) < 0.5, -1, 1)
    # each real step reads the real step sign * k before it; clamping to the ends repeats the edge value
    source = torch.minimum((rank - (sign * k)[:, None]).clamp(min=0), (lengths - 1)[:, None])
    steps = torch.arange(x.shape[-1], device=device).expand_as(real)
    index = torch.where(real, _real_order(real).gather(1, source), steps)
    return x.gather(2, index.unsqueeze(1).expand_as(x)).view(shape)


def perturbed_agreement(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    kind: str,
    level: float,
    *,
    generator: torch.Generator | None = None,
    mask: Tensor | None = None,
    repeats: int = 1,
) -> Tensor:
    """The fraction of (series, repeat) pairs where the student's top-1 class equals the teacher's on the same
    :func:`perturb`-ed input (a fresh draw each repeat).

    Both models run in eval mode without gradients; their ``training`` flags are restored.

    Args:
        teacher: ``(B, C, T) -> (B, K)`` logits (and ``mask=`` if its ``forward`` takes it).
        student: same interface.
        x, kind, level, generator, mask: as in :func:`perturb`.
        repeats: how many draws per series (``>= 1``).

    Returns:
        A 0-d float tensor in ``[0, 1]``.

    Example:
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> float(perturbed_agreement(teacher, teacher, torch.randn(4, 1, 16), "mask", 0.25, repeats=3))
        1.0
    """
    _check_level(kind, level)
    if isinstance(repeats, bool) or not isinstance(repeats, numbers.Integral) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    x = as_bct(x)
    mask = check_mask(mask, x)
    agree = []
    for _ in range(int(repeats)):
        noisy = perturb(x, kind, level, generator=generator, mask=mask)
        t, s = (eval_logits(m, noisy, mask).argmax(1) for m in (teacher, student))
        agree.append(t == s)
    return torch.stack(agree).float().mean()


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
    values = tuple(fractions)
    bad = [f for f in values if isinstance(f, bool) or not isinstance(f, numbers.Real) or not 0 < f < 1]
    if not values or bad:
        raise ValueError(
            f"fractions must be a non-empty sequence of numbers in (0, 1), the share of real steps deleted "
            f"or kept; got {list(values)} (bad: {bad}); e.g. fractions={DELETION_FRACTIONS}"
        )
    return tuple(float(f) for f in values)


def top_steps(ranking: Tensor, fraction: float, mask: Tensor | None = None) -> Tensor:
    """``(B, T)`` bool: each series' ``max(1, round(fraction * L))`` real steps of highest ``ranking`` (ties
    go to the earlier step).

    Example:
        >>> top_steps(torch.tensor([[0.1, 0.9, 0.5, 0.3]]), 0.5)
        tensor([[False,  True,  True, False]])
    """
    real = _real(ranking, mask)
    score = ranking.masked_fill(~real, -math.inf)
    order = torch.argsort(score, dim=1, descending=True, stable=True)
    position = torch.argsort(order, dim=1)  # rank of each step, 0 = highest
    k = _counts(real, fraction).clamp(min=1)
    return real & (position < k[:, None])


def deletion_curve(
    teacher: nn.Module,
    student: nn.Module,
    x: Tensor,
    ranking: Tensor,
    fractions: Sequence[float] = DELETION_FRACTIONS,
    *,
    mode: str = "delete",
    mask: Tensor | None = None,
) -> Tensor:
    """The student's agreement with the teacher's prediction on the clean ``x`` after the top steps of
    ``ranking`` are deleted (or, ``mode="keep"``, after every other real step is).

    For each fraction ``f``, the ``max(1, round(f * L))`` real steps of each series with the highest
    ``ranking`` (ties to the earlier step; see :func:`top_steps`) are set to 0 on every channel
    (``"delete"``, ERASER's comprehensiveness), or all other real steps are (``"keep"``, sufficiency).
    A student that relies on the teacher's evidence loses agreement faster when the teacher's top steps are
    deleted than when random ones are (:func:`random_ranking`), and keeps more of it when only they are
    kept. ``deletion_curve(teacher, teacher, ...)`` is the teacher's own consistency: the reference curve.
    Both models run in eval mode without gradients; their ``training`` flags are restored.

    Args:
        teacher: gives the reference predictions, on the clean ``x``.
        student: the model whose predictions on the perturbed ``x`` are compared with them.
        x: ``(B, C, T)`` (or ``(B, T)``) float series.
        ranking: ``(B, T)`` step scores, higher = more important (e.g. :func:`teacher_ranking`).
        fractions: shares of the real steps, each in ``(0, 1)``.
        mode: ``"delete"`` or ``"keep"``.
        mask: ``(B, T)`` bool, True on real steps; padded steps are never ranked, deleted or kept.

    Returns:
        ``(len(fractions),)`` float tensor of agreements in ``[0, 1]``.

    Raises:
        ValueError: a fraction outside ``(0, 1)``, an unknown ``mode``, or a ``ranking`` that is not ``(B, T)``.

    Example:
        >>> class Last(torch.nn.Module):  # reads only the last step: class 1 if it is positive
        ...     def forward(self, x):
        ...         return torch.stack([-x[:, 0, -1], x[:, 0, -1]], 1)
        >>> x = torch.ones(2, 1, 10)
        >>> deletion_curve(Last(), Last(), x, torch.arange(10.0).expand(2, 10), (0.1, 0.5))
        tensor([0., 0.])
        >>> deletion_curve(Last(), Last(), x, -torch.arange(10.0).expand(2, 10), (0.1, 0.5))
        tensor([1., 1.])
    """
    fractions = _check_fractions(fractions)
    if mode not in DELETION_MODES:
        raise ValueError(f"unknown deletion mode {mode!r}; choose one of {list(DELETION_MODES)}")
    x = as_bct(x)
    mask = check_mask(mask, x)
    if ranking.shape != (x.shape[0], x.shape[-1]):
        raise ValueError(
            f"ranking must have shape (B, T) = {(x.shape[0], x.shape[-1])} like x, got {tuple(ranking.shape)}"
        )
    real = _real(x, mask)
    reference = eval_logits(teacher, x, mask).argmax(1)
    agreement = []
    for f in fractions:
        top = top_steps(ranking.to(x.device), f, real)
        erase = top if mode == "delete" else real & ~top
        pred = eval_logits(student, x.masked_fill(erase.unsqueeze(1), 0.0), mask).argmax(1)
        agreement.append((pred == reference).float().mean())
    return torch.stack(agreement)


def random_ranking(
    x: Tensor, *, generator: torch.Generator | None = None, mask: Tensor | None = None
) -> Tensor:
    """A uniformly random ``(B, T)`` ranking of the steps of ``x`` (padded steps get 0, the lowest score),
    the comparison for :func:`deletion_curve`.

    Example:
        >>> random_ranking(torch.zeros(2, 3, 5), mask=torch.tensor([[True] * 5, [True] * 3 + [False] * 2]))[1, 3:]
        tensor([0., 0.])
    """
    x = as_bct(x)
    mask = check_mask(mask, x)
    scores = _draw(torch.rand, (x.shape[0], x.shape[-1]), generator, x.device)
    return scores if mask is None else scores.masked_fill(~mask, 0.0)


def teacher_ranking(
    teacher: nn.Module,
    x: Tensor,
    target: Tensor | int | None = None,
    *,
    mask: Tensor | None = None,
    method: str = "occlusion",
    **options: Any,
) -> Tensor:
    """The teacher's ``(B, T)`` step ranking for :func:`deletion_curve`: its
    :func:`~lightning_tsd.attribution.temporal_attribution` map for ``target`` (default: its own
    prediction), by default with captum occlusion (window ``T // 10``, stride half of it), an estimator other
    than the gradient-based ones TSD trains with.

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(20, 2))
        >>> teacher_ranking(net, torch.randn(3, 1, 20), window=2).shape
        torch.Size([3, 20])
    """
    return temporal_attribution(teacher, x, target, mask=mask, method=method, **options)


@dataclass(frozen=True)
class Behaviour:
    """What :func:`measure_behaviour` measured on ``num_series`` series.

    ``noise_agreement`` and ``mask_agreement`` are :func:`perturbed_agreement` at ``noise_level`` (series
    stds) and ``mask_level`` (share of the real steps), over ``repeats`` draws. ``curves[model][mode][ranking]``
    is a :func:`deletion_curve` over ``fractions``: ``model`` is ``"student"`` or ``"teacher"`` (the teacher's
    own consistency, the reference), ``mode`` ``"delete"`` or ``"keep"``, ``ranking`` ``"teacher"`` (by
    ``method``) or ``"random"`` (mean of ``repeats`` random rankings).

    Example:
        >>> flat = {"teacher": [0.2, 0.4], "random": [0.9, 0.9]}
        >>> curves = {m: {"delete": flat, "keep": {"teacher": [0.8, 0.9], "random": [0.5, 0.6]}}
        ...           for m in ("student", "teacher")}
        >>> b = Behaviour(8, 0.5, 0.1, 1, 1.0, 1.0, "occlusion", [0.1, 0.2], curves)
        >>> round(b.gap("delete"), 4), round(b.gap("keep", "teacher"), 4)
        (0.6, 0.3)
    """

    num_series: int
    noise_level: float
    mask_level: float
    repeats: int
    noise_agreement: float
    mask_agreement: float
    method: str
    fractions: list[float]
    curves: dict[str, dict[str, dict[str, list[float]]]]

    def gap(self, mode: str, model: str = "student") -> float:
        """How much more the teacher's ranking matters than a random one, mean over the fractions:
        random minus teacher-ranked agreement for ``"delete"``, teacher-ranked minus random for ``"keep"``
        (positive when ``model`` relies on the teacher's top steps)."""
        curve = self.curves[model][mode]
        sign = 1.0 if mode == "keep" else -1.0
        diffs = [sign * (t - r) for t, r in zip(curve["teacher"], curve["random"], strict=True)]
        return sum(diffs) / len(diffs)


_DEFAULTS: dict[str, Any] = {
    "max_series": 128,
    "noise": 0.5,
    "masked": 0.1,
    "fractions": DELETION_FRACTIONS,
    "repeats": 2,
    "seed": 0,
    "method": "occlusion",
    "options": None,
}


def check_behaviour_options(options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check :func:`measure_behaviour`'s keyword options and return them with the defaults filled in.

    Raises:
        ValueError: an unknown option or a value out of range, naming the fix.

    Example:
        >>> check_behaviour_options({"noise": 0.25})["noise"], check_behaviour_options()["max_series"]
        (0.25, 128)
        >>> check_behaviour_options({"nois": 0.25})
        Traceback (most recent call last):
        ...
        ValueError: unknown behaviour option(s) ['nois']; known: ['max_series', 'noise', 'masked', 'fractions', 'repeats', 'seed', 'method', 'options']
    """
    unknown = sorted(set(options or {}) - set(_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown behaviour option(s) {unknown}; known: {list(_DEFAULTS)}")
    out = {**_DEFAULTS, **(options or {})}
    for name in ("max_series", "repeats"):
        value = out[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"behaviour option {name} must be an integer >= 1, got {value!r}")
    _check_level("noise", out["noise"])
    _check_level("mask", out["masked"])
    out["fractions"] = _check_fractions(out["fractions"])
    out["method"], out["options"] = check_attribution_options(out["method"], out["options"])
    return out


def _first_series(batches: Iterable[Any], limit: int) -> list[tuple[Tensor, Tensor | None]]:
    """The first ``limit`` series of ``batches`` as ``(x, mask)`` chunks, consecutive batches of the same
    shape joined (fewer, larger forwards)."""
    chunks: list[tuple[list[Tensor], list[Tensor] | None]] = []
    seen = 0
    for batch in batches:
        if seen >= limit:
            break
        b = batch if isinstance(batch, Batch) else unpack_batch(batch)
        x, mask = b.x[: limit - seen], None if b.mask is None else b.mask[: limit - seen]
        seen += len(x)
        last = chunks[-1] if chunks else None
        if last and last[0][0].shape[1:] == x.shape[1:] and (last[1] is None) == (mask is None):
            last[0].append(x)
            if last[1] is not None and mask is not None:
                last[1].append(mask)
        else:
            chunks.append(([x], None if mask is None else [mask]))
    return [(torch.cat(xs), None if masks is None else torch.cat(masks)) for xs, masks in chunks]


def measure_behaviour(
    teacher: nn.Module, student: nn.Module, batches: Iterable[Any], **options: Any
) -> Behaviour:
    """Agreement under noise and masked windows, and the deletion and keep curves (teacher-ranked and
    random, for the student and for the teacher itself), over the first ``max_series`` series of
    ``batches``.

    Args:
        teacher: the reference model.
        student: the candidate.
        batches: batches as :func:`lightning_tsd._batch.unpack_batch` reads them (or tensors ``x``), on
            the models' device.
        **options: ``max_series`` (128), ``noise`` (0.5 series stds), ``masked`` (0.1 of the real steps),
            ``fractions`` (:data:`DELETION_FRACTIONS`), ``repeats`` (2 noise / mask draws and random
            rankings), ``seed`` (0, of a CPU generator: the same numbers on every call), ``method``
            (``"occlusion"``, the teacher's ranking) and ``options`` (its options, e.g. ``{"window": 4}``).

    Example:
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        >>> b = measure_behaviour(net, net, [torch.randn(4, 1, 16)], fractions=(0.25, 0.5))
        >>> b.num_series, b.noise_agreement, b.gap("delete") == b.gap("delete", "teacher")
        (4, 1.0, True)
    """
    o = check_behaviour_options(options)
    generator = torch.Generator().manual_seed(int(o["seed"]))
    models = (("student", student), ("teacher", teacher))
    sums: dict[Any, Tensor] = {}  # "noise", "mask", and (model, mode, ranking) for the curves
    seen = 0
    for x, mask in _first_series(batches, o["max_series"]):
        n = len(x)
        values: dict[Any, Tensor] = {
            kind: perturbed_agreement(
                teacher, student, x, kind, o[name], generator=generator, mask=mask, repeats=o["repeats"]
            )
            for kind, name in (("noise", "noise"), ("mask", "masked"))
        }
        rankings = {
            "teacher": [teacher_ranking(teacher, x, mask=mask, method=o["method"], **o["options"])],
            "random": [random_ranking(x, generator=generator, mask=mask) for _ in range(o["repeats"])],
        }
        for (name, model), mode, (ranked_by, ranks) in itertools.product(
            models, DELETION_MODES, rankings.items()
        ):
            curves = [
                deletion_curve(teacher, model, x, r, o["fractions"], mode=mode, mask=mask) for r in ranks
            ]
            values[name, mode, ranked_by] = torch.stack(curves).mean(0)
        for key, value in values.items():
            sums[key] = sums.get(key, 0) + value.double().cpu() * n
        seen += n
    if not seen:
        raise ValueError("measure_behaviour got no series; pass at least one batch")
    curves_out: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (name, _), mode, ranked_by in itertools.product(models, DELETION_MODES, ("teacher", "random")):
        curve = (sums[name, mode, ranked_by] / seen).tolist()
        curves_out.setdefault(name, {}).setdefault(mode, {})[ranked_by] = curve
    return Behaviour(
        num_series=seen,
        noise_level=float(o["noise"]),
        mask_level=float(o["masked"]),
        repeats=int(o["repeats"]),
        noise_agreement=float(sums["noise"]) / seen,
        mask_agreement=float(sums["mask"]) / seen,
        method=o["method"],
        fractions=list(o["fractions"]),
        curves=curves_out,
    )
