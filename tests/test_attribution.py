"""lightning_tsd.attribution: equal to captum called directly, equal to the training estimators of
lightning_tsd.saliency where the maths is the same, eval mode restored, inference mode, masks, old names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from captum.attr import FeatureAblation, InputXGradient, IntegratedGradients, Occlusion, Saliency
from tiny_models import TinyCNN

import lightning_tsd.attribution as attribution
from lightning_tsd._batch import call_model
from lightning_tsd.attribution import (
    CAPTUM_METHODS,
    check_attribution_options,
    eval_mode,
    saliency_pair,
    temporal_attribution,
)
from lightning_tsd.saliency import temporal_saliency


@pytest.fixture
def model():
    torch.manual_seed(0)
    return TinyCNN(2, 3, width=4).eval()


@pytest.fixture
def x():
    return torch.randn(5, 2, 24, generator=torch.Generator().manual_seed(1)).cumsum(-1)


def _captum(model, x, target, cls, **kwargs):
    return cls(lambda inputs: call_model(model, inputs)).attribute(
        x.clone().requires_grad_(), target=target, **kwargs
    )


def test_the_gradient_methods_equal_captum_reduced_over_channels(model, x):
    target = torch.tensor([0, 1, 2, 0, 1])
    want = {
        "gradient": _captum(model, x, target, Saliency),
        "input_x_gradient": _captum(model, x, target, InputXGradient),
        "integrated_gradients": _captum(
            model, x, target, IntegratedGradients, n_steps=6, method="riemann_middle"
        ),
    }
    for method, attr in want.items():
        options = {"steps": 6} if method == "integrated_gradients" else {}
        got = temporal_attribution(model, x, target, method=method, **options)
        torch.testing.assert_close(got, attr.detach().abs().sum(1), rtol=1e-5, atol=1e-6, msg=method)


def test_the_perturbation_methods_equal_captum(model, x):
    target = torch.tensor([2, 1, 0, 0, 1])
    occluded = _captum(model, x, target, Occlusion, sliding_window_shapes=(2, 6), strides=(2, 4))
    got = temporal_attribution(model, x, target, method="occlusion", window=6, stride=4)
    # every channel of an occluded window gets the same logit drop: the map is that drop
    assert torch.equal(occluded[:, 0], occluded[:, 1])
    torch.testing.assert_close(got, occluded[:, 0], rtol=1e-5, atol=1e-6)
    # the defaults: a window of T // 10 steps moved by half of it
    default = _captum(model, x, target, Occlusion, sliding_window_shapes=(2, 2), strides=(2, 1))
    torch.testing.assert_close(temporal_attribution(model, x, target, method="occlusion"), default[:, 0])
    ablated = _captum(model, x, target, FeatureAblation, feature_mask=torch.arange(24).repeat(1, 2, 1))
    torch.testing.assert_close(
        temporal_attribution(model, x, target, method="feature_ablation"), ablated[:, 0]
    )
    one_step = temporal_attribution(model, x, target, method="occlusion", window=1, stride=1)
    torch.testing.assert_close(one_step, ablated[:, 0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "options"),
    [
        ("gradient", {}),
        ("input_x_gradient", {}),
        ("integrated_gradients", {"steps": 5}),
        ("occlusion", {"window": 5, "stride": 3}),
    ],
)
def test_the_training_estimators_give_the_same_maps(model, x, method, options):
    mask = torch.arange(24) < torch.tensor([24, 20, 17, 24, 9])[:, None]
    target = torch.tensor([1, 0, 2, 2, 1])
    _, training = temporal_saliency(model, x, target, method=method, mask=mask, **options)
    evaluation = temporal_attribution(model, x, target, mask=mask, method=method, **options)
    torch.testing.assert_close(evaluation, training, rtol=1e-4, atol=1e-5)


def test_mask_zeroes_padded_steps_and_reaches_the_model(x):
    class MaskedMean(torch.nn.Module):
        """Logits from the mean over real steps only: padded values cannot matter."""

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(2, 3)

        def forward(self, x, mask=None):
            weights = mask.unsqueeze(1).float()
            return self.linear((x * weights).sum(-1) / weights.sum(-1))

    net = MaskedMean()
    mask = torch.arange(24) < torch.tensor([24, 10, 3, 24, 16])[:, None]
    for method in CAPTUM_METHODS:
        saliency = temporal_attribution(net, x, 0, mask=mask, method=method)
        assert saliency.shape == (5, 24) and saliency.dtype == torch.float32
        assert bool((saliency[~mask] == 0).all()) and bool((saliency[mask] != 0).any()), method
    # the gradient of a mean over n real steps is w / n at every real step
    gradient = temporal_attribution(net, x, 0, mask=mask, method="gradient")
    expected = net.linear.weight[0].abs().sum() / mask.sum(1, keepdim=True) * mask
    torch.testing.assert_close(gradient, expected.detach())


def test_eval_mode_restores_mixed_flags_and_bn_statistics(x):
    torch.manual_seed(0)
    net = TinyCNN(2, 3, width=4).train()
    net.norm.eval()  # a submodule with its own flag
    before = {name: m.training for name, m in net.named_modules()}
    running = net.norm.running_mean.clone()
    with eval_mode(net):
        assert not any(m.training for m in net.modules())
    assert {name: m.training for name, m in net.named_modules()} == before
    temporal_attribution(net, x, method="integrated_gradients", steps=4)
    assert {name: m.training for name, m in net.named_modules()} == before
    assert torch.equal(net.norm.running_mean, running)
    with pytest.raises(RuntimeError, match="boom"), eval_mode(net):
        raise RuntimeError("boom")
    assert {name: m.training for name, m in net.named_modules()} == before


@pytest.mark.parametrize("method", sorted(CAPTUM_METHODS))
def test_works_inside_inference_mode_and_no_grad(model, x, method):
    target = torch.tensor([0, 1, 2, 1, 0])
    want = temporal_attribution(model, x, target, method=method)
    with torch.inference_mode():
        inner_x, inner_target = x.clone(), target.clone()
        got = temporal_attribution(model, inner_x, inner_target, method=method)
    torch.testing.assert_close(got, want)
    with torch.no_grad():
        torch.testing.assert_close(temporal_attribution(model, x, target, method=method), want)
    assert not any(p.grad is not None for p in model.parameters())


def test_target_none_is_the_models_prediction_and_an_int_is_broadcast(model, x):
    predicted = call_model(model, x).argmax(1)
    torch.testing.assert_close(
        temporal_attribution(model, x, method="gradient"),
        temporal_attribution(model, x, predicted, method="gradient"),
    )
    torch.testing.assert_close(
        temporal_attribution(model, x, 2, method="gradient"),
        temporal_attribution(model, x, torch.full((5,), 2), method="gradient"),
    )
    with pytest.raises(ValueError, match="target must be"):
        temporal_attribution(model, x, torch.zeros(3, dtype=torch.long), method="gradient")


def test_saliency_pair_targets_the_teachers_prediction_or_the_label(x):
    torch.manual_seed(0)
    teacher, student = TinyCNN(2, 3, width=6).eval(), TinyCNN(2, 3, width=4)
    y = torch.tensor([2, 2, 0, 1, 1])
    pair = saliency_pair(teacher, student, (x, y), method="input_x_gradient")
    cls = call_model(teacher, x).argmax(1)
    torch.testing.assert_close(
        pair.student_saliency, temporal_attribution(student, x, cls, method="input_x_gradient")
    )
    torch.testing.assert_close(pair.teacher_logits, call_model(teacher, x).detach())
    by_label = saliency_pair(teacher, student, {"x": x, "y": y}, method="gradient", target="label")
    torch.testing.assert_close(
        by_label.teacher_saliency, temporal_attribution(teacher, x, y, method="gradient")
    )
    with pytest.raises(ValueError, match="needs labels"):
        saliency_pair(teacher, student, x, method="gradient", target="label")
    with pytest.raises(ValueError, match="target must be one of"):
        saliency_pair(teacher, student, x, target="student")


@pytest.mark.parametrize(
    ("method", "options", "message"),
    [
        ("gradcam", {}, "unknown attribution method 'gradcam'"),
        ("gradient", {"steps": 4}, r"\['steps'\] do not apply to attribution method 'gradient'"),
        ("integrated_gradients", {"steps": 1}, "steps=1 .* must be an integer >= 2"),
        ("occlusion", {"window": 0}, "window=0 .* must be an integer >= 1"),
        ("occlusion", {"sliding_window_shapes": (1, 4)}, "not taken here: use window="),
        (
            "integrated_gradients",
            {"method": "gausslegendre"},
            "'method' is not taken here: the integration rule is fixed",
        ),
    ],
)
def test_bad_options_are_refused_with_the_fix(method, options, message):
    with pytest.raises(ValueError, match=message):
        check_attribution_options(method, options)


def test_an_occlusion_window_longer_than_the_series_is_refused(model, x):
    with pytest.raises(ValueError, match=r"occlusion window must lie in \[1, T=24\], got 30"):
        temporal_attribution(model, x, 0, method="occlusion", window=30)


def test_the_module_imports_no_lightning():
    tree = ast.parse(Path(attribution.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported and not any(name.split(".")[0] in ("lightning", "pytorch_lightning") for name in imported)
    assert not any(
        name.startswith("lightning_tsd.") and name.split(".")[1] in _LIGHTNING_LAYER for name in imported
    )


_LIGHTNING_LAYER = (
    "module",
    "metrics",
    "callbacks",
    "report",
    "data",
    "classifier",
    "plugins",
    "cli",
    "demo",
)
