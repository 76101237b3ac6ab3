"""Adapters: raw Hugging Face time-series classifiers (the real classes, tiny configs, nothing downloaded),
the explicit adapter, the class count from the models' outputs, and the note on a failing first forward."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN
from torch import nn

from lightning_tsd.adapters import (
    ModelAdapter,
    adapt_model,
    auto_adapt,
    declared_num_classes,
    describe_forward_failure,
    infer_num_classes_from_outputs,
    is_hf_time_series_model,
)
from lightning_tsd.ensemble import TeacherEnsemble
from lightning_tsd.models import FCN
from lightning_tsd.saliency import ESTIMATORS, temporal_saliency

C, T, K = 2, 32, 3
OPTIONS = {"integrated_gradients": {"steps": 2}, "occlusion": {"window": 8, "stride": 8}}


def _patchtst():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PatchTSTConfig(
        num_input_channels=C, context_length=T, patch_length=8, patch_stride=8, num_targets=K, d_model=16,
        num_attention_heads=2, num_hidden_layers=1, ffn_dim=32,
    )  # fmt: skip
    return transformers.PatchTSTForClassification(config)


def _patchtsmixer():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.PatchTSMixerConfig(
        num_input_channels=C, context_length=T, patch_length=8, patch_stride=8, num_targets=K, d_model=16,
        num_layers=1,
    )  # fmt: skip
    return transformers.PatchTSMixerForTimeSeriesClassification(config)


HF_MODELS = {
    "PatchTST": (_patchtst, "prediction_logits"),
    "PatchTSMixer": (_patchtsmixer, "prediction_outputs"),
}


class HeadFirstTransformer(nn.Module):
    """Its head is declared before its encoder: the last declared Linear is the feed-forward one (16)."""

    def __init__(self, c: int = C, d: int = 8, k: int = K) -> None:
        super().__init__()
        self.inp = nn.Linear(c, d)
        self.head = nn.Linear(d, k)
        layer = nn.TransformerEncoderLayer(d, nhead=2, dim_feedforward=16, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)

    def forward(self, x):
        return self.head(self.enc(self.inp(x.transpose(1, 2))).mean(dim=1))


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_hf_classifier_adapted_logits_equal_raw_output_on_transposed_input(name):
    build, key = HF_MODELS[name]
    raw = build().eval()
    assert is_hf_time_series_model(raw)
    adapted = auto_adapt(raw)
    assert isinstance(adapted, ModelAdapter) and adapted.model is raw
    x = torch.randn(4, C, T)
    with torch.no_grad():
        expected = getattr(raw(past_values=x.transpose(1, 2)), key)
        got = adapted(x)
    assert got.shape == (4, K)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert auto_adapt(adapted) is adapted  # idempotent


@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_adapter_is_a_module_holding_the_model(name):
    raw = HF_MODELS[name][0]()
    adapted = auto_adapt(raw)
    assert [id(p) for p in adapted.parameters()] == [id(p) for p in raw.parameters()]
    assert set(adapted.state_dict()) == {f"model.{k}" for k in raw.state_dict()}
    adapted.eval()
    assert not raw.training and not any(m.training for m in raw.modules())
    adapted.train()
    assert raw.training
    text = repr(adapted)
    assert text.startswith(
        "ModelAdapter(\n  layout='BTC', input_name='past_values', output_key=['prediction_logits'"
    )
    assert "mask_name='past_observed_mask'" in text if name == "PatchTST" else "mask_name" not in text
    assert type(raw).__name__ in text


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
@pytest.mark.parametrize("name", sorted(HF_MODELS))
def test_saliency_of_adapted_hf_classifier_reaches_its_parameters(name, method):
    raw = HF_MODELS[name][0]().eval()  # eval: no dropout, so the map is deterministic
    adapted = auto_adapt(raw)
    x = torch.randn(3, C, T)
    logits, saliency = temporal_saliency(
        adapted, x, method=method, create_graph=True, **OPTIONS.get(method, {})
    )
    assert logits.shape == (3, K) and saliency.shape == (3, T)
    assert torch.isfinite(saliency).all() and saliency.abs().sum() > 0
    saliency.pow(2).sum().backward()
    grads = [p.grad for p in raw.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_patchtst_mask_goes_to_past_observed_mask():
    raw = _patchtst().eval()
    adapted = auto_adapt(raw)
    assert adapted.mask_name == "past_observed_mask"
    x = torch.randn(2, C, T)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[1, 20:] = False
    observed = mask.unsqueeze(2).expand(2, T, C).float()
    with torch.no_grad():
        expected = raw(past_values=x.transpose(1, 2), past_observed_mask=observed).prediction_logits
        got = adapted(x, mask=mask)
        unmasked = adapted(x)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(got[0], unmasked[0])  # an all-real row is unchanged by the mask
    assert not torch.allclose(got[1], unmasked[1])  # the scaler ignores the padded steps


def test_mixer_takes_no_mask_and_ignores_it():
    raw = _patchtsmixer().eval()
    adapted = auto_adapt(raw)
    assert adapted.mask_name is None
    x = torch.randn(2, C, T)
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, mask=torch.ones(2, T, dtype=torch.bool)), adapted(x))


def test_raw_hf_classifier_fails_with_a_note_naming_the_shape_and_the_adapter():
    raw = _patchtst()
    with pytest.raises(Exception) as info:  # Hugging Face's own error, whatever its type
        infer_num_classes_from_outputs(raw, FCN(C, K), torch.randn(4, C, T))
    note = "\n".join([str(info.value), *getattr(info.value, "__notes__", [])])  # 3.10: in the message
    assert "teacher (PatchTSTForClassification)" in note
    assert "(B, C, T) = (4, 2, 32)" in note
    assert "lightning_tsd.adapt_model(model, layout=\"BTC\", input_name='past_values'" in note


def test_auto_adapt_leaves_other_models_alone():
    for model in (FCN(C, K), nn.Linear(2, 2), HeadFirstTransformer()):
        assert auto_adapt(model) is model

    class PreTrainedModel(nn.Module):  # the name alone, outside transformers, is not Hugging Face
        main_input_name = "past_values"

    lookalike = PreTrainedModel()
    assert not is_hf_time_series_model(lookalike) and auto_adapt(lookalike) is lookalike


def test_adapt_model_layout_keyword_and_output_key():
    class Scores(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(C, K)

        def forward(self, inputs, attention=None):
            h = inputs if attention is None else inputs * attention.unsqueeze(-1)
            return {"scores": self.head(h.mean(dim=1)), "aux": None}

    inner = Scores()
    model = adapt_model(inner, layout="BTC", input_name="inputs", output_key="scores", mask_name="attention")
    x, mask = torch.randn(3, C, T), torch.rand(3, T) > 0.3
    torch.testing.assert_close(model(x), inner.head(x.transpose(1, 2).mean(dim=1)))
    expected = inner.head((x.transpose(1, 2) * mask.unsqueeze(-1)).mean(dim=1))
    torch.testing.assert_close(model(x, mask=mask), expected)
    assert repr(model).startswith(
        "ModelAdapter(\n  layout='BTC', input_name='inputs', output_key='scores', mask_name='attention'\n  (model): Scores("
    )
    with pytest.raises(TypeError, match=r"holds none of \['logits'\] \(it holds \['aux', 'scores'\]\)"):
        adapt_model(inner, layout="BTC", input_name="inputs", output_key="logits")(x)


def test_adapt_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match=r"layout must be one of \['BCT', 'BTC'\].*'TBC'"):
        adapt_model(nn.Linear(2, 2), layout="TBC")
    with pytest.raises(TypeError, match="needs a torch.nn.Module"):
        adapt_model(lambda x: x)
    with pytest.raises(ValueError, match="input_name must be a keyword name"):
        adapt_model(nn.Linear(2, 2), input_name="past values")


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_head_first_transformer_class_count_comes_from_outputs(role):
    torch.manual_seed(0)
    odd = HeadFirstTransformer()
    other = TinyCNN(C, K)
    assert declared_num_classes(odd) is None  # its layers are not counted (the last declared Linear has 16)
    teacher, student = (odd, other) if role == "teacher" else (other, odd)
    assert infer_num_classes_from_outputs(teacher, student, torch.randn(2, C, T)) == K


def test_class_count_mismatch_names_both_counts():
    with pytest.raises(ValueError, match="different numbers of classes: teacher 3, student 4"):
        infer_num_classes_from_outputs(TinyCNN(C, 3), HeadFirstTransformer(k=4), torch.randn(2, C, T))


def test_reading_the_class_count_restores_modes_and_leaves_batchnorm_statistics():
    torch.manual_seed(0)
    student = TinyCNN(C, K).train()
    teacher = TinyCNN(C, K).eval()
    frozen_bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm1d))
    frozen_bn.eval()  # one submodule in its own mode
    before = {k: v.clone() for k, v in student.state_dict().items()}
    x = torch.randn(4, C, T) * 5 + 3
    assert infer_num_classes_from_outputs(teacher, student, x) == K
    for key, value in student.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert student.training and not frozen_bn.training and not teacher.training
    assert all(m.training for m in student.modules() if m is not frozen_bn)


def test_declared_num_classes_is_a_hint_that_never_raises():
    assert declared_num_classes(FCN(C, 5)) == 5
    raw = _patchtst()
    assert raw.config.num_labels == 2  # Hugging Face's default, not this model's classes
    assert declared_num_classes(raw) == K and declared_num_classes(auto_adapt(raw)) == K
    assert declared_num_classes(TeacherEnsemble([FCN(C, 5), FCN(C, 5)])) == 5
    assert declared_num_classes(TeacherEnsemble([FCN(C, 5), HeadFirstTransformer()])) is None

    class Broken(nn.Module):
        @property
        def num_classes(self):
            raise RuntimeError("no")

    assert declared_num_classes(Broken()) is None


def test_describe_forward_failure_names_the_shape_and_the_adapter():
    note = describe_forward_failure(HeadFirstTransformer(), torch.zeros(5, 2, 7), role="student")
    assert "the student (HeadFirstTransformer)" in note
    assert "(B, C, T) = (5, 2, 7)" in note and 'lightning_tsd.adapt_model(model, layout="BTC"' in note


def test_ensemble_adapts_hf_members():
    ensemble = TeacherEnsemble([_patchtst(), _patchtsmixer()]).eval()
    assert all(isinstance(m, ModelAdapter) for m in ensemble.members)
    with torch.no_grad():
        probs = ensemble(torch.randn(2, C, T)).exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2))
