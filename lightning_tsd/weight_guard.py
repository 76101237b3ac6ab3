"""Deprecated alias, removed in 0.3.0: ``ReduceTSDWeightOnAgreementDrop`` lives in
:mod:`lightning_tsd.callbacks` (import it from there, or from ``lightning_tsd``).

Each name read from this module (``from lightning_tsd.weight_guard import ...``, or a YAML ``class_path:
lightning_tsd.weight_guard.ReduceTSDWeightOnAgreementDrop``) still works, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import warnings
from typing import Any

from lightning_tsd import callbacks as _callbacks

_MOVED = ("ReduceTSDWeightOnAgreementDrop",)


def __getattr__(name: str) -> Any:
    """The names that moved to :mod:`lightning_tsd.callbacks`, served from there with a warning."""
    if name in _MOVED:
        warnings.warn(
            f"lightning_tsd.weight_guard is deprecated and will be removed in 0.3.0; import {name} from "
            "lightning_tsd.callbacks",
            DeprecationWarning,
            stacklevel=2,
        )
        return getattr(_callbacks, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
