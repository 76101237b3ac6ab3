"""The steps the speed benchmark times: each a closure that runs one optimizer step (Adam) of one variant.

Variant names are ``kind`` or ``kind:estimator``:

* ``kd_live_hand`` / ``kd_cached_hand``: hand-written KD (CE + KD, tau 4), teacher live (``no_grad``) or its
  logits precomputed; ``kd_live_pkg`` / ``kd_cached_pkg``: the package's ``training_step`` with ``tsd_weight=0``.
* ``tsd_live_pkg:E`` / ``tsd_cached_pkg:E``: ``TemporalSaliencyDistiller.training_step`` with estimator ``E``
  (``saliency`` and ``saliency_options`` as a dict, ``teacher_saliency_options`` where
  :data:`TEACHER_OPTIONS` names ``E``; every other argument at its default), live teacher or
  ``teacher_cache=True`` (filled beforehand).
* ``tsd_live_hand:E`` / ``tsd_cached_hand:E``: the hand-written floor of the same step.
* ``tsd_live_loss:default``: the package's ``TemporalSaliencyLoss`` in a hand-written loop.
* ``occlusion_loop``: the naive cached-step baseline (one student forward per timestep).
* ``fill_pkg:E``: ``precompute_teacher_cache`` of one batch with estimator ``E``'s defaults: what the first
  epoch of a cached fit pays per batch, once (with ``teacher_cache=True`` the teacher's integrated gradients
  take 32 midpoint steps).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import speed_floor
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_tsd import TemporalSaliencyDistiller, TemporalSaliencyLoss
from lightning_tsd.losses import kd_loss
from lightning_tsd.models import InceptionTime, NarrowFCN
from lightning_tsd.saliency import ESTIMATORS as PACKAGE_ESTIMATORS
from lightning_tsd.saliency import RANDOM_SAMPLINGS

TAU = 4.0
Step = Callable[[], None]

# label -> (method, options); "all" (every interpolant in one teacher call) and "T/10", "T/20" are
# resolved per cell by resolve_options.
ESTIMATORS: dict[str, tuple[str, dict]] = {
    "gradient": ("gradient", {}),
    "input_x_gradient": ("input_x_gradient", {}),
    "ig8": ("integrated_gradients", {"steps": 8, "internal_batch_size": "all"}),
    "ig8_chunked": ("integrated_gradients", {"steps": 8}),
    "ig1_mid": ("integrated_gradients", {"steps": 1}),
    "ig1_uniform": ("integrated_gradients", {"steps": 1, "sampling": "uniform"}),
    "ig2_uniform": ("integrated_gradients", {"steps": 2, "sampling": "uniform"}),
    "ig2_antithetic": ("integrated_gradients", {"steps": 2, "sampling": "antithetic"}),
    "ig2_stratified": ("integrated_gradients", {"steps": 2, "sampling": "stratified"}),
    "occlusion": ("occlusion", {"window": "T/10", "stride": "T/20"}),
    # The student's 1-sample IG with the teacher's maps at IG-8 (selection.md, amendment 5: ig1s_*).
    "ig1_uniform_t8": ("integrated_gradients", {"steps": 1, "sampling": "uniform"}),
}
# Estimators whose teacher maps take other options than the student's (``teacher_saliency_options``).
TEACHER_OPTIONS: dict[str, dict] = {"ig1_uniform_t8": {"steps": 8}}
# The estimators of the cost-vs-(T, B) plot: IG-8, IG-2 antithetic, IG-1 uniform, the gradient.
PLOTTED = ("ig8_chunked", "ig2_antithetic", "ig1_uniform", "gradient")
# Teachers by name (InceptionTime arguments): the package's default (420k parameters) and a small one (80k).
TEACHERS: dict[str, dict] = {
    "small": {"num_filters": 16, "depth": 3},
    "default": {"num_filters": 32, "depth": 6},
}


def distiller_defaults() -> dict:
    """The ``TemporalSaliencyDistiller`` defaults the TSD step depends on."""
    params = inspect.signature(TemporalSaliencyDistiller).parameters
    keys = ("saliency", "saliency_options", "alignment", "tsd_weight", "tsd_gradient", "saliency_temperature",
            "temperature")  # fmt: skip
    return {k: params[k].default for k in keys}


def canonical(method: str, options: dict) -> tuple:
    """``(method, sorted options)`` with the estimator's own defaults filled in (to tell equal configs)."""
    params = inspect.signature(PACKAGE_ESTIMATORS[method]).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update(options)
    drop = {"mask", "create_graph", "check_target", "generator"}
    return method, tuple(sorted((k, str(v)) for k, v in full.items() if k not in drop))


def default_label() -> str:
    """The label in :data:`ESTIMATORS` of the package's default estimator; when none matches, the default
    is added to :data:`ESTIMATORS` as ``"default"``."""
    d = distiller_defaults()
    method, options = d["saliency"], dict(d["saliency_options"] or {})
    label = next(
        (k for k, (m, o) in ESTIMATORS.items() if canonical(m, o) == canonical(method, options)), None
    )
    if label is None:
        label = "default"
        ESTIMATORS[label] = (method, options)
    return label


def resolve_options(options: dict, B: int, T: int, device: torch.device, seed: int = 0) -> dict:
    """Options of one cell: the symbolic sizes made numbers, a seeded generator for random sampling."""
    out = {}
    for k, v in options.items():
        if v == "all":
            v = options["steps"] * B
        elif isinstance(v, str) and v.startswith("T/"):
            v = max(1, T // int(v[2:]))
        out[k] = v
    if out.get("sampling") in RANDOM_SAMPLINGS:
        out["generator"] = torch.Generator(device=device).manual_seed(seed)
    return out


@dataclass
class Setup:
    """One cell's models and batch: a frozen InceptionTime teacher, a NarrowFCN student, ``(x, y)``."""

    teacher: nn.Module
    student0: nn.Module
    x: Tensor
    y: Tensor
    device: torch.device

    @property
    def batch(self) -> dict:
        return {"x": self.x, "y": self.y, "index": torch.arange(self.x.shape[0], device=self.device)}

    def student(self) -> nn.Module:
        s = NarrowFCN(self.x.shape[1], 2).to(self.device)
        s.load_state_dict(self.student0.state_dict())
        return s


def build_setup(B: int, T: int, device: torch.device, teacher_kwargs: dict, seed: int = 0) -> Setup:
    torch.manual_seed(seed)
    teacher = InceptionTime(1, 2, **teacher_kwargs).to(device).eval().requires_grad_(False)
    student = NarrowFCN(1, 2).to(device)
    x = torch.randn(B, 1, T, device=device)
    y = torch.randint(0, 2, (B,), device=device)
    return Setup(teacher, student, x, y, device)


def _adam_step(student: nn.Module, loss_fn: Callable[[], Tensor]) -> Step:
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)

    def step() -> None:
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _tsd_step(
    student: nn.Module, parts: Callable[[], tuple[Tensor, Tensor]], weight: float, mode: str
) -> Step:
    """Adam on ``base + weight * tsd`` (``parts()`` gives the two): for ``mode="sum"`` one backward of the sum;
    otherwise the two gradients taken apart and joined by hand as the package's ``tsd_gradient`` does."""
    if mode == "sum":

        def loss() -> Tensor:
            base, tsd = parts()
            return base + weight * tsd

        return _adam_step(student, loss)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=3e-3)

    def step() -> None:
        base, tsd = parts()
        g_b = torch.autograd.grad(base, params, retain_graph=True)
        g_t = torch.autograd.grad(tsd, params, allow_unused=True)
        g_t = [torch.zeros_like(p) if g is None else g for g, p in zip(g_t, params)]
        fb, ft = torch.cat([g.reshape(-1) for g in g_b]), torch.cat([g.reshape(-1) for g in g_t])
        if mode == "project":  # PCGrad: remove the component of g_t along g_b where they conflict
            coef = torch.dot(fb, ft).clamp(max=0.0) / fb.square().sum().clamp_min(1e-12)
            joined = [b + weight * (t - coef * b) for b, t in zip(g_b, g_t)]
        else:  # "balance": g_t rescaled to weight * ||g_b||
            scale = fb.norm() / ft.norm().clamp_min(1e-12)
            joined = [b + weight * scale * t for b, t in zip(g_b, g_t)]
        for p, g in zip(params, joined):
            p.grad = g
        opt.step()

    return step


def kd_hand(s: Setup, cached: bool) -> Step:
    student = s.student()
    with torch.no_grad():
        z_cached = s.teacher(s.x)

    def loss() -> Tensor:
        if cached:
            zt = z_cached
        else:
            with torch.no_grad():
                zt = s.teacher(s.x)
        zs = student(s.x)
        return F.cross_entropy(zs, s.y) + kd_loss(zs, zt, TAU)

    return _adam_step(student, loss)


def pkg(s: Setup, cache: bool, **kwargs) -> Step:
    """The package's step: ``training_step`` + backward + the distiller's own optimizer."""
    d = TemporalSaliencyDistiller(s.teacher, s.student(), base_loss="kd", teacher_cache=cache, **kwargs)
    d = d.to(s.device).train()
    opt = d.configure_optimizers()
    batch = s.batch

    def step() -> None:
        loss = d.training_step(batch, 0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    if cache:  # the steady state of a fit: the cache filled, then one epoch served from it (complete)
        d.precompute_teacher_cache([batch])
        step()
        d.source.end_epoch()
        assert d.source.complete, "the cached step should be in the complete-cache state"
    return step


def fill(s: Setup, **kwargs) -> Step:
    """The cache fill of one batch (``precompute_teacher_cache``), from an emptied cache every time."""
    d = TemporalSaliencyDistiller(s.teacher, s.student(), base_loss="kd", teacher_cache=True, **kwargs)
    d = d.to(s.device).train()
    batch, empty = s.batch, {"index": torch.zeros(0, dtype=torch.long)}

    def step() -> None:
        d.teacher_cache.load_state_dict(empty)
        d.precompute_teacher_cache([batch])

    return step


def tsd_hand(s: Setup, cached: bool, method: str, options: dict) -> Step:
    """Hand-written TSD: CE + KD + w * alignment(student map, teacher map), the package's defaults (its
    ``tsd_gradient`` included)."""
    d = distiller_defaults()
    student = s.student()
    zt_c, st_c, tgt_c = speed_floor.hand_saliency(method, s.teacher, s.x, None, False, **options)
    zt_c, st_c = zt_c.detach(), st_c.detach()

    def parts() -> tuple[Tensor, Tensor]:
        if cached:
            zt, st, tgt = zt_c, st_c, tgt_c
        else:
            zt, st, tgt = speed_floor.hand_saliency(method, s.teacher, s.x, None, False, **options)
        zs, ss, _ = speed_floor.hand_saliency(method, student, s.x, tgt, True, **options)
        align = speed_floor.alignment_loss(d["alignment"], ss, st, d["saliency_temperature"])
        return F.cross_entropy(zs, s.y) + kd_loss(zs, zt.detach(), TAU), align

    return _tsd_step(student, parts, d["tsd_weight"], d["tsd_gradient"])


def tsd_loss(s: Setup, method: str, options: dict) -> Step:
    """The package's ``TemporalSaliencyLoss`` (the "three lines" usage) in a hand-written loop."""
    d = distiller_defaults()
    student = s.student()
    term = TemporalSaliencyLoss(saliency=method, alignment=d["alignment"], **options)

    def parts() -> tuple[Tensor, Tensor]:
        out = term(s.teacher, student, s.x)
        zs = out.student_logits
        return F.cross_entropy(zs, s.y) + kd_loss(zs, out.teacher_logits, TAU), out.loss

    return _tsd_step(student, parts, d["tsd_weight"], d["tsd_gradient"])


def occlusion_loop(s: Setup) -> Step:
    d = distiller_defaults()
    student = s.student()
    zt, st, tgt = speed_floor.gradient_maps(s.teacher, s.x, None, False)
    zt, st = zt.detach(), st.detach()

    def parts() -> tuple[Tensor, Tensor]:
        zs, ss = speed_floor.occlusion_loop_maps(student, s.x, tgt)
        align = speed_floor.alignment_loss(d["alignment"], ss, st, d["saliency_temperature"])
        return F.cross_entropy(zs, s.y) + kd_loss(zs, zt, TAU), align

    return _tsd_step(student, parts, d["tsd_weight"], d["tsd_gradient"])


def make_variants(
    s: Setup, estimators: list[str], floors: list[str], occlusion: bool = False, default: str | None = None
) -> dict[str, Step]:
    """Every step of one cell: KD (hand, package), TSD per estimator (package; hand for ``floors``), and the
    cache fill of one batch for the ``default`` estimator."""
    B, T = s.x.shape[0], s.x.shape[-1]
    steps: dict[str, Step] = {
        "kd_live_hand": kd_hand(s, cached=False),
        "kd_cached_hand": kd_hand(s, cached=True),
        "kd_live_pkg": pkg(s, False, tsd_weight=0.0),
        "kd_cached_pkg": pkg(s, True, tsd_weight=0.0),
    }
    for label in estimators:
        method, options = ESTIMATORS[label]
        opts = resolve_options(options, B, T, s.device)
        tsd = {"saliency": method, "saliency_options": opts}
        if label in TEACHER_OPTIONS:
            tsd["teacher_saliency_options"] = TEACHER_OPTIONS[label]
        steps[f"tsd_live_pkg:{label}"] = pkg(s, False, **tsd)
        steps[f"tsd_cached_pkg:{label}"] = pkg(s, True, **tsd)
        if label in floors:
            steps[f"tsd_live_hand:{label}"] = tsd_hand(s, False, method, opts)
            steps[f"tsd_cached_hand:{label}"] = tsd_hand(s, True, method, opts)
            steps[f"tsd_live_loss:{label}"] = tsd_loss(s, method, opts)
        if label == default:
            steps[f"fill_pkg:{label}"] = fill(s, **tsd)
    if occlusion:
        steps["occlusion_loop"] = occlusion_loop(s)
    return steps
