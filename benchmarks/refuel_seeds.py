"""Learning over several seeds: runs `refuel.py` once per seed (default settings unless overridden) and prints, per
seed and overall, mu's reward, the final reward, the best, and the minutes to reach the target (V* = 0.805, docs/implementation_notes.md#exact-values).

    python benchmarks/refuel_seeds.py --seeds 1 2 3 4 5 --parallel 2 --threads 1
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Args:
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """one refuel.py run per seed"""
    parallel: int = 1
    """runs at a time (use --threads so they do not oversubscribe the cores)"""
    threads: int = 0
    """torch threads per run (0 = torch's default)"""
    target: float = 0.6
    """the reward a run should reach"""
    output_dir: str = "runs/seeds"
    """where the runs go"""
    extra: str = ""
    """extra refuel.py flags, e.g. "--time_budget_minutes 8 --eval_every 5" """


def first_time_at(metrics: list[dict], target: float):
    for m in metrics:
        if m.get("eval/mean_reward", -1) >= target:
            return m.get("charts/elapsed_min", 0.0)
    return None


def main(args: Args) -> None:
    stamp = int(time.time())
    procs, results = {}, {}
    pending = list(args.seeds)
    while pending or procs:
        while pending and len(procs) < args.parallel:
            seed = pending.pop(0)
            name = f"seed{seed}__{stamp}"
            cmd = [sys.executable, "refuel.py", "--seed", str(seed), "--run_name", name, "--output_dir",
                   args.output_dir, "--threads", str(args.threads), *args.extra.split()]
            log = open(Path(args.output_dir).mkdir(parents=True, exist_ok=True) or Path(args.output_dir) / f"{name}.log", "w")
            procs[seed] = (subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT), name)
        time.sleep(5)
        for seed, (p, name) in list(procs.items()):
            if p.poll() is None:
                continue
            del procs[seed]
            run_dir = ROOT / args.output_dir / name
            metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
            evals = [m["eval/mean_reward"] for m in metrics if "eval/mean_reward" in m]
            s = json.loads((run_dir / "summary.json").read_text()) if p.returncode == 0 else {}
            results[seed] = dict(mu=evals[0], final=s.get("final_reward", float("nan")), best=max(evals),
                                 minutes=s.get("minutes", float("nan")), t_target=first_time_at(metrics, args.target),
                                 ok=p.returncode == 0)
            print(f"seed {seed}: {results[seed]}", flush=True)
    print(f"\n| seed | mu | final | best | minutes | minutes to {args.target} |\n|---|---|---|---|---|---|")
    for seed, r in sorted(results.items()):
        t = f"{r['t_target']:.1f}" if r["t_target"] is not None else "not reached"
        print(f"| {seed} | {r['mu']:.3f} | {r['final']:.3f} | {r['best']:.3f} | {r['minutes']:.1f} | {t} |")
    finals = np.array([r["final"] for r in results.values()])
    reached = sum(r["final"] >= args.target for r in results.values())
    print(f"\nfinal reward over {len(finals)} seeds: mean {finals.mean():.3f}, sd {finals.std(ddof=1) if len(finals) > 1 else 0:.3f}, "
          f"min {finals.min():.3f}, max {finals.max():.3f}; {reached}/{len(finals)} ended at or above {args.target}")


if __name__ == "__main__":
    main(tyro.cli(Args))
