"""Lightning callbacks that watch how closely a student's temporal saliency follows its teacher's.

Protocol: the callbacks work with any ``LightningModule`` that has two ``nn.Module`` attributes,
``teacher`` and ``student``, each mapping ``x`` ``(B, C, T)`` (and, if its ``forward`` accepts it, a
``mask=`` keyword) to logits ``(B, K)``. They never import the distiller, and they unpack batches with
:func:`lightning_tsd._batch.unpack_batch` (``(x, y)``, ``(x, y, index)`` or a dict with ``x``, ``y``,
``mask``, ``index``).

Saliency here is :func:`lightning_tsd.attribution.temporal_attribution`: a captum attribution
(``integrated_gradients``, ``gradient``, ``input_x_gradient``, ``occlusion`` or ``feature_ablation``, with
the options of the training estimators: ``steps``, ``window``, ``stride``) for the target class (the
teacher's prediction, or the label), with padded steps set to 0. Both models run in eval mode (their
``training`` flags are restored afterwards), with gradients enabled and out of inference mode, so it runs
inside Lightning's validation and test loops.

Example:
    >>> from lightning.pytorch import Trainer
    >>> callbacks = [SaliencyAlignmentMonitor(method="gradient"), SaliencyMapLogger(num_samples=2)]
    >>> trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from lightning_tsd._batch import Batch, unpack_batch
from lightning_tsd.attribution import (
    SALIENCY_TARGETS,
    check_attribution_options,
    saliency_pair,
    temporal_attribution,
)
from lightning_tsd.metrics import SaliencyAlignment
from lightning_tsd.plotting import figure_to_rgb, plot_saliency
from lightning_tsd.weight_guard import ReduceTSDWeightOnAgreementDrop

__all__ = [
    "SaliencyAlignmentMonitor",
    "SaliencyMapLogger",
    "ReduceTSDWeightOnAgreementDrop",
    "teacher_student",
]

_STAGES = ("validate", "test")


def _temporal_attribution(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    method: str = "integrated_gradients",
    method_kwargs: Mapping[str, Any] | None = None,
) -> Tensor:
    """Deprecated: use :func:`lightning_tsd.attribution.temporal_attribution`."""
    warnings.warn(
        "lightning_tsd.callbacks._temporal_attribution is deprecated; use "
        "lightning_tsd.attribution.temporal_attribution(model, x, target, mask=..., method=..., **options)",
        DeprecationWarning,
        stacklevel=2,
    )
    method, options = check_attribution_options(method, method_kwargs)
    return temporal_attribution(model, x, target, mask=mask, method=method, **options)


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def teacher_student(pl_module: LightningModule) -> tuple[nn.Module, nn.Module]:
    """The module's ``teacher`` and ``student``, or a ``MisconfigurationException`` saying what to add.

    Example:
        >>> module = LightningModule()
        >>> module.teacher, module.student = nn.Linear(2, 2), nn.Linear(2, 1)
        >>> teacher_student(module)[1] is module.student
        True
    """
    teacher, student = getattr(pl_module, "teacher", None), getattr(pl_module, "student", None)
    if not (isinstance(teacher, nn.Module) and isinstance(student, nn.Module)):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} needs nn.Module attributes `teacher` and `student` for the "
            "saliency callbacks; add them (e.g. self.teacher = teacher; self.student = student)"
        )
    return teacher, student


def _every_n_epochs(trainer: Trainer, n: int) -> bool:
    return not trainer.sanity_checking and (trainer.current_epoch + 1) % n == 0


# --- callbacks --------------------------------------------------------------------------------------


class SaliencyAlignmentMonitor(Callback):
    """Log how well the student's saliency maps align with the teacher's, during validation and test.

    On the first ``max_batches`` batches of each validation epoch (every ``every_n_epochs`` epochs; not
    during the sanity check) and of each test epoch, it attributes both models and updates a
    :class:`~lightning_tsd.metrics.SaliencyAlignment` metric; at epoch end it logs
    ``{val,test}/saliency_{spearman,pearson,cosine,topk_overlap}``. The metric syncs across ranks.

    Args:
        method: attribution method, one of ``integrated_gradients``, ``gradient``, ``input_x_gradient``,
            ``occlusion``, ``feature_ablation`` (``"saliency"``, captum's name of ``gradient``, is
            deprecated).
        target: class to attribute: ``"teacher"`` (its prediction) or ``"label"`` (``y``).
        max_batches: batches per epoch to attribute.
        every_n_epochs: validation epochs between two measurements (test always measures).
        stages: loops to watch, among ``"validate"`` (also the validation inside ``fit``) and ``"test"``.
        options: the method's options (e.g. ``{"steps": 16}`` for integrated gradients, ``window`` and
            ``stride`` for occlusion); see :func:`lightning_tsd.attribution.temporal_attribution`.
        topk_fraction: fraction of the real steps used for top-k overlap.
        method_kwargs: deprecated name of ``options``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = SaliencyAlignmentMonitor(method="gradient", max_batches=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        method: str = "integrated_gradients",
        target: str = "teacher",
        max_batches: int = 4,
        every_n_epochs: int = 1,
        stages: Sequence[str] = _STAGES,
        options: Mapping[str, Any] | None = None,
        topk_fraction: float = 0.1,
        *,
        method_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        method, options = check_attribution_options(method, options, method_kwargs)
        _check_choice("target", target, SALIENCY_TARGETS)
        _check_positive("max_batches", max_batches)
        _check_positive("every_n_epochs", every_n_epochs)
        for stage in stages:
            _check_choice("each of stages", stage, _STAGES)
        self.method, self.target, self.options = method, target, options
        self.max_batches, self.every_n_epochs, self.stages = max_batches, every_n_epochs, tuple(stages)
        self.metric = SaliencyAlignment(topk_fraction=topk_fraction)
        self._active = False
        self._seen = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        teacher_student(pl_module)

    def _start(self, pl_module: LightningModule, active: bool) -> None:
        self._active, self._seen = active, 0
        self.metric.reset()
        self.metric.to(pl_module.device)

    def _update(self, pl_module: LightningModule, batch: Any) -> None:
        if not self._active or self._seen >= self.max_batches:
            return
        self._seen += 1
        teacher, student = teacher_student(pl_module)
        b = unpack_batch(batch)
        pair = saliency_pair(teacher, student, b, method=self.method, target=self.target, **self.options)
        self.metric.update(pair.student_saliency, pair.teacher_saliency, b.mask)

    def _log(self, pl_module: LightningModule, prefix: str) -> None:
        if not self._active:
            return
        values = self.metric.compute()  # already synced across ranks by torchmetrics
        pl_module.log_dict({f"{prefix}/saliency_{k}": v for k, v in values.items()}, sync_dist=True)
        self.metric.reset()
        self._active = False

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module, "validate" in self.stages and _every_n_epochs(trainer, self.every_n_epochs))

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(pl_module, batch)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "val")

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module, "test" in self.stages)

    def on_test_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._update(pl_module, batch)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(pl_module, "test")


class SaliencyMapLogger(Callback):
    """Draw the teacher's and the student's saliency maps of a few validation samples, each epoch.

    The first ``num_samples`` samples of the first validation batch are kept; at the end of every
    ``every_n_epochs``-th validation epoch (rank zero only) each gets a
    :func:`~lightning_tsd.plotting.plot_saliency` figure titled with both models' predicted classes. The
    figures go to every ``WandbLogger`` (``log_image(key="saliency_maps")``) and ``TensorBoardLogger``
    (``add_figure("saliency_maps/sample_{i}")``); with neither, or when ``dirpath`` is given, they are
    saved as ``{dirpath}/epoch={e}_sample={i}.png`` (default dirpath: ``{trainer.log_dir}/saliency_maps``).

    Args:
        num_samples: samples to draw.
        every_n_epochs: validation epochs between two drawings.
        method: attribution method, as in :class:`SaliencyAlignmentMonitor`.
        target: ``"teacher"`` or ``"label"``.
        dirpath: folder for PNG files.
        options: the method's options, as in :class:`SaliencyAlignmentMonitor`.
        method_kwargs: deprecated name of ``options``.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SaliencyMapLogger(num_samples=2)], enable_progress_bar=False)
    """

    def __init__(
        self,
        num_samples: int = 4,
        every_n_epochs: int = 1,
        method: str = "integrated_gradients",
        target: str = "teacher",
        dirpath: str | Path | None = None,
        options: Mapping[str, Any] | None = None,
        *,
        method_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        _check_positive("num_samples", num_samples)
        _check_positive("every_n_epochs", every_n_epochs)
        method, options = check_attribution_options(method, options, method_kwargs)
        _check_choice("target", target, SALIENCY_TARGETS)
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.method, self.target, self.options = method, target, options
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._png_dir: Path | None = self.dirpath
        self._samples: Batch | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        teacher_student(pl_module)
        if self.dirpath is None:  # trainer.log_dir broadcasts: resolve it here, on every rank
            self._png_dir = Path(trainer.log_dir or trainer.default_root_dir) / "saliency_maps"

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._samples is None and batch_idx == 0 and dataloader_idx == 0:
            b = unpack_batch(batch)
            n = min(self.num_samples, b.x.shape[0])
            self._samples = Batch._make(None if t is None else t[:n].detach().clone() for t in b)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._samples is not None and _every_n_epochs(trainer, self.every_n_epochs):
            self._draw(trainer, pl_module)

    @rank_zero_only
    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        teacher, student = teacher_student(pl_module)
        assert self._samples is not None  # on_validation_epoch_end draws only with samples
        b = Batch._make(None if t is None else t.to(pl_module.device) for t in self._samples)
        pair = saliency_pair(teacher, student, b, method=self.method, target=self.target, **self.options)
        figures = []
        for i in range(b.x.shape[0]):
            name = f"sample {i}" if b.index is None else f"index {int(b.index[i])}"
            label = "" if b.y is None else f", label {int(b.y[i])}"
            title = (
                f"{name}{label}: teacher predicts {int(pair.teacher_logits[i].argmax())}, "
                f"student {int(pair.student_logits[i].argmax())}"
            )
            mask = None if b.mask is None else b.mask[i]
            figures.append(
                plot_saliency(b.x[i], pair.teacher_saliency[i], pair.student_saliency[i], mask, title)
            )
        self._send(trainer, figures)
        for fig in figures:  # figures are not tracked by pyplot: clearing them frees their artists
            fig.clear()

    def _send(self, trainer: Trainer, figures: list) -> None:
        step, sent = trainer.global_step, False
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="saliency_maps", images=[figure_to_rgb(f) for f in figures], step=step)
                sent = True
            elif isinstance(logger, TensorBoardLogger):
                for i, fig in enumerate(figures):
                    logger.experiment.add_figure(
                        f"saliency_maps/sample_{i}", fig, global_step=step, close=False
                    )
                sent = True
        if not sent or self.dirpath is not None:
            assert self._png_dir is not None  # the dirpath, or set by setup()
            self._png_dir.mkdir(parents=True, exist_ok=True)
            for i, fig in enumerate(figures):
                fig.savefig(self._png_dir / f"epoch={trainer.current_epoch}_sample={i}.png")
