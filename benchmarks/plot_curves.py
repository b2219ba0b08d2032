"""Learning curves over seeds from runs' metrics.jsonl, against mu and V*.

Every script logs `eval/mean_reward` (held-out contexts, the real user) at step 0 and every --eval_every iterations to
runs/<run>/metrics.jsonl, with `eval/fraction_of_v_star` on the tutor task. This script groups run directories by
method (the run name without its seed: `REFUEL__seed1` -> `REFUEL`, `refuel__tutor__1__1733...` -> `refuel__tutor`;
or `--label NAME` for all),
and draws per method the mean over seeds with a band from the lowest to the highest seed, one colour and marker per
method, beside mu (the step-0 evaluation: every run starts from mu) and V* (eval/mean_reward divided by
eval/fraction_of_v_star, when logged). Needs matplotlib (not a dependency: `pip install matplotlib`).

    python benchmarks/plot_curves.py runs/seeds/* --label REFUEL   # REFUEL's seeds (benchmarks/refuel_seeds.py)
    python benchmarks/plot_curves.py runs/study/REFUEL__seed* runs/study/MTPO__seed* --x minutes
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from study import method_styles  # noqa: E402  (one colour and marker per method, as the study's figure)


@dataclass
class Args:
    runs: list[str] = field(default_factory=list)
    """run directories (each with metrics.jsonl); grouped by name without the seed"""
    metric: str = "eval/mean_reward"
    """the metric drawn"""
    x: Literal["iteration", "minutes"] = "iteration"
    """x axis: the logged step (iteration) or charts/elapsed_min"""
    output: str = "benchmarks/learning_curves.png"
    """where the PNG goes"""
    title: Optional[str] = None
    """figure title (default: the metric)"""
    label: Optional[str] = None
    """one method name for all the runs given (default: grouped by run name)"""


def parse_args(argv=None) -> Args:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help=Args.__dataclass_fields__["runs"].__doc__ or "run directories")
    p.add_argument("--metric", default=Args.metric)
    p.add_argument("--x", choices=["iteration", "minutes"], default=Args.x)
    p.add_argument("--output", default=Args.output)
    p.add_argument("--title", default=None)
    p.add_argument("--label", default=None, help="one method name for all the runs given")
    return Args(**vars(p.parse_args(argv)))


def method_of(run_dir) -> str:
    """The method a run belongs to: its name without the seed (`REFUEL__seed1`, `seed1__1733...` of
    benchmarks/refuel_seeds.py) or without seed and time stamp (default run names `refuel__tutor__1__1733...`);
    a name that is only a seed gives its parent directory's name."""
    run_dir = Path(run_dir)
    name = re.sub(r"(^|__)seed\d+(__\d+)?$", "", run_dir.name)
    name = re.sub(r"__\d+__\d+$", "", name)
    return name or run_dir.resolve().parent.name


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(rows: list[dict], metric: str, x: str = "iteration") -> tuple[np.ndarray, np.ndarray]:
    """(x, y) of the rows that logged `metric`; x is the step or the elapsed minutes (0 at the first evaluation)."""
    rows = [r for r in rows if metric in r]
    xs = [r["step"] if x == "iteration" else r.get("charts/elapsed_min", 0.0) for r in rows]
    return np.asarray(xs, dtype=float), np.asarray([r[metric] for r in rows], dtype=float)


def reference_levels(all_rows: list[list[dict]]) -> dict:
    """mu: the mean step-0 reward of the runs (all start from mu); V*: mean_reward / fraction_of_v_star."""
    first = [rows[0]["eval/mean_reward"] for rows in all_rows if rows and "eval/mean_reward" in rows[0]]
    v = [r["eval/mean_reward"] / r["eval/fraction_of_v_star"] for rows in all_rows for r in rows
         if r.get("eval/fraction_of_v_star")]
    return {"mu (step 0)": float(np.mean(first)) if first else None, "V*": float(np.median(v)) if v else None}


def group_runs(run_dirs, label: Optional[str] = None) -> dict:
    """method -> [(run name, metrics rows)], in the order the methods first appear (label: one method for all)."""
    groups: dict = {}
    for d in run_dirs:
        d = Path(d)
        if not (d / "metrics.jsonl").exists():
            continue
        groups.setdefault(label or method_of(d), []).append((d.name, read_metrics(d)))
    return groups


def plot_curves(groups: dict, metric: str, x: str, levels: dict, title: Optional[str] = None):
    """The figure: per method the mean over its seeds on a common x grid (each seed's curve interpolated; the grid
    stops where the shortest seed stops) and a band from the lowest to the highest seed."""
    import matplotlib.pyplot as plt

    styles = method_styles(list(groups))
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for m, runs in groups.items():
        colour, marker, ls = styles[m]
        curves = [curve(rows, metric, x) for _, rows in runs]
        curves = [(xs, ys) for xs, ys in curves if len(xs)]
        if not curves:
            continue
        end = min(xs[-1] for xs, _ in curves)
        grid = np.unique(np.concatenate([xs[xs <= end] for xs, _ in curves]))
        ys = np.array([np.interp(grid, xs, y) for xs, y in curves])
        label = f"{m} ({len(curves)} seed{'s' * (len(curves) > 1)})"
        ax.plot(grid, ys.mean(0), color=colour, marker=marker, linestyle=ls, markersize=4, linewidth=1.8,
                label=label, markevery=max(1, len(grid) // 12))
        if len(curves) > 1:
            ax.fill_between(grid, ys.min(0), ys.max(0), color=colour, alpha=0.18, linewidth=0)
    level_styles = {"V*": ("black", "-")}
    for name, value in levels.items():
        if value is not None:
            colour, ls = level_styles.get(name, ("0.35", ":"))
            ax.axhline(value, color=colour, linestyle=ls, linewidth=1.2, label=f"{name} {value:.3f}")
    ax.set(xlabel="iteration" if x == "iteration" else "minutes", ylabel=metric,
           title=title or f"{metric}: mean over seeds (band: min to max)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def main(args: Args) -> Path:
    groups = group_runs(args.runs, args.label)
    if not groups:
        raise SystemExit("no run directory with a metrics.jsonl among --runs")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = reference_levels([rows for runs in groups.values() for _, rows in runs])
    if args.metric != "eval/mean_reward":
        levels = {}  # mu and V* are rewards
    fig = plot_curves(groups, args.metric, args.x, levels, args.title)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out} ({', '.join(f'{m}: {len(r)} runs' for m, r in groups.items())})")
    return out


if __name__ == "__main__":
    main(parse_args())
