"""Where a frozen teacher's logits and saliency come from: a live forward, or a per-sample cache.

:class:`TeacherSource` is the one object the training step asks for the teacher's outputs. It checks its
estimator options when it is built (a typo in a config fails before the fit, not mid-epoch), runs the
teacher in eval mode without parameter gradients, and owns the merge of cached rows with rows computed
live. Plain torch: no Lightning import.

Steady state with a cache: once a whole epoch was served from the cache (or the cache was precomputed),
the source marks itself *complete* and serves batches without reading anything back from the device. A
sample that still turns out to be missing is reported in :attr:`TeacherOutputs.all_cached` (a device
tensor), so the caller can fold that flag into the step's single host read and ask again with
``refresh=True``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from lightning_tsd._batch import call_model
from lightning_tsd.cache import TeacherCache
from lightning_tsd.saliency import check_saliency_options, temporal_saliency

SALIENCY_TARGETS = ("teacher", "label", "distribution")


class TeacherOutputs(NamedTuple):
    """The teacher's outputs for one batch.

    ``saliency`` is ``(B, T)``, or ``(B, K, T)`` for ``saliency_target="distribution"`` (one map per class),
    or None when not asked for. ``all_cached`` is a 0-dim bool device tensor, False when a complete cache
    missed a sample (the rows of that sample are then not the teacher's); None when nothing was assumed.
    ``stored`` holds the indices this call added to the cache (to :meth:`TeacherSource.discard` them when
    the step is refused).
    """

    logits: Tensor
    saliency: Tensor | None
    all_cached: Tensor | None = None
    stored: Tensor | None = None


STUDENT_ONLY_OPTIONS = ("sampling", "generator")


def teacher_options(options: dict[str, Any] | None, teacher: dict[str, Any] | None = None) -> dict[str, Any]:
    """The estimator options for the teacher's maps: ``teacher`` when given, else ``options`` without the
    random-sampling ones (a teacher's maps stay deterministic, so a cache holds the same maps a live
    teacher gives).

    Example:
        >>> teacher_options({"steps": 1, "sampling": "uniform"})
        {'steps': 1}
        >>> teacher_options({"steps": 2, "sampling": "antithetic"}, {"steps": 32})
        {'steps': 32}
    """
    if teacher is not None:
        return dict(teacher)
    return {k: v for k, v in (options or {}).items() if k not in STUDENT_ONLY_OPTIONS}


def _class_maps(
    model: nn.Module,
    x: Tensor,
    mask: Tensor | None,
    num_classes: int,
    method: str,
    create_graph: bool,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """Logits ``(B, K)`` and one saliency map per class ``(B, K, T)``, from one call on ``K`` stacked copies.

    Stacking copies leaves train-mode BatchNorm's batch statistics unchanged (every sample appears ``K``
    times), so the logits equal those of a single forward on ``x``.
    """
    batch = x.shape[0]
    stacked = x.repeat(num_classes, 1, 1)
    target = torch.arange(num_classes, device=x.device).repeat_interleave(batch)
    stacked_mask = None if mask is None else mask.repeat(num_classes, 1)
    logits, maps = temporal_saliency(
        model, stacked, target, method=method, create_graph=create_graph, mask=stacked_mask, **options
    )
    return logits[:batch], maps.view(num_classes, batch, -1).transpose(0, 1)


def model_saliency(
    model: nn.Module,
    x: Tensor,
    target: Tensor | None,
    *,
    method: str,
    target_mode: str = "teacher",
    mask: Tensor | None = None,
    create_graph: bool = False,
    num_classes: int | None = None,
    **options: Any,
) -> tuple[Tensor, Tensor]:
    """A model's logits and saliency for ``target`` (``(B, T)``), or for every class (``(B, K, T)``) when
    ``target_mode="distribution"`` (then ``num_classes`` is needed)."""
    if target_mode == "distribution":
        if num_classes is None:
            with torch.no_grad():
                num_classes = call_model(model, x[:1], None if mask is None else mask[:1]).shape[1]
        return _class_maps(model, x, mask, num_classes, method, create_graph, **options)
    return temporal_saliency(model, x, target, method=method, create_graph=create_graph, mask=mask, **options)


class TeacherSource:
    """The teacher's logits and saliency for a batch, live or from a :class:`TeacherCache`.

    Args:
        teacher: the frozen teacher; it is put in eval mode and its parameters stop requiring gradients.
        saliency: estimator name (:data:`lightning_tsd.saliency.ESTIMATORS`), checked here.
        saliency_options: the estimator's options, checked here.
        saliency_target: ``"teacher"`` (its predicted class), ``"label"`` (``y``) or ``"distribution"``
            (every class).
        cache: a :class:`TeacherCache`, or None to run the teacher live on every batch.

    Example:
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 3))
        >>> source = TeacherSource(teacher, "gradient", cache=TeacherCache())
        >>> x, index = torch.randn(4, 1, 8), torch.arange(4)
        >>> first = source.outputs(x, index=index)
        >>> again = source.outputs(x, index=index)  # served from the cache
        >>> torch.equal(first.saliency, again.saliency), first.saliency.shape
        (True, torch.Size([4, 8]))
    """

    def __init__(
        self,
        teacher: nn.Module,
        saliency: str = "integrated_gradients",
        saliency_options: dict[str, Any] | None = None,
        saliency_target: str = "teacher",
        cache: TeacherCache | None = None,
    ) -> None:
        if saliency_target not in SALIENCY_TARGETS:
            raise ValueError(
                f"saliency_target must be one of {list(SALIENCY_TARGETS)}, got {saliency_target!r}"
            )
        self.saliency_options = dict(saliency_options or {})
        check_saliency_options(saliency, self.saliency_options)
        self.teacher = teacher.requires_grad_(False).eval()
        self.saliency = saliency
        self.saliency_target = saliency_target
        self.cache = cache
        self.complete = False  # every sample the fit will ask for is cached (host-side knowledge)
        self._misses = 0  # samples computed live since the last end_epoch()

    # ------------------------------------------------------------------ live
    def live(
        self,
        x: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        with_saliency: bool = True,
        validated: bool = False,
    ) -> TeacherOutputs:
        """Run the teacher on ``x``: logits, and its saliency unless ``with_saliency`` is False.
        ``validated`` as in :func:`~lightning_tsd.saliency.temporal_saliency`."""
        if not with_saliency:
            with torch.no_grad():
                return TeacherOutputs(call_model(self.teacher, x, mask), None)
        target = y if self.saliency_target == "label" else None
        logits, saliency = model_saliency(
            self.teacher, x, target, method=self.saliency, target_mode=self.saliency_target, mask=mask,
            validated=validated, **self.saliency_options,
        )  # fmt: skip
        return TeacherOutputs(logits, saliency)

    # ------------------------------------------------------------------ cached
    def outputs(
        self,
        x: Tensor,
        y: Tensor | None = None,
        mask: Tensor | None = None,
        index: Tensor | None = None,
        *,
        with_saliency: bool = True,
        refresh: bool = False,
        validated: bool = False,
    ) -> TeacherOutputs:
        """The teacher's outputs for a batch: cached rows where possible, misses computed live and stored.

        Without a cache or an ``index`` everything is live. ``refresh=True`` forgets that the cache is
        complete (after ``all_cached`` came back False) and looks the batch up with a host read.
        """
        if self.cache is None or index is None:
            return self.live(x, y, mask, with_saliency, validated)
        if refresh:
            self.complete = False
        shape = None if not with_saliency else self._map_shape(x)
        logits: Tensor | None
        if self.complete:
            hit, logits, saliency = self.cache.lookup(index, x)
            return TeacherOutputs(logits, self._unflatten(saliency, shape), hit.all())
        hit, logits, saliency = self.cache.get(index, x)
        if with_saliency and logits is not None and saliency is None:
            hit, logits = torch.zeros_like(hit), None  # cached before saliency was needed: recompute
        if logits is not None and bool(hit.all()):
            return TeacherOutputs(logits, self._unflatten(saliency, shape) if with_saliency else None)
        miss = ~hit
        live = self.live(
            x[miss], None if y is None else y[miss], None if mask is None else mask[miss], with_saliency
        )
        self._misses += int(miss.sum())
        flat = None if live.saliency is None else live.saliency.flatten(1)
        self.cache.put(index[miss], live.logits, flat, x[miss])
        stored = index[miss]
        if logits is None:
            return live._replace(stored=stored)
        logits = logits.clone()
        logits[miss] = live.logits.to(logits.dtype)
        if live.saliency is not None:
            assert saliency is not None and flat is not None  # a saliency-less hit was recomputed above
            saliency = saliency.clone()
            saliency[miss] = flat.to(saliency.dtype)
        return TeacherOutputs(
            logits, self._unflatten(saliency, shape) if with_saliency else None, stored=stored
        )

    def discard(self, outputs: TeacherOutputs) -> None:
        """Forget what ``outputs`` added to the cache (its step was refused or skipped). They stay misses of
        the epoch: the cache lacks them, so it is not complete (a complete cache that missed them would ask
        again on one process only, and repeat that step's collectives there)."""
        if self.cache is not None and outputs.stored is not None:
            self.cache.discard(outputs.stored)

    def precompute(self, batches: Iterable[Any], with_saliency: bool = True) -> int:
        """Fill the cache from validated batches (each with an ``index``); returns the number of cached samples.
        Every process runs the whole loader, so nothing is left to exchange."""
        if self.cache is None:
            raise ValueError("precompute_teacher_cache needs teacher_cache=True")
        for b in batches:
            if b.index is None:
                raise ValueError(
                    "precompute_teacher_cache needs batches with an 'index' (use IndexedDataset)"
                )
            self.outputs(b.x, b.y, b.mask, b.index, with_saliency=with_saliency)
        return self.end_fill(sharded=False)

    def end_fill(self, sharded: bool) -> int:
        """End a fill of the cache before the fit: its rows are not misses of the fit's first epoch (an epoch
        served from them makes the source complete). ``sharded``: each process filled its own shard, so the
        rows are exchanged (a collective, :meth:`TeacherCache.sync`); otherwise each filled them all.
        Returns the number of cached samples."""
        assert self.cache is not None
        if sharded:
            self.cache.sync()
        else:
            self.cache.mark_synced()
        self._misses = 0
        return len(self.cache)

    def _map_shape(self, x: Tensor) -> tuple[int, ...] | None:
        return None if self.saliency_target != "distribution" else (-1, x.shape[-1])

    @staticmethod
    def _unflatten(saliency: Tensor | None, shape: tuple[int, ...] | None) -> Tensor | None:
        if saliency is None or shape is None:
            return saliency
        return saliency.view(saliency.shape[0], *shape)

    def end_epoch(self) -> None:
        """Call at the end of each training epoch (after the cache's sync): an epoch served entirely from
        the cache makes the source complete."""
        if self.cache is not None and self._misses == 0 and len(self.cache) > 0:
            self.complete = True
        self._misses = 0
