"""``TemporalSaliencyDistiller``: a LightningModule that distils a frozen teacher into a student with TSD.

The training step reads top to bottom: unpack and validate the batch, get the teacher's logits and
saliency (from the cache or one live teacher forward), run the student once (its logits and its
differentiable saliency come from the same forward), add up the losses, log.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from lightning_tsd._batch import Batch, InvalidBatchError, NonFiniteLossError, call_model, unpack_batch
from lightning_tsd.cache import TeacherCache
from lightning_tsd.checkpoint import build_from_spec, load_teacher, model_spec
from lightning_tsd.losses import (
    BASE_LOSSES,
    BaseLoss,
    TemporalSaliencyLoss,
    dkd_loss,
    kd_loss,
    teacher_outputs,
)
from lightning_tsd.metrics import TeacherAgreement, TeacherStudentDivergence

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
}
SCHEDULERS = ("cosine", "onecycle")
SUPPORTED_STRATEGIES = "single-device, 'ddp', 'ddp_spawn', 'ddp_fork' / 'ddp_notebook'"
BAD_BATCH_POLICIES = ("raise", "skip")


def infer_num_classes(model: nn.Module) -> int | None:
    """The number of classes a model predicts: ``model.num_classes`` if set, else the ``out_features``
    of its last ``nn.Linear`` (None when neither exists)."""
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1].out_features if linears else None


def _resolve_model(model: nn.Module | str | dict, role: str) -> nn.Module:
    if isinstance(model, nn.Module):
        return model
    if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
        return load_teacher(model)
    if isinstance(model, dict) and "class_path" in model:
        return build_from_spec(model)
    raise TypeError(
        f"the {role} must be a torch.nn.Module, a path to a teacher file, or a "
        f"{{'class_path', 'init_args'}} dict; got {type(model).__name__}"
    )


class TemporalSaliencyDistiller(pl.LightningModule):
    """Distil a frozen ``teacher`` into a ``student`` with a base KD loss plus Temporal Saliency Distillation.

    ``L = ce_weight * CE(z_S, y) + kd_weight * L_base(z_S, z_T) + w_tsd * L_TSD(s_S, s_T)``, where the
    saliency maps ``s`` say how much each timestep matters to each model's prediction. ``forward(x)`` is
    the student.

    Args:
        teacher: trained teacher (``nn.Module``), a path to a teacher file (loaded with
            ``weights_only=True``) or a ``{"class_path", "init_args"}`` dict. Frozen and kept in eval
            mode for the whole fit; never in the optimizer.
        student: the model to train.
        base_loss: ``"kd"`` (Hinton), ``"dkd"`` (decoupled KD), ``"none"``, or a callable
            ``(student_logits, teacher_logits, y) -> loss``.
        ce_weight: weight of the cross-entropy on labels (0 allows unlabeled batches).
        kd_weight: weight of the base loss.
        tsd_weight: weight ``w_tsd`` of the TSD term; 0 is exactly the base method and computes no saliency.
        temperature: KD temperature ``tau``.
        saliency: estimator: ``"gradient"``, ``"input_x_gradient"``, ``"integrated_gradients"``, ``"occlusion"``.
        saliency_options: estimator options: ``steps`` (IG), ``window``/``stride`` (occlusion).
        saliency_target: ``"teacher"`` (the teacher's predicted class) or ``"label"``.
        saliency_temperature: ``tau_s`` of the ``"kl"`` alignment.
        alignment: ``"kl"``, ``"pearson"`` or ``"cosine"``.
        tsd_warmup: fraction of the fit's optimizer steps over which ``w_tsd`` ramps up linearly from 0.
        tsd_every_n_steps: compute the TSD term every n-th step only (cheaper; the other steps are plain KD).
        dkd_alpha: DKD's TCKD weight.
        dkd_beta: DKD's NCKD weight.
        student_train_mode: train the student in train mode (default). False keeps it in eval mode
            (BatchNorm running statistics, no dropout), which makes each sample's saliency independent of
            the rest of the batch.
        lr: learning rate.
        optimizer: ``"adam"``, ``"adamw"``, ``"sgd"``, or a callable ``params -> Optimizer``.
        weight_decay: optimizer weight decay.
        scheduler: None, ``"cosine"`` (cosine annealing over the fit) or ``"onecycle"``.
        teacher_cache: True (or a :class:`TeacherCache`) keeps the teacher's logits and saliency per
            sample ``index``; batches without an index are served live.
        num_classes: number of classes, if it cannot be read off the models.
        on_bad_batch: what a training batch with non-finite values in ``x``, or a step whose loss comes
            out NaN/Inf, does. ``"raise"`` (default): :class:`InvalidBatchError` /
            :class:`NonFiniteLossError` before the optimizer step. ``"skip"``: the step is skipped on every
            process (under DDP the decision is all-reduced, so ranks never diverge or hang): no parameter,
            optimizer-state or BatchNorm-statistics change, a rank-zero warning, and the running count
            logged as ``train/skipped_batches`` (kept in checkpoints). Other bad batches (wrong shape,
            dtype, labels, mask) always raise.

    Inputs: a floating ``x`` whose dtype differs from the student's parameters (float64 data, a float32
    batch under ``precision="64-true"``) is cast to the student's parameter dtype; integer ``x`` is refused.

    Example:
        >>> teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))
        >>> student = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(32, 3))
        >>> distiller = TemporalSaliencyDistiller(teacher, student, tsd_weight=2.0)
        >>> distiller(torch.randn(4, 1, 32)).shape
        torch.Size([4, 3])
    """

    def __init__(
        self,
        teacher: nn.Module | str | dict,
        student: nn.Module | dict,
        base_loss: str | BaseLoss = "kd",
        ce_weight: float = 1.0,
        kd_weight: float = 1.0,
        tsd_weight: float = 0.25,
        temperature: float = 4.0,
        saliency: str = "integrated_gradients",
        saliency_options: dict[str, Any] | None = None,
        saliency_target: str = "teacher",
        saliency_temperature: float = 1.0,
        alignment: str = "pearson",
        tsd_warmup: float = 0.0,
        tsd_every_n_steps: int = 1,
        dkd_alpha: float = 1.0,
        dkd_beta: float = 8.0,
        student_train_mode: bool = True,
        lr: float = 3e-3,
        optimizer: str | Callable[..., torch.optim.Optimizer] = "adam",
        weight_decay: float = 0.0,
        scheduler: str | None = None,
        teacher_cache: bool | TeacherCache = False,
        num_classes: int | None = None,
        on_bad_batch: str = "raise",
    ) -> None:
        super().__init__()
        if on_bad_batch not in BAD_BATCH_POLICIES:
            raise ValueError(f"on_bad_batch must be one of {list(BAD_BATCH_POLICIES)}, got {on_bad_batch!r}")
        teacher_hparam = teacher if isinstance(teacher, (str, dict)) else None
        teacher = _resolve_model(teacher, "teacher")
        student = _resolve_model(student, "student")
        self._check_options(base_loss, tsd_weight, tsd_warmup, tsd_every_n_steps, optimizer, scheduler)
        self.save_hyperparameters(ignore=["teacher", "student", "teacher_cache", "base_loss", "optimizer"])
        # Record how to rebuild the models where that is known, so load_from_checkpoint needs no arguments.
        self.hparams["teacher"] = teacher_hparam or model_spec(teacher)
        self.hparams["student"] = model_spec(student)
        self.hparams["base_loss"] = (
            base_loss if isinstance(base_loss, str) else getattr(base_loss, "__name__", "callable")
        )
        self.hparams["optimizer"] = (
            optimizer if isinstance(optimizer, str) else getattr(optimizer, "__name__", "callable")
        )
        self.hparams["teacher_cache"] = bool(teacher_cache)

        self.teacher = teacher.requires_grad_(False).eval()
        self.student = student if student_train_mode else student.eval()
        self.num_classes = self._check_class_counts(num_classes)
        self.base_loss = base_loss
        self.optimizer = optimizer
        self.tsd = TemporalSaliencyLoss(
            saliency, alignment, saliency_temperature, saliency_target, **(saliency_options or {})
        )
        self.teacher_cache = (
            teacher_cache
            if isinstance(teacher_cache, TeacherCache)
            else TeacherCache()
            if teacher_cache
            else None
        )
        self.metrics = nn.ModuleDict({stage: self._stage_metrics() for stage in ("val", "test")})
        # top-1 agreement of the training batches, logged per epoch as train/agreement (synced across ranks)
        self.train_agreement = TeacherAgreement()
        # multiplies tsd_weight; lowered by callbacks such as ReduceTSDWeightOnAgreementDrop
        self.tsd_weight_scale = 1.0
        self._last_logits: tuple[Tensor, Tensor] | None = None
        self.skipped_batches = 0  # training batches skipped by on_bad_batch="skip" (all ranks agree)
        self._good_batches_since_step = 0

    # ------------------------------------------------------------------ set-up checks
    @staticmethod
    def _check_options(base_loss, tsd_weight, tsd_warmup, tsd_every_n_steps, optimizer, scheduler) -> None:
        if not (callable(base_loss) or base_loss in BASE_LOSSES):
            raise ValueError(
                f"unknown base_loss {base_loss!r}; choose one of {list(BASE_LOSSES)} or pass a callable"
            )
        if tsd_weight < 0 or not math.isfinite(tsd_weight):
            raise ValueError(f"tsd_weight must be a finite number >= 0, got {tsd_weight}")
        if not 0.0 <= tsd_warmup < 1.0:
            raise ValueError(f"tsd_warmup is a fraction of the fit in [0, 1), got {tsd_warmup}")
        if tsd_every_n_steps < 1:
            raise ValueError(f"tsd_every_n_steps must be >= 1, got {tsd_every_n_steps}")
        if not (callable(optimizer) or optimizer in OPTIMIZERS):
            raise ValueError(
                f"unknown optimizer {optimizer!r}; choose one of {list(OPTIMIZERS)} or pass a callable"
            )
        if scheduler is not None and scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {scheduler!r}; choose None or one of {list(SCHEDULERS)}")

    def _check_class_counts(self, num_classes: int | None) -> int | None:
        teacher_k, student_k = infer_num_classes(self.teacher), infer_num_classes(self.student)
        if teacher_k is not None and student_k is not None and teacher_k != student_k:
            raise ValueError(
                f"teacher and student predict different numbers of classes: teacher {teacher_k}, student {student_k}"
            )
        known = teacher_k if teacher_k is not None else student_k
        if num_classes is not None and known is not None and num_classes != known:
            raise ValueError(f"num_classes={num_classes} but the models predict {known} classes")
        return num_classes if num_classes is not None else known

    def _stage_metrics(self) -> MetricCollection:
        metrics = {"agreement": TeacherAgreement(), "divergence": TeacherStudentDivergence()}
        if self.num_classes is not None:
            metrics["acc"] = MulticlassAccuracy(self.num_classes, average="micro")
            metrics["teacher_acc"] = MulticlassAccuracy(self.num_classes, average="micro")
        metrics["loss"] = MeanMetric(
            nan_strategy="disable"
        )  # the student's CE on labelled batches (NaN stays NaN)
        return MetricCollection(metrics, compute_groups=False)

    def setup(self, stage: str) -> None:
        strategy = type(self.trainer.strategy).__name__ if self._trainer is not None else ""
        if "FSDP" in strategy or "DeepSpeed" in strategy:
            raise ValueError(
                f"{strategy} is not supported: TSD needs a double backward through the student, which "
                f"sharded strategies do not provide. Use one of: {SUPPORTED_STRATEGIES}"
            )
        if self.hparams.tsd_weight > 0 and any(
            isinstance(m, nn.SyncBatchNorm) for m in self.student.modules()
        ):
            raise ValueError(
                "the student has SyncBatchNorm layers, which have no double backward: set "
                "Trainer(sync_batchnorm=False), or student_train_mode=False"
            )

    # ------------------------------------------------------------------ modes
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

    # ------------------------------------------------------------------ pieces of a step
    def _where(self, batch_idx: int) -> str:
        return f"batch {batch_idx} of epoch {self.current_epoch} (global step {self.global_step})"

    def _unpack(self, batch: Any, batch_idx: int, check_values: bool = True) -> Batch:
        try:
            b = unpack_batch(batch, num_classes=self.num_classes, check_values=check_values)
        except InvalidBatchError as err:
            raise InvalidBatchError(f"bad {self._where(batch_idx)}: {err}") from err
        dtype = next((p.dtype for p in self.student.parameters() if p.is_floating_point()), None)
        if dtype is not None and b.x.dtype != dtype:
            b = b._replace(x=b.x.to(dtype))  # float64 data into a float32 student (and the converse)
        return b

    def _check_batchnorm_batch(self, b: Batch, batch_idx: int) -> None:
        """Train-mode BatchNorm cannot normalise a single value per channel: say so before torch does."""
        if b.x.shape[0] * b.x.shape[-1] > 1 or not self.student.training:
            return
        if any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in self.student.modules()):
            raise InvalidBatchError(
                f"bad {self._where(batch_idx)}: the student has BatchNorm in train mode, which needs more than "
                f"one value per channel, but the batch holds one sample of one step (shape {tuple(b.x.shape)}). "
                "Use DataLoader(drop_last=True), a larger batch, or student_train_mode=False"
            )

    def _buffer_snapshot(self) -> list[tuple[Tensor, Tensor]] | None:
        """Copies of the student's buffers (BatchNorm running statistics) when a forward may change them."""
        if not self.student.training:
            return None
        buffers = [t for t in self.student.buffers() if t is not None]
        return [(t, t.clone()) for t in buffers] if buffers else None

    @staticmethod
    def _restore(snapshot: list[tuple[Tensor, Tensor]] | None) -> None:
        if snapshot:
            with torch.no_grad():
                for tensor, saved in snapshot:
                    tensor.copy_(saved)

    @staticmethod
    def _finite(loss: Tensor, snapshot: list[tuple[Tensor, Tensor]] | None) -> bool:
        """The loss, and the student's floating buffers a forward may have updated, are all finite
        (one host sync)."""
        checks = [torch.isfinite(loss).all()]
        checks += [torch.isfinite(t).all() for t, _ in snapshot or () if t.is_floating_point()]
        return bool(torch.stack(checks).all()) if len(checks) > 1 else bool(checks[0])

    def _any_rank(self, flag: bool) -> bool:
        """True on every process when ``flag`` is True on any (one all-reduce under DDP)."""
        if self._trainer is None:
            return flag
        return bool(self.trainer.strategy.reduce_boolean_decision(flag, all=False))

    def _check_logits(self, logits: Tensor, who: str) -> None:
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ValueError(
                f"the {who} returned {logits.shape[1]} classes but {self.num_classes} were expected"
            )

    def current_tsd_weight(self) -> float:
        """``w_tsd`` at this step: 0 off the ``tsd_every_n_steps`` grid, ramped during the warm-up, times
        ``tsd_weight_scale`` (1 unless a callback lowered it)."""
        weight = float(self.hparams.tsd_weight) * self.tsd_weight_scale
        if weight == 0 or self.global_step % self.hparams.tsd_every_n_steps:
            return 0.0
        warmup = self.hparams.tsd_warmup
        if warmup > 0 and self._trainer is not None:
            ramp_steps = max(1, int(warmup * self.trainer.estimated_stepping_batches))
            weight *= min(1.0, self.global_step / ramp_steps)
        return weight

    def teacher_outputs(
        self, b: Batch, with_saliency: bool, use_cache: bool = True
    ) -> tuple[Tensor, Tensor | None]:
        """The teacher's logits (and saliency) for a batch: cached rows where possible (misses are
        computed live and cached), everything live without a cache or an ``index``."""
        cache = self.teacher_cache if use_cache and b.index is not None else None
        # Cached rows must hold saliency whenever the fit uses TSD at all, even on steps without it.
        compute_saliency = with_saliency or (cache is not None and self.hparams.tsd_weight > 0)
        label_target = b.y if self.tsd.saliency_target == "label" else None

        def live(rows: slice | Tensor) -> tuple[Tensor, Tensor | None]:
            return teacher_outputs(
                self.teacher,
                b.x[rows],
                None if label_target is None else label_target[rows],
                saliency=self.tsd.saliency if compute_saliency else None,
                mask=None if b.mask is None else b.mask[rows],
                **self.tsd.saliency_options,
            )

        if cache is None:
            logits, saliency = live(slice(None))
            return logits, saliency if with_saliency else None
        hit, logits, saliency = cache.get(b.index, b.x)
        if compute_saliency and logits is not None and saliency is None:
            hit, logits = torch.zeros_like(hit), None  # cached before saliency was needed: recompute
        if not bool(hit.all()):
            miss = ~hit
            miss_logits, miss_saliency = live(miss)
            cache.put(b.index[miss], miss_logits, miss_saliency, b.x[miss])
            if logits is None:
                logits, saliency = miss_logits, miss_saliency
            else:
                logits = logits.clone()
                logits[miss] = miss_logits
                if miss_saliency is not None:
                    saliency = saliency.clone()
                    saliency[miss] = miss_saliency
        return logits, saliency if with_saliency else None

    def base_loss_value(
        self, student_logits: Tensor, teacher_logits: Tensor, y: Tensor | None
    ) -> Tensor | None:
        """The base distillation loss (None for ``base_loss="none"``)."""
        if self.base_loss == "kd":
            return kd_loss(student_logits, teacher_logits, self.hparams.temperature)
        if self.base_loss == "dkd":
            if y is None:
                raise InvalidBatchError("base_loss='dkd' needs labels y in every batch")
            return dkd_loss(
                student_logits,
                teacher_logits,
                y,
                self.hparams.dkd_alpha,
                self.hparams.dkd_beta,
                self.hparams.temperature,
            )
        if self.base_loss == "none":
            return None
        return self.base_loss(student_logits, teacher_logits, y)

    # ------------------------------------------------------------------ Lightning hooks
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        skip_mode = self.hparams.on_bad_batch == "skip"
        b = self._unpack(batch, batch_idx, check_values=not skip_mode)  # "raise": NaN/Inf in x raise here
        if b.y is None and self.hparams.ce_weight > 0:
            raise InvalidBatchError(f"batch {batch_idx} has no labels y but ce_weight > 0; set ce_weight=0")
        self._check_batchnorm_batch(b, batch_idx)
        tsd_weight = self.current_tsd_weight()
        snapshot = (
            self._buffer_snapshot()
        )  # a refused or skipped step leaves BatchNorm statistics as they were
        loss, parts, reason = None, {}, self._nonfinite_input(b) if skip_mode else None
        if reason is None:
            try:
                loss, parts = self._losses(b, tsd_weight)
            except BaseException as err:
                self._restore(snapshot)
                if isinstance(err, RuntimeError):
                    err.add_note(
                        f"lightning-tsd: while training on {self._where(batch_idx)}, x of shape {tuple(b.x.shape)}"
                    )
                raise
            reason = self._nonfinite_loss(loss, parts, snapshot)
            if reason is not None and not skip_mode:
                self._restore(snapshot)
                raise NonFiniteLossError(
                    f"non-finite loss at {self._where(batch_idx)} ({reason}), before the optimizer step: the "
                    "inputs may be too large for the models' precision, or the student diverged. Pass "
                    "on_bad_batch='skip' to skip such batches"
                )
        if skip_mode and self._any_rank(reason is not None):
            self._restore(snapshot)
            return self._skip(batch_idx, reason, b.x.shape[0])

        self._good_batches_since_step += 1
        batch_size = b.x.shape[0]
        if self._last_logits is not None:
            self.train_agreement.update(*self._last_logits)
            self.log(
                "train/agreement", self.train_agreement, on_step=False, on_epoch=True, batch_size=batch_size
            )
            self._last_logits = None
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value.detach(), batch_size=batch_size)
        self.log("train/tsd_weight", tsd_weight, batch_size=batch_size)
        if skip_mode:
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch_size)
        return loss

    @staticmethod
    def _nonfinite_input(b: Batch) -> str | None:
        bad = int((~torch.isfinite(b.x)).sum())
        return f"x contains {bad} non-finite value(s) (NaN or Inf) out of {b.x.numel()}" if bad else None

    def _nonfinite_loss(
        self, loss: Tensor, parts: dict[str, Tensor], snapshot: list[tuple[Tensor, Tensor]] | None
    ) -> str | None:
        """Why this step must not reach the optimizer (a non-finite loss, or BatchNorm running statistics
        that overflowed), or None."""
        if self._finite(loss, snapshot):
            return None
        if not bool(torch.isfinite(loss)):
            return "the loss is not finite: " + ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
        return "the student's running statistics (BatchNorm buffers) overflowed to NaN/Inf"

    def _losses(self, b: Batch, tsd_weight: float) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total loss and its parts for a validated batch."""
        teacher_logits, teacher_saliency = self.teacher_outputs(b, with_saliency=tsd_weight > 0)
        self._check_logits(teacher_logits, "teacher")

        parts: dict[str, Tensor] = {}
        if tsd_weight > 0:
            out = self.tsd(self.teacher, self.student, b.x, b.y, b.mask, (teacher_logits, teacher_saliency))
            student_logits = out.student_logits
            parts["tsd"] = out.loss
        else:
            student_logits = call_model(self.student, b.x, b.mask)
        self._check_logits(student_logits, "student")
        if self.hparams.ce_weight > 0:
            parts["ce"] = F.cross_entropy(student_logits.float(), b.y)
        base = self.base_loss_value(student_logits.float(), teacher_logits.float(), b.y)
        if base is not None:
            parts["kd"] = base

        self._last_logits = (student_logits.detach(), teacher_logits.detach())
        weights = {"ce": self.hparams.ce_weight, "kd": self.hparams.kd_weight, "tsd": tsd_weight}
        loss = sum(weights[name] * value for name, value in parts.items())
        if "ce" not in parts and "kd" not in parts:
            # Parameters that only shift the logits (an output bias) get no gradient from a saliency map;
            # tie the logits in so DDP sees every parameter used (their gradient is exactly 0).
            loss = loss + 0.0 * student_logits.sum()
        return loss, parts

    def _skip(self, batch_idx: int, reason: str | None, batch_size: int) -> Tensor | None:
        """Skip this step on every rank: a zero loss that reaches every trainable parameter (so DDP's
        gradient all-reduce runs as usual and nobody waits), and ``on_before_optimizer_step`` drops the
        (zero) gradients so the optimizer changes nothing, its state included."""
        self.skipped_batches += 1
        self._last_logits = None  # a skipped batch does not count towards train/agreement
        where = reason if reason is not None else "a non-finite input or loss on another process"
        rank_zero_warn(
            f"on_bad_batch='skip': skipping {self._where(batch_idx)}: {where} "
            f"({self.skipped_batches} batch(es) skipped so far)",
            category=RuntimeWarning,
        )
        self.log("train/skipped_batches", float(self.skipped_batches), batch_size=batch_size)
        params = [p for p in self.student.parameters() if p.requires_grad]
        if not params:
            return None
        return torch.stack([p.sum() for p in params]).sum() * 0.0

    def on_train_start(self) -> None:
        # Lightning bug workaround (2.6): `estimated_stepping_batches` (which the cosine / one-cycle schedulers
        # read in `configure_optimizers`) builds the train loader *before* a checkpoint is restored, and
        # the fit loop then never hands the restored mid-epoch dataloader state to it, so a resumed fit
        # replays the epoch's first batches. Hand it over here, before the first batch is drawn.
        # The fetcher's iterator already exists by then: make a new one, so that loaders which apply a loaded
        # state when iterated (torchdata's StatefulDataLoader) resume too, not only lazy generators.
        fit_loop = self.trainer.fit_loop
        if getattr(fit_loop, "_combined_loader_states_to_load", None):
            fit_loop._load_combined_loader_states()
            if getattr(fit_loop, "_data_fetcher", None) is not None:
                iter(fit_loop._data_fetcher)

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._good_batches_since_step == 0 and self.hparams.on_bad_batch == "skip":
            # Every batch since the last step was skipped: drop the zero gradients, so that the optimizer
            # skips every parameter (no update, no weight decay, no moment or step-count change).
            for group in optimizer.param_groups:
                for p in group["params"]:
                    p.grad = None
        self._good_batches_since_step = 0

    def on_train_epoch_end(self) -> None:
        if self.teacher_cache is not None:
            self.teacher_cache.sync()

    def _eval_step(self, batch: Any, batch_idx: int, stage: str) -> None:
        b = self._unpack(batch, batch_idx)
        student_logits = call_model(self.student, b.x, b.mask)
        teacher_logits = call_model(self.teacher, b.x, b.mask)
        metrics = self.metrics[stage]
        metrics["agreement"].update(student_logits, teacher_logits)
        metrics["divergence"].update(student_logits, teacher_logits)
        if b.y is not None and "acc" in metrics:
            metrics["acc"].update(student_logits, b.y)
            metrics["teacher_acc"].update(teacher_logits, b.y)
            # a metric, not self.log(sync_dist=True): ranks whose batches lack labels must not skip a collective
            metrics["loss"].update(F.cross_entropy(student_logits.float(), b.y, reduction="none"))

    def _eval_epoch_end(self, stage: str) -> None:
        values: dict[str, Tensor] = {}
        for name, metric in self.metrics[stage].items():
            # One decision for all ranks: compute() syncs, so every rank must call it or none (a rank whose
            # batches had no labels has not updated the accuracy metrics, but others may have).
            if not self._any_rank(metric.update_called):
                continue
            result = metric.compute()
            if isinstance(result, dict):
                values.update({f"{stage}/{key}": value for key, value in result.items()})
            else:
                values[f"{stage}/{name}"] = result
            metric.reset()
        self.log_dict(values, prog_bar=stage == "val")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def on_validation_epoch_end(self) -> None:
        self._eval_epoch_end("val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def on_test_epoch_end(self) -> None:
        self._eval_epoch_end("test")

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        b = unpack_batch(batch)
        return call_model(self.student, b.x, b.mask)

    def configure_optimizers(self) -> Any:
        params = [p for p in self.student.parameters() if p.requires_grad]
        if callable(self.optimizer):
            optimizer = self.optimizer(params)
        else:
            optimizer = OPTIMIZERS[self.optimizer](
                params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
            )
        if self.hparams.scheduler is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total))
        else:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=self.hparams.lr, total_steps=max(1, total)
            )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ teacher cache
    def precompute_teacher_cache(self, dataloader: Any) -> int:
        """Fill the teacher cache in one pass over ``dataloader`` (batches must carry ``index``).

        Returns the number of cached samples. Call it before ``trainer.fit`` (under DDP every rank runs it
        over the whole loader, so each holds the whole cache).
        """
        if self.teacher_cache is None:
            raise ValueError("precompute_teacher_cache needs teacher_cache=True")
        for batch_idx, batch in enumerate(dataloader):
            b = self._unpack(move_data_to_device(batch, self.device), batch_idx)
            if b.index is None:
                raise ValueError(
                    "precompute_teacher_cache needs batches with an 'index' (use IndexedDataset)"
                )
            self.teacher_outputs(b, with_saliency=self.hparams.tsd_weight > 0, use_cache=True)
        self.teacher_cache.mark_synced()  # every rank ran the whole loader: nothing to exchange
        return len(self.teacher_cache)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["tsd_skipped_batches"] = self.skipped_batches
        checkpoint["tsd_weight_scale"] = self.tsd_weight_scale
        checkpoint["tsd_train_agreement"] = self._running_agreement_state()
        if self.teacher_cache is not None:
            checkpoint["tsd_teacher_cache"] = self.teacher_cache.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.skipped_batches = int(checkpoint.get("tsd_skipped_batches", 0))
        self.tsd_weight_scale = float(checkpoint.get("tsd_weight_scale", 1.0))
        # The running agreement was summed over ranks when saved: rank 0 takes it, the others start from zero,
        # so the synced epoch value counts every sample once.
        if self.global_rank == 0:
            for name, value in checkpoint.get("tsd_train_agreement", {}).items():
                if name in self.train_agreement.metric_state:
                    setattr(self.train_agreement, name, value.to(self.train_agreement.device))
        if self.teacher_cache is not None and "tsd_teacher_cache" in checkpoint:
            self.teacher_cache.load_state_dict(checkpoint["tsd_teacher_cache"])

    def _running_agreement_state(self) -> dict[str, Tensor]:
        """The epoch's running ``train/agreement`` state, summed over ranks, for a checkpoint taken mid-epoch
        (empty at an epoch's end: the state then still holds the finished epoch, which a resumed fit must not
        count again)."""
        trainer = self._trainer
        if trainer is None or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return {}
        state = {k: v.detach().clone() for k, v in self.train_agreement.metric_state.items()}
        if trainer.world_size > 1:  # every rank dumps the checkpoint (rank 0 writes it): a collective is safe
            state = {k: trainer.strategy.reduce(v, reduce_op="sum") for k, v in state.items()}
        return {k: v.cpu() for k, v in state.items()}
