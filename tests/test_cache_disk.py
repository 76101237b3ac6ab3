"""The teacher cache on disk: a round trip (tensors and plain data, read ``weights_only``), a fit from the file
that never runs the teacher and trains the same student as a live teacher, and clear refusals of a cache made
with another teacher, other saliency options or other data."""

from __future__ import annotations

import pytest
import torch
from tiny_models import TinyCNN
from torch.utils.data import DataLoader
from trainers import quiet_trainer

from lightning_tsd import TeacherCache, TeacherCacheError, TemporalSaliencyDistiller, UnsafeCheckpointError
from lightning_tsd.cache import CACHE_FORMAT, cache_key

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

N, T = 12, 16
OPTIONS = {"steps": 2}


def _data(seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, 1, T, generator=g).cumsum(-1)
    y = torch.randint(0, 3, (N,), generator=g)
    return [{"x": x[i], "y": y[i], "index": torch.tensor(i)} for i in range(N)]


def _teacher(seed: int = 0) -> TinyCNN:
    torch.manual_seed(seed)
    return TinyCNN(1, 3).eval()


def _distiller(teacher, cache, seed: int = 1, **kwargs) -> TemporalSaliencyDistiller:
    torch.manual_seed(seed)
    # the teacher's maps at the student's options (a cache's default for them is 32 steps)
    options = {
        "saliency": "integrated_gradients",
        "saliency_options": OPTIONS,
        "teacher_saliency_options": OPTIONS,
    }
    options.update(kwargs)
    return TemporalSaliencyDistiller(teacher, TinyCNN(1, 3, width=4), teacher_cache=cache, **options)


@pytest.fixture
def cache_file(tmp_path):
    """A cache of the teacher of seed 0 on ``_data()``, written by ``precompute_teacher_cache`` + ``save``."""
    distiller = _distiller(_teacher(), True)
    assert distiller.precompute_teacher_cache(DataLoader(_data(), batch_size=5)) == N
    path = tmp_path / "teacher_cache.pt"
    distiller.teacher_cache.save(path)
    return path, distiller.teacher_cache


def _fit(distiller: TemporalSaliencyDistiller, data=None) -> None:
    trainer = quiet_trainer(max_epochs=2, limit_val_batches=0)
    trainer.fit(distiller, DataLoader(data or _data(), batch_size=4))


def test_round_trip_through_disk(cache_file):
    path, cache = cache_file
    payload = torch.load(path, weights_only=True)  # tensors and plain data only
    assert payload["format"] == CACHE_FORMAT and payload["key"] == cache.key
    assert payload["key"] == cache_key(_teacher(), "integrated_gradients", OPTIONS, "teacher")
    loaded = TeacherCache.load(path)
    assert len(loaded) == N and loaded.key == cache.key and loaded.origin == str(path)
    for name in ("logits", "saliency", "fingerprint"):
        assert torch.equal(getattr(loaded, name)[:N], getattr(cache, name)[:N]), name
    x = torch.stack([d["x"] for d in _data()])
    hit, logits, saliency = loaded.get(torch.arange(N), x)
    assert hit.all()
    with torch.no_grad():
        torch.testing.assert_close(logits, _teacher()(x))  # the teacher's own logits came back


def test_save_and_load_refuse_what_they_cannot_check(tmp_path):
    with pytest.raises(TeacherCacheError, match="has no key.*check_key"):
        TeacherCache().save(tmp_path / "keyless.pt")
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(TeacherCacheError, match="not a lightning-tsd teacher cache.*cache-teacher"):
        TeacherCache.load(tmp_path / "other.pt")
    torch.save({"format": CACHE_FORMAT, "hook": print}, tmp_path / "evil.pt")  # would import a callable
    with pytest.raises(UnsafeCheckpointError, match="unsafe to load"):
        TeacherCache.load(tmp_path / "evil.pt")
    with pytest.raises(FileNotFoundError):
        TemporalSaliencyDistiller(_teacher(), TinyCNN(1, 3), teacher_cache=str(tmp_path / "missing.pt"))


def test_a_fit_from_the_file_never_runs_the_teacher_and_trains_the_same_student(cache_file):
    path, _ = cache_file
    teacher = _teacher()
    calls: list[int] = []
    teacher.register_forward_hook(lambda *_: calls.append(1))
    from_file = _distiller(teacher, str(path))
    _fit(from_file)
    assert calls == []  # logits, maps and even the class count came from the file
    live = _distiller(_teacher(), False)
    _fit(live)
    for name, value in live.student.state_dict().items():
        torch.testing.assert_close(from_file.student.state_dict()[name], value, msg=name)


def test_refuses_another_teacher(cache_file):
    path, _ = cache_file
    with pytest.raises(
        TeacherCacheError, match=r"made with another teacher \(its weights differ\).*cache-teacher"
    ):
        _distiller(_teacher(seed=3), path)


@pytest.mark.parametrize(
    "options, differ",
    [
        (
            {"teacher_saliency_options": {"steps": 4}},
            r"other saliency options \(cache: '\{\"steps\": 2\}', now: '\{\"steps\": 4\}'\)",
        ),
        (
            {"saliency": "gradient", "saliency_options": None, "teacher_saliency_options": None},
            r"another saliency estimator \(cache: 'integrated_gradients'",
        ),
        ({"saliency_target": "label"}, r"another saliency_target \(cache: 'teacher', now: 'label'\)"),
    ],
)
def test_refuses_other_options(cache_file, options, differ):
    path, _ = cache_file
    with pytest.raises(TeacherCacheError, match=differ):
        _distiller(_teacher(), path, **options)
    # options only the student uses are not part of the key
    _distiller(_teacher(), path, saliency_options={"steps": 2, "sampling": "uniform"})


def test_refuses_other_data_before_any_step(cache_file):
    path, _ = cache_file
    distiller = _distiller(_teacher(), path)
    before = {k: v.clone() for k, v in distiller.student.state_dict().items()}
    with pytest.raises(
        TeacherCacheError, match=f"changed since.*{path.name} was filled from other data.*cache-teacher"
    ):
        _fit(distiller, _data(seed=5))
    for name, value in distiller.student.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_fit_keys_its_cache_so_that_it_can_be_saved_and_reused(tmp_path):
    first = _distiller(_teacher(), True)
    _fit(first)
    path = tmp_path / "after_fit.pt"
    first.teacher_cache.save(path)
    assert len(TeacherCache.load(path)) == N
    _distiller(_teacher(), path)  # accepted by the same teacher and options
    shared = TeacherCache.load(path)
    with pytest.raises(TeacherCacheError, match="another teacher"):
        _distiller(_teacher(seed=3), shared)  # a TeacherCache instance is checked too
