"""The comparison study (REFUEL paper Table 1, MTPO paper Table 1) on the embedded tutor task.

Trains every method with the same budget (the same iterations x prompts per iteration, so the same number of
trained pairs / conversations started, and the same seeds), evaluates every final policy with `evaluate.py`
(per-turn win rate against mu with the oracle judge, mean reward as a fraction of V*, KL to mu), and writes the
markdown tables to benchmarks/study_results.md (with --update_readme also into docs/study.md, and the headline table
into README.md, each between its study markers).

    python benchmarks/study.py --seeds 1 2 3 --iterations 60 --parallel 2 --update_readme
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# name -> (script, flags); a method whose script is not in the repository yet is reported as missing
METHODS = {"REFUEL": ("refuel.py", [])}
for loss in ("rebel", "dpo"):
    for mode in ("lt-offline", "lt-mixed", "lt-online", "mt-mixed"):
        METHODS[f"{loss.upper()}-{mode.upper()}"] = ("baselines_dpo_rebel.py", ["--loss", loss, "--mode", mode])
METHODS["MTPO"] = ("mtpo.py", ["--variant", "mtpo"])
METHODS["MTPO-tau"] = ("mtpo.py", ["--variant", "mtpo-tau"])
METHODS["multi-turn RLHF"] = ("mtpo.py", ["--variant", "rlhf"])
METHODS["multi-turn RLHF (learned reward)"] = ("mtpo.py", ["--variant", "rlhf", "--reward", "learned"])
METHODS["Iterative PPO"] = ("iterative_ppo.py", [])


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to train (names as in the table)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per method per seed"""
    more_seeds: list[str] = field(default_factory=list)
    """'METHOD=4,5': seeds that METHOD alone adds to --seeds (trained, evaluated and averaged in its row)"""
    iterations: int = 60
    """iterations per run (every method: the same iterations x prompts per iteration)"""
    prompts_per_iteration: int = 256
    """conversations started per iteration"""
    parallel: int = 2
    """runs at a time"""
    threads: int = 1
    """torch threads per run"""
    num_contexts: int = 1024
    """held-out contexts per evaluation"""
    output_dir: str = "runs/study"
    """where the runs go"""
    update_readme: bool = False
    """write the tables into docs/study.md and the headline table into README.md (between their study markers)"""
    skip_training: bool = False
    """only evaluate the runs already in output_dir (finished runs are never retrained anyway)"""
    reuse_evaluation: bool = False
    """rewrite the tables from output_dir/evaluation.json (the last evaluation of these runs) without replaying"""
    eval_every: int = 10
    """iterations between held-out evaluations in each run (the learning curves' points)"""
    target: float = 0.6
    """the table counts the runs whose final mean reward reaches this (0.6 = 0.75 of V*)"""


def seeds_of(args: Args, method: str, methods: dict = METHODS) -> list:
    """--seeds, and the seeds --more_seeds adds for this method."""
    extra = [x.split("=", 1) for x in args.more_seeds]
    if any(len(x) != 2 or x[0] not in methods for x in extra):
        raise SystemExit(f"--more_seeds takes METHOD=SEED,SEED (methods: {', '.join(methods)}): {args.more_seeds}")
    return args.seeds + [int(s) for m, seeds in extra if m == method for s in seeds.split(",")
                         if int(s) not in args.seeds]


def train_all(args: Args, methods: dict = METHODS) -> dict:
    """Every method of args.methods (names in `methods`: name -> (script, flags)) for each of its seeds."""
    # a run that already finished (its summary.json exists) is kept: the study can be extended or resumed
    jobs = [(m, s) for m in args.methods for s in seeds_of(args, m, methods)
            if not (run_dir(args, m, s) / "summary.json").exists()]
    procs, done = {}, {}
    while jobs or procs:
        while jobs and len(procs) < args.parallel:
            method, seed = jobs.pop(0)
            script, flags = methods[method]
            name = f"{method.replace(' ', '_')}__seed{seed}"
            cmd = [sys.executable, script, *flags, "--seed", str(seed), "--run_name", name, "--output_dir",
                   args.output_dir, "--num_iterations", str(args.iterations), "--prompts_per_iteration",
                   str(args.prompts_per_iteration), "--time_budget_minutes", "0", "--eval_every",
                   str(args.eval_every), "--num_eval", "256", "--threads", str(args.threads)]
            (ROOT / args.output_dir).mkdir(parents=True, exist_ok=True)
            log = open(ROOT / args.output_dir / f"{name}.log", "w")
            procs[(method, seed)] = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
            print(f"started {name}", flush=True)
        time.sleep(2)
        for key, p in list(procs.items()):
            if p.poll() is not None:
                del procs[key]
                done[key] = p.returncode
                print(f"finished {key}: exit {p.returncode}", flush=True)
    return done


def run_dir(args: Args, method: str, seed: int) -> Path:
    return ROOT / args.output_dir / f"{method.replace(' ', '_')}__seed{seed}"


def main(args: Args) -> None:
    import evaluate as ev

    missing = [m for m in args.methods if not (ROOT / METHODS[m][0]).exists()]
    if missing:
        print(f"not in the repository yet, left out: {', '.join(missing)}")
    args.methods = [m for m in args.methods if m not in missing]
    t0 = time.time()
    if not args.skip_training:
        failed = {k: rc for k, rc in train_all(args).items() if rc != 0}
        if failed:
            raise SystemExit(f"runs failed (see their logs in {args.output_dir}): {failed}")
    train_min = (time.time() - t0) / 60
    trained_here = train_min > 0.1
    runs = [(m, s) for m in args.methods for s in seeds_of(args, m)]
    seed0 = args.seeds[0]  # the preference matrix (MTPO paper Table 1 format) uses the first seed's dialogues
    names = [f"{m} seed {s}" for m, s in runs]
    saved = ROOT / args.output_dir / "evaluation.json"
    if args.reuse_evaluation:
        out = json.loads(saved.read_text())
        if [r["name"] for r in out["rows"]] != names:
            raise SystemExit(f"{saved} holds other runs than --methods x --seeds: evaluate again")
    else:
        out = ev.evaluate(ev.Args(policies=[str(run_dir(args, m, s)) for m, s in runs], names=names,
                                  num_contexts=args.num_contexts, matrix=True,
                                  matrix_policies=[f"{m} seed {seed0}" for m in args.methods]))
        saved.write_text(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))
    by = {(m, s): r for (m, s), r in zip(runs, out["rows"])}
    H = len(out["rows"][0]["win_rate"]["per_turn"])
    lines = ["| method | " + " | ".join(f"h={h}" for h in range(1, H + 1)) +
             f" | avg win rate | reward | of V* | runs >= {args.target} | KL to mu | iterations | optimizer steps | "
             "minutes per run | seeds |",
             "|" + "---|" * (H + 10)]
    table = {}
    for m in args.methods:
        seeds = seeds_of(args, m)
        rows = [by[(m, s)] for s in seeds]
        per_turn = np.mean([r["win_rate"]["per_turn"] for r in rows], 0)
        avg = np.array([r["win_rate"]["average"] for r in rows])
        rew = np.array([r["reward"] for r in rows])
        kl = np.mean([r["kl"] for r in rows])
        summaries = [json.loads((run_dir(args, m, s) / "summary.json").read_text()) for s in seeds]
        minutes = np.mean([x["minutes"] for x in summaries])
        iters = "/".join(str(x["iterations"]) for x in summaries)
        steps = np.mean([optimizer_steps(run_dir(args, m, s), x) for s, x in zip(seeds, summaries)])
        sd = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0
        table[m] = dict(per_turn=per_turn.tolist(), average=avg.mean(), average_sd=sd(avg), reward=rew.mean(),
                        reward_sd=sd(rew), kl=kl, minutes=minutes,
                        per_turn_seeds=[r["win_rate"]["per_turn"] for r in rows], reward_seeds=rew.tolist(),
                        seeds=seeds)
        lines.append(f"| {m} | " + " | ".join(f"{100 * x:.1f}" for x in per_turn) +
                     f" | {100 * avg.mean():.1f} ± {100 * sd(avg):.1f} | {rew.mean():.3f} ± {sd(rew):.3f} | "
                     f"{rew.mean() / out['v_star']:.2f} | {(rew >= args.target).sum()}/{len(rew)} | {kl:.2f} | "
                     f"{iters} | {steps:.0f} | {minutes:.1f} | {','.join(map(str, seeds))} |")
    matrix = ev.matrix_table([*args.methods, out["matrix_names"][-1]], np.array(out["matrix"]))
    cmd = "python benchmarks/study.py " + shlex.join(sys.argv[1:])
    text = (f"Win rate (%) against mu per turn h (oracle judge: lessons learned so far, ties half; "
            f"{args.num_contexts} held-out contexts), mean over each row's seeds (± sd across seeds); reward = "
            f"mean final reward (mu: {out['reference_reward']:.3f}, V* = {out['v_star']:.4f}); every method "
            f"trained for {args.iterations} iterations x {args.prompts_per_iteration} conversations, "
            f"{args.parallel} runs at a time with {args.threads} thread(s) each" +
            (f"; whole study {(time.time() - t0) / 60:.0f} min ({train_min:.0f} training)" if trained_here else
             "; runs trained earlier" + ("" if args.reuse_evaluation else ", this invocation evaluated them")) +
            f". `{cmd}`\n\n" + "\n".join(lines) +
            f"\n\nPreference matrix (seed {seed0}, final dialogues, row beats column, %):\n\n" + matrix)
    if missing:
        text += f"\n\nNot yet in the repository: {', '.join(missing)}."
    if plot(table, H, ROOT / "benchmarks" / "study_win_rate.png", reference_levels(out)):
        text += "\n\n![win rate against mu per turn](benchmarks/study_win_rate.png)"
    print("\n" + text)
    (ROOT / "benchmarks" / "study_results.md").write_text(text + "\n")
    (ROOT / args.output_dir / "study.json").write_text(json.dumps(table, indent=1))
    if args.update_readme:
        update_docs(text, headline_table(table, args, out))


def headline_table(table: dict, args: Args, out: dict) -> str:
    """The README's study table: the headline columns of the full table (docs/study.md), from the same `table`."""
    lines = ["Mean over seeds (± sd across seeds; each row's seeds in its last column) of each method trained from "
             f"mu for {args.iterations} iterations x {args.prompts_per_iteration} conversations and evaluated by "
             f"`evaluate.py` on {args.num_contexts} held-out contexts: win rate against mu averaged over the turns "
             f"(oracle judge), final reward (mu {out['reference_reward']:.3f}, V* {out['v_star']:.3f}), runs whose "
             f"final reward reaches {args.target}, KL to mu, minutes per run. Per-turn win rates, the preference "
             "matrix and the figure: "
             "[docs/study.md](docs/study.md).",
             "",
             f"| method | avg win rate (%) | reward | runs >= {args.target} | KL to mu | minutes per run | seeds |",
             "|---|---|---|---|---|---|---|"]
    for m, r in table.items():
        rewards = np.array(r["reward_seeds"])
        lines.append(f"| {m} | {100 * r['average']:.1f} ± {100 * r['average_sd']:.1f} | {r['reward']:.3f} ± "
                     f"{r['reward_sd']:.3f} | {(rewards >= args.target).sum()}/{len(rewards)} | {r['kl']:.2f} | "
                     f"{r['minutes']:.1f} | {','.join(map(str, r['seeds']))} |")
    return "\n".join(lines)


def update_docs(text: str, headline: str) -> None:
    """--update_readme: the full tables, matrix and figure (`text`) into docs/study.md and the headline table into
    README.md, each between its study markers (both checked before either is written)."""
    a, b = "<!-- study:begin -->", "<!-- study:end -->"
    # the figure's path is relative to the repository root in `text`, to docs/ in docs/study.md
    targets = [(ROOT / "docs" / "study.md", text.replace("](benchmarks/", "](../benchmarks/")),
               (ROOT / "README.md", headline)]
    for path, _ in targets:
        if a not in path.read_text() or b not in path.read_text():
            raise SystemExit(f"{path.relative_to(ROOT)} has no study markers")
    for path, body in targets:
        head, rest = path.read_text().split(a, 1)
        path.write_text(head + a + "\n" + body + "\n" + b + rest.split(b, 1)[1])


def optimizer_steps(path: Path, summary: dict) -> int:
    """Optimizer steps a run took: its summary's count, else the last logged charts/optimizer_steps, else (mtpo.py,
    which logs none) epochs x minibatches per iteration."""
    if "optimizer_steps" in summary:
        return summary["optimizer_steps"]
    logged = [json.loads(line).get("charts/optimizer_steps") for line in (path / "metrics.jsonl").open()]
    logged = [x for x in logged if x is not None]
    if logged:
        return int(logged[-1])
    a = json.loads((path / "args.json").read_text())
    return summary["iterations"] * a["num_epochs"] * a["num_minibatches"]


def reference_levels(out: dict) -> dict:
    """The reward levels the figure marks: mu (as evaluated), V*, and on the tutor task the best never-ask policy and
    the last-turn-only bound (exact values from the simulator)."""
    levels = {"mu": out.get("reference_reward"), "V*": out.get("v_star")}
    if out.get("v_star") is not None:
        try:
            from envs import tutor_task

            levels["never-ask"] = tutor_task.tutor_value(tutor_task.TutorRules(), "never_ask")
            levels["last-turn bound"] = tutor_task.tutor_value(tutor_task.TutorRules(), "last_turn")
        except (ImportError, AttributeError, ValueError):
            pass
    return levels


# One colour and one marker per method (solid lines: methods trained on multi-turn signal; dashed: last-turn only).
STYLE = {
    "REFUEL": ("#d62728", "o"),
    "REBEL-MT-MIXED": ("#ff7f0e", "s"),
    "DPO-MT-MIXED": ("#bcbd22", "D"),
    "MTPO": ("#2ca02c", "^"),
    "MTPO-tau": ("#17becf", "v"),
    "multi-turn RLHF": ("#1f77b4", "P"),
    "Iterative PPO": ("#9467bd", "X"),
    "REBEL-LT-OFFLINE": ("#8c564b", "<"),
    "REBEL-LT-MIXED": ("#e377c2", ">"),
    "REBEL-LT-ONLINE": ("#7f7f7f", "h"),
    "DPO-LT-OFFLINE": ("#000000", "d"),
    "DPO-LT-MIXED": ("#a6761d", "p"),
    "DPO-LT-ONLINE": ("#3f3f9f", "*"),
}
SPARE_STYLES = [("#66a61e", "o"), ("#e7298a", "s"), ("#7570b3", "^"), ("#d95f02", "v"), ("#1b9e77", "D")]


def method_styles(methods) -> dict:
    """method -> (colour, marker, linestyle), no two methods alike (unknown names take spare styles in order)."""
    spare, out = iter(SPARE_STYLES), {}
    for m in methods:
        colour, marker = STYLE.get(m) or STYLE.get(m.replace("_", " ")) or next(spare)  # run names use _
        out[m] = (colour, marker, "--" if "-LT-" in m else "-")
    return out


def plot_figure(table: dict, H: int, levels: dict):
    """The study figure: (left) win rate against mu per turn, mean over seeds with error bars of +-1 sd across seeds,
    each method shifted a little sideways so overlapping lines stay visible; mu is 50% by definition. (right) final
    reward per method, one small dot per seed and the mean, beside the reference levels (mu, V*, ...).
    table[m]: per_turn (H means), optionally per_turn_seeds (seeds x H) and reward_seeds; levels: name -> reward."""
    import matplotlib.pyplot as plt

    methods = list(table)
    styles = method_styles(methods)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 6.4), gridspec_kw=dict(width_ratios=[3, 2]))
    turns = np.arange(1, H + 1)
    width = 0.5  # total sideways spread of the methods at one turn
    for i, m in enumerate(methods):
        colour, marker, ls = styles[m]
        r = table[m]
        x = turns + (i - (len(methods) - 1) / 2) * width / max(1, len(methods) - 1)
        y = 100 * np.asarray(r["per_turn"], dtype=float)
        seeds = np.asarray(r.get("per_turn_seeds") or [], dtype=float)
        err = 100 * seeds.std(0, ddof=1) if seeds.ndim == 2 and len(seeds) > 1 else None
        ax.errorbar(x, y, yerr=err, color=colour, marker=marker, linestyle=ls, markersize=6 if m == "REFUEL" else 4.5,
                    linewidth=2.4 if m == "REFUEL" else 1.2, capsize=2, elinewidth=1, label=m,
                    zorder=3 if m == "REFUEL" else 2)
    ax.axhline(50, color="0.35", linestyle=":", linewidth=1.2, zorder=1, label="mu (50% by definition)")
    ax.set_xticks(turns)
    ax.set_xlim(turns[0] - 0.5, turns[-1] + 0.5)
    ax.set(xlabel="turn h", ylabel="win rate against mu (%)",
           title="win rate per turn (mean over seeds, bars: ±1 sd)")
    ax.grid(axis="y", alpha=0.3)

    y_pos = np.arange(len(methods))[::-1]
    for yp, m in zip(y_pos, methods):
        colour, marker, _ = styles[m]
        rew = np.asarray(table[m].get("reward_seeds") or [table[m]["reward"]], dtype=float)
        bx.scatter(rew, np.full(len(rew), yp), color=colour, marker=marker, s=14, alpha=0.5, zorder=2)
        bx.scatter([rew.mean()], [yp], color=colour, marker=marker, s=60, edgecolor="black", linewidth=0.6, zorder=3)
    level_styles = {"mu": ("0.35", ":"), "V*": ("black", "-"), "last-turn bound": ("0.6", "-.")}
    for name, value in levels.items():
        if value is None:
            continue
        colour, ls = level_styles.get(name, ("0.6", "--"))
        bx.axvline(value, color=colour, linestyle=ls, linewidth=1.2, zorder=1, label=f"{name} {value:.3f}")
    bx.set_yticks(y_pos)
    bx.set_yticklabels(methods, fontsize=8)
    bx.set_ylim(-0.7, len(methods) - 0.3)
    if any(v is not None for v in levels.values()):
        bx.legend(fontsize=7, loc="center", framealpha=0.9)
    bx.set(xlabel="final reward (lessons learned / 4)", title="final reward (dots: seeds; large: mean)")
    bx.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.11))
    fig.tight_layout()
    return fig


def plot(table: dict, H: int, path: Path, levels: Optional[dict] = None) -> bool:
    """Write the study figure to `path` (PNG) when matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plot_figure(table, H, levels or {})
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")
    return True


if __name__ == "__main__":
    main(tyro.cli(Args))
