"""Export a model (a trained student) to ONNX with a dynamic batch axis (plain torch).

Needs the ``deploy`` extra (``onnx``, ``onnxscript``, ``onnxruntime``). The ONNX graph takes one input
``x`` ``(batch, C, T)`` (float32) and returns ``logits`` ``(batch, K)``; ``C`` and ``T`` are those of the
example input. The padding mask is not an input: export a model for full-length series.
"""

from __future__ import annotations

import importlib
import io
import os
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_tsd._batch import as_bct, call_model, floating_dtype
from lightning_tsd.attribution import eval_mode

__all__ = ["check_onnx", "export_onnx"]

INSTALL_HINT = "pip install 'lightning-tsd[deploy]'"
_EXTERNAL_DATA_BYTES = 1 << 30  # weights above 1 GiB go to a .data file beside the model (ONNX's 2 GB limit)


def _require(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(f"ONNX export needs {', '.join(missing)}: {INSTALL_HINT}")


class _Logits(nn.Module):
    """``model`` as ``x -> logits``: whatever the model returns (a tensor, a tuple, a dict), only the logits
    are exported, and a model that takes a mask is called without one."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return call_model(self.model, x)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    example_x: Tensor,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
    check: bool = True,
    atol: float = 1e-4,
) -> Path:
    """Write ``model`` as an ONNX file whose input ``x`` has a dynamic batch axis; return the file's path.

    The model is exported in eval mode (every submodule's mode is restored afterwards) with
    ``torch.onnx.export``'s ``torch.export``-based exporter. Pass the student, e.g. ``distiller.student``.

    Args:
        model: an ``nn.Module`` taking ``x`` ``(B, C, T)`` and returning logits ``(B, K)`` (or a
            ``(logits, ...)`` tuple or ``{"logits": ...}`` dict: only the logits are exported).
        path: destination ``.onnx`` file (its folder is created).
        example_x: an input ``(B, C, T)`` (or ``(B, T)``) of the shape to deploy; only ``C`` and ``T`` are
            fixed in the graph. A batch of one is repeated to two (``torch.export`` fixes size-1 axes).
        opset: the ONNX opset version; the exporter's default when None.
        dynamic_batch: leave the batch axis dynamic (else fixed to ``example_x``'s).
        check: run the file with onnxruntime on ``example_x`` and raise ``RuntimeError`` if its logits
            differ from the model's by more than ``atol``.
        atol: the tolerance of ``check``.

    Raises:
        ImportError: when ``onnx``/``onnxscript`` (or, with ``check``, ``onnxruntime``) are missing; the
            message says to install the ``deploy`` extra.

    Example:
        >>> import tempfile, os
        >>> from lightning_tsd.models import NarrowFCN
        >>> path = export_onnx(NarrowFCN(1, 2), os.path.join(tempfile.mkdtemp(), "student.onnx"), torch.randn(2, 1, 32))
        >>> path.suffix
        '.onnx'
    """
    _require("onnx", "onnxscript", *(("onnxruntime",) if check else ()))
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"export_onnx needs a torch.nn.Module (for a distiller, pass distiller.student), got "
            f"{type(model).__name__}"
        )
    example_x = as_bct(example_x, where="example_x").detach()
    device = next((p.device for p in model.parameters()), example_x.device)
    dtype = floating_dtype(model) or torch.float32
    example_x = example_x.to(device=device, dtype=dtype)
    if dynamic_batch and example_x.shape[0] == 1:
        example_x = example_x.repeat(2, 1, 1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    dynamic_shapes = {"x": {0: torch.export.Dim("batch")}} if dynamic_batch else None
    with eval_mode(model), torch.no_grad():
        torch.onnx.export(
            _Logits(model).eval(),
            (example_x,),
            str(path),
            input_names=["x"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            external_data=weight_bytes > _EXTERNAL_DATA_BYTES,
            verbose=False,
        )
        if check:
            expected = call_model(model, example_x)
            check_onnx(path, example_x, expected, atol=atol)
    return path


def check_onnx(path: str | os.PathLike, x: Tensor, expected: Tensor, *, atol: float = 1e-4) -> Tensor:
    """Run the ONNX file ``path`` with onnxruntime (CPU) on ``x`` and compare its logits with ``expected``;
    return onnxruntime's logits. Raises ``RuntimeError`` naming the largest difference when it exceeds
    ``atol``.

    Example:
        >>> import tempfile, os
        >>> from lightning_tsd.models import NarrowFCN
        >>> model = NarrowFCN(1, 2).eval()
        >>> path = export_onnx(model, os.path.join(tempfile.mkdtemp(), "s.onnx"), torch.randn(2, 1, 32))
        >>> x = torch.randn(5, 1, 32)
        >>> with torch.no_grad():
        ...     check_onnx(path, x, model(x)).shape
        torch.Size([5, 2])
    """
    _require("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": x.detach().cpu().numpy()})
    got = torch.from_numpy(logits)
    want = expected.detach().cpu().to(got.dtype)
    if got.shape != want.shape:
        raise RuntimeError(
            f"{path}: onnxruntime returned logits of shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        )
    error = float((got - want).abs().max()) if got.numel() else 0.0
    if not error <= atol:
        raise RuntimeError(
            f"{path}: onnxruntime's logits differ from the model's by up to {error:.3g} (> atol={atol}); "
            "the model may use an operator the exporter translates differently"
        )
    return got


def model_cost(
    model: nn.Module, x: Tensor, mask: Tensor | None = None, repeats: int = 5, warmup: int = 2
) -> dict:
    """``params`` (parameter count), ``bytes`` (size of ``torch.save(model.state_dict())``) and
    ``latency_ms`` (median wall time of one forward on ``x``, eval mode and no grad, after ``warmup`` calls;
    CUDA is synchronised) of ``model``. Its ``training`` flags are restored.

    Example:
        >>> cost = model_cost(torch.nn.Linear(8, 2), torch.randn(4, 8))
        >>> cost["params"], cost["latency_ms"] > 0
        (18, True)
    """
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    times = []
    with torch.no_grad(), eval_mode(model):
        for _ in range(warmup + repeats):
            sync()
            start = time.perf_counter()
            call_model(model, x, mask)
            sync()
            times.append(time.perf_counter() - start)
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": buffer.getbuffer().nbytes,
        "latency_ms": 1000.0 * statistics.median(times[warmup:]),
    }
