"""Safe teacher files: tensors and plain data only, read with ``torch.load(weights_only=True)``.

A teacher file holds ``{"format", "class_path", "init_args", "state_dict"}``: the model's import path,
the keyword arguments that rebuild it, and its weights. Nothing in it is unpickled as code, so a
file that needs any other unpickling is refused with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import importlib
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

TEACHER_FORMAT = "lightning-tsd-teacher/1"


class UnsafeCheckpointError(ValueError):
    """A checkpoint that would need arbitrary unpickling (and so could run code) to load."""


class CorruptCheckpointError(ValueError):
    """A checkpoint file that is truncated, corrupt or not in the expected format."""


def model_spec(model: nn.Module) -> dict[str, Any] | None:
    """``{"class_path", "init_args"}`` that rebuild ``model``, or None when its init args are unknown.

    Init args are read from ``model.init_args`` (the reference models record theirs) or, for a
    LightningModule, from ``model.hparams``.
    """
    init_args = getattr(model, "init_args", None)
    if init_args is None and hasattr(model, "hparams"):
        init_args = dict(cast(Mapping[str, Any], model.hparams))  # nn.Module.__getattr__ says Tensor | Module
    if init_args is None:
        return None
    cls = type(model)
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": dict(init_args)}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    """Instantiate ``spec["class_path"](**spec["init_args"])`` (an ``nn.Module`` subclass only)."""
    module_name, _, class_name = spec["class_path"].rpartition(".")
    cls = getattr(importlib.import_module(module_name), class_name)
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"{spec['class_path']} is not a torch.nn.Module subclass")
    return cls(**spec.get("init_args", {}))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename: an interrupted save
    leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_teacher(model: nn.Module, path: str | os.PathLike, init_args: dict[str, Any] | None = None) -> None:
    """Write ``model`` as a safe teacher file (atomically).

    Args:
        model: the trained teacher.
        path: destination file.
        init_args: keyword arguments that rebuild the model; defaults to :func:`model_spec`'s.

    Example:
        >>> from lightning_tsd.models import FCN
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "teacher.pt")
        >>> save_teacher(FCN(in_channels=1, num_classes=2), path)
        >>> type(load_teacher(path)).__name__
        'FCN'
    """
    spec = (
        model_spec(model)
        if init_args is None
        else {
            "class_path": f"{type(model).__module__}.{type(model).__qualname__}",
            "init_args": dict(init_args),
        }
    )
    if spec is None:
        raise ValueError(
            f"cannot tell how to rebuild {type(model).__name__}: pass init_args=... (the keyword arguments "
            "of its constructor)"
        )
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": TEACHER_FORMAT, **spec, "state_dict": state}, path)


def _intact_zip(path: str | os.PathLike) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def check_checkpoint_file(path: str | os.PathLike) -> None:
    """Raise :class:`CorruptCheckpointError` naming ``path`` when the file is truncated or corrupt.

    Reads no pickle: a ``torch.save`` archive (zip) must have every member's CRC right; a file that is
    neither such an archive nor a legacy pickle is damaged. A missing file raises ``FileNotFoundError``.

    Example:
        >>> import tempfile, pathlib
        >>> bad = pathlib.Path(tempfile.mkdtemp()) / "bad.ckpt"
        >>> _ = bad.write_bytes(b"PK\x03\x04 not really a zip")
        >>> check_checkpoint_file(bad)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        lightning_tsd.checkpoint.CorruptCheckpointError: checkpoint .../bad.ckpt is damaged ...
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head.startswith(b"PK") and _intact_zip(path):
        return
    if head[:1] == b"\x80" and not head.startswith(b"PK"):  # a legacy (pre-zip) torch.save pickle
        return
    raise CorruptCheckpointError(
        f"checkpoint {path} is damaged (truncated or corrupt: "
        f"{'its zip archive fails its checks' if head.startswith(b'PK') else 'not a torch checkpoint'}); "
        "resume from an earlier checkpoint, or start the fit without ckpt_path"
    )


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with clear errors for unsafe, missing and corrupt files."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # "Unsupported global: GLOBAL module.name" means the file names code to import and call; any
        # other unpickling failure (an unknown opcode, random bytes) is a damaged file, not a hostile one.
        if "Unsupported global" in str(err) or "GLOBAL " in str(err):
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it is unsafe to load, because it needs to unpickle objects other "
                "than tensors and plain data (which could run arbitrary code). Re-export the model with "
                "lightning_tsd.save_teacher, or load it yourself if you trust the file."
            ) from err
        raise CorruptCheckpointError(f"cannot read checkpoint {path}: {err}") from err
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - damaged bytes make the unpickler fail in arbitrary ways
        # Random or truncated bytes reach the unpickler's internals: IndexError, KeyError, struct.error,
        # UnicodeDecodeError, EOFError, RuntimeError ... all mean the same thing to the user. An intact
        # archive (torch.save's zip format, every CRC correct) failed for another reason (map_location, ...):
        # that error is the user's to see.
        if _intact_zip(path):
            raise
        raise CorruptCheckpointError(
            f"cannot read checkpoint {path}: it is truncated or corrupt ({type(err).__name__}: {err})"
        ) from err


def load_teacher(path: str | os.PathLike, map_location: Any = "cpu") -> nn.Module:
    """Rebuild a teacher from a file written by :func:`save_teacher` (or a Lightning checkpoint of
    :class:`lightning_tsd.TimeSeriesClassifier`), without unpickling any code."""
    payload = safe_torch_load(path, map_location)
    if isinstance(payload, dict) and payload.get("format") == TEACHER_FORMAT:
        model = build_from_spec(payload)
        model.load_state_dict(payload["state_dict"])
        return model
    if (
        isinstance(payload, dict)
        and "state_dict" in payload
        and "model_name" in payload.get("hyper_parameters", {})
    ):
        # A TimeSeriesClassifier checkpoint: rebuild its reference model from the recorded hyperparameters.
        from lightning_tsd.models import build_model

        hp = payload["hyper_parameters"]
        model = build_model(
            hp["model_name"], hp["in_channels"], hp["num_classes"], **(hp.get("model_kwargs") or {})
        )
        prefix = "model."
        model.load_state_dict(
            {k[len(prefix) :]: v for k, v in payload["state_dict"].items() if k.startswith(prefix)}
        )
        return model
    raise CorruptCheckpointError(
        f"{path} is not a lightning-tsd teacher file (expected format {TEACHER_FORMAT!r} or a "
        "TimeSeriesClassifier checkpoint)"
    )
