"""``TemporalSaliencyDistiller``: a LightningModule that distils a frozen teacher into a student with TSD.

The module is glue. The training step reads top to bottom: unpack the batch (types and shapes) → the
teacher's logits and saliency (:class:`~lightning_tsd.teacher.TeacherSource`: cache or one live forward) →
the student once (logits and differentiable saliency from the same forward) and the TSD term → the losses,
with the FitNets term when layers are paired (:mod:`lightning_tsd.features`: hooks catch both models'
features during those forwards) (and, optionally, how the TSD gradient joins the base gradient: :mod:`lightning_tsd.gradients`) → one
check of every value (:class:`~lightning_tsd.guard.BadBatchGuard`, one host read) → log.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from lightning_tsd import _compat
from lightning_tsd._batch import (
    Batch,
    InvalidBatchError,
    call_model,
    check_batchnorm_batch,
    clamp_labels,
    unpack_batch,
)
from lightning_tsd._models import (
    agreed_hint,
    file_hparam,
    infer_num_classes,
    name_of,
    read_class_count,
    resolve_model,
)
from lightning_tsd._options import (
    OPTIMIZERS,
    SCHEDULERS,
    build_optimizer,
    build_scheduler,
    check_options,
    tsd_weight_at,
)
from lightning_tsd._state import EvaluationHooks, ResumableState
from lightning_tsd.cache import TeacherCache, cache_key
from lightning_tsd.checkpoint import model_spec
from lightning_tsd.features import FeatureDistillation, example_input
from lightning_tsd.gradients import combined_loss, weighted_sum
from lightning_tsd.guard import BadBatchGuard, Verdict, locate
from lightning_tsd.kernels import batchnorm_eval
from lightning_tsd.losses import BaseLoss, TemporalSaliencyLoss, base_distillation_loss, kd_loss
from lightning_tsd.metrics import DistillationMetrics, TeacherAgreement
from lightning_tsd.plugins import CheckedCheckpointIO
from lightning_tsd.recombination import recombine
from lightning_tsd.saliency import RANDOM_SAMPLINGS
from lightning_tsd.teacher import TeacherOutputs, TeacherSource, teacher_options

__all__ = ["OPTIMIZERS", "SCHEDULERS", "TemporalSaliencyDistiller", "infer_num_classes"]


class TemporalSaliencyDistiller(ResumableState, EvaluationHooks, pl.LightningModule):
    """Distil a frozen ``teacher`` into a ``student`` with a base KD loss plus Temporal Saliency Distillation.

    ``L = ce_weight * CE(z_S, y) + kd_weight * L_base(z_S, z_T) + w_tsd * L_TSD(s_S, s_T)``, where the
    saliency maps ``s`` say how much each timestep matters to each model's prediction. ``forward(x)`` is
    the student. The number of classes is read from both models' outputs on the first batch (one no-grad
    forward each); declared attributes are hints only.

    Args:
        teacher: trained teacher: a module, a teacher file (read ``weights_only``), a spec dict, or a list of those
            (a :class:`~lightning_tsd.ensemble.TeacherEnsemble`); raw Hugging Face classifiers are adapted.
        student: the model to train (a module, a spec dict, or a raw Hugging Face classifier).
        base_loss: ``"kd"``, ``"dkd"``, ``"none"``, or a callable ``(student_logits, teacher_logits, y) -> loss``.
        ce_weight: weight of the cross-entropy on labels (0 allows unlabeled batches).
        kd_weight: weight of the base loss.
        tsd_weight: weight ``w_tsd`` of the TSD term; 0 is exactly the base method and computes no saliency.
        temperature: KD temperature ``tau``.
        saliency: estimator: ``"gradient"``, ``"input_x_gradient"``, ``"integrated_gradients"``, ``"occlusion"``.
        saliency_options: estimator options, checked here; a random ``sampling`` (``"uniform"``, ``"antithetic"``,
            ``"stratified"``) draws from a generator seeded with ``torch.initial_seed() + global_step``
            (reproducible, and the same after a resume).
        teacher_saliency_options: options for the teacher's maps (default: ``saliency_options`` without
            ``sampling``, so the teacher's maps are deterministic and cacheable). With the cache on they are paid
            once, so ``{"steps": 32}`` costs little more; it is not the default, since the selection measured the
            teacher at the student's options (with a 32-step teacher a tiny student at ``tsd_weight=2``
            collapsed in ``tests/test_real_data.py``).
        saliency_target: ``"teacher"`` (its predicted class), ``"label"``, or ``"distribution"`` (every class,
            weighted by the teacher's probabilities; ``K`` times the saliency cost).
        saliency_temperature: ``tau_s`` of the ``"kl"`` alignment.
        alignment: ``"kl"``, ``"pearson"`` or ``"cosine"``.
        saliency_smoothing: moving-average window (steps) applied to both maps before alignment (1: none).
        tsd_gradient: ``"project"`` (PCGrad: the TSD gradient's component that conflicts with the base loss's is
            removed; one more backward), ``"sum"`` (the plain loss sum) or ``"balance"`` (the TSD gradient
            rescaled to ``w_tsd`` times the base gradient's norm; one more backward).
        tsd_warmup: fraction of the fit's optimizer steps over which ``w_tsd`` ramps up linearly from 0.
        tsd_start: fraction of the fit's optimizer steps before which TSD is off (KD first).
        tsd_every_n_steps: compute the TSD term every n-th step only (the other steps are plain KD).
        tsd_every_n_scale: on those steps, weight the term ``n * w_tsd``, so that its mean weight per step stays
            ``w_tsd`` (default False: ``w_tsd``).
        tsd_fraction: the TSD term on a random ``ceil(tsd_fraction * B)`` rows of each batch (an unbiased
            estimate of the batch mean; the rows drawn from a generator seeded with the global seed and step, so
            a resume is exact). Below 1 the student runs twice: once on the whole batch for its logits (the
            CE/KD terms; train-mode BatchNorm sees every real sample once, there), and once on the rows with
            BatchNorm in eval mode for their maps (for integrated gradients the same maps as on the whole batch;
            for the other estimators with train-mode BatchNorm, the maps of its eval mode).
        dkd_alpha: DKD's TCKD weight; ``dkd_beta``: its NCKD weight.
        student_train_mode: train the student in train mode (default); False keeps it in eval mode.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a callable ``params -> Optimizer``.
        weight_decay: optimizer weight decay.
        scheduler: None, ``"cosine"`` (cosine annealing over the fit) or ``"onecycle"``.
        teacher_cache: True (or a :class:`TeacherCache`): the teacher's outputs kept per sample ``index``; or the
            path of a cache file (``lightning-tsd cache-teacher``, :meth:`TeacherCache.save`), loaded here and
            refused when it was made with another teacher, other saliency options or (on a sample's first hit)
            other data.
        teacher_cache_precompute: with the cache on and a finite train loader, fill the cache in one pass over the
            train loader before the first epoch (a progress bar; under DDP each process fills its shard, then
            the rows are exchanged), so that every epoch is served from it; samples already cached (a restored
            checkpoint, a cache file) are not computed again. False: the first epoch fills it.
        num_classes: the number of classes; when given, the models' outputs must agree with it.
        on_bad_batch: NaN/Inf in ``x`` or the loss: ``"raise"`` an error before the optimizer step, or ``"skip"``
            the step on every process (counted in ``train/skipped_batches``). Bad labels or masks always raise.
        feature_pairs: FitNets hints (:mod:`lightning_tsd.features`): ``{student_layer: teacher_layer}`` module
            names, each relative to its model (``{"blocks.1": "blocks.4"}``); a learned projector per pair where
            widths differ, trained with the student and saved in checkpoints. Logged as ``train/feature``. The
            teacher's features come from its live forward: with a teacher cache, one no-grad teacher forward
            per step gives them.
        feature_weight: weight of the feature term.
        feature_layout: ``"BCT"`` or ``"BTC"``, the layout of 3-D features (or a ``[student, teacher]`` pair).
        feature_input_shape: ``(C, T)`` of the input used once to read the feature widths (default: what the
            student declares, :func:`~lightning_tsd.features.example_input`).
        recombination_weight: weight of the base loss on saliency-guided recombinations of each batch
            (:mod:`lightning_tsd.recombination`): every series keeps the steps its teacher map ranks highest and
            takes the rest from a series of another teacher class; the teacher runs live on them. 0: off.
        recombination_keep: fraction of each series' steps kept in a recombination.

    Example:
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))
        >>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))
        >>> distiller = TemporalSaliencyDistiller(teacher, student, tsd_weight=2.0, tsd_gradient="project")
        >>> distiller(torch.randn(4, 1, 32)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        teacher: nn.Module | str | dict | Sequence[nn.Module | str | dict],
        student: nn.Module | dict,
        base_loss: str | BaseLoss = "kd",
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        tsd_weight: float = 0.5,
        temperature: float = 4.0,
        saliency: str = "integrated_gradients",
        saliency_options: dict[str, Any] | None = None,
        teacher_saliency_options: dict[str, Any] | None = None,
        saliency_target: str = "teacher",
        saliency_temperature: float = 1.0,
        alignment: str = "pearson",
        saliency_smoothing: int = 1,
        tsd_gradient: str = "project",
        tsd_warmup: float = 0.0,
        tsd_start: float = 0.0,
        tsd_every_n_steps: int = 1,
        tsd_every_n_scale: bool = False,
        tsd_fraction: float = 1.0,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        student_train_mode: bool = True,
        lr: float = 3e-3,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        teacher_cache: bool | str | os.PathLike | TeacherCache = False,
        teacher_cache_precompute: bool = True,
        num_classes: int | None = None,
        on_bad_batch: str = "raise",
        feature_pairs: dict[str, str] | None = None,
        feature_weight: float = 1.0,
        feature_layout: str | list[str] = "BCT",
        feature_input_shape: tuple[int, int] | None = None,
        recombination_weight: float = 0.0,
        recombination_keep: float = 0.5,
    ) -> None:
        super().__init__()
        self.guard = BadBatchGuard(on_bad_batch)
        teacher_hparam = file_hparam(teacher)
        teacher, student = resolve_model(teacher, "teacher"), resolve_model(student, "student")
        self.save_hyperparameters(ignore=["teacher", "student", "teacher_cache", "base_loss", "optimizer"])
        check_options(base_loss, optimizer, self.hparams)
        # How to rebuild the models where that is known, so load_from_checkpoint needs no arguments.
        self.hparams.update(
            teacher=teacher_hparam or model_spec(teacher),
            student=model_spec(student),
            base_loss=name_of(base_loss),
            optimizer=name_of(optimizer),
            teacher_cache=bool(teacher_cache),
        )
        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student if student_train_mode else student.eval()
        self.base_loss, self.optimizer = base_loss, optimizer
        if isinstance(teacher_cache, (str, os.PathLike)):
            cache: TeacherCache | None = TeacherCache.load(teacher_cache)
        else:
            cache = (
                teacher_cache
                if isinstance(teacher_cache, TeacherCache)
                else (TeacherCache() if teacher_cache else None)
            )
        options = saliency_options or {}
        teacher_opts = teacher_options(saliency_options, teacher_saliency_options)
        self.source = TeacherSource(self.teacher, saliency, teacher_opts, saliency_target, cache)
        self.tsd = TemporalSaliencyLoss(
            saliency,
            alignment,
            saliency_temperature,
            saliency_target,
            saliency_smoothing,
            teacher_opts,
            **options,
        )
        if cache is not None and cache.key is not None:  # a cache made with another teacher or options
            cache.check_key(self._cache_key())
        if feature_pairs and not feature_weight > 0:
            raise ValueError(f"feature_weight must be > 0 with feature_pairs, got {feature_weight}")
        self.features = (
            FeatureDistillation(
                student, teacher, feature_pairs, example_input(student, feature_input_shape), feature_layout
            )
            if feature_pairs
            else None
        )
        self.num_classes = num_classes if num_classes is not None else agreed_hint(teacher, student)
        self._classes_read = False  # set once the models' outputs have given the class count
        self.metrics = DistillationMetrics(self.num_classes)
        self.train_agreement = TeacherAgreement()  # logged per epoch as train/agreement (synced across ranks)
        self.tsd_weight_scale = 1.0  # multiplies tsd_weight; the one owner (callbacks change it here)

    @property
    def teacher_cache(self) -> TeacherCache | None:
        return self.source.cache

    @property
    def skipped_batches(self) -> int:
        """Training batches skipped by ``on_bad_batch="skip"`` (all ranks agree; kept in checkpoints)."""
        return self.guard.skipped

    def setup(self, stage: str) -> None:
        _compat.refuse_unsupported(
            self.trainer.strategy, self.student if self.hparams.tsd_weight > 0 else None
        )
        # setup runs before fit(ckpt_path=...) reads the file: check it first
        strategy = self.trainer.strategy
        if not isinstance(strategy.checkpoint_io, CheckedCheckpointIO):
            strategy.checkpoint_io = CheckedCheckpointIO(strategy.checkpoint_io)
        self._key_teacher_cache()

    def _cache_key(self) -> dict[str, str]:
        """What the teacher cache's rows depend on: this teacher's weights, estimator, options and target."""
        source = self.source
        return cache_key(self.teacher, source.saliency, source.saliency_options, source.saliency_target)

    def _key_teacher_cache(self) -> None:
        """Key a teacher cache that has no key yet to this teacher and its options (so that it can be saved)."""
        if self.teacher_cache is not None and self.teacher_cache.key is None:
            self.teacher_cache.check_key(self._cache_key())

    def train(self, mode: bool = True) -> TemporalSaliencyDistiller:
        """Lightning toggles train mode on the whole module: keep the teacher in eval mode regardless."""
        super().train(mode)
        self.teacher.eval()
        if not self.hparams.student_train_mode:
            self.student.eval()
        return self

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The student's logits."""
        return call_model(self.student, x, mask)

    # ------------------------------------------------------------------ the training step
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        b = self._unpack(
            batch, batch_idx, deferred=True
        )  # types and shapes; values are checked with the loss
        weight = self.current_tsd_weight()
        snapshot = self.guard.snapshot(self.student)  # a refused or skipped step leaves BatchNorm as it was
        try:
            loss, parts, student_logits, teacher, verdict = self._checked_losses(b, weight, snapshot)
        except BaseException as err:
            self.guard.restore(snapshot)
            if isinstance(err, RuntimeError) and hasattr(err, "add_note"):  # Python >= 3.11
                err.add_note(
                    f"lightning-tsd: while training on {self._where(batch_idx)}, x {tuple(b.x.shape)}"
                )
            raise
        skippable = verdict.error is not None and verdict.skippable
        skip = self.guard.policy == "skip" and self._any_rank(skippable)
        if skip or verdict.error is not None:  # nothing of this step stays: buffers, cache entries
            self.guard.restore(snapshot)
            self.source.discard(teacher)
        if skip:
            return self._skip(batch_idx, verdict.error)
        if verdict.error is not None:
            raise locate(verdict.error, self._where(batch_idx))
        self.guard.good_step()
        self._log_step(loss, parts, weight, student_logits, teacher.logits)
        return loss

    def _checked_losses(
        self, b: Batch, weight: float, snapshot: Any
    ) -> tuple[Tensor, dict[str, Tensor], Tensor, TeacherOutputs, Verdict]:
        """The losses of a batch and the guard's verdict on them (one host read); a complete teacher cache
        that missed a sample is asked again, with the student's buffers restored first."""
        self._read_classes(b)
        safe = clamp_labels(b, self.num_classes)  # bad labels are reported by the guard, after one host read
        with_saliency = weight > 0 or self.hparams.recombination_weight > 0
        with_saliency = with_saliency or (self.teacher_cache is not None and self._teacher_maps_needed)
        for refresh in (False, True):
            with self._capture_features(b) as features:
                teacher = self.source.outputs(
                    *safe, with_saliency=with_saliency, refresh=refresh, validated=True
                )
                loss, parts, student_logits = self._losses(safe, teacher, weight, features)
            verdict = self.guard.inspect(b, self.num_classes, loss, parts, snapshot, teacher.all_cached)
            if not verdict.cache_missed:
                break
            self.guard.restore(snapshot)
        return loss, parts, student_logits, teacher, verdict

    def _capture_features(self, b: Batch) -> Any:
        """Hooks on the feature pairs' layers for this step (none without ``feature_pairs``); the teacher's
        only when it runs on the whole batch (no cache, or no ``index``)."""
        if self.features is None:
            return nullcontext(None)
        live = self.teacher_cache is None or b.index is None
        return self.features.capture(b.x.shape[0], teacher=live)

    def _losses(
        self, b: Batch, teacher: TeacherOutputs, weight: float, features: dict[str, list] | None = None
    ) -> tuple[Tensor, dict[str, Tensor], Tensor]:
        """The total loss, its parts and the student's logits for a batch whose teacher outputs are known
        (``features``: what the feature pairs' hooks caught in this step)."""
        if teacher.logits.ndim != 2 or teacher.logits.shape[1] != (
            self.num_classes or teacher.logits.shape[1]
        ):
            raise ValueError(f"the teacher returned logits of shape {tuple(teacher.logits.shape)}")
        parts: dict[str, Tensor] = {}
        if weight > 0:
            generator = self._step_generator(b.x.device)
            rows = self._tsd_rows(b.x.shape[0], generator)
            sampling = generator if self._draws_interpolants else None
            if rows is None:
                cached = (teacher.logits, teacher.saliency)
                out = self.tsd(self.teacher, self.student, b.x, b.y, b.mask, cached, True, sampling)
                student_logits, parts["tsd"] = out.student_logits, out.loss
            else:
                student_logits, parts["tsd"] = self._sub_batch_tsd(b, teacher, rows, sampling)
        else:
            student_logits = call_model(self.student, b.x, b.mask)
        if features is not None:
            parts["feature"] = self._feature_loss(b, features)
        if self.hparams.recombination_weight > 0:
            parts["recombined"] = self._recombined_loss(b, teacher)
        if self.hparams.ce_weight > 0:
            assert b.y is not None  # _unpack refuses unlabelled training batches when ce_weight > 0
            parts["ce"] = F.cross_entropy(student_logits.float(), b.y)
        base = self.base_loss_value(student_logits.float(), teacher.logits.float(), b.y)
        if base is not None:
            parts["kd"] = base
        return self._total(parts, weight, student_logits), parts, student_logits

    def _sub_batch_tsd(
        self, b: Batch, teacher: TeacherOutputs, rows: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor]:
        """``tsd_fraction < 1``: the student's logits on the whole batch from a plain forward (the CE/KD terms;
        train-mode BatchNorm sees every real sample once, there) and the TSD term on ``rows`` alone, from a
        second call with BatchNorm in eval mode (its statistics are not touched again)."""
        assert teacher.saliency is not None  # with_saliency is on whenever weight > 0
        student_logits = call_model(self.student, b.x, b.mask)
        y, mask = (None if t is None else t[rows] for t in (b.y, b.mask))
        cached = (teacher.logits[rows], teacher.saliency[rows])
        with batchnorm_eval(self.student):
            out = self.tsd(self.teacher, self.student, b.x[rows], y, mask, cached, True, generator)
        return student_logits, out.loss

    def _feature_loss(self, b: Batch, features: dict[str, list]) -> Tensor:
        """The FitNets term. The teacher's features come from its live forward in this step; when its outputs
        came from the cache, from one no-grad teacher forward."""
        assert self.features is not None
        if any(f is None for f in features["teacher"]):
            with torch.no_grad(), self.features.capture(b.x.shape[0], student=False) as extra:
                call_model(self.teacher, b.x, b.mask)
            features = {"student": features["student"], "teacher": extra["teacher"]}
        return self.features(features)

    def _recombined_loss(self, b: Batch, teacher: TeacherOutputs) -> Tensor:
        """KD (temperature ``temperature``) on saliency-guided recombinations of the batch: the teacher runs
        live on them, the student with its BatchNorm statistics untouched (they see real samples only).
        The partners are drawn from a generator seeded by the global seed and step (a resume is exact)."""
        assert teacher.saliency is not None  # with_saliency is on whenever recombination_weight > 0
        classes = teacher.logits.detach().argmax(dim=1)
        maps = teacher.saliency
        if maps.ndim == 3:  # saliency_target="distribution": the map of the teacher's class
            maps = maps[torch.arange(maps.shape[0], device=maps.device), classes]
        generator = self._seeded_generator(b.x.device)
        x = recombine(b.x, maps, classes, self.hparams.recombination_keep, mask=b.mask, generator=generator)
        with torch.no_grad():
            teacher_logits = call_model(self.teacher, x, b.mask)
        with batchnorm_eval(self.student):
            student_logits = call_model(self.student, x, b.mask)
        return kd_loss(student_logits.float(), teacher_logits.float(), self.hparams.temperature)

    @property
    def _teacher_maps_needed(self) -> bool:
        """Whether any term uses the teacher's maps (TSD, or the recombinations)."""
        return self.hparams.tsd_weight > 0 or self.hparams.recombination_weight > 0

    def _trained_parameters(self) -> list[nn.Parameter]:
        """What the optimizer trains: the student's parameters and the feature projectors'."""
        modules = [self.student] if self.features is None else [self.student, self.features]
        return [p for module in modules for p in module.parameters() if p.requires_grad]

    def _total(self, parts: dict[str, Tensor], weight: float, student_logits: Tensor) -> Tensor:
        hp = self.hparams
        base = weighted_sum(
            {k: v for k, v in parts.items() if k != "tsd"},
            {"ce": hp.ce_weight, "kd": hp.kd_weight, "feature": hp.feature_weight}
            | {"recombined": hp.recombination_weight},
        )
        separate = hp.tsd_gradient != "sum" and "tsd" in parts  # only then are the gradients taken apart
        params = self._trained_parameters() if separate else []
        ddp = self._trainer is not None and self.trainer.world_size > 1  # project global gradients
        reduce = (lambda v: self.trainer.strategy.reduce(v, reduce_op="mean")) if ddp else None
        return combined_loss(base, parts.get("tsd"), weight, hp.tsd_gradient, params, student_logits, reduce)

    @property
    def _draws_interpolants(self) -> bool:
        """Whether the student's maps draw random interpolants from the step's generator."""
        options = self.tsd.saliency_options
        return options.get("sampling") in RANDOM_SAMPLINGS and "generator" not in options

    def _step_generator(self, device: torch.device) -> torch.Generator | None:
        """What a step draws (the ``tsd_fraction`` rows, then the student's random interpolants) comes from a
        generator seeded by the global seed and step (resumes bit-exact); None when it draws nothing."""
        if not (self._draws_interpolants or self.hparams.tsd_fraction < 1):
            return None
        return self._seeded_generator(device)

    def _seeded_generator(self, device: torch.device) -> torch.Generator:
        """A generator seeded by the global seed and this step: what a step draws is the same after a resume."""
        return torch.Generator(device=device).manual_seed((torch.initial_seed() + self.global_step) % 2**63)

    def _tsd_rows(self, batch_size: int, generator: torch.Generator | None) -> Tensor | None:
        """The ``ceil(tsd_fraction * B)`` rows of the TSD term, uniformly at random (None: every row)."""
        count = math.ceil(self.hparams.tsd_fraction * batch_size)
        if generator is None or count >= batch_size:
            return None
        return torch.randperm(batch_size, generator=generator, device=generator.device)[:count]

    def base_loss_value(
        self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor | None
    ) -> Tensor | None:
        """The base distillation loss (None for ``base_loss="none"``)."""
        hp = self.hparams
        options = {"temperature": hp.temperature, "alpha": hp.dkd_alpha, "beta": hp.dkd_beta}
        return base_distillation_loss(self.base_loss, student_logits, teacher_logits, y, **options)

    def _log_step(self, loss: Tensor, parts: dict[str, Tensor], weight: float, *logits: Tensor) -> None:
        size = logits[0].shape[0]
        self.train_agreement.update(*(z.detach() for z in logits))  # student, teacher
        self.log("train/agreement", self.train_agreement, on_step=False, on_epoch=True, batch_size=size)
        self.log("train/loss", loss, prog_bar=True, batch_size=size)
        self.log_dict({f"train/{k}": v.detach() for k, v in parts.items()}, batch_size=size)
        self.log("train/tsd_weight", weight, batch_size=size)
        if self.guard.policy == "skip":
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=size)

    def _skip(self, batch_idx: int, error: InvalidBatchError | None) -> Tensor | None:
        where = error if error is not None else "a non-finite input or loss on another process"
        loss = self.guard.skip_loss(self.student)
        rank_zero_warn(
            f"on_bad_batch='skip': skipping {self._where(batch_idx)}: {where} "
            f"({self.skipped_batches} batch(es) skipped so far)",
            category=RuntimeWarning,
        )
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=1)
        return loss

    def current_tsd_weight(self) -> float:
        """``w_tsd`` at this step: 0 before ``tsd_start`` and off the ``tsd_every_n_steps`` grid (times n on it
        with ``tsd_every_n_scale``), ramped during the warm-up, times ``tsd_weight_scale`` (1 unless a callback
        lowered it)."""
        hp = self.hparams
        total = self.trainer.estimated_stepping_batches if self._trainer is not None else None
        schedule = (hp.tsd_start, hp.tsd_warmup, hp.tsd_every_n_steps)
        weight = float(hp.tsd_weight) * self.tsd_weight_scale
        return tsd_weight_at(self.global_step, total, weight, *schedule, scale_by_n=hp.tsd_every_n_scale)

    def _where(self, batch_idx: int) -> str:
        return f"batch {batch_idx} of epoch {self.current_epoch} (global step {self.global_step})"

    def _unpack(self, batch: Any, batch_idx: int, deferred: bool = False) -> Batch:
        try:
            b = unpack_batch(batch, num_classes=self.num_classes, deferred=deferred)
        except InvalidBatchError as err:
            raise InvalidBatchError(f"bad {self._where(batch_idx)}: {err}") from err
        if b.y is None and self.hparams.ce_weight > 0 and self.training:
            raise InvalidBatchError(f"batch {batch_idx} has no labels y but ce_weight > 0; set ce_weight=0")
        if self.training:
            check_batchnorm_batch(self.student, b.x, self._where(batch_idx))
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), None)
        if dtype is not None and b.x.dtype != dtype:
            b = b._replace(x=b.x.to(dtype))  # float64 data into a float32 student (and the converse)
        return b

    def _read_classes(self, b: Batch) -> None:
        """On the first batch: the class count from the models' outputs (one no-grad forward each; a cache
        that already holds the teacher's logits answers for the teacher)."""
        if self._classes_read:
            return
        cache = self.teacher_cache
        cached = cache.logits.shape[1] if cache is not None and cache.logits is not None else None
        k = read_class_count(
            self.teacher, self.student, b.x[:2], None if b.mask is None else b.mask[:2], cached
        )
        if self.hparams.num_classes is not None and k != self.hparams.num_classes:
            raise ValueError(f"num_classes={self.hparams.num_classes} but the models predict {k} classes")
        if k != self.num_classes:
            with torch.inference_mode(False):  # the first batch may be a validation one, under inference mode
                self.num_classes, self.metrics = k, DistillationMetrics(k).to(self.device)
        self._classes_read = True

    def _any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (one all-reduce under DDP)."""
        strategy = self._trainer.strategy if self._trainer is not None else None
        return flag if strategy is None else bool(strategy.reduce_boolean_decision(flag, all=False))

    # ------------------------------------------------------------------ Lightning hooks
    def on_train_start(self) -> None:
        # the fill first: it leaves every random state (global, the loader's) as it found it
        if self.teacher_cache is not None and self.hparams.teacher_cache_precompute:
            self._fill_teacher_cache(self.trainer.train_dataloader)
        _compat.hand_over_restored_loader_state(self.trainer)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.guard.drop_gradients(optimizer)

    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self.teacher_cache.sync()
            self.source.end_epoch()

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        params = self._trained_parameters()
        optimizer = build_optimizer(params, self.optimizer, hp.lr, hp.weight_decay)
        if hp.scheduler is None:
            return optimizer
        scheduler = build_scheduler(optimizer, hp.scheduler, hp.lr, self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _fill_teacher_cache(self, loader: Any) -> None:
        """``teacher_cache_precompute``: one pass over the train loader before the first epoch (this process's
        shard under DDP; the rows are then exchanged), skipped when the cache already holds as many samples
        as the loader's dataset (restored from a checkpoint or a file) or the loader has no length. A batch the
        pass cannot fill (no ``index``, bad values, a teacher error) is left to the training step, which
        refuses, skips or fills it as it would without the pass."""
        cache = self.teacher_cache
        assert cache is not None
        if not isinstance(loader, DataLoader) or not math.isfinite(self.trainer.num_training_batches):
            return
        if len(cache) >= len(loader.dataset):  # type: ignore[arg-type]  # a finite loader's dataset is sized
            return
        trainer = self.trainer
        show = trainer.is_global_zero and trainer.progress_bar_callback is not None
        with _random_state_kept(loader, self.device), trainer.precision_plugin.train_step_context():
            for i, batch in enumerate(tqdm(_fresh(loader), "teacher cache", len(loader), disable=not show)):
                try:
                    b = self._unpack(move_data_to_device(batch, self.device), i)
                    if b.index is not None:
                        self.source.outputs(
                            b.x, b.y, b.mask, b.index, with_saliency=self._teacher_maps_needed
                        )
                except Exception:  # noqa: BLE001  # the step meets this batch again and says what is wrong
                    continue
        self.source.end_fill(sharded=trainer.world_size > 1)

    def precompute_teacher_cache(self, dataloader: Any) -> int:
        """Fill the teacher cache in one pass over ``dataloader`` (batches must carry ``index``); returns the
        number of cached samples. Call it before ``trainer.fit`` (under DDP every rank runs the whole loader).
        The cache is keyed to this teacher and its options first, so it can be saved."""
        self._key_teacher_cache()
        batches = (self._unpack(move_data_to_device(b, self.device), i) for i, b in enumerate(dataloader))
        return self.source.precompute(batches, with_saliency=self._teacher_maps_needed)


def _fresh(loader: DataLoader) -> DataLoader:
    """A loader whose iteration leaves ``loader``'s own iterator alone: iterating a loader with persistent
    workers resets the one iterator it keeps, which the fit loop already holds."""
    if not (loader.persistent_workers and loader.num_workers > 0):
        return loader
    batching: dict[str, Any] = (
        {"batch_sampler": loader.batch_sampler}
        if loader.batch_sampler is not None
        else {"sampler": loader.sampler, "batch_size": None}
    )
    return DataLoader(
        loader.dataset, **batching, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
    )  # fmt: skip


@contextmanager
def _random_state_kept(loader: DataLoader, device: torch.device) -> Iterator[None]:
    """Iterate ``loader`` without moving any random state: the global one (an iterator draws its workers'
    seed there, a sampler without a generator its order) and the generators of the loader and its samplers,
    so that the fit shuffles as it would without the pass. The pass draws from a global stream of its own:
    a random augmentation then differs from the first epoch's, and the cache's input check refuses it."""
    samplers = (loader, loader.sampler, getattr(loader.batch_sampler, "sampler", None))
    generators = {id(g): g for g in (getattr(s, "generator", None) for s in samplers) if g is not None}
    states = {key: g.get_state() for key, g in generators.items() if isinstance(g, torch.Generator)}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.default_generator.manual_seed((torch.initial_seed() + 1) % 2**63)
        yield
    for key, state in states.items():
        generators[key].set_state(state)
