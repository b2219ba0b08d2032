"""The gift task (envs/gift_task.py) learned by a real chat model over seeds: runs one script (REFUEL by default)
per seed on `--env gift` with SmolLM2-135M-Instruct for a fixed time budget, then prints, per seed and over seeds,
the base model's success rate (the run's first evaluation, before any update), the final and best ones, and how
many seeds reached the target (twice the base rate, or 0.2 above it); plots the curves, and
prints a few held-out conversations of the base model and of the trained one.

    python benchmarks/gift_seeds.py --script refuel.py --seeds 1 2 3 --minutes 30
    python benchmarks/gift_seeds.py --report_only   # the table and docs/gift_curves.png from the runs already there

The flags of each run are `RUN_FLAGS[script]` plus --extra; the figures on docs/gift_task.md come from these
commands. --plot needs matplotlib (optional).
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
COMMON = ("--env gift --max_turns 2 --max_new_tokens 32 --temperature 0.7 --prompts_per_iteration 16 "
          "--num_eval 64 --eval_every 5 --num_iterations 1000")
RUN_FLAGS = {  # on top of COMMON; the time budget ends each run (measured on seed 1 for mtpo.py and iterative_ppo.py)
    "refuel.py": "--minibatch_size 8 --num_epochs 1 --bf16 True --lr 2e-5",
    "mtpo.py": "--bf16 True --lr 2e-5",
    "iterative_ppo.py": "--bf16 True --lr 2e-5",
}


@dataclass
class Args:
    script: str = "refuel.py"
    """the algorithm: refuel.py, mtpo.py or iterative_ppo.py"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    """one run per seed"""
    minutes: float = 30.0
    """each run's --time_budget_minutes (it stops after the iteration that passes it, then evaluates)"""
    model: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    """the policy (and, by default, the customer)"""
    parallel: int = 1
    """runs at a time (each with --threads threads)"""
    threads: int = 0
    """torch threads per run (0 = torch's default)"""
    extra: str = ""
    """more flags for every run, e.g. "--user_model scripted" """
    output_dir: str = "runs/gift"
    """where the runs and the results JSON go"""
    plot: Optional[str] = "docs/gift_curves.png"
    """draw the curves of every script's runs in --output_dir here (None: no plot)"""
    report_only: bool = False
    """run nothing: the table, the conversations and the plot from the runs already in --output_dir"""
    show: int = 3
    """held-out conversations of the base and the trained model to print (0: none)"""
    dry_run: bool = False
    """print the runs' commands and stop"""


def command(args: Args, seed: int, name: str) -> list[str]:
    flags = f"{COMMON} {RUN_FLAGS[args.script]} {args.extra}"
    return [sys.executable, args.script, *shlex.split(flags), "--model_name_or_path", args.model, "--seed", str(seed),
            "--time_budget_minutes", str(args.minutes), "--threads", str(args.threads), "--run_name", name,
            "--output_dir", args.output_dir]


def curve(run_dir: Path) -> list[tuple[float, float, float]]:
    """(minutes, eval/mean_reward, eval/asked_rate) of each evaluation of a run."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    minutes = 0.0
    out = []
    for m in rows:
        minutes = m.get("charts/elapsed_min", minutes)
        if "eval/mean_reward" in m:
            out.append((minutes, m["eval/mean_reward"], m.get("eval/asked_rate", float("nan"))))
    return out


def results_of(run_dir: Path) -> dict:
    c = curve(run_dir)
    return dict(run=run_dir.name, base=c[0][1], final=c[-1][1], best=max(r for _, r, _ in c), asked_base=c[0][2],
                asked_final=c[-1][2], minutes=c[-1][0], curve=c)


def finished_runs(output_dir: Path, script: str) -> dict:
    """seed -> results of the finished runs of one script in output_dir (named <script>_seed<N>__<stamp>; the
    latest per seed)."""
    out = {}
    for run_dir in sorted(output_dir.glob(f"{Path(script).stem}_seed*__*"), key=lambda p: p.name.split("__")[-1]):
        if (run_dir / "summary.json").is_file():
            out[int(run_dir.name.split("_seed")[1].split("__")[0])] = results_of(run_dir)
    return out


def run_seeds(args: Args) -> dict:
    stamp = int(time.time())
    out_dir = ROOT / args.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, results, pending = {}, {}, list(args.seeds)
    while pending or procs:
        while pending and len(procs) < args.parallel:
            seed = pending.pop(0)
            name = f"{Path(args.script).stem}_seed{seed}__{stamp}"
            log = open(out_dir / f"{name}.log", "w")
            procs[seed] = (subprocess.Popen(command(args, seed, name), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT),
                           name)
        time.sleep(5)
        for seed, (p, name) in list(procs.items()):
            if p.poll() is None:
                continue
            del procs[seed]
            if p.returncode != 0:
                raise SystemExit(f"seed {seed} failed: see {out_dir / name}.log")
            r = results[seed] = results_of(out_dir / name)
            print(f"seed {seed}: base {r['base']:.3f} -> final {r['final']:.3f} in {r['minutes']:.1f} min", flush=True)
    return results


def report(args: Args, results: dict) -> None:
    print(f"\n{args.script} on the gift task, {len(results)} seeds\n")
    print("| seed | base | final | best | final / base | asked (base -> final) | minutes |\n|---|---|---|---|---|---|---|")
    for seed, r in sorted(results.items()):
        ratio = r["final"] / r["base"] if r["base"] > 0 else float("inf")
        print(f"| {seed} | {r['base']:.3f} | {r['final']:.3f} | {r['best']:.3f} | {ratio:.1f}x | "
              f"{r['asked_base']:.2f} -> {r['asked_final']:.2f} | {r['minutes']:.1f} |")
    base = np.array([r["base"] for r in results.values()])
    final = np.array([r["final"] for r in results.values()])
    reached = sum(f >= min(2 * b, b + 0.2) for b, f in zip(base, final))
    sd = (lambda x: x.std(ddof=1) if len(x) > 1 else 0.0)
    print(f"\nbase {base.mean():.3f} +- {sd(base):.3f}, final {final.mean():.3f} +- {sd(final):.3f} (mean +- sd over "
          f"seeds); {reached}/{len(final)} seeds reached twice the base rate or 0.2 above it")


def plot(args: Args) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib (pip install matplotlib), or pass --plot None") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for script in RUN_FLAGS:
        results = finished_runs(ROOT / args.output_dir, script)
        if not results:
            continue
        colour = None
        for i, r in enumerate(results.values()):
            minutes, reward = [c[0] for c in r["curve"]], [c[1] for c in r["curve"]]
            line, = ax.plot(minutes, reward, color=colour, alpha=0.8,
                            label=f"{Path(script).stem} ({len(results)} seeds)" if i == 0 else None)
            colour = line.get_color()
        base = np.mean([r["base"] for r in results.values()])
        ax.axhline(base, color=colour, ls=":", lw=1)
    ax.set_xlabel("minutes (2 CPU cores)")
    ax.set_ylabel("success rate, 64 held-out customers")
    ax.set_title("gift task, SmolLM2-135M-Instruct (dotted: the base model)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / args.plot, dpi=120)
    print(f"wrote {args.plot}")


def show_conversations(args: Args, results: dict) -> None:
    """The base model and the first seed's trained policy on the same held-out customers (the LM customer)."""
    import torch

    sys.path.insert(0, str(ROOT))
    import simulator as sim
    from envs.gift_task import GiftEnv, LMUser
    from envs.loading import load_policy

    base, tok = load_policy(args.model)
    trained_dir = ROOT / args.output_dir / results[min(results)]["run"] / "checkpoint" / "policy"
    trained, _ = load_policy(str(trained_dir))
    env = GiftEnv(LMUser(base.eval(), tok), max_turns=2)
    contexts = env.contexts(args.show, "eval", np.random.default_rng(2024))
    for label, model in (("base model", base), (f"after {args.script}, seed {min(results)}", trained)):
        torch.manual_seed(0)
        convs, _ = sim.continue_dialogues(model.eval(), tok, env, [c.messages for c in contexts],
                                          [c.user for c in contexts], [2] * len(contexts), np.random.default_rng(0),
                                          32, 0.7)
        print(f"\n### {label}")
        for c, ctx, r in zip(convs, contexts, env.reward(convs).tolist()):
            print(f"\n(favourite colour: {ctx.user['colour']}; reward {r:.0f})")
            for m in c[1:]:
                print(f"- {'customer' if m['role'] == 'user' else 'assistant'}: {m['content']}")


def main(args: Args) -> None:
    if args.script not in RUN_FLAGS:
        raise SystemExit(f"--script must be one of {sorted(RUN_FLAGS)}")
    if args.dry_run:
        for seed in args.seeds:
            print(shlex.join(command(args, seed, f"{Path(args.script).stem}_seed{seed}")))
        return
    if not args.report_only:
        run_seeds(args)
    results = finished_runs(ROOT / args.output_dir, args.script)
    if not results:
        raise SystemExit(f"no finished {args.script} runs in {args.output_dir}")
    report(args, results)
    if args.show:
        show_conversations(args, results)
    if args.plot:
        plot(args)


if __name__ == "__main__":
    main(tyro.cli(Args))
