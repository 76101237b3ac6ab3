"""The one quiet-Trainer factory of the tests: CPU, no logger, no checkpoints, no progress bar, no summary.

Every test that fits builds its ``Trainer`` here (directly, or through the ``quiet_trainer`` fixture of
``conftest.py``, which also writes under the test's ``tmp_path``), so a Lightning default that changes, or a
warning that must stay silent, is handled in one place.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Trainer

QUIET: dict[str, Any] = {
    "accelerator": "cpu",
    "max_epochs": 1,
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
    "num_sanity_val_steps": 0,
}
"""The factory's defaults; any of them can be overridden, and any other ``Trainer`` argument added."""


def quiet_trainer(**kwargs: Any) -> Trainer:
    """A ``Trainer`` with the :data:`QUIET` defaults, updated by ``kwargs``.

    Pass what a test needs on top: ``max_steps=1``, ``limit_val_batches=0``, ``deterministic=True``,
    ``callbacks=[...]``, ``logger=CSVLogger(tmp_path)``, ``num_sanity_val_steps=1``,
    ``strategy="ddp", devices=2``, ``default_root_dir=tmp_path``, ...

    Example:
        >>> trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
        >>> trainer.max_epochs, trainer.logger, trainer.num_sanity_val_steps, trainer.limit_val_batches
        (2, None, 0, 0)
    """
    return Trainer(**{**QUIET, **kwargs})
