"""ONNX export: onnxruntime's logits equal the model's (1e-4) on a batch size other than the example's."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from lightning_tsd.export import check_onnx, export_onnx
from lightning_tsd.models import NarrowFCN, ResNet1d, TransformerClassifier

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

C, T, K = 2, 24, 3


def _run(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"x": x.numpy()})
    return session, torch.from_numpy(logits)


@pytest.mark.parametrize("cls", [NarrowFCN, ResNet1d, TransformerClassifier], ids=lambda c: c.__name__)
def test_onnxruntime_logits_equal_the_model_on_another_batch_size(tmp_path, cls):
    torch.manual_seed(0)
    model = cls(C, K).train()  # a student fresh from training: exported in eval mode, mode restored
    before = {k: v.clone() for k, v in model.state_dict().items()}
    path = export_onnx(model, tmp_path / "student.onnx", torch.randn(2, C, T))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # BatchNorm stats untouched
    x = torch.randn(5, C, T)
    session, got = _run(path, x)
    with torch.no_grad():
        expected = model.eval()(x)
    assert got.shape == (5, K)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    (inp,), (out,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, out.name) == ("x", "logits")
    assert isinstance(inp.shape[0], str) and inp.shape[1:] == [C, T]


def test_example_batch_of_one_still_gives_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    model = NarrowFCN(C, K).eval()
    path = export_onnx(model, tmp_path / "one.onnx", torch.randn(1, C, T))
    for batch in (1, 3):
        x = torch.randn(batch, C, T)
        _, got = _run(path, x)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=0, atol=1e-4)


def test_fixed_batch_and_dict_output(tmp_path):
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(C, K)

        def forward(self, x, mask=None):
            return {"logits": self.head(x.mean(dim=-1))}

    torch.manual_seed(0)
    model = DictOut()
    path = export_onnx(model, tmp_path / "fixed.onnx", torch.randn(2, C, T), dynamic_batch=False)
    x = torch.randn(2, C, T)
    session, got = _run(path, x)
    assert session.get_inputs()[0].shape == [2, C, T]
    with torch.no_grad():
        torch.testing.assert_close(got, model(x)["logits"], rtol=0, atol=1e-5)


def test_check_onnx_reports_a_mismatch(tmp_path):
    model = NarrowFCN(C, K).eval()
    path = export_onnx(model, tmp_path / "s.onnx", torch.randn(2, C, T), check=False)
    x = torch.randn(2, C, T)
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"differ from the model's by up to"):
        check_onnx(path, x, model(x) + 1.0)


def test_missing_onnx_says_which_extra_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ImportError, match=r"needs onnxscript: pip install 'lightning-tsd\[deploy\]'"):
        export_onnx(NarrowFCN(C, K), tmp_path / "s.onnx", torch.randn(2, C, T))


def test_rejects_what_is_not_a_module(tmp_path):
    with pytest.raises(TypeError, match="pass distiller.student"):
        export_onnx(lambda x: x, tmp_path / "s.onnx", torch.randn(2, C, T))
