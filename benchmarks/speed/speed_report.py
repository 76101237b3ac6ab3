"""``speed.md``, ``speed.png`` and ``speed_estimators.png`` from the rows of ``speed.csv``: the targets with
PASS/MISS per cell, the cost and peak memory of every estimator vs T, the first epoch's cache fill, and the
raw measurements. A group is one teacher and one batch size; a cell is a group and a length T."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import Panel, line_plot, markdown_table
from speed_variants import ESTIMATORS, PLOTTED, TEACHER_OPTIONS, distiller_defaults

Res = dict[str, dict[int, dict[str, dict[str, float]]]]  # res[group][T][variant][measure]
NUMERIC = {
    "wall_ms": "wall",
    "wall_min_ms": "wall_min",
    "cpu_ms": "cpu",
    "cpu_min_ms": "cpu_min",
    "peak_mb": "peak_mb",
}


def group(teacher_params: int, batch_size: int) -> str:
    """A group's name: ``"80k teacher, B=16"``."""
    return f"{teacher_params / 1000:.0f}k teacher, B={batch_size}"


def load(rows: list[dict[str, str]], device: str) -> Res:
    """The CSV rows of one device as ``res[group][T][variant][measure]`` (by teacher size, B, then T)."""
    order = sorted(
        {(int(r["teacher_params"]), int(r["batch_size"])) for r in rows if r.get("device") == device}
    )
    res: Res = {group(*key): {} for key in order}
    for r in rows:
        if r.get("device") != device:
            continue
        cell = res[group(int(r["teacher_params"]), int(r["batch_size"]))].setdefault(int(r["T"]), {})
        cell[r["variant"]] = {
            key: float(r[col]) for col, key in NUMERIC.items() if r.get(col) not in (None, "")
        }
        cell[r["variant"]]["n"] = float(r.get("repeats") or 0)
    return {g: dict(sorted(by_T.items())) for g, by_T in res.items()}


def val(cell: dict, name: str, key: str) -> float | None:
    v = cell.get(name, {}).get(key)
    return None if v is None or math.isnan(v) else v


def ratio(cell: dict, a: str, b: str, key: str) -> float | None:
    va, vb = val(cell, a, key), val(cell, b, key)
    return None if va is None or vb is None or vb == 0 else va / vb


def fit_exponent(points: dict[int, float]) -> float | None:
    """Least-squares slope of log(cost) vs log(T) (cost ~ T^slope); needs >= 2 lengths."""
    if len(points) < 2:
        return None
    Ts = sorted(points)
    return float(np.polyfit(np.log(Ts), np.log([points[T] for T in Ts]), 1)[0])


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else "**PASS**" if ok else "**MISS**"


# ----------------------------------------------------------------------------- targets
def _target(
    label: str, fn: Callable[[dict, str], float | None], limit: float, at_least: bool = False
) -> dict:
    """A target: ``fn(cell, measure)`` is its value in a cell; peak-memory targets say so in the label."""
    return {"label": label, "fn": fn, "limit": limit, "at_least": at_least, "memory": "memory" in label}


def issue_targets(default: str, floors: list[str], t: str) -> list[dict]:
    """The targets of issue 10 (time measure ``t``: process CPU time on CPU, wall-clock on CUDA)."""
    live, cached = f"tsd_live_pkg:{default}", f"tsd_cached_pkg:{default}"
    out = [
        _target(
            f"default TSD ({default}) / package KD, live teacher, time <= 5x",
            lambda c, k: ratio(c, live, "kd_live_pkg", k),
            5,
        ),
        _target(
            "default TSD / package KD, live teacher, peak memory <= 5x",
            lambda c, k: ratio(c, live, "kd_live_pkg", "peak_mb"),
            5,
        ),
        _target(
            "default TSD / package KD, cached, time <= 3x",
            lambda c, k: ratio(c, cached, "kd_cached_pkg", k),
            3,
        ),
        _target(
            "default TSD / package KD, cached, peak memory <= 3x",
            lambda c, k: ratio(c, cached, "kd_cached_pkg", "peak_mb"),
            3,
        ),
    ]
    pairs = [("KD, live", "kd_live_pkg", "kd_live_hand"), ("KD, cached", "kd_cached_pkg", "kd_cached_hand")]
    for f in floors:
        pairs += [(f"TSD {f}, live", f"tsd_live_pkg:{f}", f"tsd_live_hand:{f}")]
        pairs += [(f"TSD {f}, cached", f"tsd_cached_pkg:{f}", f"tsd_cached_hand:{f}")]
    for label, a, b in pairs:
        out.append(
            _target(
                f"package / hand-written floor <= 1.15x, {label}",
                lambda c, k, a=a, b=b: ratio(c, a, b, k),
                1.15,
            )
        )
    return out


def earlier_targets(default: str, floors: list[str]) -> list[dict]:
    """Targets of the earlier benchmark issue, kept so the two runs stay comparable."""
    out = []
    for f in floors:
        for mode in ("live", "cached"):
            p, h = (f"tsd_{mode}_pkg:{f}", f"kd_{mode}_pkg"), (f"tsd_{mode}_hand:{f}", f"kd_{mode}_hand")

            def rel(c, k, p=p, h=h):
                rp, rh = ratio(c, *p, k), ratio(c, *h, k)
                return None if rp is None or rh is None else rp / rh

            out.append(_target(f"(package TSD/KD) / (floor TSD/KD) <= 1.1x, {f}, {mode}", rel, 1.1))
            out.append(
                _target(
                    f"peak memory package / floor <= 1.2x, TSD {f}, {mode}",
                    lambda c, k, a=p[0], b=h[0]: ratio(c, a, b, "peak_mb"),
                    1.2,
                )
            )
    out.append(
        _target(
            f"cached TSD ({default}) / live hand-written KD <= 0.1x (spec)",
            lambda c, k: ratio(c, f"tsd_cached_pkg:{default}", "kd_live_hand", k),
            0.1,
        )
    )
    out.append(
        _target(
            "occlusion_loop / cached package TSD (gradient) >= 100x",
            lambda c, k: ratio(c, "occlusion_loop", "tsd_cached_pkg:gradient", k),
            100,
            at_least=True,
        )
    )
    return out


def _meets(target: dict, values: list[float | None]) -> bool | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return all(v >= target["limit"] if target["at_least"] else v <= target["limit"] for v in got)


def target_table(res: Res, targets: list[dict], t: str, per_cell: bool = False) -> list[str]:
    """One row per target: its value in every cell (time: median, minimum in brackets; ``per_cell``: with the
    cell's PASS/MISS from the median), and the verdict over every measured cell (time: from the medians /
    from the minima)."""
    cells = [c for by_T in res.values() for c in by_T.values()]
    columns = (
        ["target"] + [f"{g}, T={T}" for g, by_T in res.items() for T in by_T] + ["verdict (median / min)"]
    )
    body = []
    for tg in targets:
        if tg["memory"]:
            med, mins = [tg["fn"](c, "peak_mb") for c in cells], [None] * len(cells)
        else:
            med, mins = [tg["fn"](c, t) for c in cells], [tg["fn"](c, t + "_min") for c in cells]
        if all(v is None for v in med):
            continue
        shown = [
            None
            if m is None
            else f"{m:.2f}"
            + ("" if n is None else f" ({n:.2f})")
            + (" " + verdict(_meets(tg, [m])) if per_cell else "")
            for m, n in zip(med, mins)
        ]
        ruling = verdict(_meets(tg, med)) + ("" if tg["memory"] else f" / {verdict(_meets(tg, mins))}")
        body.append([tg["label"]] + shown + [ruling])
    return markdown_table(body, columns)


def exponent_lines(res: Res, variants: list[str], t: str) -> list[str]:
    """Cost-vs-T exponent per variant and batch size (target <= 1.1: cost linear in T)."""
    body = []
    for v in variants:
        for B, by_T in res.items():
            pts = {T: val(c, v, t) for T, c in by_T.items()}
            e = fit_exponent({T: p for T, p in pts.items() if p is not None})
            if e is not None:
                body.append([v, B, f"{e:.3f}", verdict(e <= 1.1)])
    return markdown_table(body, ["variant", "group", "fitted exponent", "<= 1.1"]) if body else []


# ----------------------------------------------------------------------------- estimator tables
def estimator_table(res: Res, B: int, t: str, default: str) -> list[str]:
    """Per estimator and T: live and cached package step, each as ms and as a multiple of package KD."""
    by_T = res[B]
    labels = [e for e in ESTIMATORS if any(f"tsd_live_pkg:{e}" in c for c in by_T.values())]
    columns = ["estimator"] + [f"{m} T={T}" for T in by_T for m in ("live", "cached")]
    body = []
    for e in labels:
        row = [e + (" (default)" if e == default else "")]
        for c in by_T.values():
            for mode in ("live", "cached"):
                ms, r = val(c, f"tsd_{mode}_pkg:{e}", t), ratio(c, f"tsd_{mode}_pkg:{e}", f"kd_{mode}_pkg", t)
                row.append("–" if ms is None else f"{ms:.1f} ms ({r:.2f}x)")
        body.append(row)
    return markdown_table(body, columns)


def memory_table(res: Res, B: int, default: str) -> list[str]:
    """Peak MB of the package's step per estimator vs T (live and cached), KD first."""
    by_T = res[B]
    names = ["kd_live_pkg", "kd_cached_pkg"] + [
        f"tsd_{mode}_pkg:{e}" for e in ESTIMATORS for mode in ("live", "cached")
    ]
    body = []
    for n in names:
        if any(val(c, n, "peak_mb") is not None for c in by_T.values()):
            label = n + (" (default)" if n.endswith(f":{default}") else "")
            body.append([label] + [val(c, n, "peak_mb") for c in by_T.values()])
    return markdown_table(body, ["step"] + [f"T={T}" for T in by_T], digits=2)


def fill_table(res: Res, default: str, t: str) -> list[str]:
    """The first epoch of a cached fit pays the cache fill once per batch: its cost (ms per batch, and in
    package KD steps, live), and the first epoch's step (fill + cached TSD step) against the live KD step."""
    fill, cached = f"fill_pkg:{default}", f"tsd_cached_pkg:{default}"
    body = []
    for g, by_T in res.items():
        for T, c in by_T.items():
            ms, first = val(c, fill, t), val(c, cached, t)
            kd = val(c, "kd_live_pkg", t)
            if ms is None or kd is None:
                continue
            epoch = None if first is None else (ms + first) / kd
            body.append([g, T, f"{ms:.1f}", f"{ms / kd:.2f}", None if epoch is None else f"{epoch:.2f}",
                         val(c, fill, "peak_mb")])  # fmt: skip
    columns = ["group", "T", "fill ms per batch", "fill / live KD step", "first-epoch step / live KD step",
               "fill peak MB"]  # fmt: skip
    return markdown_table(body, columns, digits=2) if body else []


def raw_table(res: Res, B: int, key: str, digits: int = 2) -> list[str]:
    by_T = res[B]
    names: list[str] = []
    for c in by_T.values():
        names += [n for n in c if n not in names]
    body = [[n] + [val(c, n, key) for c in by_T.values()] for n in names]
    return markdown_table(body, ["variant"] + [f"T={T}" for T in by_T], digits=digits)


# ----------------------------------------------------------------------------- plot
def plot(path: Path, res: Res, t: str, default: str, floors: list[str]) -> bool:
    """Per batch size: ms per step vs T (KD, the default TSD, floors) and peak MB vs T per estimator."""
    panels = []
    for B, by_T in res.items():
        timing = Panel(f"{B}: ms per step ({t})", "T", "ms")
        memory = Panel(f"{B}: peak MB per step, live teacher", "T", "MB")
        names = ["kd_live_pkg", "kd_cached_pkg", f"tsd_live_pkg:{default}", f"tsd_cached_pkg:{default}"]
        names += [f"tsd_{m}_hand:{f}" for f in floors for m in ("live", "cached")]
        for n in names:
            timing.series[n] = [(T, val(c, n, t)) for T, c in by_T.items()]
        for n in ["kd_live_pkg"] + [f"tsd_live_pkg:{e}" for e in ESTIMATORS]:
            memory.series[n.replace("tsd_live_pkg:", "")] = [
                (T, val(c, n, "peak_mb")) for T, c in by_T.items()
            ]
        panels += [timing, memory]
    return line_plot(path, panels, title="lightning-tsd step cost and peak memory vs T")


def plot_estimators(path: Path, res: Res, t: str) -> bool:
    """One panel per teacher and estimator of :data:`PLOTTED`: ms per package step vs T, a line per batch size
    and teacher mode (live, cached), the package KD steps beside them."""
    teachers = sorted({g.split(",")[0] for g in res}, key=lambda name: float(name.split("k")[0]))
    panels = []
    for teacher in teachers:
        groups = {g.split("B=")[1]: by_T for g, by_T in res.items() if g.startswith(teacher + ",")}
        for e in PLOTTED:
            panel = Panel(f"{e}, {teacher}: ms per step ({t}) vs T and B", "T", "ms")
            for B, by_T in groups.items():
                for mode in ("live", "cached"):
                    for name, label in (
                        (f"tsd_{mode}_pkg:{e}", f"B={B} {mode}"),
                        (f"kd_{mode}_pkg", f"B={B} KD {mode}"),
                    ):
                        panel.series[label] = [(T, val(c, name, t)) for T, c in by_T.items()]
            if any(p[1] is not None for points in panel.series.values() for p in points):
                panels.append(panel)
    return bool(panels) and line_plot(path, panels, title="lightning-tsd step cost per estimator vs T and B")


# ----------------------------------------------------------------------------- speed.md
def setup_lines(env: dict, info: dict) -> list[str]:
    method, options = ESTIMATORS[info["default"]]
    d = distiller_defaults()
    other = ", ".join(f"`{k}={d[k]!r}`" for k in ("alignment", "tsd_weight", "tsd_gradient"))
    estimators = ", ".join(
        f"`{e}` = {m} {o}" + (f" (teacher's maps: {TEACHER_OPTIONS[e]})" if e in TEACHER_OPTIONS else "")
        for e, (m, o) in ESTIMATORS.items()
    )
    return [
        "## Setup",
        "",
        f"* torch {env['torch']}, Lightning {env['lightning']}, Python {env['python']}, {env['device']};"
        f" {env['date']}, load average at start {env['load']}.",
        f"* Teachers: InceptionTime {info['teacher_kwargs']} (frozen, eval mode; groups name them by their"
        f" parameter count). Student: NarrowFCN, {info['student_params']:,} parameters (train mode, BatchNorm).",
        f"* Package default estimator: `{info['default']}` = {method} {options}; every other distiller",
        f"  argument at its default ({other}), `base_loss='kd'`, Adam. The package's step is",
        "  `TemporalSaliencyDistiller.training_step` + backward + optimizer step, with `saliency_options`",
        "  passed as a dict; `_cached` steps use `teacher_cache=True`, filled beforehand (the fill, timed",
        "  apart as `fill_pkg`, is what the first epoch pays once per batch).",
        f"* Estimators: {estimators}.",
        "  `ig8` runs all 8 x B teacher interpolants in one call; `ig8_chunked` uses the package's default",
        "  teacher chunking (at most max(B, 64) rows per teacher forward). The student side of every IG",
        "  variant runs its interpolants in one call (their double-backward graphs are all needed).",
        f"* Hand-written floors (plain PyTorch, same math, no checks) for: {', '.join(info['floors'])}.",
        f"* Time: {info['measure_label']}; {info['warmup']} warm-up round(s), then up to {info['repeats']}"
        " interleaved rounds per cell (round-robin over the variants, so load slows all alike); median, and",
        "  the minimum in brackets. Peak memory: one extra, untimed step per variant: bytes allocated during",
        "  the step and live at once (CPU: the profiler's allocator events replayed in order; CUDA: the",
        "  allocator's peak above what was allocated before the step).",
        "",
    ]


def markdown(env: dict, res: Res, info: dict) -> str:
    t, default, floors = info["measure"], info["default"], info["floors"]
    L = ["# Training-step cost: lightning-tsd vs KD and vs a hand-written floor", ""]
    L += [f"Generated by `benchmarks/speed/bench_speed.py` from `{info['csv']}`; the last measuring run took"]
    L += [
        f"{env.get('wall', '?')} (cells already in the CSV were measured by earlier runs of the command):",
        "",
        "```",
        env["command"],
        "```",
        "",
    ]
    if info.get("quick"):
        L += [
            "**Quick smoke run** (`--quick`): short series, one small batch, few repeats; not the targets' cells.",
            "",
        ]
    L += setup_lines(env, info)
    targets = issue_targets(default, floors, t)
    L += [
        "## Targets (issue 27)",
        "",
        f"The default step (`{default}`) against the package's own KD step, live and cached, in time and peak",
        "memory; each cell's value with its PASS/MISS, and a verdict that is PASS when every cell meets it.",
        "",
    ]
    L += target_table(res, targets[:4], t, per_cell=True) + [""]
    L += ["## The package at its floor (issue 10)", ""]
    L += target_table(res, targets[4:], t) + [""]
    fills = fill_table(res, default, t)
    if fills:
        L += [
            "## First epoch: the cache fill (paid once)",
            "",
            "With `teacher_cache=True` the teacher's maps are computed in one pass before the first epoch",
            "(`teacher_cache_precompute`, at the teacher options of the cell); every later step is the cached",
            "step above. Per batch of the cell:",
            "",
        ]
        L += fills + [""]
    L += ["## Earlier targets (kept for comparison)", ""]
    L += target_table(res, earlier_targets(default, floors), t) + [""]
    exp = exponent_lines(res, [f"tsd_live_pkg:{default}", f"tsd_cached_pkg:{default}"], t)
    if exp:
        L += ["Cost vs T, least-squares exponent on log-log (this run):", ""] + exp + [""]
    for B in res:
        L += [
            f"## {B}",
            "",
            f"### Estimators: package step, ms ({t}) and multiple of the package KD step",
            "",
        ]
        L += estimator_table(res, B, t, default) + [""]
        L += ["### Peak memory vs T, MB per step", ""] + memory_table(res, B, default) + [""]
        for key, title in ((t, "median"), (t + "_min", "minimum"), ("peak_mb", "peak MB")):
            L += (
                [f"### All variants, {title} ({'MB' if key == 'peak_mb' else 'ms'})", ""]
                + raw_table(res, B, key)
                + [""]
            )
    return "\n".join(L)
