"""``SaliencyMapLogger``: figures of the teacher's and the student's saliency maps of a few validation
samples, sent to W&B, TensorBoard or PNG files."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_tsd._batch import Batch, unpack_batch
from lightning_tsd.attribution import SALIENCY_TARGETS, check_attribution_options, saliency_pair
from lightning_tsd.callbacks._common import check_choice, check_positive, on_epoch_grid, teacher_student
from lightning_tsd.plotting import figure_to_rgb, plot_saliency

__all__ = ["SaliencyMapLogger"]


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
        method: attribution method, as in :class:`~lightning_tsd.callbacks.SaliencyAlignmentMonitor`.
        target: ``"teacher"`` or ``"label"``.
        dirpath: folder for PNG files.
        options: the method's options, as in :class:`~lightning_tsd.callbacks.SaliencyAlignmentMonitor`.
        method_kwargs: deprecated name of ``options`` (removed in 0.3.0).

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
        check_positive("num_samples", num_samples)
        check_positive("every_n_epochs", every_n_epochs)
        method, options = check_attribution_options(method, options, method_kwargs)
        check_choice("target", target, SALIENCY_TARGETS)
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.method, self.target, self.options = method, target, options
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._png_dir: Path | None = self.dirpath
        self._samples: Batch | None = None

    def _should_keep(self, batch_idx: int, dataloader_idx: int) -> bool:
        """Whether this validation batch gives the samples to draw (the first one, once); no side effect."""
        return self._samples is None and batch_idx == 0 and dataloader_idx == 0

    def _should_draw(self, epoch: int, sanity_checking: bool) -> bool:
        """Whether this validation epoch is drawn (samples kept, on the ``every_n_epochs`` grid); no side effect.

        Example:
            >>> SaliencyMapLogger(every_n_epochs=2)._should_draw(1, sanity_checking=False)  # no samples yet
            False
        """
        return self._samples is not None and on_epoch_grid(epoch, self.every_n_epochs, sanity_checking)

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
        if self._should_keep(batch_idx, dataloader_idx):
            b = unpack_batch(batch)
            n = min(self.num_samples, b.x.shape[0])
            self._samples = Batch._make(None if t is None else t[:n].detach().clone() for t in b)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._should_draw(trainer.current_epoch, trainer.sanity_checking):
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
