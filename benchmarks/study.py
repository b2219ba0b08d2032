"""The comparison study (REFUEL paper Table 1, MTPO paper Table 1) on the embedded tutor task.

Trains every method with the same budget (the same iterations x prompts per iteration, so the same number of
trained pairs / conversations started, and the same seeds), evaluates every final policy with `evaluate.py`
(per-turn win rate against mu with the oracle judge, mean reward as a fraction of V*, KL to mu), and writes the
markdown tables to benchmarks/study_results.md (and into README.md between the study markers with --update_readme).

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
METHODS["Iterative PPO"] = ("iterative_ppo.py", [])


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to train (names as in the table)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per method per seed"""
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
    """replace the README's study section with the new tables"""
    skip_training: bool = False
    """only evaluate the runs already in output_dir (finished runs are never retrained anyway)"""
    reuse_evaluation: bool = False
    """rewrite the tables from output_dir/evaluation.json (the last evaluation of these runs) without replaying"""
    target: float = 0.6
    """the table counts the runs whose final mean reward reaches this (0.6 = 0.75 of V*)"""


def train_all(args: Args) -> dict:
    # a run that already finished (its summary.json exists) is kept: the study can be extended or resumed
    jobs = [(m, s) for m in args.methods for s in args.seeds if not (run_dir(args, m, s) / "summary.json").exists()]
    procs, done = {}, {}
    while jobs or procs:
        while jobs and len(procs) < args.parallel:
            method, seed = jobs.pop(0)
            script, flags = METHODS[method]
            name = f"{method.replace(' ', '_')}__seed{seed}"
            cmd = [sys.executable, script, *flags, "--seed", str(seed), "--run_name", name, "--output_dir",
                   args.output_dir, "--num_iterations", str(args.iterations), "--prompts_per_iteration",
                   str(args.prompts_per_iteration), "--time_budget_minutes", "0", "--eval_every",
                   str(args.iterations), "--num_eval", "256", "--threads", str(args.threads)]
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
    runs = [(m, s) for m in args.methods for s in args.seeds]
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
             f" | avg win rate | reward | of V* | runs >= {args.target} | KL to mu | iterations | minutes per run |",
             "|" + "---|" * (H + 8)]
    table = {}
    for m in args.methods:
        rows = [by[(m, s)] for s in args.seeds]
        per_turn = np.mean([r["win_rate"]["per_turn"] for r in rows], 0)
        avg = np.array([r["win_rate"]["average"] for r in rows])
        rew = np.array([r["reward"] for r in rows])
        kl = np.mean([r["kl"] for r in rows])
        summaries = [json.loads((run_dir(args, m, s) / "summary.json").read_text()) for s in args.seeds]
        minutes = np.mean([x["minutes"] for x in summaries])
        iters = "/".join(str(x["iterations"]) for x in summaries)
        sd = lambda x: x.std(ddof=1) if len(x) > 1 else 0.0
        table[m] = dict(per_turn=per_turn.tolist(), average=avg.mean(), average_sd=sd(avg), reward=rew.mean(),
                        reward_sd=sd(rew), kl=kl, minutes=minutes)
        lines.append(f"| {m} | " + " | ".join(f"{100 * x:.1f}" for x in per_turn) +
                     f" | {100 * avg.mean():.1f} ± {100 * sd(avg):.1f} | {rew.mean():.3f} ± {sd(rew):.3f} | "
                     f"{rew.mean() / out['v_star']:.2f} | {(rew >= args.target).sum()}/{len(rew)} | {kl:.2f} | "
                     f"{iters} | {minutes:.1f} |")
    matrix = ev.matrix_table([*args.methods, out["matrix_names"][-1]], np.array(out["matrix"]))
    cmd = "python benchmarks/study.py " + shlex.join(sys.argv[1:])
    text = (f"Win rate (%) against mu per turn h (oracle judge: lessons learned so far, ties half; "
            f"{args.num_contexts} held-out contexts), mean over seeds {args.seeds} (± sd across seeds); reward = "
            f"mean final reward (mu: {out['reference_reward']:.3f}, V* = {out['v_star']:.4f}); every method "
            f"trained for {args.iterations} iterations x {args.prompts_per_iteration} conversations, "
            f"{args.parallel} runs at a time with {args.threads} thread(s) each" +
            (f"; whole study {(time.time() - t0) / 60:.0f} min ({train_min:.0f} training)" if trained_here else
             "; runs trained earlier" + ("" if args.reuse_evaluation else ", this invocation evaluated them")) +
            f". `{cmd}`\n\n" + "\n".join(lines) +
            f"\n\nPreference matrix (seed {seed0}, final dialogues, row beats column, %):\n\n" + matrix)
    if missing:
        text += f"\n\nNot yet in the repository: {', '.join(missing)}."
    if plot(table, H, ROOT / "benchmarks" / "study_win_rate.png"):
        text += "\n\n![win rate against mu per turn](benchmarks/study_win_rate.png)"
    print("\n" + text)
    (ROOT / "benchmarks" / "study_results.md").write_text(text + "\n")
    (ROOT / args.output_dir / "study.json").write_text(json.dumps(table, indent=1))
    if args.update_readme:
        readme = (ROOT / "README.md").read_text()
        a, b = "<!-- study:begin -->", "<!-- study:end -->"
        if a not in readme or b not in readme:
            raise SystemExit("README.md has no study markers")
        head, rest = readme.split(a, 1)
        (ROOT / "README.md").write_text(head + a + "\n" + text + "\n" + b + rest.split(b, 1)[1])


def plot(table: dict, H: int, path: Path) -> bool:
    """A PNG of win rate per turn, when matplotlib is installed (it is not a dependency)."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib not installed: no plot")
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for m, r in table.items():
        ax.plot(range(1, H + 1), [100 * x for x in r["per_turn"]], marker="o", label=m,
                linewidth=2.5 if m == "REFUEL" else 1.2)
    ax.axhline(50, color="grey", linestyle=":")
    ax.set(xlabel="turn h", ylabel="win rate vs mu (%)", title="tutor task: win rate per turn")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return True


if __name__ == "__main__":
    main(tyro.cli(Args))
