"""Cost of one training step: plain PyTorch vs lightning-tsd (mirrors the spec's "Cost, measured" table).

Variants, all with an InceptionTime teacher (reduced by default: ``--teacher-filters 16 --teacher-depth 3``),
a NarrowFCN student, every batch size of ``--batch-sizes`` (default 16 64), Adam, loss CE + KD (tau=4)
[+ 2 * L_TSD (pearson)]:

* ``kd``            plain KD step: teacher forward under no_grad, student forward, CE + KD backward.
* ``kd_cached_hand`` the same with the teacher's logits precomputed.
* ``kd_live_pkg`` / ``kd_cached_pkg`` the package's KD step: ``training_step`` with ``tsd_weight=0``.
* ``tsd_live_pkg``  the package: ``TemporalSaliencyDistiller.training_step`` with a live teacher.
* ``tsd_live_loss`` the package's ``TemporalSaliencyLoss`` in a hand-written loop (the "3 lines" usage).
* ``tsd_live_hand`` hand-written plain-PyTorch TSD with a live teacher: the floor for the same math.
* ``tsd_cached_pkg``  ``training_step`` with ``teacher_cache=True`` (cache filled beforehand).
* ``tsd_cached_hand`` hand-written TSD with the teacher's logits and saliency precomputed (the floor).
* ``*_ig`` the same with integrated gradients (8 steps) instead of the gradient estimator.
* ``occlusion_loop`` (opt-in, ``--occlusion``): the naive baseline for the cached step: the teacher's logits
  and saliency precomputed as for ``tsd_cached_hand``, the student's saliency by per-timestep occlusion in a
  Python loop (T student forward passes, each with one timestep zeroed, all kept in the autograd graph),
  then the same CE + KD + 2 * pearson loss, backward and Adam step.

Per variant and cell the script also measures the peak memory of one extra, untimed step (CPU, via the
profiler: ``peak_memory_bytes``), fits the cost-vs-T exponent from the run's own data (per batch size), checks
every target of the issue (PASS/MISS in the Markdown) and plots ms per step and peak MB vs T.
``--scaling-from results_1thread.csv`` also fits the exponent from an older CSV.

Output: ``benchmarks/results/speed{tag}.csv``, ``.md``, ``.png`` (``--out``, ``--tag``).

Every variant runs one optimizer step per call; variants are interleaved round-robin (so a shared,
noisy CPU slows all of them alike) after warm-up, and the median of the repeats is reported.

Usage: ``python benchmarks/speed/bench_speed.py [--device cpu|cuda] [--lengths 128 512 2048] [--batch-sizes 16 64]``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_tsd import TemporalSaliencyDistiller, TemporalSaliencyLoss
from lightning_tsd.losses import kd_loss
from lightning_tsd.models import InceptionTime, NarrowFCN, count_parameters

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parent / "results"
TAU, W_TSD = 4.0, 2.0


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ----------------------------------------------------------------------------- hand-written floor
def hand_gradient_saliency(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, create_graph: bool
):
    x = x.detach().requires_grad_(True)
    logits = model(x)
    if target is None:
        target = logits.detach().argmax(1)
    (g,) = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), x, create_graph=create_graph)
    return logits, g.abs().sum(1), target


def _bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training]


def hand_ig_saliency(
    model: nn.Module, x: torch.Tensor, target: torch.Tensor | None, create_graph: bool, steps=8
):
    """IG (riemann middle, zero baseline); for a train-mode BN model the interpolants run in a second
    call with BN in eval mode (same math as the package)."""
    alphas = (torch.arange(steps, device=x.device, dtype=x.dtype) + 0.5) / steps
    scaled = (alphas.view(-1, 1, 1, 1) * x.unsqueeze(0)).flatten(0, 1).requires_grad_(True)
    bns = _bn_layers(model)
    if bns:
        logits = model(x)
        for m in bns:
            m.eval()
        scaled_logits = model(scaled)
        for m in bns:
            m.train()
    else:
        both = model(torch.cat([x, scaled]))
        logits, scaled_logits = both[: x.shape[0]], both[x.shape[0] :]
    if target is None:
        target = logits.detach().argmax(1)
    (g,) = torch.autograd.grad(
        scaled_logits.gather(1, target.repeat(steps)[:, None]).sum(), scaled, create_graph=create_graph
    )
    mean_grad = g.view(steps, *x.shape).mean(0)
    return logits, (x * mean_grad).abs().sum(1), target


def pearson_loss(s_student: torch.Tensor, s_teacher: torch.Tensor) -> torch.Tensor:
    def z(s):
        s = s - s.mean(1, keepdim=True)
        return s / s.pow(2).mean(1, keepdim=True).clamp_min(1e-16).sqrt()

    return (
        (1 - F.cosine_similarity(z(s_student), z(s_teacher.detach()), dim=1, eps=1e-12)).clamp_min(0).mean()
    )


# ----------------------------------------------------------------------------- benchmark
TEACHER_KWARGS: dict = {}


def build(T: int, device: torch.device, batch_size: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    teacher = InceptionTime(1, 2, **TEACHER_KWARGS).to(device).eval().requires_grad_(False)
    student = NarrowFCN(1, 2).to(device)
    x = torch.randn(batch_size, 1, T, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    return teacher, student, x, y


def occlusion_saliency(model: nn.Module, x: torch.Tensor, target: torch.Tensor):
    """Naive per-timestep occlusion: |logit_target(x) - logit_target(x with timestep t zeroed)| for each t,
    one student forward per timestep in a Python loop, differentiable w.r.t. the student's parameters.
    The occluded passes run with BatchNorm in eval mode (as the IG interpolants above)."""
    logits = model(x)
    ref = logits.gather(1, target[:, None])[:, 0]
    bns = _bn_layers(model)
    for m in bns:
        m.eval()
    cols = []
    for t in range(x.shape[-1]):
        x_occ = x.clone()
        x_occ[..., t] = 0
        cols.append((ref - model(x_occ).gather(1, target[:, None])[:, 0]).abs())
    for m in bns:
        m.train()
    return logits, torch.stack(cols, 1)


def make_variants(
    T: int, device: torch.device, with_ig: bool, with_occlusion: bool = False, batch_size: int = 32
):
    teacher, student0, x, y = build(T, device, batch_size)
    batch = {"x": x, "y": y, "index": torch.arange(batch_size, device=device)}
    variants = {}

    def fresh_student():
        s = NarrowFCN(1, 2).to(device)
        s.load_state_dict(student0.state_dict())
        return s

    # (a) plain KD
    s_kd = fresh_student()
    opt_kd = torch.optim.Adam(s_kd.parameters(), lr=3e-3)

    def kd():
        with torch.no_grad():
            zt = teacher(x)
        zs = s_kd(x)
        loss = F.cross_entropy(zs, y) + kd_loss(zs, zt, TAU)
        opt_kd.zero_grad(set_to_none=True)
        loss.backward()
        opt_kd.step()

    variants["kd"] = kd

    # (a') plain KD, teacher logits precomputed (the floor of the package's cached KD step)
    s_kdc = fresh_student()
    opt_kdc = torch.optim.Adam(s_kdc.parameters(), lr=3e-3)
    with torch.no_grad():
        zt_kdc = teacher(x)

    def kd_cached_hand():
        zs = s_kdc(x)
        loss = F.cross_entropy(zs, y) + kd_loss(zs, zt_kdc, TAU)
        opt_kdc.zero_grad(set_to_none=True)
        loss.backward()
        opt_kdc.step()

    variants["kd_cached_hand"] = kd_cached_hand

    # the package's step: TemporalSaliencyDistiller.training_step + backward + Adam, live teacher or cached
    def pkg_step(cache: bool, **options):
        d = TemporalSaliencyDistiller(
            teacher, fresh_student(), base_loss="kd", teacher_cache=cache, **options
        ).to(device)
        d.train()
        opt = d.configure_optimizers()
        if cache:
            d.precompute_teacher_cache([batch])

        def step():
            loss = d.training_step(batch, 0)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    # (a'') the package's KD step: the distiller with tsd_weight=0 (computes no saliency), live / cached
    variants["kd_live_pkg"] = pkg_step(False, tsd_weight=0.0)
    variants["kd_cached_pkg"] = pkg_step(True, tsd_weight=0.0)

    for method, sal in (("gradient", hand_gradient_saliency), ("integrated_gradients", hand_ig_saliency)):
        if method == "integrated_gradients" and not with_ig:
            continue
        suffix = "" if method == "gradient" else "_ig"
        options = {} if method == "gradient" else {"steps": 8}

        # (b) package, via the LightningModule's training_step
        tsd = dict(tsd_weight=W_TSD, saliency=method, saliency_options=options, alignment="pearson")
        variants[f"tsd_live_pkg{suffix}"] = pkg_step(False, **tsd)
        variants[f"tsd_cached_pkg{suffix}"] = pkg_step(True, **tsd)

        # (b') package's TemporalSaliencyLoss inside a hand-written loop
        s_loss = fresh_student()
        opt_loss = torch.optim.Adam(s_loss.parameters(), lr=3e-3)
        tsd = TemporalSaliencyLoss(saliency=method, alignment="pearson", **options)

        def loss_step(s=s_loss, opt=opt_loss, tsd=tsd):
            out = tsd(teacher, s, x)
            loss = F.cross_entropy(out.student_logits, y) + kd_loss(
                out.student_logits, out.teacher_logits, TAU
            )
            loss = loss + W_TSD * out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        variants[f"tsd_live_loss{suffix}"] = loss_step

        # (d) hand-written floor, live teacher and cached teacher
        def hand_step(cached: bool, sal=sal):
            s = fresh_student()
            opt = torch.optim.Adam(s.parameters(), lr=3e-3)
            zt_c, st_c, tgt_c = sal(teacher, x, None, False)
            zt_c, st_c = zt_c.detach(), st_c.detach()

            def step():
                if cached:
                    zt, st, tgt = zt_c, st_c, tgt_c
                else:
                    zt, st, tgt = sal(teacher, x, None, False)
                    zt, st = zt.detach(), st.detach()
                zs, ss, _ = sal(s, x, tgt, True)
                loss = F.cross_entropy(zs, y) + kd_loss(zs, zt, TAU) + W_TSD * pearson_loss(ss, st)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            return step

        variants[f"tsd_live_hand{suffix}"] = hand_step(False)
        variants[f"tsd_cached_hand{suffix}"] = hand_step(True)

    if with_occlusion:  # naive baseline of the cached step: student saliency by a Python occlusion loop
        s_occ = fresh_student()
        opt_occ = torch.optim.Adam(s_occ.parameters(), lr=3e-3)
        zt_o, st_o, tgt_o = hand_gradient_saliency(teacher, x, None, False)
        zt_o, st_o = zt_o.detach(), st_o.detach()

        def occlusion_step():
            zs, ss = occlusion_saliency(s_occ, x, tgt_o)
            loss = F.cross_entropy(zs, y) + kd_loss(zs, zt_o, TAU) + W_TSD * pearson_loss(ss, st_o)
            opt_occ.zero_grad(set_to_none=True)
            loss.backward()
            opt_occ.step()

        variants["occlusion_loop"] = occlusion_step
    return variants, count_parameters(teacher), count_parameters(student0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_variants(variants, device, warmup: int, repeats: int, budget_s: float):
    """Round-robin over the variants: ``warmup`` untimed rounds, then up to ``repeats`` timed rounds
    (fewer if ``budget_s`` runs out, but at least 3)."""
    times = {name: [] for name in variants}
    cpu = {name: [] for name in variants}
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    sync(device)
    start = time.perf_counter()
    for r in range(repeats):
        for name, fn in variants.items():
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
        if r >= 2 and time.perf_counter() - start > budget_s:
            break
    return times, cpu


def peak_memory_bytes(fn) -> int:
    """Peak CPU bytes allocated during one call of ``fn`` and live at the same time.

    Runs ``fn`` once under ``torch.profiler.profile(profile_memory=True)`` and replays every allocation and
    free the CPU allocator reported (the ``[memory]`` instant events of the Chrome trace, each with its
    signed ``Bytes``), in order: the peak is the maximum of the running sum. (``prof.events()`` is not
    enough: in torch 2.x it folds allocations made inside an op into that op's ``cpu_memory_usage`` and
    keeps separate ``[memory]`` events only for frees outside any op.) Tensors that outlive the step (the
    models, Adam state, a teacher cache, the batch) were allocated before it and are not counted; the
    profiler does not report frees of such blocks either (e.g. last step's gradients dropped by
    ``zero_grad``), so the figure is the peak of the step's own allocations, not of the process.
    """
    from torch.profiler import ProfilerActivity, profile

    gc.collect()
    with tempfile.TemporaryDirectory() as tmp:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        data = json.loads(trace.read_text())
    events = data["traceEvents"] if isinstance(data, dict) else data
    mem = [e for e in events if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    mem.sort(key=lambda e: (e["ts"], e["args"].get("Ev Idx", 0)))
    live = peak = 0
    for e in mem:
        live += int(e["args"]["Bytes"])
        peak = max(peak, live)
    if peak <= 0:
        raise RuntimeError("peak-memory measurement saw no allocation: profiler memory events missing")
    return peak


FIELDS = [
    "batch_size",
    "T",
    "variant",
    "median_ms",
    "min_ms",
    "cpu_median_ms",
    "cpu_min_ms",
    "repeats",
    "peak_mb",
    "teacher_params",
    "student_params",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--ig-max-length", type=int, default=2048, help="skip IG rows above this T")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument(
        "--budget-per-length", type=float, default=90.0, help="seconds of timed rounds per (T, batch) cell"
    )
    parser.add_argument(
        "--teacher-filters", type=int, default=16, help="InceptionTime num_filters (package default 32)"
    )
    parser.add_argument(
        "--teacher-depth", type=int, default=3, help="InceptionTime depth (package default 6)"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="keep variants whose name contains one of these"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory step (CPU only)")
    parser.add_argument(
        "--occlusion",
        action="store_true",
        help="add the occlusion_loop baseline (T student forwards per step) at the --occlusion-lengths",
    )
    parser.add_argument("--occlusion-lengths", type=int, nargs="+", default=[512])
    parser.add_argument(
        "--occlusion-batch-sizes", type=int, nargs="+", default=None, help="default: the first batch size"
    )
    parser.add_argument(
        "--scaling-from",
        type=Path,
        default=None,
        help="an older results CSV with T in {128, 512, 2048}: also fit the cost-vs-T exponent from it",
    )
    parser.add_argument("--tag", default="", help="suffix of the results files (speed{tag}.csv/.md/.png)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    TEACHER_KWARGS.update(num_filters=args.teacher_filters, depth=args.teacher_depth)
    occ_batches = args.occlusion_batch_sizes or args.batch_sizes[:1]
    measure_memory = args.device == "cpu" and not args.no_memory

    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns once per call site
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("" if args.device == "cpu" else f"_{args.device}") + args.tag
    csv_path = args.out / f"speed{tag}.csv"
    md_path = args.out / f"speed{tag}.md"
    png_path = args.out / f"speed{tag}.png"
    hw = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"{cpu_model()}, {os.cpu_count()} logical cores visible, torch threads {torch.get_num_threads()}"
    )
    load = ""
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": f"{args.device} ({hw})",
        "date": f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "load": load,
        "command": "python " + shlex.join([os.path.relpath(sys.argv[0])] + sys.argv[1:]),
    }
    run_start = time.perf_counter()
    rows: list[dict] = []
    # res[B][T][variant] = {"wall", "cpu", "cpu_min", "peak_mb", "n"}
    res: dict[int, dict[int, dict[str, dict[str, float]]]] = {}
    params = (0, 0)
    for B in args.batch_sizes:
        res[B] = {}
        for T in args.lengths:
            t0 = time.perf_counter()
            variants, tp, sp = make_variants(
                T,
                device,
                with_ig=T <= args.ig_max_length,
                with_occlusion=args.occlusion and T in args.occlusion_lengths and B in occ_batches,
                batch_size=B,
            )
            params = (tp, sp)
            if args.only:
                variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
            times, cpu = time_variants(variants, device, args.warmup, args.repeats, args.budget_per_length)
            cell = res[B][T] = {}
            for name, ts in times.items():
                peak = float("nan")
                if measure_memory and name != "occlusion_loop":  # T forwards under the profiler: too slow
                    peak = peak_memory_bytes(variants[name]) / 2**20
                cell[name] = {
                    "wall": statistics.median(ts) * 1e3,
                    "wall_min": min(ts) * 1e3,
                    "cpu": statistics.median(cpu[name]) * 1e3,
                    "cpu_min": min(cpu[name]) * 1e3,
                    "peak_mb": peak,
                    "n": len(ts),
                }
                c = cell[name]
                rows.append(
                    {
                        "batch_size": B,
                        "T": T,
                        "variant": name,
                        "median_ms": f"{c['wall']:.3f}",
                        "min_ms": f"{c['wall_min']:.3f}",
                        "cpu_median_ms": f"{c['cpu']:.3f}",
                        "cpu_min_ms": f"{c['cpu_min']:.3f}",
                        "repeats": len(ts),
                        "peak_mb": f"{peak:.3f}",
                        "teacher_params": tp,
                        "student_params": sp,
                    }
                )
            del variants
            with csv_path.open("w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=FIELDS)
                w.writeheader()
                w.writerows(rows)
            print(
                f"B={B} T={T}: {len(next(iter(times.values())))} rounds in {time.perf_counter() - t0:.0f}s",
                flush=True,
            )
            for name, c in cell.items():
                print(
                    f"  {name:22s} {c['wall']:9.2f} ms wall {c['cpu']:9.2f} ms cpu (min {c['cpu_min']:.2f})"
                    f"  peak {c['peak_mb']:.2f} MB",
                    flush=True,
                )
            env["wall"] = f"{time.perf_counter() - run_start:.0f} s"
            write_markdown(md_path, env, res, params, args, measure_memory)
    sanity = memory_sanity(res) if measure_memory else []
    for line in sanity:
        print(line, flush=True)
    env["wall"] = f"{time.perf_counter() - run_start:.0f} s"
    write_markdown(md_path, env, res, params, args, measure_memory, sanity)
    try:
        plot(png_path, res, measure_memory)
    except ImportError as e:  # matplotlib is optional
        print(f"no plot: {e}")
    print(f"wrote {csv_path}, {md_path}, {png_path} in {env['wall']}", flush=True)


# ----------------------------------------------------------------------------- analysis
SCALING_VARIANTS = ["tsd_cached_pkg", "tsd_live_pkg", "tsd_cached_hand", "tsd_live_hand", "kd", "kd_live_pkg"]
PLOT_VARIANTS = ["kd", "tsd_live_pkg", "tsd_live_hand", "tsd_cached_pkg", "tsd_cached_hand"]
SCALING_TARGET = 1.1
OVERHEAD_TARGET = 1.15
TSD_KD_TARGET = 1.1
CACHED_TARGET = 0.1
MEMORY_TARGET = 1.2
OCCLUSION_TARGET = 100.0
MEASURES = (("cpu", "CPU time, median"), ("cpu_min", "CPU time, min"), ("wall", "wall-clock, median"))
# (label, package variant, hand-written floor)
PKG_PAIRS = [
    ("KD, live teacher", "kd_live_pkg", "kd"),
    ("KD, cached teacher", "kd_cached_pkg", "kd_cached_hand"),
    ("TSD gradient, live", "tsd_live_pkg", "tsd_live_hand"),
    ("TSD gradient, cached", "tsd_cached_pkg", "tsd_cached_hand"),
    ("TSD IG 8, live", "tsd_live_pkg_ig", "tsd_live_hand_ig"),
    ("TSD IG 8, cached", "tsd_cached_pkg_ig", "tsd_cached_hand_ig"),
]
# (label, package TSD, package KD, hand TSD, hand KD)
TSD_KD_QUADS = [
    ("gradient, live", "tsd_live_pkg", "kd_live_pkg", "tsd_live_hand", "kd"),
    ("gradient, cached", "tsd_cached_pkg", "kd_cached_pkg", "tsd_cached_hand", "kd_cached_hand"),
    ("IG 8, live", "tsd_live_pkg_ig", "kd_live_pkg", "tsd_live_hand_ig", "kd"),
    ("IG 8, cached", "tsd_cached_pkg_ig", "kd_cached_pkg", "tsd_cached_hand_ig", "kd_cached_hand"),
]
SPEC_TSD_KD = {128: (2.92, 2.49, 0.104), 512: (2.71, 3.35, 0.071), 2048: (2.59, 3.64, 0.059)}


def _val(cell: dict, name: str, key: str) -> float | None:
    v = cell.get(name, {}).get(key)
    return None if v is None or math.isnan(v) else v


def _ratio(cell: dict, a: str, b: str, key: str) -> float | None:
    va, vb = _val(cell, a, key), _val(cell, b, key)
    return None if va is None or vb is None or vb == 0 else va / vb


def _diff(cell: dict, a: str, b: str, key: str) -> float | None:
    va, vb = _val(cell, a, key), _val(cell, b, key)
    return None if va is None or vb is None else va - vb


def fit_exponent(pts: dict[int, float]) -> float | None:
    """Least-squares slope of log(cost) vs log(T) (cost ~ T^slope); needs >= 2 lengths."""
    import numpy as np

    Ts = sorted(pts)
    if len(Ts) < 2:
        return None
    return float(np.polyfit(np.log(Ts), np.log([pts[T] for T in Ts]), 1)[0])


def fit_exponents_csv(csv_path: Path, lengths=(128, 512, 2048)) -> dict[str, dict[str, float]]:
    """The same fit from an older results CSV (no batch_size column), per variant and timing column."""
    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, float]] = {}
    for v in SCALING_VARIANTS:
        for col in ("cpu_min_ms", "cpu_median_ms", "median_ms"):
            pts = {int(r["T"]): float(r[col]) for r in rows if r["variant"] == v and col in r}
            if all(T in pts for T in lengths):
                out.setdefault(v, {})[col] = fit_exponent({T: pts[T] for T in lengths})
    return out


def memory_sanity(res) -> list[str]:
    """Peak memory must be > 0 (checked when measured) and grow with T for every variant."""
    bad = []
    for B, by_T in res.items():
        Ts = sorted(by_T)
        if len(Ts) < 2:
            continue
        for name in by_T[Ts[0]]:
            pts = [(T, _val(by_T[T], name, "peak_mb")) for T in Ts]
            pts = [(T, p) for T, p in pts if p is not None]
            if len(pts) >= 2 and not all(b[1] > a[1] for a, b in zip(pts, pts[1:])):
                bad.append(f"B={B} {name}: " + ", ".join(f"T={T}: {p:.2f} MB" for T, p in pts))
    if bad:
        return ["Memory sanity check FAILED (peak does not grow with T):"] + [f"* {b}" for b in bad]
    return ["Memory sanity check passed: every peak > 0 and strictly increasing with T, for every variant."]


def _verdict(ok: bool) -> str:
    return "**PASS**" if ok else "**MISS**"


def _fmt(v: float | None, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def target_lines(res, measure_memory: bool) -> list[str]:
    """Every target of the issue, its measured values and a verdict (on CPU time, median and min)."""
    cells = [(B, T, c) for B, by_T in res.items() for T, c in by_T.items()]
    L = [
        "## Targets",
        "",
        "Verdicts use process CPU time (median over the interleaved repeats; the minimum, shown after the",
        "slash, gives the verdict a noise-free reading would lean to). *worst* = the worst cell over every",
        "T and batch size measured.",
        "",
        "| target | measured (worst cell) | verdict, median / min |",
        "|---|---|---|",
    ]

    def worst(pairs, key, mode=max):
        vals = [(r, f"B={B} T={T}") for B, T, c in cells for _, r in pairs(c, key, B, T)]
        vals = [(r, w) for r, w in vals if r is not None]
        return mode(vals) if vals else (None, "")

    def row(label, pairs, target, mode=max, unit="x"):
        (m, where), (mn, where_mn) = worst(pairs, "cpu", mode), worst(pairs, "cpu_min", mode)
        if m is None:
            return
        ok = (lambda v: v <= target) if mode is max else (lambda v: v >= target)
        vals = [r for B, T, c in cells for _, r in pairs(c, "cpu", B, T) if r is not None]
        n_miss = sum(not ok(v) for v in vals)
        L.append(
            f"| {label} | {m:.3f}{unit} ({where}); min: {mn:.3f}{unit} ({where_mn}); "
            f"{n_miss}/{len(vals)} cells miss (median) | {_verdict(ok(m))} / {_verdict(ok(mn))} |"
        )

    for lab, a, b in PKG_PAIRS:
        row(
            f"package / hand-written <= {OVERHEAD_TARGET}, {lab}",
            lambda c, k, B, T, a=a, b=b, lab=lab: [(lab, _ratio(c, a, b, k))],
            OVERHEAD_TARGET,
        )
    for lab, pt, pk, ht, hk in TSD_KD_QUADS:

        def rel(c, k, B, T, pt=pt, pk=pk, ht=ht, hk=hk, lab=lab):
            p, h = _ratio(c, pt, pk, k), _ratio(c, ht, hk, k)
            return [(lab, None if p is None or h is None else p / h)]

        row(f"(package TSD/KD) / (floor TSD/KD) <= {TSD_KD_TARGET}, {lab}", rel, TSD_KD_TARGET)
    for v in ("tsd_cached_pkg", "tsd_cached_hand", "tsd_cached_pkg_ig"):
        row(
            f"{v} / live KD step (`kd`) <= {CACHED_TARGET}, T >= 512",
            lambda c, k, B, T, v=v: [(v, _ratio(c, v, "kd", k) if T >= 512 else None)],
            CACHED_TARGET,
        )
    row(
        f"occlusion_loop / tsd_cached_pkg >= {OCCLUSION_TARGET:.0f}x",
        lambda c, k, B, T: [("", _ratio(c, "occlusion_loop", "tsd_cached_pkg", k))],
        OCCLUSION_TARGET,
        mode=min,
    )
    for v in ("tsd_live_pkg", "tsd_cached_pkg", "tsd_live_pkg_ig", "tsd_cached_pkg_ig"):
        exps = {}
        for key in ("cpu", "cpu_min"):
            for B, by_T in res.items():
                pts = {T: _val(c, v, key) for T, c in by_T.items()}
                pts = {T: p for T, p in pts.items() if p is not None}
                e = fit_exponent(pts) if len(pts) >= 3 else None
                if e is not None:
                    exps.setdefault(key, []).append((e, B))
        if "cpu" in exps:
            (m, bm), (mn, bmn) = max(exps["cpu"]), max(exps["cpu_min"])
            L.append(
                f"| cost linear in T: fitted exponent <= {SCALING_TARGET}, {v} | {m:.3f} (B={bm}); "
                f"min: {mn:.3f} (B={bmn}) | {_verdict(m <= SCALING_TARGET)} / {_verdict(mn <= SCALING_TARGET)} |"
            )
    if measure_memory:
        for lab, a, b in PKG_PAIRS:
            vals = [
                (_ratio(c, a, b, "peak_mb"), f"B={B} T={T}")
                for B, T, c in cells
                if _ratio(c, a, b, "peak_mb")
            ]
            if vals:
                m, where = max(vals)
                L.append(
                    f"| peak memory package / hand-written <= {MEMORY_TARGET}, {lab} | {m:.3f}x ({where}) "
                    f"| {_verdict(m <= MEMORY_TARGET)} |"
                )
    return L + [""]


def _table(header: list[str], body: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(r) + " |" for r in body
    ]


def batch_lines(B: int, by_T: dict, threads: int, measure_memory: bool) -> list[str]:
    Ts = list(by_T)
    names: list[str] = []
    for c in by_T.values():
        names += [n for n in c if n not in names]
    L = [f"## Batch size {B}", ""]
    for key, title in (
        ("cpu", f"process CPU time ({threads} thread(s)), median"),
        ("cpu_min", f"process CPU time ({threads} thread(s)), minimum over repeats"),
        ("wall", "wall-clock, median"),
    ):
        L += [f"### ms per optimizer step, {title}", ""]
        L += _table(
            ["variant"] + [f"T={T}" for T in Ts],
            [[n] + [_fmt(_val(by_T[T], n, key), 1) for T in Ts] for n in names],
        )
        L.append("")
    reps = ", ".join(f"T={T}: {next(iter(c.values()))['n']}" for T, c in by_T.items())
    L += [f"Repeats per cell: {reps}.", ""]
    if measure_memory:
        L += ["### Peak memory per step, MB (bytes allocated during one step and live at once)", ""]
        L += _table(
            ["variant"] + [f"T={T}" for T in Ts],
            [
                [n] + [_fmt(_val(by_T[T], n, "peak_mb"), 2) for T in Ts]
                for n in names
                if n != "occlusion_loop"
            ],
        )
        L.append("")
    L += ["### Ratios (CPU time, median; peak memory where marked)", ""]
    body = []
    for lab, a, b in PKG_PAIRS:
        body.append([f"package / hand, {lab}"] + [_fmt(_ratio(by_T[T], a, b, "cpu")) for T in Ts])
    for lab, a, b in PKG_PAIRS:
        body.append([f"package - hand, ms, {lab}"] + [_fmt(_diff(by_T[T], a, b, "cpu"), 2) for T in Ts])
    body.append(
        ["TemporalSaliencyLoss / hand, live (gradient)"]
        + [_fmt(_ratio(by_T[T], "tsd_live_loss", "tsd_live_hand", "cpu")) for T in Ts]
    )
    body.append(
        ["TemporalSaliencyLoss / hand, live (IG 8)"]
        + [_fmt(_ratio(by_T[T], "tsd_live_loss_ig", "tsd_live_hand_ig", "cpu")) for T in Ts]
    )
    for lab, pt, pk, ht, hk in TSD_KD_QUADS:
        body.append([f"TSD/KD, floor (hand), {lab}"] + [_fmt(_ratio(by_T[T], ht, hk, "cpu")) for T in Ts])
        body.append([f"TSD/KD, package, {lab}"] + [_fmt(_ratio(by_T[T], pt, pk, "cpu")) for T in Ts])
    spec = {T: SPEC_TSD_KD.get(T) for T in Ts}
    body.append(
        ["spec floor: TSD/KD live; both cached; TSD cached / KD live"]
        + ["; ".join(str(v) for v in spec[T]) if spec[T] else "–" for T in Ts]
    )
    for v in ("tsd_cached_hand", "tsd_cached_pkg", "tsd_cached_pkg_ig"):
        body.append([f"{v} / kd (live KD)"] + [_fmt(_ratio(by_T[T], v, "kd", "cpu")) for T in Ts])
    body.append(
        ["occlusion_loop / tsd_cached_pkg"]
        + [_fmt(_ratio(by_T[T], "occlusion_loop", "tsd_cached_pkg", "cpu"), 0) for T in Ts]
    )
    if measure_memory:
        for lab, a, b in PKG_PAIRS:
            body.append(
                [f"peak memory package / hand, {lab}"] + [_fmt(_ratio(by_T[T], a, b, "peak_mb")) for T in Ts]
            )
        body.append(
            ["peak memory tsd_live_hand / kd"]
            + [_fmt(_ratio(by_T[T], "tsd_live_hand", "kd", "peak_mb")) for T in Ts]
        )
    L += _table(["ratio"] + [f"T={T}" for T in Ts], [r for r in body if any(c != "–" for c in r[1:])])
    L.append("")
    if len(Ts) >= 2:
        L += [
            f"### Cost vs T, fitted exponent (this run, B={B}, least squares on log-log, target <= 1.1)",
            "",
        ]
        body = []
        for v in SCALING_VARIANTS + ["tsd_live_pkg_ig", "tsd_cached_pkg_ig"]:
            cells = []
            for key, _ in MEASURES:
                pts = {T: _val(c, v, key) for T, c in by_T.items()}
                pts = {T: p for T, p in pts.items() if p is not None}
                cells.append(
                    _fmt(fit_exponent(pts))
                    + (f" (T={min(pts)}..{max(pts)})" if 1 < len(pts) < len(Ts) else "")
                )
            if any(c != "–" for c in cells):
                body.append([v] + cells)
        L += _table(["variant"] + [t for _, t in MEASURES], body)
        L.append("")
    return L


def write_markdown(path: Path, env: dict, res, params, args, measure_memory: bool, sanity=()) -> None:
    tp, sp = params
    L = [
        "# Training-step cost: plain PyTorch vs lightning-tsd",
        "",
        f'Generated by `benchmarks/speed/bench_speed.py` (issue "Benchmarks", cost part). Run wall time {env.get("wall", "?")}.',
        "",
        "```",
        env["command"],
        "```",
        "",
        "## Setup",
        "",
        f"* torch {env['torch']}, Python {env['python']}, {env['device']}; {env['date']}, load average at start"
        f" {env['load']}.",
        "* **Load caveat:** a shared machine with 2 CPU cores, another benchmark running at the same time.",
        "  Variants are interleaved round-robin so load slows all alike, and process CPU time (what the step",
        "  itself computes) is the measure used for the verdicts; wall-clock times are shown but noisy.",
        f"* Teacher: InceptionTime {dict(TEACHER_KWARGS)}, {tp:,} parameters (**reduced**: the package default",
        "  is num_filters=32, depth=6, ~420k; the spec's cost table used an 870k teacher). Student: NarrowFCN,",
        f"  {sp:,} parameters. Batch sizes {args.batch_sizes}, T in {args.lengths}, IG (8 steps) rows at"
        f" T <= {args.ig_max_length}.",
        "* Loss CE + KD (tau 4) [+ 2 x pearson L_TSD], Adam. One optimizer step per call; "
        f"{args.warmup} warm-up round(s), then up to {args.repeats} interleaved timed rounds per cell.",
        "* Variants: `kd` hand-written KD step (teacher forward under no_grad); `kd_cached_hand` KD with the",
        "  teacher's logits precomputed; `kd_live_pkg` / `kd_cached_pkg` the package's",
        "  `TemporalSaliencyDistiller.training_step` with `tsd_weight=0` (live / `teacher_cache=True`);",
        "  `tsd_live_pkg` / `tsd_cached_pkg` the same with `tsd_weight=2`; `tsd_live_loss` the package's",
        "  `TemporalSaliencyLoss` in a hand-written loop; `tsd_live_hand` / `tsd_cached_hand` the",
        "  hand-written plain-PyTorch floor for the same math; `*_ig` integrated gradients (8 steps);",
        "  `occlusion_loop` the naive per-timestep occlusion baseline of the cached step.",
        "* Peak memory: one extra, untimed step per variant per cell under",
        "  `torch.profiler.profile(activities=[CPU], profile_memory=True)`; every CPU allocation/free event",
        "  (the `[memory]` events of the exported trace, signed byte counts) is replayed in time order and the",
        "  maximum of the running sum is the peak of the bytes allocated during the step and live at once.",
        "  Tensors allocated before the step (models, Adam state, teacher cache, batch, last step's grads) are",
        "  not counted, nor are their frees (the profiler does not see them). Checked on toy functions (exact",
        "  to the byte). Not measured for `occlusion_loop` (T forwards under the profiler).",
        "",
    ]
    L += target_lines(res, measure_memory)
    over = [
        (_diff(c, a, b, "cpu"), _ratio(c, a, b, "cpu"), _val(c, b, "cpu"), f"{a} B={B} T={T}")
        for B, by_T in res.items()
        for T, c in by_T.items()
        for _, a, b in PKG_PAIRS
    ]
    over = [o for o in over if o[0] is not None]
    missed = [o for o in over if o[1] > OVERHEAD_TARGET]
    L += ["Notes on the targets:", ""]
    if missed:
        L += [
            f"* package / hand-written > {OVERHEAD_TARGET} in {len(missed)} of {len(over)} (pair, cell)"
            f" comparisons, all where the hand-written step takes <= {max(o[2] for o in missed):.1f} ms;",
            f"  there the package costs {min(o[0] for o in missed):.1f}-{max(o[0] for o in missed):.1f} ms"
            " more per step (CPU median). These are the smallest steps, where a per-step cost of the",
            "  package's `training_step` that is (roughly) independent of T and B (batch unpacking, cache",
            "  lookup, `self.log` calls, loss bookkeeping; likely causes, not profiled here) is a large share;",
            "  see the `package - hand, ms` rows below, and the ratios on the larger steps.",
        ]
    L += [
        "* TSD/KD is compared with this run's own hand-written floor (same teacher, same data), which is",
        "  what the target asks. The floor's TSD/KD ratios here are **not comparable to the spec's** (2.92 /",
        "  2.71 / 2.59 live, from an 870k teacher): with the reduced 80k teacher the teacher passes are a",
        "  smaller share of a step and the student's double backward a larger one, so TSD/KD comes out",
        "  higher for floor and package alike (the earlier B=32 run gave 4.1-5.0). For the same reason",
        "  `tsd_cached / kd <= 0.1` (the spec's floor: 0.071 / 0.059) depends on the teacher being far",
        "  larger than the student; where the hand-written floor misses it too, the teacher size, not the",
        "  package, is the cause.",
        "",
    ]
    L += list(sanity) + ([""] if sanity else [])
    for B, by_T in res.items():
        L += batch_lines(B, by_T, args.threads, measure_memory)
    if args.scaling_from is not None and args.scaling_from.exists():
        exps = fit_exponents_csv(args.scaling_from)
        if exps:
            L += [f"## Cost vs T, fitted exponent from the older `{args.scaling_from.name}` (B=32)", ""]
            L += _table(
                ["variant", "CPU time, min", "CPU time, median", "wall-clock, median"],
                [
                    [v] + [_fmt(e.get(c)) for c in ("cpu_min_ms", "cpu_median_ms", "median_ms")]
                    for v, e in exps.items()
                ],
            )
            L.append("")
    path.write_text("\n".join(L))


def plot(path: Path, res, measure_memory: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nrows = 2 if measure_memory else 1
    fig, axes = plt.subplots(nrows, len(res), figsize=(5 * len(res), 4 * nrows), squeeze=False)
    styles = {
        "kd": "k-o",
        "tsd_live_pkg": "C0-s",
        "tsd_live_hand": "C0--x",
        "tsd_cached_pkg": "C1-s",
        "tsd_cached_hand": "C1--x",
    }
    for j, (B, by_T) in enumerate(res.items()):
        for i, (key, ylabel) in enumerate(
            (("cpu", "ms per step (CPU time, median)"), ("peak_mb", "peak MB per step"))[:nrows]
        ):
            ax = axes[i][j]
            for v in PLOT_VARIANTS:
                pts = [(T, _val(c, v, key)) for T, c in sorted(by_T.items())]
                pts = [(T, p) for T, p in pts if p is not None]
                if pts:
                    ax.plot(*zip(*pts), styles[v], label=v)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("T")
            ax.set_ylabel(ylabel)
            ax.set_title(f"batch {B}")
            ax.grid(True, which="both", alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=8)
    fig.suptitle(
        f"lightning-tsd step cost vs hand-written floor (teacher {dict(TEACHER_KWARGS)})", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
