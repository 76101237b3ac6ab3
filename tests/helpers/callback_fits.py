"""The short fits the callback tests run, and reading back the PNG files they write."""

from __future__ import annotations

import numpy as np
from lightning.pytorch import Trainer
from PIL import Image
from trainers import quiet_trainer


def callback_trainer(tmp_path, callbacks, logger=False, max_epochs=1) -> Trainer:
    """A quiet Trainer in ``tmp_path`` with one sanity-check batch and a log line per step."""
    return quiet_trainer(
        max_epochs=max_epochs,
        logger=logger,
        callbacks=callbacks,
        default_root_dir=tmp_path,
        num_sanity_val_steps=1,
        log_every_n_steps=1,
    )


def read_png(path) -> np.ndarray:
    """The image's pixels, ``(H, W, 3)`` floats."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=float)
