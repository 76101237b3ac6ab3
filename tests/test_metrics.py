"""Functional metrics against hand-computed values and scipy; metric classes against the functional means,
in one process and synced across two (gloo)."""

from __future__ import annotations

import math
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats
from torchmetrics.utilities.data import dim_zero_sum

from lightning_tsd.functional import (
    average_ranks,
    saliency_alignment,
    teacher_agreement,
    teacher_student_divergence,
    topk_size,
)
from lightning_tsd.metrics import SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence


def _values(out: dict) -> dict:
    return {k: v.tolist() for k, v in out.items()}


def test_spearman_with_ties_by_hand_and_scipy():
    student = torch.tensor([[1.0, 2.0, 2.0, 3.0]])
    teacher = torch.tensor([[1.0, 3.0, 2.0, 4.0]])
    # ranks [1, 2.5, 2.5, 4] vs [1, 3, 2, 4]: cov 4.5, variances 4.5 and 5 -> 4.5 / sqrt(22.5) = sqrt(0.9)
    got = saliency_alignment(student, teacher)["spearman"]
    assert got.item() == pytest.approx(math.sqrt(0.9), abs=1e-6)
    assert got.item() == pytest.approx(stats.spearmanr([1, 2, 2, 3], [1, 3, 2, 4]).statistic, abs=1e-6)


def test_average_ranks_match_scipy_rankdata():
    x = torch.randint(0, 4, (20, 9), generator=torch.Generator().manual_seed(0)).double()
    np.testing.assert_allclose(average_ranks(x).numpy(), stats.rankdata(x.numpy(), axis=1))


def test_pearson_cosine_topk_by_hand():
    out = _values(saliency_alignment(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])))
    # centred [-1, 0, 1] and [-7/3, -1/3, 8/3]: cov 5, sums of squares 2 and 114/9
    assert out["pearson"][0] == pytest.approx(5 / math.sqrt(2 * 114 / 9), abs=1e-6)
    assert out["cosine"][0] == pytest.approx(31 / math.sqrt(14 * 69), abs=1e-6)
    assert out["topk_overlap"][0] == 1.0  # k = max(1, round(0.3)) = 1: both peak at the last step

    teacher = torch.tensor([[9.0, 8.0, 7.0, 0, 0, 0, 0, 0, 0, 0]])
    student = torch.tensor([[8.0, 0, 9.0, 0, 0, 7.0, 0, 0, 0, 0]])
    # k = 3: teacher {0, 1, 2}, student {2, 0, 5} -> 2 / 3
    assert saliency_alignment(student, teacher, topk_fraction=0.3)["topk_overlap"].item() == pytest.approx(
        2 / 3
    )


def test_topk_size_rounds_and_floors_at_one():
    assert [topk_size(t, 0.1) for t in (1, 4, 5, 15, 24, 25, 100)] == [1, 1, 1, 2, 2, 3, 10]


def test_masked_steps_are_excluded():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.rand(3, 10, generator=g), torch.rand(3, 10, generator=g)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 7:] = False  # padded at the end
    mask[1, :2] = False  # padded at the start, and a hole
    mask[1, 5] = False
    garbage_s, garbage_t = student.masked_fill(~mask, 1e6), teacher.masked_fill(~mask, -1e6)
    got = saliency_alignment(garbage_s, garbage_t, mask, topk_fraction=0.3)
    for i in range(3):
        alone = saliency_alignment(student[i, mask[i]][None], teacher[i, mask[i]][None], topk_fraction=0.3)
        for key, value in alone.items():
            assert got[key][i].item() == pytest.approx(value.item(), abs=1e-6), (key, i)
    real_s, real_t = student[1, mask[1]].numpy(), teacher[1, mask[1]].numpy()
    assert got["spearman"][1].item() == pytest.approx(stats.spearmanr(real_s, real_t).statistic, abs=1e-6)
    assert got["pearson"][1].item() == pytest.approx(stats.pearsonr(real_s, real_t).statistic, abs=1e-6)


def test_random_ties_and_lengths_match_scipy():
    g = torch.Generator().manual_seed(2)
    student = torch.randint(0, 5, (16, 30), generator=g).double()
    teacher = torch.randint(0, 5, (16, 30), generator=g).double()
    lengths = torch.randint(3, 31, (16,), generator=g)
    mask = torch.arange(30) < lengths[:, None]
    got = saliency_alignment(student, teacher, mask)
    for i, n in enumerate(lengths.tolist()):
        s, t = student[i, :n].numpy(), teacher[i, :n].numpy()
        assert got["spearman"][i].item() == pytest.approx(stats.spearmanr(s, t).statistic, abs=1e-9)
        assert got["pearson"][i].item() == pytest.approx(stats.pearsonr(s, t).statistic, abs=1e-9)
        assert got["cosine"][i].item() == pytest.approx(
            s @ t / np.linalg.norm(s) / np.linalg.norm(t), abs=1e-9
        )


def test_constant_and_zero_maps_give_zero_not_nan():
    student = torch.tensor([[0.1] * 7, [0.0] * 7, [1.0, 2, 3, 4, 5, 6, 7]])
    teacher = torch.tensor([[1.0, 2, 3, 4, 5, 6, 7], [1.0, 2, 3, 4, 5, 6, 7], [3.0] * 7])
    got = _values(saliency_alignment(student, teacher))
    assert got["spearman"] == [0.0, 0.0, 0.0]
    assert got["pearson"] == [0.0, 0.0, 0.0]
    assert got["cosine"][1] == 0.0  # all-zero map
    assert got["cosine"][0] == pytest.approx(28 / math.sqrt(7 * 140), abs=1e-6)
    assert all(math.isfinite(v) for values in got.values() for v in values)


def test_alignment_rejects_bad_shapes_and_empty_masks():
    with pytest.raises(ValueError, match="shape"):
        saliency_alignment(torch.rand(2, 5), torch.rand(2, 6))
    with pytest.raises(ValueError, match="no real step"):
        saliency_alignment(torch.rand(2, 5), torch.rand(2, 5), torch.tensor([[True] * 5, [False] * 5]))
    with pytest.raises(ValueError, match="topk_fraction"):
        saliency_alignment(torch.rand(2, 5), torch.rand(2, 5), topk_fraction=0.0)


def test_teacher_agreement_top1_and_topk():
    student = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [1.0, 2.0, 3.0]])
    teacher = torch.tensor([[5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0]])
    assert teacher_agreement(student, teacher).tolist() == [1.0, 0.0, 0.0]
    assert teacher_agreement(student, teacher, top_k=2).tolist() == [1.0, 1.0, 0.0]
    assert teacher_agreement(student, teacher, top_k=3).tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="top_k"):
        teacher_agreement(student, teacher, top_k=4)


def test_divergence_by_hand():
    student = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0], [1.0, 2.0]])
    out = teacher_student_divergence(student, teacher)
    p, q = np.array([0.75, 0.25]), np.array([0.5, 0.5])
    m = (p + q) / 2
    assert out["kl"][0].item() == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5), abs=1e-6)
    assert out["js"][0].item() == pytest.approx(
        0.5 * np.sum(p * np.log(p / m)) + 0.5 * np.sum(q * np.log(q / m)), abs=1e-6
    )
    assert out["kl"][1].item() == 0.0 and out["js"][1].item() == 0.0
    assert out["js"][0].item() == pytest.approx(stats.entropy(p, m) / 2 + stats.entropy(q, m) / 2, abs=1e-6)


def _toy_inputs(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "s_map": torch.rand(n, 20, generator=g),
        "t_map": torch.rand(n, 20, generator=g),
        "mask": torch.arange(20) < torch.randint(5, 21, (n, 1), generator=g),
        "s_logits": torch.randn(n, 4, generator=g),
        "t_logits": torch.randn(n, 4, generator=g),
    }


def _metric_values(data: dict[str, torch.Tensor], chunks: int = 2) -> dict[str, float]:
    """Update the three metric classes in ``chunks`` uneven pieces and return their computed values."""
    alignment, agreement, divergence = (
        SaliencyAlignment(topk_fraction=0.2),
        TeacherAgreement(),
        TeacherStudentDivergence(),
    )
    for piece in zip(*(v.tensor_split(chunks) for v in data.values())):
        s_map, t_map, mask, s_logits, t_logits = piece
        alignment.update(s_map, t_map, mask)
        agreement.update(s_logits, t_logits)
        divergence.update(s_logits, t_logits)
    out = {f"saliency_{k}": float(v) for k, v in alignment.compute().items()}
    out.update({k: float(v) for k, v in divergence.compute().items()}, agreement=float(agreement.compute()))
    return out


def test_metric_classes_equal_functional_means():
    data = _toy_inputs(11, seed=3)
    got = _metric_values(data, chunks=3)
    align = saliency_alignment(data["s_map"], data["t_map"], data["mask"], topk_fraction=0.2)
    div = teacher_student_divergence(data["s_logits"], data["t_logits"])
    want = {f"saliency_{k}": v.mean().item() for k, v in align.items()}
    want.update({k: v.mean().item() for k, v in div.items()})
    want["agreement"] = teacher_agreement(data["s_logits"], data["t_logits"]).mean().item()
    assert got == pytest.approx(want, abs=1e-6)


def test_metric_class_flags():
    assert SaliencyAlignment.higher_is_better and TeacherAgreement.higher_is_better
    assert TeacherStudentDivergence.higher_is_better is False
    for cls in (SaliencyAlignment, TeacherAgreement, TeacherStudentDivergence):
        assert cls.is_differentiable is False and cls.full_state_update is False
        assert all(fx is dim_zero_sum for fx in cls()._reductions.values())  # DDP-safe states


def _ddp_worker(rank: int, world: int, port: int, shards: list, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        values = _metric_values(shards[rank])
        torch.save(values, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
@pytest.mark.timeout(120)
def test_metric_classes_sync_across_two_processes(tmp_path):
    data = _toy_inputs(13, seed=4)
    shards = [{k: v[:5] for k, v in data.items()}, {k: v[5:] for k, v in data.items()}]  # uneven on purpose
    out = tmp_path / "values"
    mp.spawn(_ddp_worker, args=(2, _free_port(), shards, str(out)), nprocs=2, join=True)
    single = _metric_values(data)
    for rank in range(2):
        assert torch.load(f"{out}.{rank}") == pytest.approx(single, abs=1e-6)
