"""Figures of a series with its teacher and student saliency maps (plain matplotlib, no pyplot state).

Figures are ``matplotlib.figure.Figure`` objects that no pyplot window manager tracks, so they are safe
with any backend and are freed by the garbage collector; :func:`figure_to_rgb` renders one with Agg.
:func:`saliency_panels` computes and draws the teacher's and one or more students' integrated-gradients maps
of a few series, each student's labelled with its alignment; :func:`saliency_comparison` stacks them into one
image (the demo's ``saliency.png``). Plain torch and matplotlib: no Lightning.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor, nn

from lightning_tsd.functional import saliency_alignment
from lightning_tsd.saliency import temporal_saliency

ArrayLike = Tensor | np.ndarray | Sequence[float]


def _numpy(a: ArrayLike) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=float)


def _stacked(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scale each channel of ``x`` (``(C, T)``) to height 0.8 around its own baseline, top channel first.

    Returns the lines to draw and the baselines (their y ticks).
    """
    low = np.nanmin(x, axis=1, keepdims=True)
    span = np.nanmax(x, axis=1, keepdims=True) - low
    scaled = np.where(span > 0, (x - low) / np.where(span > 0, span, 1.0), 0.5) - 0.5
    offsets = np.arange(x.shape[0])[::-1].astype(float)
    return 0.8 * scaled + offsets[:, None], offsets


def plot_saliency_maps(
    x: ArrayLike,
    maps: Mapping[str, ArrayLike],
    mask: ArrayLike | None = None,
    title: str = "",
    channel_names: Sequence[str] | None = None,
    figsize: tuple[float, float] | None = None,
    dpi: int = 100,
    cmap: str = "magma",
) -> Figure:
    """Draw a series above one saliency heatmap per entry of ``maps`` (labelled by its key), on one time axis.

    A univariate series is drawn as is; a multivariate one has each channel min-max scaled and stacked
    with an offset (channel 0 on top). Each saliency row is divided by its own maximum over real steps,
    so the rows compare where the saliency sits, not its scale. Padded steps (``mask`` False) are
    left out of the series and shown grey in the heatmaps.

    Args:
        x: the series, ``(C, T)`` or ``(T,)``.
        maps: label -> saliency map ``(T,)``, drawn top to bottom in order.
        mask: ``(T,)`` bool, True on real steps; None means all real.
        title: figure title.
        channel_names: one label per channel (multivariate only); default ``c0, c1, ...``.
        figsize: size in inches (default 8 wide, 3 + 0.5 per map high); the PNG is ``figsize * dpi`` pixels.
        dpi: dots per inch.
        cmap: colormap of the saliency rows.

    Returns:
        A ``matplotlib.figure.Figure`` (save it with ``fig.savefig(path)``).

    Example:
        >>> maps = {"teacher": torch.rand(50), "KD": torch.rand(50), "KD+TSD": torch.rand(50)}
        >>> fig = plot_saliency_maps(torch.randn(50), maps)
        >>> [ax.get_ylabel() for ax in fig.axes[1:4]], fig.get_size_inches().tolist()
        (['teacher', 'KD', 'KD+TSD'], [8.0, 4.5])
    """
    series = np.atleast_2d(_numpy(x))
    steps = series.shape[1]
    rows = np.stack([_numpy(m) for m in maps.values()])
    if rows.shape[1:] != (steps,):
        raise ValueError(f"saliency maps must have shape ({steps},) like x's time axis, got {rows.shape[1:]}")
    real = np.ones(steps, dtype=bool) if mask is None else _numpy(mask).astype(bool)
    series = np.where(real, series, np.nan)
    rows = np.where(real, rows, np.nan)
    peak = np.nanmax(np.abs(rows), axis=1, keepdims=True)
    rows = rows / np.where(peak > 0, peak, 1.0)

    fig = Figure(figsize=figsize or (8.0, 3.0 + 0.5 * len(rows)), dpi=dpi, layout="constrained")
    ratios = [4] + [1] * len(rows)
    ax_x, *ax_maps = fig.subplots(len(ratios), 1, sharex=True, gridspec_kw={"height_ratios": ratios})
    time = np.arange(steps)
    if series.shape[0] == 1:
        ax_x.plot(time, series[0], color="C0", linewidth=1.2)
        ax_x.set_ylabel("x")
    else:
        lines, offsets = _stacked(series)
        for c, line in enumerate(lines):
            ax_x.plot(time, line, color=f"C{c % 10}", linewidth=1.0)
        names = list(channel_names) if channel_names is not None else [f"c{c}" for c in range(len(lines))]
        ax_x.set_yticks(offsets, names)
    colors = matplotlib.colormaps[cmap].with_extremes(bad="0.85")
    for ax, row, label in zip(ax_maps, rows, maps, strict=True):
        image = ax.imshow(
            np.ma.masked_invalid(row[None, :]),
            aspect="auto",
            cmap=colors,
            vmin=0.0,
            vmax=1.0,
            extent=(-0.5, steps - 0.5, 0, 1),
            interpolation="nearest",
        )
        ax.set_yticks([])
        ax.set_ylabel(label, rotation=0, ha="right", va="center")
    # one colorbar for all rows keeps the time axes aligned; it sits beside the heatmaps
    fig.colorbar(
        image,
        ax=[ax_x, *ax_maps],
        label="saliency / max",
        fraction=0.03,
        pad=0.01,
        shrink=0.4,
        anchor=(0.0, 0.0),
    )
    ax_maps[-1].set_xlabel("time step")
    ax_maps[-1].set_xlim(-0.5, steps - 0.5)
    if title:
        fig.suptitle(title)
    return fig


def plot_saliency(
    x: ArrayLike,
    teacher_saliency: ArrayLike,
    student_saliency: ArrayLike,
    mask: ArrayLike | None = None,
    title: str = "",
    channel_names: Sequence[str] | None = None,
    figsize: tuple[float, float] = (8.0, 4.0),
    dpi: int = 100,
    cmap: str = "magma",
) -> Figure:
    """Draw a series above its teacher and student saliency maps, on one time axis:
    :func:`plot_saliency_maps` with the rows ``teacher`` and ``student``.

    Args:
        x: the series, ``(C, T)`` or ``(T,)``.
        teacher_saliency: ``(T,)``.
        student_saliency: ``(T,)``.
        mask: ``(T,)`` bool, True on real steps; None means all real.
        title: figure title.
        channel_names: one label per channel (multivariate only); default ``c0, c1, ...``.
        figsize: size in inches; the PNG is ``figsize * dpi`` pixels.
        dpi: dots per inch.
        cmap: colormap of the saliency rows.

    Returns:
        A ``matplotlib.figure.Figure`` (save it with ``fig.savefig(path)``).

    Example:
        >>> fig = plot_saliency(torch.randn(3, 50), torch.rand(50), torch.rand(50), title="sample 0")
        >>> [ax.get_ylabel() for ax in fig.axes[1:3]]
        ['teacher', 'student']
    """
    maps = {"teacher": teacher_saliency, "student": student_saliency}
    return plot_saliency_maps(x, maps, mask, title, channel_names, figsize, dpi, cmap)


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """Render ``fig`` with Agg and return its pixels as an ``(H, W, 3)`` uint8 array.

    Example:
        >>> figure_to_rgb(Figure(figsize=(2, 1), dpi=50)).shape
        (50, 100, 3)
    """
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def saliency_panels(
    teacher: nn.Module,
    students: nn.Module | Mapping[str, nn.Module],
    x: Tensor,
    mask: Tensor | None = None,
    captions: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    steps: int = 32,
) -> list[Figure]:
    """The teacher's and each student's integrated-gradients maps of each series of ``x``: one
    :func:`plot_saliency_maps` figure per series, its rows ``teacher`` then one per student, each student's
    row labelled with its name and the Spearman correlation of its map with the teacher's (``ρ``).

    All maps target the teacher's predicted class; each figure's title gives its caption and the teacher's
    prediction. A single ``nn.Module`` is named ``student``. The models run in eval mode and get their modes
    back afterwards.

    Args:
        teacher: the teacher, ``(B, C, T) -> (B, K)``.
        students: a student, same signature, or name -> student.
        x: ``(N, C, T)`` series, one figure each.
        mask: ``(N, T)`` bool, True on real steps; None means all real.
        captions: one title prefix per series (e.g. ``"GunPoint test #3: class 1"``).
        class_names: names of the classes (default: their indices).
        steps: integrated-gradients steps.

    Example:
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
        >>> students = {"KD": nn.Sequential(nn.Flatten(), nn.Linear(20, 2)), "KD+TSD": teacher}
        >>> fig, = saliency_panels(teacher, students, torch.randn(1, 1, 20), steps=4)
        >>> [ax.get_ylabel().splitlines()[0] for ax in fig.axes[1:4]], fig.axes[3].get_ylabel().splitlines()
        (['teacher', 'KD', 'KD+TSD'], ['KD+TSD', 'ρ = 1.00'])
    """
    models = {"student": students} if isinstance(students, nn.Module) else dict(students)
    everyone = [teacher, *models.values()]
    modes = [m.training for m in everyone]
    try:
        teacher_logits, teacher_maps = temporal_saliency(
            teacher.eval(), x, None, "integrated_gradients", mask=mask, steps=steps
        )
        target = teacher_logits.argmax(1)
        student_maps = {
            name: temporal_saliency(m.eval(), x, target, "integrated_gradients", mask=mask, steps=steps)[1]
            for name, m in models.items()
        }
    finally:
        for m, mode in zip(everyone, modes, strict=True):
            m.train(mode)
    spearman = {
        name: saliency_alignment(s, teacher_maps, mask)["spearman"] for name, s in student_maps.items()
    }
    names = [str(c) for c in class_names] if class_names is not None else None
    figures = []
    for i in range(len(x)):
        predicted = names[int(target[i])] if names is not None else str(int(target[i]))
        caption = f"{captions[i]}, teacher" if captions is not None else "teacher"
        maps = {"teacher": teacher_maps[i]}
        maps |= {f"{name}\nρ = {float(spearman[name][i]):.2f}": s[i] for name, s in student_maps.items()}
        title = f"{caption} predicts {predicted}; ρ = Spearman with the teacher's map"
        figures.append(plot_saliency_maps(x[i], maps, None if mask is None else mask[i], title))
    return figures


def saliency_comparison(
    teacher: nn.Module,
    students: nn.Module | Mapping[str, nn.Module],
    x: Tensor,
    mask: Tensor | None = None,
    captions: Sequence[str] | None = None,
    class_names: Sequence[str] | None = None,
    steps: int = 32,
) -> np.ndarray:
    """:func:`saliency_panels` rendered and stacked top to bottom into one RGB image: an ``(N * H, W, 3)``
    uint8 array (save it with ``matplotlib.image.imsave``).

    Example:
        >>> teacher = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
        >>> student = nn.Sequential(nn.Flatten(), nn.Linear(20, 2))
        >>> saliency_comparison(teacher, student, torch.randn(2, 1, 20), steps=4).shape
        (800, 800, 3)
    """
    figures = saliency_panels(teacher, students, x, mask, captions, class_names, steps)
    return np.concatenate([figure_to_rgb(f) for f in figures], axis=0)


Check = tuple  # (name, value, op, threshold, passed)


def format_value(value: object) -> str:
    """A report value as text: ``"n/a"`` for None or NaN, four decimals for a float.

    Example:
        >>> format_value(0.5), format_value(None), format_value(3)
        ('0.5000', 'n/a', '3')
    """
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "n/a"
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def plot_substitution_report(
    confusion: Sequence[Sequence[int]],
    per_class_agreement: Sequence[float],
    per_class_count: Sequence[int],
    min_agreement: float,
    checks: Sequence[Check],
    cost: dict,
    *,
    curves: tuple[Sequence[float], Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]]] | None = None,
) -> Figure:
    """The substitution report's figure: the teacher-vs-student confusion matrix, agreement per
    teacher-predicted class against ``min_agreement``, the deletion and keep curves when ``curves`` is
    given, and a panel with every check (``(name, value, op, threshold, passed)``, green ``pass`` / red
    ``FAIL``) and each model's cost; the title names failed checks.

    ``curves`` is ``(fractions, curves[model][mode][ranking])`` as in
    :class:`lightning_tsd.behaviour.Behaviour`: the student's curves are drawn thick with markers, the
    teacher's own thin; red for delete, blue for keep; solid for the teacher's ranking, dashed for random.

    Example:
        >>> fig = plot_substitution_report([[3, 1], [0, 4]], [0.75, 1.0], [4, 4], 0.95,
        ...                                [("agreement", 0.875, ">=", 0.95, False)], {})
        >>> fig._suptitle.get_text()
        'can substitute: no (failed: agreement)'
    """
    fig = Figure(figsize=(14 if curves is None else 18, 4), dpi=100, layout="constrained")
    widths = [1, 1, 0.9] if curves is None else [1, 1, 1, 0.9]
    *ax_plots, ax_text = fig.subplots(1, len(widths), width_ratios=widths)
    ax_cm, ax_bar = ax_plots[:2]
    matrix = np.asarray(confusion)
    image = ax_cm.imshow(matrix, cmap="Blues")
    for (t, s), count in np.ndenumerate(matrix):
        dark = count > matrix.max() / 2
        ax_cm.text(s, t, str(count), ha="center", va="center", color="white" if dark else "black")
    ax_cm.set(xlabel="student prediction", ylabel="teacher prediction", title="teacher vs student")
    ticks = range(len(matrix))
    ax_cm.set_xticks(ticks)
    ax_cm.set_yticks(ticks)
    fig.colorbar(image, ax=ax_cm, shrink=0.8)
    agreement = np.asarray(per_class_agreement, dtype=float)
    ax_bar.bar(ticks, np.nan_to_num(agreement), color="C0")
    for c, (value, count) in enumerate(zip(agreement, per_class_count, strict=False)):
        note = "n/a" if np.isnan(value) else f"n={count}"
        ax_bar.text(c, np.nan_to_num(value) + 0.02, note, ha="center", va="bottom", fontsize="small")
    ax_bar.axhline(min_agreement, color="C3", linestyle="--", label="threshold")
    ax_bar.set(
        xlabel="teacher-predicted class", ylabel="agreement", ylim=(0, 1.05), title="agreement per class"
    )
    ax_bar.set_xticks(ticks)
    ax_bar.legend(loc="lower right")
    if curves is not None:
        _plot_curves(ax_plots[2], *curves)
    ax_text.set_axis_off()
    ax_text.set_title("checks and cost")
    style = {"transform": ax_text.transAxes, "va": "top"}
    step = min(0.12, 0.95 / max(1, len(checks) + len(cost)))
    for i, (name, value, op, threshold, passed) in enumerate(checks):
        text = f"{'pass' if passed else 'FAIL'}  {name} = {format_value(value)}, rule {op} {format_value(threshold)}"
        ax_text.text(0.0, 0.95 - step * i, text, color="tab:green" if passed else "tab:red", **style)
    for i, (model, m) in enumerate(cost.items(), len(checks)):
        text = f"{model}: {m['params']:,} parameters, {m['bytes'] / 1024:.1f} KiB, {m['latency_ms']:.2f} ms"
        ax_text.text(0.0, 0.95 - step * i, text, color="black", **style)
    failed = [name for name, *_, passed in checks if not passed]
    fig.suptitle(f"can substitute: {'no (failed: ' + ', '.join(failed) + ')' if failed else 'yes'}")
    return fig


def _plot_curves(
    ax: Axes,
    fractions: Sequence[float],
    curves: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
) -> None:
    """Agreement against the share of steps deleted or kept: teacher-ranked (solid) vs random (dashed)."""
    percent = 100 * np.asarray(fractions, dtype=float)
    for model, width, alpha, marker in (("teacher", 1.0, 0.45, None), ("student", 2.0, 1.0, "o")):
        for mode, color in (("delete", "C3"), ("keep", "C0")):
            for ranking, style in (("teacher", "-"), ("random", "--")):
                label = f"{mode}, {'teacher-ranked' if ranking == 'teacher' else 'random'}"
                ax.plot(
                    percent,
                    curves[model][mode][ranking],
                    color=color,
                    linestyle=style,
                    linewidth=width,
                    alpha=alpha,
                    marker=marker,
                    label=label if model == "student" else None,
                )
    ax.plot([], [], color="0.5", linewidth=1.0, alpha=0.45, label="thin: the teacher itself")
    ax.set(xlabel="steps deleted / kept (%)", ylabel="agreement with the teacher (clean)", ylim=(-0.02, 1.05))
    ax.set_title("deletion and keep curves")
    ax.legend(loc="best", fontsize="small", handlelength=3.5)
