"""Lightning callbacks that watch how closely a student's temporal saliency follows its teacher's.

Protocol: the callbacks work with any ``LightningModule`` that has two ``nn.Module`` attributes,
``teacher`` and ``student``, each mapping ``x`` ``(B, C, T)`` (and, if its ``forward`` accepts it, a
``mask=`` keyword) to logits ``(B, K)``. They never import the distiller, and they unpack batches with
:func:`lightning_tsd._batch.unpack_batch` (``(x, y)``, ``(x, y, index)`` or a dict with ``x``, ``y``,
``mask``, ``index``).

Saliency here is a captum attribution (``integrated_gradients``, ``saliency``, ``input_x_gradient``,
``occlusion`` or ``feature_ablation``) for the target class (the teacher's prediction, or the label),
reduced to time as ``|attribution|`` summed over channels, with padded steps set to 0. It is computed
with both models in eval mode (their ``training`` flags are restored afterwards), with gradients enabled
and out of inference mode, so it runs inside Lightning's validation and test loops. On a GPU, cuDNN is
switched off while attributing, because cuDNN RNNs have no backward in eval mode.

Example:
    >>> from lightning.pytorch import Trainer
    >>> callbacks = [SaliencyAlignmentMonitor(method="saliency"), SaliencyMapLogger(num_samples=2)]
    >>> trainer = Trainer(callbacks=callbacks, logger=False, enable_progress_bar=False)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from torch import Tensor, nn

from lightning_tsd._batch import Batch, call_model, unpack_batch
from lightning_tsd.metrics import SaliencyAlignment
from lightning_tsd.plotting import figure_to_rgb, plot_saliency

CAPTUM_METHODS = {
    "integrated_gradients": "IntegratedGradients",
    "saliency": "Saliency",
    "input_x_gradient": "InputXGradient",
    "occlusion": "Occlusion",
    "feature_ablation": "FeatureAblation",
}
_GRADIENT_METHODS = ("integrated_gradients", "saliency", "input_x_gradient")
SALIENCY_TARGETS = ("teacher", "label")
_STAGES = ("validate", "test")


# --- shared attribution code (also used by lightning_tsd.report) -----------------------------------


class _SaliencyPair(NamedTuple):
    teacher_logits: Tensor
    student_logits: Tensor
    teacher_saliency: Tensor
    student_saliency: Tensor


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _teacher_student(pl_module: LightningModule) -> tuple[nn.Module, nn.Module]:
    teacher, student = getattr(pl_module, "teacher", None), getattr(pl_module, "student", None)
    if not (isinstance(teacher, nn.Module) and isinstance(student, nn.Module)):
        raise MisconfigurationException(
            f"{type(pl_module).__name__} needs nn.Module attributes `teacher` and `student` for the "
            "saliency callbacks; add them (e.g. self.teacher = teacher; self.student = student)"
        )
    return teacher, student


@contextmanager
def _eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Put ``modules`` in eval mode, then restore every submodule's own ``training`` flag."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    try:
        for module in modules:
            module.eval()
        yield
    finally:
        for m, training in flags:
            m.training = training


@contextmanager
def _cudnn_off(device: torch.device) -> Iterator[None]:
    """Disable cuDNN on CUDA devices: cuDNN RNNs cannot backward in eval mode."""
    enabled = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = enabled and device.type != "cuda"
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = enabled


def _captum_defaults(method: str, x: Tensor) -> dict[str, Any]:
    """Perturbation methods act on whole time steps: all channels of a window (occlusion, a tenth of
    ``T``, half-overlapping) or of one step (feature ablation) are zeroed together."""
    channels, steps = x.shape[1:]
    if method == "occlusion":
        window = max(1, steps // 10)
        return {"sliding_window_shapes": (channels, window), "strides": (channels, max(1, window // 2))}
    if method == "feature_ablation":
        return {"feature_mask": torch.arange(steps, device=x.device).repeat(1, channels, 1)}
    return {}


def _logits(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    with torch.no_grad(), _eval_mode(model):
        return call_model(model, x, mask)


def _temporal_attribution(
    model: nn.Module,
    x: Tensor,
    target: Tensor,
    mask: Tensor | None = None,
    method: str = "integrated_gradients",
    method_kwargs: dict[str, Any] | None = None,
) -> Tensor:
    """``|captum attribution|`` of ``target`` summed over channels, ``(B, T)``, zero on padded steps."""
    _check_choice("method", method, CAPTUM_METHODS)
    try:
        import captum.attr
    except ImportError as err:  # pragma: no cover - captum is a dependency of the callbacks
        raise ImportError("the saliency callbacks need captum: pip install captum") from err
    explainer = getattr(captum.attr, CAPTUM_METHODS[method])

    def forward(inputs: Tensor, mask: Tensor | None = None) -> Tensor:
        return call_model(model, inputs, mask)

    with torch.inference_mode(False), torch.enable_grad(), _eval_mode(model), _cudnn_off(x.device):
        # Tensors made under inference mode cannot take part in autograd: clone them out of it.
        inputs = x.detach().clone().requires_grad_(method in _GRADIENT_METHODS)
        options = {**_captum_defaults(method, inputs), **(method_kwargs or {})}
        extra = None if mask is None else (mask.clone(),)
        attribution = explainer(forward).attribute(
            inputs, target=target.clone(), additional_forward_args=extra, **options
        )
    saliency = attribution.detach().abs().sum(1)
    return saliency if mask is None else saliency.masked_fill(~mask, 0.0)


def _saliency_pair(
    teacher: nn.Module,
    student: nn.Module,
    batch: Batch,
    method: str = "integrated_gradients",
    target: str = "teacher",
    method_kwargs: dict[str, Any] | None = None,
) -> _SaliencyPair:
    """Logits of both models and their saliency maps for the same target class (the teacher's
    prediction, or the label ``y``)."""
    _check_choice("target", target, SALIENCY_TARGETS)
    teacher_logits = _logits(teacher, batch.x, batch.mask)
    student_logits = _logits(student, batch.x, batch.mask)
    if target == "teacher":
        cls = teacher_logits.argmax(1)
    elif batch.y is None:
        raise ValueError(
            "target='label' needs labels y in the batch; use target='teacher' for unlabelled data"
        )
    else:
        cls = batch.y
    maps = [
        _temporal_attribution(m, batch.x, cls, batch.mask, method, method_kwargs) for m in (teacher, student)
    ]
    return _SaliencyPair(teacher_logits, student_logits, *maps)


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
        method: captum method, one of ``integrated_gradients``, ``saliency``, ``input_x_gradient``,
            ``occlusion``, ``feature_ablation``.
        target: class to attribute: ``"teacher"`` (its prediction) or ``"label"`` (``y``).
        max_batches: batches per epoch to attribute.
        every_n_epochs: validation epochs between two measurements (test always measures).
        stages: loops to watch, among ``"validate"`` (also the validation inside ``fit``) and ``"test"``.
        method_kwargs: passed to captum's ``attribute`` (e.g. ``{"n_steps": 16}`` for integrated gradients).
        topk_fraction: fraction of the real steps used for top-k overlap.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> monitor = SaliencyAlignmentMonitor(method="saliency", max_batches=2)
        >>> trainer = Trainer(callbacks=[monitor], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        method: str = "integrated_gradients",
        target: str = "teacher",
        max_batches: int = 4,
        every_n_epochs: int = 1,
        stages: Sequence[str] = _STAGES,
        method_kwargs: dict[str, Any] | None = None,
        topk_fraction: float = 0.1,
    ) -> None:
        _check_choice("method", method, CAPTUM_METHODS)
        _check_choice("target", target, SALIENCY_TARGETS)
        _check_positive("max_batches", max_batches)
        _check_positive("every_n_epochs", every_n_epochs)
        for stage in stages:
            _check_choice("each of stages", stage, _STAGES)
        self.method, self.target, self.method_kwargs = method, target, method_kwargs
        self.max_batches, self.every_n_epochs, self.stages = max_batches, every_n_epochs, tuple(stages)
        self.metric = SaliencyAlignment(topk_fraction=topk_fraction)
        self._active = False
        self._seen = 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _teacher_student(pl_module)

    def _start(self, pl_module: LightningModule, active: bool) -> None:
        self._active, self._seen = active, 0
        self.metric.reset()
        self.metric.to(pl_module.device)

    def _update(self, pl_module: LightningModule, batch: Any) -> None:
        if not self._active or self._seen >= self.max_batches:
            return
        self._seen += 1
        teacher, student = _teacher_student(pl_module)
        b = unpack_batch(batch)
        pair = _saliency_pair(teacher, student, b, self.method, self.target, self.method_kwargs)
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
        method: captum method, as in :class:`SaliencyAlignmentMonitor`.
        target: ``"teacher"`` or ``"label"``.
        dirpath: folder for PNG files.
        method_kwargs: passed to captum's ``attribute``.

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
        method_kwargs: dict[str, Any] | None = None,
    ) -> None:
        _check_positive("num_samples", num_samples)
        _check_positive("every_n_epochs", every_n_epochs)
        _check_choice("method", method, CAPTUM_METHODS)
        _check_choice("target", target, SALIENCY_TARGETS)
        self.num_samples, self.every_n_epochs = num_samples, every_n_epochs
        self.method, self.target, self.method_kwargs = method, target, method_kwargs
        self.dirpath = Path(dirpath) if dirpath is not None else None
        self._png_dir: Path | None = self.dirpath
        self._samples: Batch | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _teacher_student(pl_module)
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
            self._samples = Batch(*(None if t is None else t[:n].detach().clone() for t in b))

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._samples is not None and _every_n_epochs(trainer, self.every_n_epochs):
            self._draw(trainer, pl_module)

    @rank_zero_only
    def _draw(self, trainer: Trainer, pl_module: LightningModule) -> None:
        teacher, student = _teacher_student(pl_module)
        b = Batch(*(None if t is None else t.to(pl_module.device) for t in self._samples))
        pair = _saliency_pair(teacher, student, b, self.method, self.target, self.method_kwargs)
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
            self._png_dir.mkdir(parents=True, exist_ok=True)
            for i, fig in enumerate(figures):
                fig.savefig(self._png_dir / f"epoch={trainer.current_epoch}_sample={i}.png")


class ReduceTSDWeightOnAgreementDrop(Callback):
    """Lower the TSD weight when the student's agreement with its teacher drops (like ``ReduceLROnPlateau``).

    The TSD term can buy saliency alignment with top-1 agreement (the benchmarks in ``benchmarks/results``
    measure it). This callback watches an agreement metric and, when it has been more than ``tolerance``
    below the best value seen for more than ``patience`` consecutive checks, multiplies the TSD weight by
    ``factor`` (through the distiller's ``tsd_weight_scale``); the best value is then reset to the current
    one, so a further drop is needed for a further cut. A scale below ``min_scale`` switches the TSD term off.

    It checks after each validation epoch, or at the end of each training epoch when ``monitor`` starts with
    ``"train/"`` (``TemporalSaliencyDistiller`` logs ``train/agreement``, the top-1 agreement of the epoch's
    training batches, and ``val/agreement``). Under DDP, rank 0 decides and broadcasts, so all ranks keep the
    same weight. The scale, best value and wait count are saved in checkpoints and restored on resume.
    The weight in use is logged as ``train/tsd_weight``; ``history`` lists ``(epoch, value, scale)`` per check.

    Args:
        monitor: the logged agreement metric (higher is better).
        factor: multiplier of the TSD weight at each cut, in ``(0, 1)``.
        tolerance: how far below the best value the metric may fall before it counts as a drop.
        patience: drops tolerated in a row before a cut (0: cut at the first drop).
        min_scale: below this scale the TSD term is switched off (scale 0).

    Example:
        >>> from lightning.pytorch import Trainer
        >>> guard = ReduceTSDWeightOnAgreementDrop(monitor="val/agreement", factor=0.5, tolerance=0.02)
        >>> trainer = Trainer(callbacks=[guard], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        monitor: str = "val/agreement",
        factor: float = 0.5,
        tolerance: float = 0.01,
        patience: int = 0,
        min_scale: float = 0.05,
    ) -> None:
        if not 0.0 < factor < 1.0:
            raise ValueError(f"factor must lie in (0, 1), got {factor}")
        if tolerance < 0 or patience < 0 or min_scale < 0:
            raise ValueError(
                f"tolerance, patience and min_scale must be >= 0, got {tolerance}, {patience}, {min_scale}"
            )
        self.monitor = monitor
        self.factor = factor
        self.tolerance = tolerance
        self.patience = patience
        self.min_scale = min_scale
        self.scale = 1.0
        self.best: float | None = None
        self.wait = 0
        self.history: list[tuple[int, float, float]] = []  # (epoch, monitored value, scale after the check)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "best": self.best, "wait": self.wait, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.scale = float(state_dict["scale"])
        self.best = state_dict["best"]
        self.wait = int(state_dict["wait"])
        self.history = [tuple(h) for h in state_dict.get("history", [])]

    @staticmethod
    def _check_module(pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "tsd_weight_scale"):
            raise MisconfigurationException(
                "ReduceTSDWeightOnAgreementDrop needs a module with a `tsd_weight_scale` attribute that "
                f"multiplies its TSD weight (TemporalSaliencyDistiller has one); {type(pl_module).__name__} has not"
            )

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # a fresh start for each fit (a checkpoint, if any, is restored after this)
            self.scale, self.best, self.wait, self.history = 1.0, None, 0, []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.tsd_weight_scale = self.scale  # after a checkpoint restored this callback's state

    def _on_train_metric(self) -> bool:
        return self.monitor.startswith("train/")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._on_train_metric():
            self._check(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._on_train_metric() and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._check(trainer, pl_module)

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        # Every rank decides on rank 0's value (one broadcast, before anything can raise), so all ranks keep
        # the same weight even where their own logged values differ, and all raise together if it is missing.
        current = trainer.strategy.broadcast(None if value is None else float(value), src=0)
        if current is None:
            raise MisconfigurationException(
                f"ReduceTSDWeightOnAgreementDrop monitors {self.monitor!r}, which was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        if self.best is None or current > self.best:
            self.best, self.wait = current, 0
        elif current < self.best - self.tolerance:
            self.wait += 1
            if self.wait > self.patience:
                self.scale *= self.factor
                if self.scale < self.min_scale:
                    self.scale = 0.0
                self.best, self.wait = current, 0
        else:
            self.wait = 0  # not a drop: the count of drops in a row starts again
        self.history.append((trainer.current_epoch, current, self.scale))
        pl_module.tsd_weight_scale = self.scale
