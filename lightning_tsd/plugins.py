"""Lightning plugins: atomic, safe checkpoint IO (the Lightning layer above :mod:`lightning_tsd.checkpoint`)."""

from __future__ import annotations

from typing import Any

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from lightning_tsd.checkpoint import UnsafeCheckpointError, atomic_torch_save, safe_torch_load


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
