"""Fill the ``@...@`` placeholders of the README's and the docs' benchmark sections from the full selection's
rows (one-shot, for the default change; run from the repository root once ``fullsel.md`` has its decision).

Usage::

    python benchmarks/quality/fill_numbers.py README.md docs/benchmarks.md
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import common  # noqa: E402
import fullsel  # noqa: E402
import screen_report  # noqa: E402

PICK = "project_w0.5"


def verdict(s: dict) -> str:
    """``"4/4: qualifies"`` or ``"N/4: <the conditions that fail>"`` (the selection rule's four)."""
    mean, lo, _ = s["agreement"]
    failed = [name for name, ok in (("agreement >= 0", mean >= 0), ("its lower end >= -0.01", lo >= -0.01),
                                    ("IG-rho >= +0.05", s["ig_rho"][0] >= 0.05),
                                    ("occ-rho >= +0.05", s["occ_rho"][0] >= 0.05)) if not ok]  # fmt: skip
    return f"{4 - len(failed)}/4: " + ("qualifies" if not failed else "fails " + ", ".join(failed))


def numbers() -> dict[str, str]:
    rows = fullsel.selection_rows()
    st = {k: screen_report.stats(v) for k, v in screen_report.paired_deltas(rows).items()}
    sub = {}
    for size, key in (("tenth", "TENTH"), ("tiny", "TINY")):
        s = st[(size, PICK)]
        sub[f"@{key}_N@"] = str(s["n"])
        sub[f"@{key}_AGR@"] = common.format_ci(s["agreement"])
        sub[f"@{key}_IG@"] = common.format_ci(s["ig_rho"])
        sub[f"@{key}_OCC@"] = common.format_ci(s["occ_rho"])
        sub[f"@{key}_VERDICT@"] = verdict(s)
    sub["@TINY_AGR_MEAN@"] = f"{-st[('tiny', PICK)]['agreement'][0]:.3f}"
    carried = fullsel.carried()["tiny"]
    names = [c for c in carried + [f"ig1s_{c}" for c in carried] if ("tiny", c) in st]
    means = sorted(st[("tiny", c)]["agreement"][0] for c in names)
    sub["@TINY_RANGE@"] = f"d agreement {means[0]:+.3f} to {means[-1]:+.3f}"
    kd = {}
    for r in rows:
        if r["student"] == "tenth" and r["candidate"] == "kd":
            kd.setdefault(r["dataset"], []).append(float(r["agreement"]))
    kd_means = sorted(sum(v) / len(v) for v in kd.values())
    sub["@KD_TENTH@"] = f"{kd_means[0]:.2f}-{kd_means[-1]:.2f}"
    rel = screen_report.relative_costs(rows)  # CPU time per step as a multiple of kd's in the same block
    sub["@COST_TINY@"] = f"{rel[('tiny', PICK)]:.1f}"
    sub["@COST_TENTH@"] = f"{rel[('tenth', PICK)]:.1f}"
    sub["@COST_IG1S@"] = f"{rel[('tenth', f'ig1s_{PICK}')]:.1f}"
    comp = fullsel.off_screen_comparison(rows, fullsel.todo())
    c = next(x for x in comp if x["size"] == "tenth" and x["cheap"] == f"ig1s_{PICK}")
    d = c["diffs"]
    sub["@CHEAP@"] = (
        f"agreement {d['agreement'][0]:+.3f} (standard error {d['agreement'][1]:.3f}), IG-rho "
        f"{d['ig_rho'][0]:+.3f} ({d['ig_rho'][1]:.3f}), occ-rho {d['occ_rho'][0]:+.3f} "
        f"({d['occ_rho'][1]:.3f}) for the 1/10 student over {c['n']} blocks"
    )
    return sub


def main(paths: list[str]) -> None:
    sub = numbers()
    for path in map(Path, paths):
        text = path.read_text()
        for k, v in sub.items():
            text = text.replace(k, v)
        left = [
            line
            for line in text.splitlines()
            if any(t in line for t in ("@TENTH", "@TINY", "@CHEAP", "@KD_", "@COST"))
        ]
        if left:
            raise SystemExit(f"{path}: placeholders left: {left}")
        path.write_text(text)
    print(sub)


if __name__ == "__main__":
    main(sys.argv[1:])
