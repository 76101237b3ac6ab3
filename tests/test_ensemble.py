"""TeacherEnsemble: logits are the log of the members' mean probability, its saliency is that of the
ensemble's prediction (checked against a hand-derived gradient), and it saves and loads as one teacher."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import TinyCNN
from torch import nn

from lightning_tsd._batch import call_model
from lightning_tsd.checkpoint import load_teacher, model_spec, save_teacher
from lightning_tsd.ensemble import TeacherEnsemble, ensemble_log_probs
from lightning_tsd.models import FCN, NarrowFCN
from lightning_tsd.saliency import ESTIMATORS, temporal_saliency

C, T, K = 2, 12, 3
OPTIONS = {"integrated_gradients": {"steps": 2}, "occlusion": {"window": 4, "stride": 4}}


def _linear_members(n: int = 3, scale: float = 1.0) -> list[nn.Sequential]:
    torch.manual_seed(0)
    members = [nn.Sequential(nn.Flatten(), nn.Linear(C * T, K)) for _ in range(n)]
    with torch.no_grad():
        for m in members:
            m[1].weight.mul_(scale)
    return members


def test_logits_are_log_of_mean_probabilities():
    members = _linear_members(3)
    x = torch.randn(5, C, T)
    ensemble = TeacherEnsemble(members)
    with torch.no_grad():
        probs = [torch.softmax(m(x), dim=1) for m in members]
        expected = torch.log((probs[0] + probs[1] + probs[2]) / 3)
        got = ensemble(x)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.exp().sum(dim=1), torch.ones(5))


def test_one_member_equals_its_log_softmax():
    (member,) = _linear_members(1)
    x = torch.randn(4, C, T)
    with torch.no_grad():
        torch.testing.assert_close(TeacherEnsemble([member])(x), torch.log_softmax(member(x), dim=1))


def test_stable_for_large_logits():
    members = _linear_members(2, scale=1e4)  # logits ~1e3..1e4: softmax then log would give -inf
    x = torch.randn(3, C, T)
    with torch.no_grad():
        got = TeacherEnsemble(members)(x)
        z = [m(x).double() for m in members]
    expected = torch.logsumexp(torch.stack([torch.log_softmax(v, dim=1) for v in z]), dim=0) - math.log(2)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-3)


def test_members_get_the_mask_when_they_take_it():
    torch.manual_seed(0)
    with_mask, without = TinyCNN(C, K).eval(), nn.Sequential(nn.Flatten(), nn.Linear(C * T, K))
    x, mask = torch.randn(2, C, T), torch.ones(2, T, dtype=torch.bool)
    mask[0, 8:] = False
    with torch.no_grad():
        expected = ensemble_log_probs([with_mask(x, mask=mask), without(x)])
        got = TeacherEnsemble([with_mask, without])(x, mask=mask)
        assert not torch.allclose(got, TeacherEnsemble([with_mask, without])(x))
    torch.testing.assert_close(got, expected)


def test_members_must_agree_on_classes():
    torch.manual_seed(0)
    ensemble = TeacherEnsemble([FCN(C, 3), FCN(C, 4)])
    with pytest.raises(ValueError, match=r"same number of classes, got \[3, 4\]"):
        ensemble(torch.randn(2, C, T))
    with pytest.raises(ValueError, match="at least one member"):
        TeacherEnsemble([])
    with pytest.raises(TypeError, match="takes a list of teachers"):
        TeacherEnsemble(FCN(C, 3))
    with pytest.raises(TypeError, match="ensemble member 1 must be"):
        TeacherEnsemble([FCN(C, 3), 42])


def test_gradient_saliency_is_that_of_the_ensemble_prediction():
    members = _linear_members(3)
    ensemble = TeacherEnsemble(members)
    x = torch.randn(4, C, T)
    logits, saliency = temporal_saliency(ensemble, x, method="gradient", create_graph=True)
    # By hand: d log pbar_k / dx = sum_i p_ik (W_ik - sum_j p_ij W_ij) / (n pbar_k), for z_i = W_i x + b_i.
    with torch.no_grad():
        weights = torch.stack([m[1].weight for m in members])  # (n, K, C*T)
        probs = torch.stack([torch.softmax(m(x), dim=1) for m in members])  # (n, B, K)
        pbar = probs.mean(dim=0)
        k = pbar.argmax(dim=1)
        rows = torch.arange(x.shape[0])
        expected_w = weights[:, k]  # (n, B, C*T): W_ik per sample
        mean_w = torch.einsum("nbk,nkd->nbd", probs, weights)  # sum_j p_ij W_ij
        p_k = probs[:, rows, k]  # (n, B)
        grad = (p_k.unsqueeze(-1) * (expected_w - mean_w)).sum(dim=0) / (
            len(members) * pbar[rows, k]
        ).unsqueeze(-1)
        expected = grad.view(-1, C, T).abs().sum(dim=1)
    torch.testing.assert_close(logits.detach(), torch.log(pbar))
    torch.testing.assert_close(saliency.detach(), expected, rtol=1e-4, atol=1e-6)
    saliency.sum().backward()
    assert all(m[1].weight.grad is not None and m[1].weight.grad.abs().sum() > 0 for m in members)


@pytest.mark.parametrize("method", sorted(ESTIMATORS))
def test_every_estimator_gives_a_finite_map(method):
    torch.manual_seed(0)
    ensemble = TeacherEnsemble([TinyCNN(C, K), FCN(C, K)]).eval()
    logits, saliency = temporal_saliency(
        ensemble, torch.randn(3, C, T), method=method, **OPTIONS.get(method, {})
    )
    assert logits.shape == (3, K) and saliency.shape == (3, T)
    assert torch.isfinite(saliency).all() and saliency.abs().sum() > 0


def test_saves_and_loads_as_one_teacher_file(tmp_path):
    torch.manual_seed(0)
    ensemble = TeacherEnsemble([FCN(C, K), NarrowFCN(C, K)]).eval()
    spec = model_spec(ensemble)
    assert spec["class_path"] == "lightning_tsd.ensemble.TeacherEnsemble"
    assert [m["class_path"] for m in spec["init_args"]["members"]] == [
        "lightning_tsd.models.fcn.FCN",
        "lightning_tsd.models.fcn.NarrowFCN",
    ]
    save_teacher(ensemble, tmp_path / "ensemble.pt")  # read back with weights_only=True
    loaded = load_teacher(tmp_path / "ensemble.pt").eval()
    assert isinstance(loaded, TeacherEnsemble) and len(loaded.members) == 2
    x = torch.randn(3, C, T)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ensemble(x), rtol=0, atol=0)


def test_members_from_teacher_files_and_specs(tmp_path):
    torch.manual_seed(0)
    a, b = FCN(C, K).eval(), NarrowFCN(C, K).eval()
    save_teacher(a, tmp_path / "a.pt")
    ensemble = TeacherEnsemble([tmp_path / "a.pt", str(tmp_path / "a.pt"), model_spec(b)]).eval()
    ensemble.members[2].load_state_dict(b.state_dict())
    x = torch.randn(2, C, T)
    with torch.no_grad():
        expected = ensemble_log_probs([a(x), a(x), b(x)])
        torch.testing.assert_close(ensemble(x), expected)


def test_member_without_a_spec_cannot_be_saved(tmp_path):
    ensemble = TeacherEnsemble([FCN(C, K), nn.Sequential(nn.Flatten(), nn.Linear(C * T, K))])
    assert ensemble.init_args is None and model_spec(ensemble) is None
    with pytest.raises(ValueError, match="cannot tell how to rebuild TeacherEnsemble"):
        save_teacher(ensemble, tmp_path / "e.pt")


def test_call_model_and_state_dict_keys():
    ensemble = TeacherEnsemble(_linear_members(2))
    assert call_model(ensemble, torch.randn(2, C, T)).shape == (2, K)
    assert sorted(ensemble.state_dict()) == [
        f"members.{i}.1.{p}" for i in range(2) for p in ("bias", "weight")
    ]
    assert "2 members" in repr(ensemble)


def test_distiller_with_an_ensemble_teacher_caches_checkpoints_and_resumes(tmp_path):
    """An ensemble is one teacher to the distiller: cached after epoch 1, rebuilt from its checkpoint."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader
    from trainers import quiet_trainer

    from lightning_tsd import TemporalSaliencyDistiller
    from lightning_tsd.models import FCN, NarrowFCN

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 1, 32, generator=g), torch.randint(0, 3, (24,), generator=g)
    loader = DataLoader([{"x": x[i], "y": y[i], "index": i} for i in range(24)], batch_size=8)
    members = [FCN(1, 3, num_filters=4).eval(), FCN(1, 3, num_filters=4).eval()]
    model = TemporalSaliencyDistiller(members, NarrowFCN(1, 3), saliency="gradient", teacher_cache=True)
    assert isinstance(model.teacher, TeacherEnsemble)
    calls = []
    model.teacher.register_forward_hook(lambda *_: calls.append(1))
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, save_last=True)
    quiet_trainer(max_epochs=2, limit_val_batches=0, enable_checkpointing=True, callbacks=[ckpt]).fit(
        model, loader
    )
    assert len(calls) == 3  # the cache's fill before epoch 1 (it then answers the class count); none after
    restored = TemporalSaliencyDistiller.load_from_checkpoint(tmp_path / "last.ckpt", weights_only=True)
    assert isinstance(restored.teacher, TeacherEnsemble) and len(restored.teacher_cache) == 24
    probe = torch.randn(5, 1, 32)
    with torch.no_grad():
        assert torch.allclose(restored.teacher(probe), model.teacher(probe))
