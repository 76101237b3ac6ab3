"""Cost of one training step: plain PyTorch vs lightning-tsd (mirrors the spec's "Cost, measured" table).

Variants, all with an InceptionTime teacher (package default size), a NarrowFCN student, batch 32,
Adam, loss CE + KD (tau=4) [+ 2 * L_TSD (pearson)]:

* ``kd``            plain KD step: teacher forward under no_grad, student forward, CE + KD backward.
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

``--scaling-from results_1thread.csv`` adds to the Markdown a log-log least-squares fit of cost vs T for
the package's cached and live TSD steps, taken from that (already measured) CSV.

Every variant runs one optimizer step per call; variants are interleaved round-robin (so a shared,
noisy CPU slows all of them alike) after warm-up, and the median of the repeats is reported.

Usage: ``python benchmarks/speed/bench_speed.py [--device cpu|cuda] [--lengths 128 512 2048]``
"""

from __future__ import annotations

import argparse
import csv
import datetime
import platform
import statistics
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


def build(T: int, device: torch.device, seed: int = 0):
    torch.manual_seed(seed)
    teacher = InceptionTime(1, 2, **TEACHER_KWARGS).to(device).eval().requires_grad_(False)
    student = NarrowFCN(1, 2).to(device)
    x = torch.randn(32, 1, T, device=device)
    y = torch.randint(0, 2, (32,), device=device)
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


def make_variants(T: int, device: torch.device, with_ig: bool, with_occlusion: bool = False):
    teacher, student0, x, y = build(T, device)
    batch = {"x": x, "y": y, "index": torch.arange(32, device=device)}
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

    for method, sal in (("gradient", hand_gradient_saliency), ("integrated_gradients", hand_ig_saliency)):
        if method == "integrated_gradients" and not with_ig:
            continue
        suffix = "" if method == "gradient" else "_ig"
        options = {} if method == "gradient" else {"steps": 8}

        # (b) package, live teacher, via the LightningModule's training_step
        def pkg_step(cache: bool, method=method, options=options):
            d = TemporalSaliencyDistiller(
                teacher,
                fresh_student(),
                base_loss="kd",
                tsd_weight=W_TSD,
                saliency=method,
                saliency_options=options,
                alignment="pearson",
                teacher_cache=cache,
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

        variants[f"tsd_live_pkg{suffix}"] = pkg_step(False)
        variants[f"tsd_cached_pkg{suffix}"] = pkg_step(True)

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    parser.add_argument("--ig-max-length", type=int, default=2048, help="skip IG rows above this T")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--budget-per-length", type=float, default=90.0, help="seconds of timed rounds per T")
    parser.add_argument(
        "--teacher-filters", type=int, default=16, help="InceptionTime num_filters (package default 32)"
    )
    parser.add_argument(
        "--teacher-depth", type=int, default=3, help="InceptionTime depth (package default 6)"
    )
    parser.add_argument(
        "--only", nargs="+", default=None, help="keep variants whose name contains one of these"
    )
    parser.add_argument(
        "--occlusion",
        action="store_true",
        help="add the occlusion_loop baseline (T student forwards per step) at the --occlusion-lengths",
    )
    parser.add_argument("--occlusion-lengths", type=int, nargs="+", default=[512])
    parser.add_argument(
        "--scaling-from",
        type=Path,
        default=None,
        help="a results CSV with T in {128, 512, 2048}: fit the cost-vs-T exponent of the package's TSD steps",
    )
    parser.add_argument("--tag", default="", help="suffix of the results files (results{tag}.csv/.md)")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args()
    TEACHER_KWARGS.update(num_filters=args.teacher_filters, depth=args.teacher_depth)

    warnings.filterwarnings("ignore")  # self.log outside a Trainer warns once per call site
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    tag = ("" if args.device == "cpu" else f"_{args.device}") + args.tag
    csv_path = args.out / f"results{tag}.csv"
    md_path = args.out / f"results{tag}.md"
    hw = (
        torch.cuda.get_device_name(0)
        if device.type == "cuda"
        else f"{cpu_model()}, {torch.get_num_threads()} threads"
    )
    load = ""
    try:
        load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        pass
    header = (
        f"torch {torch.__version__}, device {args.device} ({hw}), {platform.python_version()}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, load average at start {load}"
    )
    fields = [
        "T",
        "variant",
        "median_ms",
        "min_ms",
        "cpu_median_ms",
        "cpu_min_ms",
        "repeats",
        "teacher_params",
        "student_params",
    ]
    with csv_path.open("w", newline="") as f:
        csv.writer(f).writerow(fields)
    all_rows: dict[int, dict[str, float]] = {}
    cpu_rows: dict[int, dict[str, float]] = {}
    cpu_min_rows: dict[int, dict[str, float]] = {}
    params = (0, 0)
    for T in args.lengths:
        t0 = time.perf_counter()
        variants, tp, sp = make_variants(
            T,
            device,
            with_ig=T <= args.ig_max_length,
            with_occlusion=args.occlusion and T in args.occlusion_lengths,
        )
        params = (tp, sp)
        if args.only:
            variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
        times, cpu = time_variants(variants, device, args.warmup, args.repeats, args.budget_per_length)
        all_rows[T], cpu_rows[T], cpu_min_rows[T] = {}, {}, {}
        with csv_path.open("a", newline="") as f:
            w = csv.writer(f)
            for name, ts in times.items():
                med = statistics.median(ts) * 1e3
                all_rows[T][name] = med
                cpu_rows[T][name] = statistics.median(cpu[name]) * 1e3
                cpu_min_rows[T][name] = min(cpu[name]) * 1e3
                w.writerow(
                    [
                        T,
                        name,
                        f"{med:.3f}",
                        f"{min(ts) * 1e3:.3f}",
                        f"{cpu_rows[T][name]:.3f}",
                        f"{cpu_min_rows[T][name]:.3f}",
                        len(ts),
                        tp,
                        sp,
                    ]
                )
        print(
            f"T={T}: {len(next(iter(times.values())))} rounds in {time.perf_counter() - t0:.0f}s", flush=True
        )
        for name, med in all_rows[T].items():
            print(
                f"  {name:22s} {med:9.2f} ms wall {cpu_rows[T][name]:9.2f} ms cpu (min {cpu_min_rows[T][name]:.2f})",
                flush=True,
            )
        write_markdown(
            md_path, header, all_rows, cpu_rows, cpu_min_rows, params, args.threads, args.scaling_from
        )


SCALING_VARIANTS = ["tsd_cached_pkg", "tsd_live_pkg", "tsd_cached_hand", "tsd_live_hand", "kd"]
SCALING_TARGET = 1.1


def fit_exponents(csv_path: Path, lengths=(128, 512, 2048)) -> dict[str, dict[str, float]]:
    """Least-squares slope of log(cost) vs log(T) over ``lengths``, per variant and timing column."""
    import numpy as np

    with csv_path.open() as f:
        rows = list(csv.DictReader(f))
    out: dict[str, dict[str, float]] = {}
    for v in SCALING_VARIANTS:
        for col in ("cpu_min_ms", "cpu_median_ms", "median_ms"):
            pts = {int(r["T"]): float(r[col]) for r in rows if r["variant"] == v and col in r}
            if all(T in pts for T in lengths):
                slope = np.polyfit(np.log(lengths), np.log([pts[T] for T in lengths]), 1)[0]
                out.setdefault(v, {})[col] = float(slope)
    return out


def scaling_lines(csv_path: Path) -> list[str]:
    exps = fit_exponents(csv_path)
    if not exps:
        return []
    lines = [
        f"## Cost vs T: fitted exponent (from `{csv_path.name}`)",
        "",
        "Slope of a least-squares line through (log T, log ms per step) at T = 128, 512, 2048 (cost ~ T^slope);",
        f"target for the package's TSD steps: <= {SCALING_TARGET}. Not re-measured: read from the CSV above.",
        "",
        "| variant | CPU time, min | CPU time, median | wall-clock, median |",
        "|---|---|---|---|",
    ]
    for v, e in exps.items():
        cells = [f"{e[c]:.3f}" if c in e else "–" for c in ("cpu_min_ms", "cpu_median_ms", "median_ms")]
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines + [""]


def occlusion_lines(
    cpu_min: dict[int, dict[str, float]], cpu: dict[int, dict[str, float]], wall
) -> list[str]:
    lines = []
    for T, r in cpu_min.items():
        if "occlusion_loop" in r and "tsd_cached_pkg" in r:
            if not lines:
                lines += [
                    "## Package TSD step (cached teacher) vs the naive occlusion loop",
                    "",
                    "Speed-up = occlusion_loop / tsd_cached_pkg (same run, interleaved); target >= 100x.",
                    "",
                    "| T | CPU time, min | CPU time, median | wall-clock, median |",
                    "|---|---|---|---|",
                ]
            cells = [f"{d[T]['occlusion_loop'] / d[T]['tsd_cached_pkg']:.0f}x" for d in (cpu_min, cpu, wall)]
            lines.append(f"| {T} | " + " | ".join(cells) + " |")
    return lines + ([""] if lines else [])


def write_markdown(
    path: Path, header: str, wall, cpu, cpu_min, params, threads: int, scaling_from: Path | None = None
) -> None:
    tp, sp = params
    lines = [
        "# Training-step cost: plain PyTorch vs lightning-tsd",
        "",
        f"Generated by `benchmarks/speed/bench_speed.py`. {header}.",
        f"B=32, InceptionTime teacher ({tp:,} parameters, {TEACHER_KWARGS}), NarrowFCN student ({sp:,} parameters),",
        "Adam, loss CE + KD (tau 4) + 2 * pearson L_TSD. Median of interleaved repeats after warm-up (ms per",
        "optimizer step). *hand* = hand-written plain-PyTorch loop doing the same math (the floor);",
        "*pkg* = `TemporalSaliencyDistiller.training_step` (outside a Trainer); *loss* = the package's",
        "`TemporalSaliencyLoss` in a hand-written loop.",
        "",
    ]
    for title, rows in (
        ("wall-clock, median", wall),
        (f"process CPU time (all {threads} threads summed), median", cpu),
        (f"process CPU time (all {threads} threads summed), minimum over repeats", cpu_min),
    ):
        lines += [f"## Milliseconds per step, {title}", ""]
        lines += _tables(rows)
    lines += occlusion_lines(cpu_min, cpu, wall)
    if scaling_from is not None and scaling_from.exists():
        lines += scaling_lines(scaling_from)
    lines += [
        "Target: package / hand-written <= 1.15. The CPU was shared with other jobs (load average above),",
        "so wall-clock times are noisy; process CPU time is the steadier measure of the work each step does,",
        "and its minimum over repeats (noise only ever adds time) the most robust one.",
        "",
    ]
    path.write_text("\n".join(lines))


def _tables(rows: dict[int, dict[str, float]]) -> list[str]:
    lines = []
    names = []
    for r in rows.values():
        names += [n for n in r if n not in names]
    lines.append("| variant | " + " | ".join(f"T={T}" for T in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for n in names:
        lines.append(f"| {n} | " + " | ".join(f"{r[n]:.1f}" if n in r else "–" for r in rows.values()) + " |")
    lines += ["", "Ratios:", ""]
    ratio_defs = [
        ("package / hand-written, live teacher (gradient)", "tsd_live_pkg", "tsd_live_hand"),
        ("TemporalSaliencyLoss / hand-written, live (gradient)", "tsd_live_loss", "tsd_live_hand"),
        ("package / hand-written, cached teacher (gradient)", "tsd_cached_pkg", "tsd_cached_hand"),
        ("package / hand-written, live teacher (IG 8)", "tsd_live_pkg_ig", "tsd_live_hand_ig"),
        ("TemporalSaliencyLoss / hand-written, live (IG 8)", "tsd_live_loss_ig", "tsd_live_hand_ig"),
        ("package / hand-written, cached teacher (IG 8)", "tsd_cached_pkg_ig", "tsd_cached_hand_ig"),
        ("TSD/KD, teacher live, hand-written (spec: 2.92 / 2.71 / 2.59)", "tsd_live_hand", "kd"),
        ("TSD/KD, teacher live, package", "tsd_live_pkg", "kd"),
        ("TSD cached / KD live, hand-written (spec: 0.104 / 0.071 / 0.059)", "tsd_cached_hand", "kd"),
        ("TSD cached / KD live, package", "tsd_cached_pkg", "kd"),
        ("IG 8 / gradient, package live", "tsd_live_pkg_ig", "tsd_live_pkg"),
        ("IG 8 / gradient, package cached", "tsd_cached_pkg_ig", "tsd_cached_pkg"),
    ]
    lines.append("| ratio | " + " | ".join(f"T={T}" for T in rows) + " |")
    lines.append("|---|" + "---|" * len(rows))
    for label, a, b in ratio_defs:
        cells = [f"{r[a] / r[b]:.3f}" if a in r and b in r else "–" for r in rows.values()]
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    return lines


if __name__ == "__main__":
    main()
