"""Reference models: shapes, mask-awareness, parameter counts, double backward, the registry."""

from __future__ import annotations

import re

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from lightning_tsd.models import (
    FCN,
    MODEL_REGISTRY,
    GRUClassifier,
    InceptionTime,
    NarrowFCN,
    ResNet1d,
    TransformerClassifier,
    build_model,
    count_parameters,
)

ALL_MODELS = [InceptionTime, ResNet1d, FCN, NarrowFCN, GRUClassifier, TransformerClassifier]
# Small configurations keep the tests fast; parameter counts use the defaults.
SMALL = {
    InceptionTime: {"num_filters": 4, "depth": 3, "kernel_size": 8, "bottleneck": 4},
    ResNet1d: {"num_filters": 4},
    FCN: {"num_filters": 8},
    NarrowFCN: {},
    GRUClassifier: {"hidden_size": 8},
    TransformerClassifier: {"d_model": 8, "nhead": 2, "dim_feedforward": 16, "dropout": 0.0},
}


def small(cls: type, in_channels: int, num_classes: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(in_channels, num_classes, **{**SMALL[cls], **kwargs})


def padded_batch(
    channels: int = 2, lengths: tuple[int, ...] = (24, 15, 9)
) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(1)
    x = torch.randn(len(lengths), channels, max(lengths))
    mask = torch.arange(max(lengths)) < torch.tensor(lengths).unsqueeze(1)
    return x.masked_fill(~mask.unsqueeze(1), 0.0), mask


@pytest.mark.parametrize("cls", ALL_MODELS)
@pytest.mark.parametrize(("batch", "channels", "length"), [(2, 1, 16), (3, 4, 21)])
def test_output_shape(cls, batch, channels, length):
    model = small(cls, channels, 5)
    assert model(torch.randn(batch, channels, length)).shape == (batch, 5)
    mask = torch.ones(batch, length, dtype=torch.bool)
    assert model(torch.randn(batch, channels, length), mask=mask).shape == (batch, 5)


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_default_config_builds_and_runs(cls):
    model = cls(3, 4)
    assert model(torch.randn(2, 3, 32)).shape == (2, 4)


@pytest.mark.parametrize("cls", ALL_MODELS)
@pytest.mark.parametrize("train", [False, True])
def test_padded_values_do_not_change_logits(cls, train):
    model = small(cls, 2, 3).train(train)
    x, mask = padded_batch()
    garbage = x + 100.0 * torch.randn_like(x) * (~mask).unsqueeze(1)
    with torch.no_grad():
        clean, dirty = model(x, mask=mask), model(garbage, mask=mask)
        unmasked = model(garbage)
    torch.testing.assert_close(clean, dirty, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(clean, unmasked, atol=1e-3)  # the mask is what protects the logits


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_all_true_mask_equals_no_mask(cls):
    model = small(cls, 2, 3).eval()
    x = torch.randn(3, 2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask=torch.ones(3, 20, dtype=torch.bool)), model(x))


@pytest.mark.parametrize("pooling", ["mean", "max", "last"])
def test_gru_poolings_are_mask_aware(pooling):
    model = small(GRUClassifier, 2, 3, pooling=pooling).eval()
    x, mask = padded_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x, mask=mask), model(x + 50.0 * (~mask).unsqueeze(1), mask=mask))
        # a sample cut to its real steps gives the same logits as its padded, masked version
        torch.testing.assert_close(model(x[2:, :, :9]), model(x[2:], mask=mask[2:]))


@pytest.mark.parametrize("cls", ALL_MODELS)
def test_docstring_states_default_parameter_count(cls):
    stated = re.search(r"\*\*([\d,]+)\*\*\s+parameters", cls.__doc__)
    assert stated, f"{cls.__name__} docstring must state its parameter count as **N** parameters"
    assert count_parameters(cls(in_channels=1, num_classes=2)) == int(stated.group(1).replace(",", ""))


def test_parameter_count_sizes():
    assert 300_000 <= count_parameters(InceptionTime(1, 2)) <= 900_000
    assert 300 <= count_parameters(NarrowFCN(1, 2)) <= 2_000
    assert count_parameters(TransformerClassifier(1, 2, position="learned", max_len=100)) == 17_218 + 100 * 32
    frozen = NarrowFCN(1, 2)
    frozen.head.requires_grad_(False)
    assert count_parameters(frozen, trainable_only=True) == 1_170 - frozen.head.weight.numel() - 2


@pytest.mark.parametrize("cls", ALL_MODELS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_double_backward_through_input_gradient(cls, with_mask):
    model = small(cls, 2, 3).train()
    x, mask = padded_batch()
    x.requires_grad_(True)
    with sdpa_kernel(SDPBackend.MATH):
        logits = model(x, mask=mask if with_mask else None)
        (grad,) = torch.autograd.grad(logits[:, 0].sum(), x, create_graph=True)
        grad.abs().sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_transformer_learned_positions_and_errors():
    model = small(TransformerClassifier, 1, 2, position="learned", max_len=16)
    assert model(torch.randn(2, 1, 16)).shape == (2, 2)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.randn(2, 1, 17))
    with pytest.raises(ValueError, match="position"):
        TransformerClassifier(1, 2, position="rotary")
    with pytest.raises(ValueError, match="pooling"):
        GRUClassifier(1, 2, pooling="sum")


@pytest.mark.parametrize("name", sorted(MODEL_REGISTRY))
def test_build_model_by_name_and_rebuild_from_init_args(name):
    model = build_model(name.lower(), in_channels=2, num_classes=3, **SMALL[MODEL_REGISTRY[name]])
    assert type(model) is MODEL_REGISTRY[name]
    assert all(isinstance(v, (int, float, str)) for v in model.init_args.values())
    clone = type(model)(**model.init_args)
    clone.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, 12)
    torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="InceptionTime"):
        build_model("LSTMFCN", 1, 2)


@pytest.mark.parametrize("activation", ["gelu", "silu", "softplus"])
def test_fcn_students_take_a_smooth_activation_with_the_same_parameters(activation):
    """A smooth activation has a non-zero second derivative (a saliency loss can move where units switch
    on); the parameter count and the rebuild from ``init_args`` are unchanged."""
    from lightning_tsd.models import FCN, NarrowFCN, count_parameters
    from lightning_tsd.models._common import ACTIVATIONS

    smooth = NarrowFCN(1, 2, activation=activation)
    assert count_parameters(smooth) == count_parameters(NarrowFCN(1, 2)) == 1170
    kinds = {type(m) for m in smooth.modules()}
    assert ACTIVATIONS[activation] in kinds and torch.nn.ReLU not in kinds
    rebuilt = type(smooth)(**smooth.init_args)
    assert rebuilt.init_args["activation"] == activation
    assert "activation" not in FCN(1, 2, 4).init_args  # a ReLU model's spec is as before
    x = torch.randn(3, 1, 20, requires_grad=True)
    (grad,) = torch.autograd.grad(smooth.eval()(x)[:, 0].sum(), x, create_graph=True)
    second = torch.autograd.grad(grad.pow(2).sum(), x)[0]
    assert second.abs().sum() > 0  # a ReLU network's input Hessian is 0; this one's is not
    with pytest.raises(ValueError, match=r"activation must be one of \['gelu', 'relu', 'silu', 'softplus'\]"):
        NarrowFCN(1, 2, activation="tanh")
