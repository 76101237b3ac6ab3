"""Hand-written loops of the shortcut probes (GunPoint, spike, 16-filter NarrowFCN, 600 steps, 3 seeds): each
lever of issue 26 on the same teacher, transfer set and batch order, outside the distiller so that one lever is
changed at a time. Loss: CE + Hinton KD (tau 4, times tau^2) + the lever. They measured GunPoint's test split
and chose which lever the benchmark (``bench.py``) carries; no default was chosen from them.

    python benchmarks/behaviour/levers.py masses            # where the teacher's and students' maps put mass
    python benchmarks/behaviour/levers.py run kd recomb_other ...   # rows appended to results/behaviour_levers.csv

Levers (:data:`LEVERS`): the saliency family (``sal_*``: an estimator, the explained output, an activation,
Pearson alignment, plain sum), the support-sensitive penalty on occlusion drops (``support*``), and extra
transfer points with the teacher queried on them (``mix``, ``recomb*``).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import harness  # noqa: E402
import probe  # noqa: E402
import shortcut  # noqa: E402

CSV = HERE.parent / "results" / "behaviour_levers.csv"
OCC = dict(window=8, stride=4)

LEVERS: dict[str, tuple[str, dict]] = {
    "kd": ("saliency", dict(w=0)),
    "sal_grad_w8": ("saliency", dict(w=8)),  # gradient saliency of the logit
    "sal_margin_w8": ("saliency", dict(w=8, output="margin")),
    "sal_softplus_w8": ("saliency", dict(w=8, act="softplus")),
    "sal_margin_softplus_w8": (
        "saliency",
        dict(w=8, output="margin", act="softplus"),
    ),  # (2 seeds in the log)
    "sal_occ_margin_w1": ("saliency", dict(w=1, method="occlusion", output="margin")),
    "sal_occ_margin_w4": ("saliency", dict(w=4, method="occlusion", output="margin")),
    "clean_kd": ("support", dict(w=0, clean=True)),
    "support_w1": ("support", dict(w=1, align="support")),
    "support_w10": ("support", dict(w=10, align="support")),
    "support2_w0.1": ("support", dict(w=0.1, align="support2")),
    "support2_w1": ("support", dict(w=1, align="support2")),
    "mix": ("transfer", dict(extra="mix")),
    "recomb_random": ("transfer", dict(extra="swap", q=0.5)),
    "recomb_random_q0.3": ("transfer", dict(extra="swap", q=0.3)),
    "recomb_other": ("transfer", dict(extra="swap", q=0.5, diff=True)),
    "recomb_other_w3": ("transfer", dict(extra="swap", q=0.5, diff=True, w=3)),
}


class Probe:
    """The teacher, the shortcut transfer set and the teacher's classes and spike positions on it."""

    def __init__(self) -> None:
        torch.set_num_threads(1)
        self.data = probe.load("GunPoint")
        xtr, ytr, xte, yte, self.k = self.data
        self.teacher = probe.teacher_for("GunPoint", 0, self.data)
        self.s = shortcut.shortcut_set(self.teacher, xtr, ytr, xte, yte, "spike", self.k)
        self.y = ytr
        self.tt = shortcut.predict(self.teacher, self.s.x_transfer)
        self.pos = shortcut.class_position(self.tt, self.k, xtr.shape[-1])

    def spike_mass(self, model, method: str, output: str = "logit", clamp: bool = False, **options) -> float:
        """Mean share of a model's map (on the transfer series) on the 3 spike steps."""
        from lightning_tsd.saliency import temporal_saliency

        _, m = temporal_saliency(model, self.s.x_transfer, self.tt, method=method, output=output, **options)
        if clamp:
            m = m.clamp_min(0)
            m = m / m.sum(1, keepdim=True).clamp_min(1e-9)
        else:
            m = m / m.sum(1, keepdim=True)
        idx = torch.stack([self.pos - 1, self.pos, self.pos + 1], 1)
        return float(m.gather(1, idx).sum(1).mean())

    def kd(self, z, t):
        return 16 * F.kl_div(F.log_softmax(z / 4, 1), F.softmax(t / 4, 1), reduction="batchmean")

    def fit_saliency(
        self, w, output="logit", method="gradient", act="relu", seed=0, steps=600, align="pearson"
    ):
        from lightning_tsd.losses import saliency_alignment_loss
        from lightning_tsd.models import NarrowFCN
        from lightning_tsd.saliency import temporal_saliency

        torch.manual_seed(seed)
        st = NarrowFCN(1, self.k, 16, activation=act)
        opt = torch.optim.Adam(st.parameters(), 3e-3)
        g = torch.Generator().manual_seed(seed)
        X = self.s.x_transfer
        with torch.no_grad():
            tl = self.teacher(X)
        o = OCC if method == "occlusion" else {}
        _, tm = temporal_saliency(self.teacher, X, self.tt, method=method, output=output, **o)
        for _ in range(steps):
            rows = torch.randperm(len(self.y), generator=g)[:16]
            x = X[rows]
            if w > 0:
                z, sm = temporal_saliency(
                    st, x, self.tt[rows], method=method, output=output, create_graph=True, **o
                )
                l_t = saliency_alignment_loss(sm, tm[rows], align)
            else:
                z = st(x)
                l_t = z.sum() * 0
            loss = F.cross_entropy(z, self.y[rows]) + self.kd(z, tl[rows]) + w * l_t
            opt.zero_grad()
            loss.backward()
            opt.step()
        return st.eval()

    def fit_support(self, w, align="support", seed=0, steps=600, clean=False, output="margin"):
        from lightning_tsd.models import NarrowFCN
        from lightning_tsd.saliency import temporal_saliency

        torch.manual_seed(seed)
        st = NarrowFCN(1, self.k, 16)
        opt = torch.optim.Adam(st.parameters(), 3e-3)
        g = torch.Generator().manual_seed(seed)
        X = self.data[0] if clean else self.s.x_transfer
        with torch.no_grad():
            tl = self.teacher(X)
        _, tm = temporal_saliency(self.teacher, X, self.tt, method="occlusion", output=output, **OCC)
        for _ in range(steps):
            rows = torch.randperm(len(self.y), generator=g)[:16]
            x = X[rows]
            if w > 0:
                z, sm = temporal_saliency(
                    st, x, self.tt[rows], method="occlusion", output=output, create_graph=True, **OCC
                )
                t = tm[rows].abs()
                low = 1 - t / t.amax(1, keepdim=True).clamp_min(1e-12)  # 1 where the teacher's drop is 0
                l_t = (low * (sm.abs() if align == "support" else sm**2)).mean(1).mean()
            else:
                z = st(x)
                l_t = z.sum() * 0
            loss = F.cross_entropy(z, self.y[rows]) + self.kd(z, tl[rows]) + w * l_t
            opt.zero_grad()
            loss.backward()
            opt.step()
        return st.eval()

    def fit_transfer(self, extra="none", q=0.5, w=1.0, diff=False, seed=0, steps=600, smooth=15):
        from lightning_tsd.losses import smooth_saliency
        from lightning_tsd.models import NarrowFCN
        from lightning_tsd.saliency import temporal_saliency

        torch.manual_seed(seed)
        st = NarrowFCN(1, self.k, 16)
        opt = torch.optim.Adam(st.parameters(), 3e-3)
        g = torch.Generator().manual_seed(seed)
        X = self.s.x_transfer
        with torch.no_grad():
            tl = self.teacher(X)
        _, tm = temporal_saliency(self.teacher, X, self.tt, method="integrated_gradients")
        tm = smooth_saliency(tm, smooth)
        n = len(self.y)
        keep = (tm >= tm.quantile(1 - q, dim=1, keepdim=True)).float().unsqueeze(1)
        for _ in range(steps):
            rows = torch.randperm(n, generator=g)[:16]
            x = X[rows]
            z = st(x)
            loss = F.cross_entropy(z, self.y[rows]) + self.kd(z, tl[rows])
            if extra != "none":
                other = torch.randint(n, (len(rows),), generator=g)
                if diff:  # a partner the teacher puts in another class
                    pool = [torch.nonzero(self.tt != self.tt[r]).flatten() for r in rows]
                    other = torch.stack([p[torch.randint(len(p), (1,), generator=g)][0] for p in pool])
                if extra == "mix":
                    lam = torch.rand(len(rows), 1, 1, generator=g)
                    xn = lam * x + (1 - lam) * X[other]
                else:  # the teacher's important steps of x, the rest from another series
                    xn = keep[rows] * x + (1 - keep[rows]) * X[other]
                with torch.no_grad():
                    tn = self.teacher(xn)
                loss = loss + w * self.kd(st(xn), tn)
            opt.zero_grad()
            loss.backward()
            opt.step()
        return st.eval()


def cmd_masses(p: Probe) -> None:
    for method, o in [("gradient", {}), ("integrated_gradients", {"steps": 8}), ("occlusion", OCC)]:
        for output in ["logit", "margin"]:
            mass = p.spike_mass(p.teacher, method, output, clamp=method == "occlusion", **o)
            print(f"teacher {method} {output}: {mass:.3f} of the map on the 3 spike steps (uniform: 0.020)")
    for seed in (0, 1, 2):
        st = p.fit_saliency(0, seed=seed)
        b = shortcut.behaviour(st, p.s)
        grad = p.spike_mass(st, "gradient", "logit")
        occ = p.spike_mass(st, "occlusion", "margin", clamp=True, **OCC)
        print(
            f"KD student seed {seed}: follows {b['follows']:.3f}, gradient mass {grad:.3f}, occlusion mass {occ:.3f}"
        )


def cmd_run(p: Probe, names: list[str]) -> None:
    done = harness.done_keys(CSV, ["lever", "seed"])
    for name in names:
        kind, options = LEVERS[name]
        for seed in (0, 1, 2):
            if (name, str(seed)) in done:
                continue
            t0 = time.perf_counter()
            st = getattr(p, f"fit_{kind}")(seed=seed, **options)
            row = dict(lever=name, seed=seed, **shortcut.behaviour(st, p.s), fit_s=time.perf_counter() - t0)
            harness.append_row(CSV, row, list(row))
            print(row, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cmd", choices=["masses", "run"])
    ap.add_argument("levers", nargs="*", choices=list(LEVERS), default=[])
    args = ap.parse_args()
    p = Probe()
    cmd_masses(p) if args.cmd == "masses" else cmd_run(p, args.levers or list(LEVERS))


if __name__ == "__main__":
    main()
