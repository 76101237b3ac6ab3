"""Lightning plugins: atomic, safe checkpoint IO (the Lightning layer above :mod:`lightning_tsd.checkpoint`)."""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_tsd.checkpoint import (
    UnsafeCheckpointError,
    atomic_torch_save,
    check_checkpoint_file,
    safe_torch_load,
)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` that writes each checkpoint atomically and reads it safely.

    Saving goes to a temporary file beside the target, is flushed and fsync'ed, then renamed over the
    target (``os.replace``): a crash or an error mid-save leaves the previous checkpoint intact and no
    partial file under the checkpoint's name. Loading uses ``torch.load(weights_only=True)`` (nothing
    pickled runs), refusing unsafe files with :class:`UnsafeCheckpointError` and truncated or corrupt
    ones with :class:`CorruptCheckpointError`.

    Example:
        >>> import lightning.pytorch as pl
        >>> trainer = pl.Trainer(plugins=[AtomicCheckpointIO()], logger=False, enable_progress_bar=False)
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError(
                f"{type(self).__name__}.save_checkpoint takes no storage_options, got {storage_options!r}"
            )
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if weights_only is False:
            raise UnsafeCheckpointError(
                f"{type(self).__name__} only loads checkpoints with weights_only=True; use Lightning's "
                "TorchCheckpointIO to load a trusted file that needs arbitrary unpickling"
            )
        return safe_torch_load(path, map_location="cpu" if map_location is None else map_location)


class CheckedCheckpointIO(CheckpointIO):
    """Wraps a strategy's ``CheckpointIO`` so that a damaged file fails with a clear error before it is read.

    :class:`~lightning_tsd.TemporalSaliencyDistiller` installs it in ``setup`` (which runs before Lightning
    restores ``fit(ckpt_path=...)``): a truncated or corrupt checkpoint raises
    :class:`~lightning_tsd.CorruptCheckpointError` naming the file, instead of an ``OSError`` from deep inside
    ``torch.load``. Everything else is delegated unchanged.
    """

    def __init__(self, inner: CheckpointIO) -> None:
        self.inner = inner

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def load_checkpoint(
        self, path: Any, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        if isinstance(path, (str, os.PathLike)) and "://" not in str(path):
            check_checkpoint_file(path)
        return self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()
