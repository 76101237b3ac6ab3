"""Saliency estimators: equal to captum, differentiable, masked, any model family."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Occlusion, Saliency
from tiny_models import FAMILIES, TinyCNN

from lightning_tsd import ESTIMATORS, temporal_saliency
from lightning_tsd.saliency import saliency_kernels

METHODS = sorted(ESTIMATORS)


@pytest.fixture
def model_and_input():
    torch.manual_seed(0)
    model = TinyCNN(in_channels=2, num_classes=3).eval()
    x = torch.randn(5, 2, 24)
    target = torch.tensor([0, 1, 2, 0, 1])
    return model, x, target


def test_gradient_equals_captum_saliency(model_and_input):
    model, x, target = model_and_input
    _, ours = temporal_saliency(model, x, target, method="gradient")
    theirs = Saliency(model).attribute(x.clone().requires_grad_(), target=target, abs=True).sum(1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_input_x_gradient_equals_captum(model_and_input):
    model, x, target = model_and_input
    _, ours = temporal_saliency(model, x, target, method="input_x_gradient")
    theirs = InputXGradient(model).attribute(x.clone().requires_grad_(), target=target).abs().sum(1)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("steps", [2, 8, 32])
def test_integrated_gradients_equals_captum_riemann_middle(model_and_input, steps):
    model, x, target = model_and_input
    _, ours = temporal_saliency(model, x, target, method="integrated_gradients", steps=steps)
    theirs = IntegratedGradients(model).attribute(x, target=target, n_steps=steps, method="riemann_middle")
    # Same interpolants and weights as captum: equal up to float summation order.
    torch.testing.assert_close(ours, theirs.abs().sum(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("window", "stride"), [(1, 1), (4, 3), (4, 4), (7, 5), (24, 1)])
def test_occlusion_equals_captum(model_and_input, window, stride):
    model, x, target = model_and_input
    _, ours = temporal_saliency(model, x, target, method="occlusion", window=window, stride=stride)
    theirs = Occlusion(model).attribute(
        x, target=target, sliding_window_shapes=(2, window), strides=(2, stride)
    )
    # captum gives every channel the window's score; we report it once per timestep.
    torch.testing.assert_close(ours, theirs[:, 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_default_target_is_models_prediction_and_logits_are_the_forward(model_and_input, method):
    model, x, _ = model_and_input
    logits, ours = temporal_saliency(model, x, method=method)
    torch.testing.assert_close(logits, model(x))
    _, explicit = temporal_saliency(model, x, model(x).argmax(1), method=method)
    torch.testing.assert_close(ours, explicit)


@pytest.mark.parametrize("method", METHODS)
def test_mask_zeroes_padded_steps(model_and_input, method):
    model, x, target = model_and_input
    mask = torch.ones(5, 24, dtype=torch.bool)
    mask[1, 18:] = False
    mask[3, 10:] = False
    _, saliency = temporal_saliency(model, x, target, method=method, mask=mask)
    assert saliency.shape == (5, 24)
    assert torch.all(saliency[~mask] == 0)
    assert saliency[mask].abs().sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_univariate_2d_input_gets_a_channel_axis(method):
    torch.manual_seed(1)
    model = TinyCNN(1, 2).eval()
    x = torch.randn(3, 16)
    _, flat = temporal_saliency(model, x, method=method)
    _, bct = temporal_saliency(model, x.unsqueeze(1), method=method)
    torch.testing.assert_close(flat, bct)


@pytest.mark.parametrize("method", METHODS)
def test_student_saliency_is_differentiable_in_parameters(method):
    torch.manual_seed(2)
    model = TinyCNN(1, 3)
    _, saliency = temporal_saliency(model, torch.randn(4, 1, 20), method=method, create_graph=True)
    assert saliency.requires_grad
    saliency.pow(2).sum().backward()
    # Every weight shapes the map (biases before a ReLU may not: its second derivative is 0).
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_teacher_saliency_builds_no_parameter_gradient(model_and_input):
    model, x, target = model_and_input
    logits, saliency = temporal_saliency(model, x, target, method="gradient")
    assert not saliency.requires_grad and not logits.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_works_under_inference_mode_like_lightning_validation(model_and_input):
    model, x, target = model_and_input
    expected = temporal_saliency(model, x, target, method="input_x_gradient")[1]
    with torch.inference_mode():
        x_inf = x.clone()
        _, saliency = temporal_saliency(model, x_inf, target, method="input_x_gradient")
    torch.testing.assert_close(saliency, expected)


def test_integrated_gradients_keeps_batchnorm_statistics_on_real_samples():
    """Interpolants must not enter a train-mode BatchNorm's batch or running statistics."""
    torch.manual_seed(3)
    model = TinyCNN(1, 3)
    x = torch.randn(8, 1, 20) * 3 + 1
    reference = TinyCNN(1, 3)
    reference.load_state_dict(model.state_dict())
    logits, _ = temporal_saliency(model, x, method="integrated_gradients", steps=4, create_graph=True)
    torch.testing.assert_close(logits, reference(x))
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    torch.testing.assert_close(model.norm.running_var, reference.norm.running_var)


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("train_mode", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("method", ["gradient", "input_x_gradient", "integrated_gradients"])
def test_model_family_matrix_double_backward(family, train_mode, method):
    """CNN+BatchNorm, LSTM, GRU and Transformer (dropout 0: the CPU flash-attention trap), in train and
    eval mode: the student's saliency loss backpropagates into every parameter."""
    torch.manual_seed(4)
    model = FAMILIES[family](2, 3).train(train_mode)
    x = torch.randn(4, 2, 12)
    options = {"steps": 4} if method == "integrated_gradients" else {}
    logits, saliency = temporal_saliency(model, x, method=method, create_graph=True, **options)
    (logits.logsumexp(1).mean() + saliency.std(1).mean()).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing


def test_transformer_flash_kernel_trap_is_real_without_kernel_selection():
    """Documents why saliency_kernels exists: outside it, the CPU flash kernel refuses double backward."""
    torch.manual_seed(5)
    model = FAMILIES["transformer"](1, 2).eval()
    x = torch.randn(2, 1, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x)[:, 0].sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="not implemented"):
        grad.sum().backward()
    x.grad = None
    with saliency_kernels("cpu"):
        out = model(x)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)
    grad.sum().backward()


def test_compiled_module_runs_on_its_original_module():
    torch.manual_seed(6)
    model = TinyCNN(1, 2)
    compiled = torch.compile(model)
    x = torch.randn(3, 1, 16)
    _, via_compiled = temporal_saliency(compiled, x, method="gradient", create_graph=True)
    _, direct = temporal_saliency(model, x, method="gradient", create_graph=True)
    torch.testing.assert_close(via_compiled, direct)
    via_compiled.sum().backward()
    assert model.conv.weight.grad is not None


def test_unknown_method_and_bad_options_are_named():
    model = TinyCNN(1, 2)
    x = torch.randn(2, 1, 8)
    with pytest.raises(ValueError, match="unknown saliency method 'lime'"):
        temporal_saliency(model, x, method="lime")
    with pytest.raises(ValueError, match="window"):
        temporal_saliency(model, x, method="occlusion", window=9)
    with pytest.raises(ValueError, match="steps"):
        temporal_saliency(model, x, method="integrated_gradients", steps=0)
    with pytest.raises(ValueError, match=r"\['steps'\] do not apply to saliency method 'gradient'"):
        temporal_saliency(model, x, method="gradient", steps=4)
    with pytest.raises(ValueError, match=r"target classes must lie in \[0, 2\)"):
        temporal_saliency(model, x, torch.tensor([0, 5]))
    with pytest.raises(TypeError, match="nn.Module"):
        temporal_saliency(lambda t: t, x)
