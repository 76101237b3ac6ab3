"""Every use of a Lightning private attribute, in one file, each named after the behaviour it works around.

Supported Lightning: 2.4 to 2.6 (``lightning>=2.4,<2.7``). :func:`check_lightning_internals` fails loudly,
naming the attribute, when the installed Lightning lacks one of them; the test suite calls it, so an upgrade
that renames one breaks a test instead of silently turning a workaround into a no-op.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

SUPPORTED_STRATEGIES = "single-device, 'ddp', 'ddp_spawn', 'ddp_fork' / 'ddp_notebook'"
SHARDED_STRATEGIES: tuple[type[Strategy], ...] = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)

# (object path from the trainer, attribute) pairs this file relies on
_PRIVATE = (
    ("fit_loop", "_combined_loader_states_to_load"),
    ("fit_loop", "_load_combined_loader_states"),
    ("fit_loop", "_data_fetcher"),
    ("fit_loop.epoch_loop.batch_progress", "is_last_batch"),
)


class LightningInternalsChanged(RuntimeError):
    """The installed Lightning lacks a private attribute that lightning-tsd relies on."""


def _resolve(obj: Any, path: str) -> Any:
    for name in path.split("."):
        obj = getattr(obj, name)
    return obj


def check_lightning_internals(trainer: pl.Trainer) -> None:
    """Raise :class:`LightningInternalsChanged` naming each private attribute the installed Lightning lacks."""
    missing = []
    for path, attribute in _PRIVATE:
        try:
            owner = _resolve(trainer, path)
        except AttributeError:
            missing.append(f"trainer.{path}")
            continue
        if not hasattr(owner, attribute):
            missing.append(f"trainer.{path}.{attribute}")
    if missing:
        raise LightningInternalsChanged(
            f"lightning {pl.__version__} lacks {missing}; lightning-tsd supports lightning>=2.4,<2.7"
        )


def is_sharded(strategy: Strategy) -> bool:
    """Whether a strategy shards parameters (FSDP, DeepSpeed, model parallel): no double backward there."""
    return isinstance(strategy, SHARDED_STRATEGIES)


def refuse_unsupported(strategy: Strategy, student: nn.Module | None) -> None:
    """Raise ``ValueError`` for what has no double backward: a sharded strategy, or SyncBatchNorm layers in
    the ``student`` (pass None when no saliency is trained)."""
    if is_sharded(strategy):
        raise ValueError(
            f"{type(strategy).__name__} is not supported: TSD needs a double backward through the student, "
            f"which sharded strategies do not provide. Use one of: {SUPPORTED_STRATEGIES}"
        )
    if student is not None and any(isinstance(m, nn.SyncBatchNorm) for m in student.modules()):
        raise ValueError(
            "the student has SyncBatchNorm layers, which have no double backward: set "
            "Trainer(sync_batchnorm=False), or student_train_mode=False"
        )


def hand_over_restored_loader_state(trainer: pl.Trainer) -> None:
    """Work around Lightning 2.6 replaying batches after a mid-epoch resume with a step-count scheduler.

    ``trainer.estimated_stepping_batches`` (read by cosine / one-cycle schedulers in ``configure_optimizers``)
    builds the train loader *before* the checkpoint is restored, and the fit loop then never hands the
    restored mid-epoch loader state to it. Call from ``on_train_start``: it hands the state over, then makes
    a new iterator so loaders that apply a loaded state when iterated (torchdata's StatefulDataLoader)
    resume too.
    """
    fit_loop = trainer.fit_loop
    if fit_loop._combined_loader_states_to_load:
        fit_loop._load_combined_loader_states()
        if fit_loop._data_fetcher is not None:
            iter(fit_loop._data_fetcher)


def on_last_batch_of_epoch(trainer: pl.Trainer) -> bool:
    """Whether the fit loop has drawn the epoch's last batch (a checkpoint now is an epoch-end one)."""
    return bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)
