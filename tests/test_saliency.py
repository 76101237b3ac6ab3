"""Saliency estimators: equal to captum, differentiable, masked, any model family."""

from __future__ import annotations

import pytest
import torch
from captum.attr import InputXGradient, IntegratedGradients, Occlusion, Saliency
from tiny_models import FAMILIES, TinyCNN

from lightning_tsd import ESTIMATORS, temporal_saliency
from lightning_tsd.saliency import check_saliency_options, saliency_kernels

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


# ----------------------------------------------------------------------------- integrated gradients variants
@pytest.mark.parametrize(
    ("steps", "internal_batch_size"), [(2, 5), (3, 7), (8, 12), (8, 40), (8, None), (3, 2), (5, 64)]
)
def test_chunked_teacher_ig_equals_captum_internal_batch_size(model_and_input, steps, internal_batch_size):
    """Chunks of 7 or 12 rows split the 5-sample steps (15 or 40 rows do not divide evenly), 2 < B rows."""
    model, x, target = model_and_input
    _, ours = temporal_saliency(
        model, x, target, method="integrated_gradients", steps=steps, internal_batch_size=internal_batch_size
    )
    theirs = IntegratedGradients(model).attribute(
        x,
        target=target,
        n_steps=steps,
        method="riemann_middle",
        internal_batch_size=internal_batch_size if internal_batch_size and internal_batch_size >= 5 else None,
    )
    torch.testing.assert_close(ours, theirs.abs().sum(1), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("internal_batch_size", [None, 2])
def test_single_midpoint_step_is_input_x_gradient_at_half_the_input(model_and_input, internal_batch_size):
    """steps=1: |x * dz/dx(x / 2)| = 2 |(x / 2) * dz/dx(x / 2)| (captum refuses riemann n_steps=1)."""
    model, x, target = model_and_input
    _, ours = temporal_saliency(
        model, x, target, method="integrated_gradients", steps=1, internal_batch_size=internal_batch_size
    )
    theirs = InputXGradient(model).attribute((x / 2).requires_grad_(), target=target).abs().sum(1) * 2
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def _forward_batch_sizes(model: torch.nn.Module) -> list[int]:
    sizes: list[int] = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(args[0].shape[0]))
    return sizes


def test_teacher_ig_runs_interpolants_in_bounded_chunks(model_and_input):
    model, x, target = model_and_input
    sizes = _forward_batch_sizes(model)
    temporal_saliency(model, x, target, method="integrated_gradients", steps=8, internal_batch_size=12)
    assert sizes == [5, 12, 12, 12, 4]  # x under no_grad, then 40 interpolant rows in chunks of <= 12
    sizes.clear()
    temporal_saliency(model, x, target, method="integrated_gradients", steps=32)  # default: max(B, 64) rows
    assert sizes == [5, 64, 64, 32]
    sizes.clear()  # a student keeps every graph: one call with x, whatever internal_batch_size says
    _, student = temporal_saliency(
        model, x, target, method="integrated_gradients", steps=8, create_graph=True, internal_batch_size=12
    )
    assert sizes == [45]
    _, teacher = temporal_saliency(model, x, target, method="integrated_gradients", steps=8)
    torch.testing.assert_close(student.detach(), teacher, atol=1e-5, rtol=1e-4)


def test_chunked_teacher_ig_keeps_batchnorm_statistics_on_real_samples():
    torch.manual_seed(3)
    model = TinyCNN(1, 3)
    reference = TinyCNN(1, 3)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(8, 1, 20) * 3 + 1
    logits, _ = temporal_saliency(model, x, method="integrated_gradients", steps=4, internal_batch_size=5)
    torch.testing.assert_close(logits, reference(x))
    torch.testing.assert_close(model.norm.running_mean, reference.norm.running_mean)
    torch.testing.assert_close(model.norm.running_var, reference.norm.running_var)
    assert model.norm.training


def _monotone_model(length: int) -> torch.nn.Module:
    """Positive weights and a softplus: dz_0/dx > 0 everywhere, so for x > 0 the map x * mean-gradient
    needs no absolute value and a mean of maps is the map of the mean gradient. Strongly curved along
    the path (the single midpoint misses the dense map by ~70%)."""
    torch.manual_seed(7)
    model = torch.nn.Sequential(
        torch.nn.Conv1d(1, 4, 3, padding=1),
        torch.nn.Softplus(beta=4.0),
        torch.nn.Flatten(),
        torch.nn.Linear(4 * length, 2),
    )
    with torch.no_grad():
        for p in model.parameters():
            p.abs_()
        model[0].weight.mul_(3.0)
        model[0].bias.fill_(-3.0)
    return model.eval()


def test_uniform_sampling_is_unbiased_for_the_dense_ig_map():
    model = _monotone_model(12)
    x = torch.rand(3, 1, 12, generator=torch.Generator().manual_seed(8)) * 2 + 0.5
    target = torch.zeros(3, dtype=torch.long)
    _, dense = temporal_saliency(model, x, target, method="integrated_gradients", steps=256)
    n = 4000  # 4000 independent 2-draw estimates per sample, in one call (each row draws its own alphas)
    _, maps = temporal_saliency(
        model,
        x.repeat(n, 1, 1),
        target.repeat(n),
        method="integrated_gradients",
        steps=2,
        sampling="uniform",
        generator=torch.Generator().manual_seed(0),
    )
    maps = maps.view(n, 3, 12)
    standard_error = maps.std(0) / n**0.5

    def close(candidate: torch.Tensor) -> bool:
        return bool(((candidate - dense).abs() / standard_error).max() < 4.5) and bool(
            (candidate - dense).norm() / dense.norm() < 0.05
        )

    assert close(maps.mean(0))  # fixed seeds: deterministic (measured: 2.2 standard errors, 2% off)
    _, midpoint2 = temporal_saliency(model, x, target, method="integrated_gradients", steps=2)
    _, midpoint1 = temporal_saliency(model, x, target, method="integrated_gradients", steps=1)
    assert not close(midpoint2) and not close(midpoint1)  # the check tells a biased estimate apart
    assert (maps[0] - dense).norm() / dense.norm() > 0.3  # one estimate alone is noisy


def test_uniform_sampling_follows_its_generator_and_the_global_rng(model_and_input):
    model, x, target = model_and_input

    def draw(**options):
        return temporal_saliency(
            model, x, target, method="integrated_gradients", steps=2, sampling="uniform", **options
        )[1]

    first = draw(generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(draw(generator=torch.Generator().manual_seed(1)), first, rtol=0, atol=0)
    assert not torch.allclose(draw(generator=torch.Generator().manual_seed(2)), first)
    torch.manual_seed(3)
    global_first = draw()
    torch.manual_seed(3)
    torch.testing.assert_close(draw(), global_first, rtol=0, atol=0)
    chunked = draw(generator=torch.Generator().manual_seed(1), internal_batch_size=3)
    torch.testing.assert_close(chunked, first, atol=1e-5, rtol=1e-4)  # same draws, any chunking


def _two_draw_maps(sampling: str, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense IG map (256 midpoints) of the monotone model, and ``n`` independent 2-draw estimates of it."""
    model = _monotone_model(12)
    x = torch.rand(3, 1, 12, generator=torch.Generator().manual_seed(8)) * 2 + 0.5
    target = torch.zeros(3, dtype=torch.long)
    _, dense = temporal_saliency(model, x, target, method="integrated_gradients", steps=256)
    _, maps = temporal_saliency(
        model, x.repeat(n, 1, 1), target.repeat(n), method="integrated_gradients", steps=2,
        sampling=sampling, generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    return dense, maps.view(n, 3, 12)


@pytest.mark.parametrize("sampling", ["antithetic", "stratified"])
def test_paired_samplings_are_unbiased_for_the_dense_ig_map_with_less_variance(sampling):
    """Antithetic pairs (a, 1 - a) and one draw per half [0, 1/2), [1/2, 1): each coefficient is U(0, 1) on its
    own, so the mean of many estimates is the dense map; along this monotone path both spread less than two
    independent draws."""
    dense, maps = _two_draw_maps(sampling)
    _, uniform = _two_draw_maps("uniform")
    standard_error = maps.std(0) / maps.shape[0] ** 0.5
    assert float(((maps.mean(0) - dense).abs() / standard_error).max()) < 4.5  # fixed seeds: deterministic
    assert float((maps.mean(0) - dense).norm() / dense.norm()) < 0.03  # measured: 0.5% and 1.7%
    spread, uniform_spread = float(maps.std(0).mean()), float(uniform.std(0).mean())
    assert spread < 0.75 * uniform_spread, (spread, uniform_spread)  # measured: 0.66 and 0.67


@pytest.mark.parametrize("sampling", ["antithetic", "stratified"])
def test_paired_samplings_follow_their_generator_in_either_path(model_and_input, sampling):
    model, x, target = model_and_input

    def draw(seed, **options):
        return temporal_saliency(
            model, x, target, method="integrated_gradients", steps=3, sampling=sampling,
            generator=torch.Generator().manual_seed(seed), **options,
        )[1]  # fmt: skip

    first = draw(1)
    torch.testing.assert_close(draw(1), first, rtol=0, atol=0)
    assert not torch.allclose(draw(2), first)
    torch.testing.assert_close(draw(1, internal_batch_size=4), first, atol=1e-5, rtol=1e-4)  # any chunking
    student = temporal_saliency(
        model, x, target, method="integrated_gradients", steps=3, sampling=sampling, create_graph=True,
        generator=torch.Generator().manual_seed(1),
    )[1]  # fmt: skip
    torch.testing.assert_close(
        student.detach(), first, atol=1e-5, rtol=1e-4
    )  # the student's path: same draws


@pytest.mark.parametrize(
    "options",
    [
        {"steps": 2, "sampling": "uniform"},
        {"steps": 1},
        {"steps": 2, "sampling": "antithetic"},
        {"steps": 2, "sampling": "stratified"},
    ],
    ids=["uniform", "mid1", "antithetic", "stratified"],
)
def test_cheap_ig_variants_are_differentiable_in_parameters(options):
    torch.manual_seed(2)
    model = TinyCNN(1, 3)
    _, saliency = temporal_saliency(
        model, torch.randn(4, 1, 20), method="integrated_gradients", create_graph=True, **options
    )
    saliency.pow(2).sum().backward()
    for name, p in model.named_parameters():
        if name.endswith("weight"):
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ----------------------------------------------------------------------------- option checks, validated=True
@pytest.mark.parametrize(
    ("method", "options", "match"),
    [
        (
            "integrated_gradients",
            {"steps": 0},
            r"steps=0 of method 'integrated_gradients' must be an integer >= 1",
        ),
        ("integrated_gradients", {"steps": 2.5}, r"steps=2.5 .* must be an integer >= 1"),
        ("integrated_gradients", {"steps": True}, r"steps=True"),
        (
            "integrated_gradients",
            {"sampling": "sobol"},
            r"sampling='sobol' .* one of \['midpoint', 'uniform', 'antithetic', 'stratified'\]",
        ),
        ("integrated_gradients", {"internal_batch_size": 0}, r"internal_batch_size=0 .* None or an integer"),
        ("integrated_gradients", {"generator": 0}, r"generator=0 .* torch.Generator"),
        ("occlusion", {"window": 0}, r"window=0"),
        ("occlusion", {"stride": -1}, r"stride=-1 .* takes \['output', 'stride', 'window'\]"),
        (
            "gradient",
            {"output": "probability"},
            r"output='probability' .* one of \['logit', 'log_prob', 'margin'\]",
        ),
        (
            "gradient",
            {"steps": 4},
            r"\['steps'\] do not apply to saliency method 'gradient', which takes \['output'\]",
        ),
        ("occlusion", {"steps": 4}, r"\['steps'\] do not apply .* takes \['output', 'stride', 'window'\]"),
        ("lime", {}, r"unknown saliency method 'lime'"),
    ],
)
def test_check_saliency_options_names_the_bad_option(method, options, match):
    with pytest.raises(ValueError, match=match):
        check_saliency_options(method, options)
    with pytest.raises(ValueError, match=match):  # temporal_saliency runs the same check
        temporal_saliency(TinyCNN(1, 2), torch.randn(2, 1, 8), method=method, **options)


def test_check_saliency_options_accepts_every_documented_option():
    generator = torch.Generator()
    options = {"steps": 1, "sampling": "uniform", "generator": generator, "internal_batch_size": None}
    assert check_saliency_options("integrated_gradients", options) is None
    assert check_saliency_options("occlusion", {"window": 3, "stride": 1}) is None
    assert check_saliency_options("input_x_gradient", {}) is None


@pytest.mark.parametrize("method", METHODS)
def test_validated_call_equals_checked_call_and_makes_no_host_sync(model_and_input, method, monkeypatch):
    model, x, target = model_and_input
    mask = torch.ones(5, 24, dtype=torch.bool)
    mask[2, 20:] = False
    expected = temporal_saliency(model, x, target, method=method, mask=mask)
    syncs: list[str] = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor, name, lambda self, *a, _o=original, _n=name: syncs.append(_n) or _o(self, *a)
        )
    logits, saliency = temporal_saliency(model, x, target, method=method, mask=mask, validated=True)
    assert syncs == []
    torch.testing.assert_close(logits, expected[0])
    torch.testing.assert_close(saliency, expected[1])
    temporal_saliency(model, x, target, method=method, mask=mask)
    assert syncs  # the unvalidated call checks the mask and the target on the host


class _Explained(torch.nn.Module):
    """``model``'s logits turned into the scalar an ``output`` option explains, one column per class."""

    def __init__(self, model: torch.nn.Module, output: str) -> None:
        super().__init__()
        self.model, self.output = model, output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.model(x)
        if self.output == "log_prob":
            return torch.log_softmax(z, dim=1)
        # margin of class k: z_k - logsumexp_{j != k} z_j, written out class by class
        eye = torch.eye(z.shape[1], dtype=torch.bool)
        return torch.stack(
            [z[:, k] - torch.logsumexp(z[:, ~eye[k]], dim=1) for k in range(z.shape[1])], dim=1
        )


@pytest.mark.parametrize("output", ["log_prob", "margin"])
@pytest.mark.parametrize("method", METHODS)
def test_output_option_explains_the_log_probability_or_the_margin(model_and_input, method, output):
    """Every estimator with ``output=`` equals the same estimator (``logit``) on a model whose outputs are
    the log-probabilities or margins, written out by hand; the logits returned are still the model's."""
    model, x, target = model_and_input
    logits, ours = temporal_saliency(model, x, target, method=method, output=output)
    _, theirs = temporal_saliency(_Explained(model, output), x, target, method=method)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(logits, model(x))
    _, plain = temporal_saliency(model, x, target, method=method)
    assert not torch.allclose(ours, plain, atol=1e-3)  # it explains something else than the logit


def test_margin_of_two_classes_is_the_logit_difference():
    """For K=2 the margin is ``z_k - z_j``: its gradient is the difference of the two logits' gradients."""
    torch.manual_seed(1)
    model = TinyCNN(in_channels=1, num_classes=2).eval()
    x = torch.randn(3, 1, 16, requires_grad=True)
    target = torch.tensor([0, 1, 1])
    z = model(x)
    (grad,) = torch.autograd.grad((z[:, 0] - z[:, 1]).mul(torch.tensor([1.0, -1.0, -1.0])).sum(), x)
    _, ours = temporal_saliency(model, x.detach(), target, method="gradient", output="margin")
    torch.testing.assert_close(ours, grad.abs().sum(1))
