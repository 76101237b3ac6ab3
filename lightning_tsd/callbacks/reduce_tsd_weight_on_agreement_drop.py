"""``ReduceTSDWeightOnAgreementDrop``: lowers the TSD weight when the student's agreement with its teacher
drops, like ``ReduceLROnPlateau`` does for a learning rate.

It adapts ``tsd_weight_scale``, the multiplier of the TSD weight that ``TemporalSaliencyDistiller`` owns and
checkpoints (any module with that attribute works), from a logged agreement metric.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

__all__ = ["ReduceTSDWeightOnAgreementDrop"]


class _Decision(NamedTuple):
    """The schedule after one check: best value, drops in a row, the scale to use, and why it changed."""

    best: float
    wait: int
    scale: float
    reason: str | None  # None when the scale is unchanged


class ReduceTSDWeightOnAgreementDrop(Callback):
    """Lower the TSD weight when the student's agreement with its teacher drops (like ``ReduceLROnPlateau``).

    The TSD term can buy saliency alignment with top-1 agreement (the benchmarks in ``benchmarks/results``
    measure it). This callback watches an agreement metric and, when it has been more than ``tolerance``
    below the best value seen for more than ``patience`` consecutive checks, multiplies the module's
    ``tsd_weight_scale`` by ``factor``; the best value is then reset to the current one, so a further drop
    is needed for a further cut. A scale below ``min_scale`` switches the TSD term off (scale 0).

    It checks after each validation epoch, or at the end of each training epoch when ``monitor`` starts with
    ``"train/"`` (``TemporalSaliencyDistiller`` logs ``train/agreement``, the top-1 agreement of the epoch's
    training batches, and ``val/agreement``). Under DDP, rank 0 decides and broadcasts, so all ranks keep the
    same weight. The scale belongs to the module, which saves it in its checkpoints; this callback saves only
    its schedule (best value, wait count, history), starts a fresh schedule with each fit and restores it
    on resume. The weight in use is logged as ``train/tsd_weight``; ``history`` lists
    ``(epoch, value, scale after the check)`` per check.

    Args:
        monitor: the logged agreement metric (higher is better).
        factor: multiplier of the TSD weight at each cut, in ``(0, 1)``.
        tolerance: how far below the best value the metric may fall before it counts as a drop.
        patience: drops tolerated in a row before a cut (0: cut at the first drop).
        min_scale: below this scale the TSD term is switched off (scale 0).
        verbose: log each cut (rank zero, at INFO level) with its reason.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> weight_cut = ReduceTSDWeightOnAgreementDrop(monitor="val/agreement", factor=0.5, tolerance=0.02)
        >>> trainer = Trainer(callbacks=[weight_cut], logger=False, enable_progress_bar=False)
    """

    def __init__(
        self,
        monitor: str = "val/agreement",
        factor: float = 0.5,
        tolerance: float = 0.01,
        patience: int = 0,
        min_scale: float = 0.05,
        verbose: bool = False,
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
        self.verbose = verbose
        self.best: float | None = None
        self.wait = 0
        self.history: list[tuple[int, float, float]] = []  # (epoch, monitored value, scale after the check)

    @property
    def state_key(self) -> str:
        return self._generate_state_key(monitor=self.monitor)

    @property
    def scale(self) -> float:
        """Deprecated (removed in 0.3.0): the scale after the last check; read the module's
        ``tsd_weight_scale``, which owns the value."""
        warnings.warn(
            "ReduceTSDWeightOnAgreementDrop.scale is deprecated and will be removed in 0.3.0; read the "
            "module's tsd_weight_scale instead",
            DeprecationWarning,
            stacklevel=2,
        )
        return self.history[-1][2] if self.history else 1.0

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait, "history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # A checkpoint from before the module owned the scale also holds "scale": the module's own value wins.
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
        if stage == "fit":  # a fresh schedule for each fit (a checkpoint, if any, is restored after this)
            self.best, self.wait, self.history = None, 0, []

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._check_module(pl_module)

    def _on_train_metric(self) -> bool:
        return self.monitor.startswith("train/")

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._on_train_metric():
            self._run_check(trainer, pl_module)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._on_train_metric() and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._run_check(trainer, pl_module)

    def _evaluate(self, current: float, scale: float) -> _Decision:
        """The schedule after a check that reads ``current`` while the scale is ``scale``; no side effect.

        Example:
            >>> cut = ReduceTSDWeightOnAgreementDrop(factor=0.5, tolerance=0.02)
            >>> cut.best = 0.9
            >>> cut._evaluate(0.89, 1.0)  # within the tolerance: not a drop
            _Decision(best=0.9, wait=0, scale=1.0, reason=None)
            >>> cut._evaluate(0.8, 1.0).scale
            0.5
        """
        if self.best is None or current > self.best:
            return _Decision(current, 0, scale, None)
        if not current < self.best - self.tolerance:  # not a drop: the count of drops in a row starts again
            return _Decision(self.best, 0, scale, None)
        wait = self.wait + 1
        if wait <= self.patience:
            return _Decision(self.best, wait, scale, None)
        new_scale = scale * self.factor
        if new_scale < self.min_scale:
            new_scale = 0.0
        reason = (
            f"{self.monitor} = {current:.4f}, more than {self.tolerance} below its best {self.best:.4f} for "
            f"{wait} check(s) in a row: TSD weight scale {scale:g} -> {new_scale:g}"
        )
        return _Decision(current, 0, new_scale, reason)  # the best resets: a further cut needs a further drop

    def _run_check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        value = trainer.callback_metrics.get(self.monitor)
        # Every rank decides on rank 0's value (one broadcast, before anything can raise), so all ranks keep
        # the same weight even where their own logged values differ, and all raise together if it is missing.
        current = trainer.strategy.broadcast(None if value is None else float(value), src=0)
        if current is None:
            raise MisconfigurationException(
                f"ReduceTSDWeightOnAgreementDrop monitors {self.monitor!r}, which was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        module: Any = pl_module  # the module owns the scale (its checkpoints save it)
        decision = self._evaluate(current, float(module.tsd_weight_scale))
        self.best, self.wait = decision.best, decision.wait
        self.history.append((trainer.current_epoch, current, decision.scale))
        module.tsd_weight_scale = decision.scale
        if decision.reason is not None and self.verbose:
            rank_zero_info(f"ReduceTSDWeightOnAgreementDrop: {decision.reason}")
