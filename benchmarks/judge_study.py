"""MTPO against reward-based methods under a judge no reward represents: the tutor task with `--tutor_judge majority`
(envs/tutor_judge.py; docs/mtpo.md#a-judge-no-reward-represents).

Trains MTPO and MTPO-tau (self-play on the panel's preference), multi-turn RLHF on a Bradley-Terry reward model
r_phi learned from the panel's labels on mu's conversations, and REFUEL and Iterative PPO on the judge's exact
Bradley-Terry reward, every method from mu with the same iterations x conversations and the same seeds. Then per
seed one `evaluate.py` with the panel as judge over every method's final policy, the panel's exact Nash equilibrium
and the maximiser of its Bradley-Terry reward (both played by code), and mu; prints and writes the table (win rate
against mu and against the Nash, rewards, lessons, questions) and the head-to-head matrix, mean ± sd over seeds.

    python benchmarks/judge_study.py --seeds 1 2 3 4 5 --iterations 30 --update_docs
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import study  # noqa: E402  (train_all, run_dir: the comparison study's runner)

JUDGE = ["--tutor_judge", "majority"]
METHODS = {
    "MTPO": ("mtpo.py", ["--variant", "mtpo", *JUDGE]),
    "MTPO-tau": ("mtpo.py", ["--variant", "mtpo-tau", *JUDGE]),
    "multi-turn RLHF (learned reward)": ("mtpo.py", ["--variant", "rlhf", "--reward", "learned", *JUDGE]),
    "REFUEL": ("refuel.py", JUDGE),
    "Iterative PPO": ("iterative_ppo.py", JUDGE),
}
SCRIPTED = {"nash": "Nash (exact)", "bradley_terry_optimal": "Bradley-Terry optimum (exact)"}


@dataclass
class Args:
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    """methods to train (names as in the table)"""
    seeds: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5])
    """one run per method per seed"""
    iterations: int = 30
    """iterations per run (every method: the same iterations x prompts per iteration)"""
    prompts_per_iteration: int = 256
    """conversations started per iteration"""
    parallel: int = 2
    """runs at a time"""
    threads: int = 1
    """torch threads per run"""
    num_contexts: int = 1024
    """held-out contexts per evaluation (one evaluation per seed)"""
    eval_every: int = 10
    """iterations between each run's held-out evaluations"""
    output_dir: str = "runs/judge_study"
    """where the runs, the evaluations and the results go"""
    update_docs: bool = False
    """write the tables into docs/mtpo.md and README.md (between their judge-study markers)"""
    more_seeds: list[str] = field(default_factory=list)
    """(study.train_all's) 'METHOD=4,5': seeds that METHOD alone adds"""


def evaluate_seed(args: Args, seed: int) -> dict:
    """evaluate.py on one seed's final policies, the Nash and the Bradley-Terry optimum (cached in output_dir)."""
    import evaluate as ev

    path = ROOT / args.output_dir / f"evaluation_seed{seed}.json"
    if path.exists():
        return json.loads(path.read_text())
    out = ev.evaluate(ev.Args(policies=[str(study.run_dir(args, m, seed)) for m in args.methods], names=args.methods,
                              tutor_judge="majority", judge="preference", scripted=list(SCRIPTED), matrix=True,
                              num_contexts=args.num_contexts, seed=1234 + seed))
    path.write_text(json.dumps(out, default=lambda x: x.tolist() if hasattr(x, "tolist") else float(x)))
    return out


def reward_model_accuracy(args: Args, seed: int) -> dict:
    """The learned r_phi's held-out figures, as its run logged them."""
    run = study.run_dir(args, "multi-turn RLHF (learned reward)", seed) / "metrics.jsonl"
    for line in run.read_text().splitlines():
        m = json.loads(line)
        if "reward_model/heldout_accuracy" in m:
            return {k.split("/")[1]: v for k, v in m.items() if k.startswith("reward_model/heldout")}
    return {}


def tables(args: Args, evals: dict, exact: dict) -> dict:
    """The study's summary line (intro), its table and its head-to-head matrix, as markdown."""
    names = [*args.methods, *SCRIPTED]
    shown = {**{m: m for m in args.methods}, **SCRIPTED}
    mu = "reference (tutor)"
    mean_sd = lambda x: f"{np.mean(x):.3f} ± {np.std(x, ddof=1) if len(x) > 1 else 0:.3f}"
    pct = lambda x: f"{100 * np.mean(x):.1f} ± {100 * (np.std(x, ddof=1) if len(x) > 1 else 0):.1f}"
    Ms = {s: np.array(e["matrix"]) for s, e in evals.items()}
    order = evals[args.seeds[0]]["matrix_names"]
    idx = {n: order.index(n) for n in [*names, mu]}
    lines = ["| method | beats mu (%) | beats the Nash (%) | Bradley-Terry reward | lessons (of H - 1) | questions | "
             "first lesson (turn) | KL to mu |", "|" + "---|" * 8]
    for n in names:
        rows = [next(r for r in e["rows"] if r["name"] == n) for e in evals.values()]
        vs_mu = [Ms[s][idx[n], idx[mu]] for s in evals]
        vs_nash = [Ms[s][idx[n], idx["nash"]] for s in evals] if n != "nash" else None
        kl = [r["kl"] for r in rows if r["kl"] is not None]
        lines.append(f"| {shown[n]} | {pct(vs_mu)} | {pct(vs_nash) if vs_nash else '-'} | "
                     f"{mean_sd([r['reward'] for r in rows])} | {mean_sd([r['metrics']['eval/lessons'] for r in rows])}"
                     f" | {mean_sd([r['metrics']['eval/asks'] for r in rows])} | "
                     f"{mean_sd([r['metrics']['eval/first_lesson_turn'] for r in rows])} | "
                     f"{f'{np.mean(kl):.2f}' if kl else '-'} |")
    mu_row = evals[args.seeds[0]]
    head = ["| row beats column (%) | " + " | ".join(shown.get(n, "mu") for n in [*names, mu]) + " |",
            "|" + "---|" * (len(names) + 2)]
    for a in [*names, mu]:
        cells = ["-" if a == b else pct([Ms[s][idx[a], idx[b]] for s in evals]) for b in [*names, mu]]
        head.append(f"| {shown.get(a, 'mu')} | " + " | ".join(cells) + " |")
    rm = [reward_model_accuracy(args, s) for s in args.seeds] if "multi-turn RLHF (learned reward)" in args.methods \
        else []
    rm_line = ""
    if rm and all(rm):
        rm_line = (" The learned r_phi's held-out accuracy on mu's pairs: "
                   f"{mean_sd([r['heldout_accuracy'] for r in rm])}"
                   f" (ceiling {mean_sd([r['heldout_accuracy_ceiling'] for r in rm])}; untied pairs "
                   f"{mean_sd([r['heldout_untied_accuracy'] for r in rm])}).")
    cmd = "python benchmarks/judge_study.py " + shlex.join(sys.argv[1:])
    intro = (f"The tutor task judged by the panel (`--tutor_judge majority`): every method trained from mu for "
             f"{args.iterations} iterations x {args.prompts_per_iteration} conversations, seeds "
             f"{','.join(map(str, args.seeds))}; per seed `evaluate.py --judge preference` on {args.num_contexts} "
             f"held-out contexts, final dialogues judged head to head from the same contexts (ties half); mean ± sd "
             f"over seeds. mu's Bradley-Terry reward {mean_sd([e['reference_reward'] for e in evals.values()])}, "
             f"V* {mu_row['v_star']:.3f}. Exact: the Bradley-Terry optimum beats the Nash "
             f"{100 * exact['bt_vs_nash']:.1f}% and mu's scripted reference {100 * exact['ref_vs_nash']:.1f}%; the "
             f"judge's Bradley-Terry reward orders {100 * exact['bt_accuracy']:.1f}% of the reference's untied pairs "
             f"as the panel does.{rm_line} `{cmd}`")
    return dict(intro=intro, table="\n".join(lines), matrix="\n".join(head))


def exact_figures() -> dict:
    from envs import tutor_judge as tj

    env = tj.MajorityTutorEnv()
    nash = tj.solve_game(env.rules)["nash"]
    d_bt = tj.outcome_distribution(env.bradley_terry_optimum.policy, env.rules)
    ref = tj.outcome_distribution(tj.reference_teacher(env.rules), env.rules)
    return dict(bt_vs_nash=tj.policy_preference(d_bt, nash), ref_vs_nash=tj.policy_preference(ref, nash),
                bt_accuracy=env.bradley_terry.accuracy)


def update_docs(text: str, readme: str) -> None:
    """The full text into docs/mtpo.md, the table and the matrix into README.md, between their judge-study markers
    (both checked before either is written)."""
    a, b = "<!-- judge-study:begin -->", "<!-- judge-study:end -->"
    targets = [(ROOT / "docs" / "mtpo.md", text), (ROOT / "README.md", readme)]
    for path, _ in targets:
        if a not in path.read_text() or b not in path.read_text():
            raise SystemExit(f"{path.relative_to(ROOT)} has no judge-study markers")
    for path, body in targets:
        head, rest = path.read_text().split(a, 1)
        path.write_text(head + a + "\n" + body + "\n" + b + rest.split(b, 1)[1])


def main(args: Args) -> None:
    t0 = time.time()
    failed = {k: rc for k, rc in study.train_all(args, METHODS).items() if rc != 0}
    if failed:
        raise SystemExit(f"runs failed (see their logs in {args.output_dir}): {failed}")
    print(f"trained in {(time.time() - t0) / 60:.1f} min", flush=True)
    evals = {s: evaluate_seed(args, s) for s in args.seeds}
    t = tables(args, evals, exact_figures())
    matrix_head = "Head to head (final dialogues, row beats column, %, mean ± sd over seeds):"
    text = f"{t['intro']}\n\n{t['table']}\n\n{matrix_head}\n\n{t['matrix']}"
    print("\n" + text)
    (ROOT / "benchmarks" / "judge_study_results.md").write_text(text + "\n")
    if args.update_docs:
        update_docs(text, f"{t['table']}\n\n{matrix_head}\n\n{t['matrix']}")


if __name__ == "__main__":
    main(tyro.cli(Args))
