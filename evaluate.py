"""evaluate.py: one evaluation for every method of this repository.

What it measures (REFUEL paper, Gao et al., ICLR 2025, Sections 4.2-4.3 and Appendix C.5; MTPO paper, Shani et al.,
2024, Table 1):
  - Per-turn win rate against the reference policy: the policy and the reference each play H_max turns with the
    simulated user from the same held-out contexts; for every turn h a judge compares the two dialogues up to turn
    h (the user's reaction to turn h included where the environment's reward reads it), the A/B order drawn at
    random for each comparison and undone afterwards; a tie counts half. Reported per h and averaged over h, each
    with a 95% confidence interval (normal approximation; the average's interval is taken over per-context means,
    so the correlation between the turns of one context is accounted for).
  - Judges: `oracle` (the environment's own reward of each prefix, higher wins: on the tutor task the lessons
    learned so far), `preference` (the environment's own preference oracle, P(a > b) counted as a's share of the
    win: with --tutor_judge majority the tutor's panel vote), `reward_model` (an HF sequence-classification model,
    higher score wins), `llm` (a judge model
    prompted in the paper's App. C.5 format, from an HF model or an OpenAI-compatible endpoint; replies that miss
    the format go through a counted fallback, and replies that still do not parse count as ties and are counted).
  - The reward of the final conversation (the environment's reward model), and on the tutor task its fraction of V*.
  - KL(pi || pi_ref) on the policy's own samples: for a dialogue tau ~ pi,
        k(tau) = sum_h [ ln pi(y_h | s_h) - ln pi_ref(y_h | s_h) ],
    whose mean is an unbiased estimate of KL(P_pi || P_ref) over whole dialogues, that is of
    E_{tau ~ pi} sum_h KL(pi(.|s_h) || pi_ref(.|s_h)) (the user's turns are the same under both and cancel).
    Log-probs at the sampling temperature, as everywhere in this repository, both teacher-forced on the turn's
    text (as the training losses score it, so a rare sampled token path that re-tokenizes differently counts the
    same under pi and pi_ref); reported with its standard error.
  - A pairwise preference matrix across any list of policies (MTPO paper Table 1 format): row i, column j is the
    rate at which i's final dialogue is preferred to j's from the same context.

    python evaluate.py --policies runs/refuel__tutor__1__X runs/baseline__tutor__1__Y --names refuel rebel-lt-online
"""
from __future__ import annotations

import json
import math
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional, Sequence

import numpy as np
import torch

import simulator as sim
from envs.flags import EnvArgs, make_env_from_args
from envs.loading import load_policy

# ----------------------------------------------------------------------------------------------------------------
# Judges: __call__(convs_a, convs_b) -> array of "A wins" scores in {1, 0.5, 0}
# ----------------------------------------------------------------------------------------------------------------
class ScoreJudge:
    """Higher score wins, equal scores tie. score_fn(convs) -> tensor: the env's reward (oracle) or an HF RM."""

    def __init__(self, score_fn: Callable):
        self.score_fn = score_fn

    def __call__(self, convs_a, convs_b) -> np.ndarray:
        s = self.score_fn(list(convs_a) + list(convs_b)).double().numpy()
        sa, sb = s[: len(convs_a)], s[len(convs_a):]
        return np.where(sa > sb, 1.0, np.where(sa < sb, 0.0, 0.5))


class LLMJudge:
    """A judge model prompted with a template (envs/chat_env.py's JUDGE_PROMPT by default); generate(prompts) ->
    replies (an HF model or an endpoint). The chat world's prompt format and parser, imported when a judge is made
    (a copy of evaluate.py with your own environment and the oracle judge does not need them)."""

    def __init__(self, generate: Callable[[list], list], template: Optional[str] = None):
        from envs.chat_env import JUDGE_PROMPT

        self.generate, self.template, self.counts = generate, template or JUDGE_PROMPT, Counter()

    def __call__(self, convs_a, convs_b) -> np.ndarray:
        from envs.chat_env import format_dialogue, parse_judge_reply

        prompts = [self.template.format(dialogue_a=format_dialogue(a), dialogue_b=format_dialogue(b))
                   for a, b in zip(convs_a, convs_b)]
        parsed = [parse_judge_reply(t) for t in self.generate(prompts)]
        self.counts.update(how for _, how in parsed)
        return np.array([1.0 if c == "A" else 0.0 if c == "B" else 0.5 for c, _ in parsed])


# ----------------------------------------------------------------------------------------------------------------
# Playing, judging per turn, KL
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def play(model, tokenizer, env: sim.Environment, contexts: Sequence[sim.Context], rng: np.random.Generator,
         max_new_tokens: int, temperature: float = 1.0, max_batch_size: int = 256) -> list:
    """Each context's turns (H_max, or a record's own number where it has one: setting two), batched per turn
    (torch's sampler draws from torch's seeded generator)."""
    convs, _ = sim.continue_dialogues(model, tokenizer, env, [c.messages for c in contexts],
                                      [c.user for c in contexts], dialogue_turns(contexts, env), rng,
                                      max_new_tokens, temperature, max_batch_size)
    return convs


def dialogue_turns(contexts: Sequence[sim.Context], env: sim.Environment) -> list:
    """H of each context: H_max, or the record's own number of turns where it has one."""
    return [getattr(c, "max_turns", None) or env.max_turns for c in contexts]


def dialogue_to_turn(conv: sim.Conversation, h: int, env: sim.Environment) -> sim.Conversation:
    """The dialogue up to assistant turn h, with the user's reaction to it when the env's reward reads that."""
    end = sim.assistant_turn_index(conv, h) + 1
    if env.scores_final_user_reply and end < len(conv) and conv[end]["role"] == "user":
        end += 1
    return list(conv[:end])


def judge_turns(judge, convs_pi: Sequence, convs_ref: Sequence, env: sim.Environment,
                rng: np.random.Generator) -> np.ndarray:
    """n x H_max array of the policy's win score (1 win, 0.5 tie, 0 loss) at each turn, NaN past a dialogue's own
    last turn (the policy and the reference play the same context, so the same number of turns); one batched
    judge call."""
    n, H = len(convs_pi), env.max_turns
    pi_first = rng.random((n, H)) < 0.5  # A/B order drawn per comparison
    a, b, at = [], [], []
    for i in range(n):
        for h in range(1, min(H, sim.assistant_turns(convs_pi[i])) + 1):
            p, r = dialogue_to_turn(convs_pi[i], h, env), dialogue_to_turn(convs_ref[i], h, env)
            a.append(p if pi_first[i, h - 1] else r)
            b.append(r if pi_first[i, h - 1] else p)
            at.append((i, h - 1))
    a_wins = np.full((n, H), np.nan)
    if at:
        a_wins[tuple(np.array(at).T)] = judge(a, b)
    return np.where(pi_first, a_wins, 1.0 - a_wins)  # undo the order


def win_rates(policy_wins: np.ndarray) -> dict:
    """Per-turn win rate and the average over turns, each with a 95% CI half-width."""
    n = policy_wins.shape[0]
    played = lambda x: x[~np.isnan(x)]  # turns past a dialogue's own last turn are NaN
    ci = lambda x: 1.96 * played(x).std(ddof=1) / math.sqrt(len(played(x))) if len(played(x)) > 1 else float("nan")
    per_dialogue = np.nanmean(policy_wins, 1)
    return {"per_turn": [float(played(policy_wins[:, h]).mean()) if len(played(policy_wins[:, h])) else float("nan")
                         for h in range(policy_wins.shape[1])],
            "per_turn_ci": [ci(policy_wins[:, h]) for h in range(policy_wins.shape[1])],
            "average": float(per_dialogue.mean()), "average_ci": ci(per_dialogue), "n": n}


def kl_estimate(logp_pi: np.ndarray, logp_ref: np.ndarray) -> tuple[float, float]:
    """Mean and standard error of sum_h [ln pi - ln pi_ref] over dialogues sampled from pi (unbiased for the KL)."""
    k = (np.asarray(logp_pi) - np.asarray(logp_ref)).reshape(len(logp_pi), -1).sum(1)
    return float(k.mean()), float(k.std(ddof=1) / math.sqrt(len(k))) if len(k) > 1 else float("nan")


@torch.no_grad()
def dialogue_logprobs(model, tokenizer, convs: Sequence, H: int, temperature: float = 1.0,
                      max_batch_size: int = 64, max_tokens_per_batch: Optional[int] = None) -> np.ndarray:
    """ln pi(y_h|s_h) of every turn of every dialogue (n x H, 0 past a dialogue's own last turn), teacher-forced on
    the turn's text in batches."""
    at = [(i, h) for i, c in enumerate(convs) for h in range(1, min(H, sim.assistant_turns(c)) + 1)]
    lp = sim.turn_logprob(model, tokenizer, [convs[i] for i, _ in at], [h for _, h in at], temperature,
                          max_batch_size=max_batch_size, max_tokens_per_batch=max_tokens_per_batch)
    out = np.zeros((len(convs), H))
    for (i, h), v in zip(at, lp.float().cpu().numpy()):
        out[i, h - 1] = v
    return out


def preference_matrix(dialogues: Sequence[Sequence], judge, rng: np.random.Generator) -> np.ndarray:
    """M[i, j] = rate at which policy i's final dialogue beats policy j's from the same context (ties half)."""
    k = len(dialogues)
    M = np.full((k, k), 0.5)
    for i in range(k):
        for j in range(i + 1, k):
            n = len(dialogues[i])
            i_first = rng.random(n) < 0.5
            a = [dialogues[i][s] if i_first[s] else dialogues[j][s] for s in range(n)]
            b = [dialogues[j][s] if i_first[s] else dialogues[i][s] for s in range(n)]
            a_wins = judge(a, b)
            M[i, j] = float(np.where(i_first, a_wins, 1 - a_wins).mean())
            M[j, i] = 1 - M[i, j]
    return M


# ----------------------------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------------------------
def results_table(rows: Sequence[dict], H: int) -> str:
    head = "| policy | " + " | ".join(f"h={h}" for h in range(1, H + 1)) + " | avg win rate | reward | of V* | KL |"
    lines = [head, "|" + "---|" * (H + 5)]
    for r in rows:
        w = r["win_rate"]
        v = f"{r['fraction_of_v_star']:.2f}" if r.get("fraction_of_v_star") is not None else "-"
        kl = f"{r['kl']:.2f}" if r.get("kl") is not None else "-"
        lines.append(f"| {r['name']} | " + " | ".join(f"{100 * x:.1f}" for x in w["per_turn"]) +
                     f" | {100 * w['average']:.1f} ± {100 * w['average_ci']:.1f} | {r['reward']:.3f} | {v} | {kl} |")
    return "\n".join(lines)


def matrix_table(names: Sequence[str], M: np.ndarray) -> str:
    lines = ["| row beats column | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for i, n in enumerate(names):
        lines.append(f"| {n} | " + " | ".join("-" if i == j else f"{100 * M[i, j]:.1f}" for j in range(len(names)))
                     + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Args(EnvArgs):
    """The environment's flags (--env, --prompts_path, --user_model, --reward_model, ...) are envs/flags.EnvArgs's,
    as in the training scripts; --user_max_concurrency/--user_timeout/--user_retries also govern an endpoint judge."""
    policies: list[str] = field(default_factory=lambda: ["tutor"])
    """policies to evaluate: run directories (their checkpoint/policy is used), save_pretrained dirs, hub names,
    or 'tutor' (the embedded reference policy mu)"""
    names: Optional[list[str]] = None
    """a display name per policy (default: the paths)"""
    reference: str = "tutor"
    """the reference policy of the win rates and of the KL (the papers: the initial policy)"""
    judge: Literal["oracle", "preference", "reward_model", "llm"] = "oracle"
    """oracle: the env's own reward; preference: the env's own preference oracle (what MTPO plays); reward_model:
    --judge_model as an HF reward model; llm: --judge_model prompted"""
    judge_model: Optional[str] = None
    """the judge's HF model (or, with --judge_api_base, the endpoint's model name, e.g. gpt-4-0613)"""
    judge_api_base: Optional[str] = None
    """an OpenAI-compatible endpoint for the llm judge (e.g. http://localhost:8000/v1); key from $OPENAI_API_KEY"""
    judge_prompt_path: Optional[str] = None
    """a text file replacing the judge's prompt (with {dialogue_a} and {dialogue_b}; default: the REFUEL paper's
    comparison prompt, or the MTPO paper's teacher-assessment prompt on Education Dialogue data)"""
    judge_max_new_tokens: int = 256
    """the llm judge's reply budget"""
    scripted: list[str] = field(default_factory=list)
    """policies the environment plays by code, evaluated beside --policies and in the matrix (no KL): the tutor's
    'reference' (the scripted teacher mu imitates); with --tutor_judge majority also 'nash' (the panel's exact Nash
    equilibrium) and 'bradley_terry_optimal' (the maximiser of the judge's Bradley-Terry reward)"""
    matrix: bool = False
    """also write the pairwise preference matrix across the policies and the reference (final dialogues)"""
    matrix_policies: Optional[list[str]] = None
    """names (from --names) of the policies in the matrix (default: all); the dialogues already played are reused"""
    num_contexts: int = 1024
    """held-out contexts (each played by every policy and the reference)"""
    seed: int = 1234
    """seed of the contexts, the users and the judge's A/B order"""
    max_turns: int = 5
    """H_max: turns played by each policy"""
    temperature: float = 1.0
    """sampling temperature (also the temperature of the KL's log-probs)"""
    max_new_tokens: int = 12
    """per-turn token budget"""
    gen_batch_size: int = 256
    """max sequences per sampling call"""
    max_tokens_per_batch: Optional[int] = 16384
    """max padded tokens per log-prob forward of the KL estimate (memory)"""
    device: str = "auto"
    """'auto' = cuda when available"""
    bf16: Optional[bool] = None
    """load models in bfloat16 (default: on with CUDA, where an 8B policy in float32 would take 32 GB)"""
    output: Optional[str] = None
    """write the results as JSON here"""


def load_any_policy(path: str, dtype, device):
    p = Path(path)
    if (p / "checkpoint" / "policy").is_dir():
        path = str(p / "checkpoint" / "policy")
    model, tok = load_policy(path, dtype)
    return model.to(device).eval(), tok


def make_judge(args, env, dtype, device):
    """--judge: the environment's own reward (oracle), an HF reward model, or a prompted LLM in-process or at an
    endpoint. The chat world (envs/chat_env.py) is imported only for a judge model."""
    if args.judge == "oracle":
        return ScoreJudge(env.reward)
    if args.judge == "preference":
        return lambda convs_a, convs_b: env.preference(convs_a, convs_b).double().numpy()
    if not args.judge_model:
        raise ValueError(f"--judge {args.judge} needs --judge_model")
    from envs.chat_env import OpenAIChatClient, hf_greedy_generate, judge_prompt, load_reward_model

    if args.judge == "reward_model":
        return ScoreJudge(load_reward_model(args.judge_model, dtype, device, args.reward_trust_remote_code,
                                            args.reward_max_length))
    if args.judge_api_base:
        client = OpenAIChatClient(args.judge_api_base, args.judge_model, max_workers=args.user_max_concurrency,
                                  timeout=args.user_timeout, retries=args.user_retries)
        return LLMJudge(lambda prompts: client.complete(prompts, args.judge_max_new_tokens, temperature=0.0),
                        judge_prompt(env, args.judge_prompt_path))
    jm, jt = load_policy(args.judge_model, dtype)
    return LLMJudge(hf_greedy_generate(jm.to(device).eval(), jt, args.judge_max_new_tokens),
                    judge_prompt(env, args.judge_prompt_path))


def evaluate(args: Args) -> dict:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    bf16 = torch.cuda.is_available() if args.bf16 is None else args.bf16
    dtype = torch.bfloat16 if bf16 else torch.float32
    names = args.names or args.policies
    if len(names) != len(args.policies):
        raise ValueError(f"--names has {len(names)} entries for {len(args.policies)} policies")
    env = make_env_from_args(args, args.max_turns, device, dtype)
    judge = make_judge(args, env, dtype, device)
    scripted = env.scripted_policies()
    unknown = [n for n in args.scripted if n not in scripted]
    if unknown:  # before anything is played
        raise ValueError(f"--scripted {' '.join(unknown)}: env {env.name!r} plays {sorted(scripted) or 'none'}")
    rng = np.random.default_rng(args.seed)
    contexts = env.contexts(args.num_contexts, "eval", rng)
    ref_model, ref_tok = load_any_policy(args.reference, dtype, device)
    play_kw = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                   max_batch_size=args.gen_batch_size)
    torch.manual_seed(args.seed)
    ref_convs = play(ref_model, ref_tok, env, contexts, np.random.default_rng(args.seed + 1), **play_kw)
    v_star = env.optimal_value()  # None where the task has no exact optimum
    rows, all_convs = [], []

    def add_row(name, policy, convs, draw, t0, kl=None, kl_se=None):
        wins = judge_turns(judge, convs, ref_convs, env, np.random.default_rng([args.seed, draw, 100]))
        reward = float(env.reward(convs).mean())
        rows.append(dict(name=name, policy=policy, win_rate=win_rates(wins), reward=reward,
                         fraction_of_v_star=reward / v_star if v_star else None, kl=kl, kl_stderr=kl_se,
                         seconds=time.time() - t0, metrics=env.dialogue_metrics(convs)))
        all_convs.append(convs)

    for name, path in zip(names, args.policies):
        t0 = time.time()
        model, tok = load_any_policy(path, dtype, device)
        draw = zlib.crc32(name.encode())  # a policy's sampling follows its name, not its place in the list
        torch.manual_seed(args.seed + 2 + draw)
        convs = play(model, tok, env, contexts, np.random.default_rng([args.seed, draw, 2]), **play_kw)
        kl = kl_se = None
        if tok.get_vocab() == ref_tok.get_vocab():  # the KL needs a shared token space
            budget = dict(max_tokens_per_batch=args.max_tokens_per_batch)
            kl, kl_se = kl_estimate(dialogue_logprobs(model, tok, convs, env.max_turns, args.temperature, **budget),
                                    dialogue_logprobs(ref_model, ref_tok, convs, env.max_turns, args.temperature,
                                                      **budget))
        add_row(name, path, convs, draw, t0, kl, kl_se)
        del model
    for name in args.scripted:  # played by the environment's code: no token space, no KL
        t0, draw = time.time(), zlib.crc32(name.encode())
        add_row(name, f"scripted {name}", scripted[name](contexts, np.random.default_rng([args.seed, draw, 2])), draw,
                t0)
    names = [*names, *args.scripted]
    ref_reward = float(env.reward(ref_convs).mean())
    out = {"rows": rows, "reference": args.reference, "reference_reward": ref_reward, "judge": args.judge,
           "num_contexts": args.num_contexts, "v_star": v_star, "table": results_table(rows, env.max_turns)}
    if isinstance(judge, LLMJudge):
        out["judge_parse"] = dict(judge.counts)
    if args.matrix:
        keep = [names.index(n) for n in args.matrix_policies] if args.matrix_policies else range(len(names))
        M = preference_matrix([all_convs[i] for i in keep] + [ref_convs], judge, np.random.default_rng(args.seed + 999))
        out["matrix"], out["matrix_names"] = M.tolist(), [*(names[i] for i in keep), f"reference ({args.reference})"]
        out["matrix_table"] = matrix_table(out["matrix_names"], M)
    return out


def main(args: Args) -> dict:
    out = evaluate(args)
    print(f"win rate (%) against {args.reference} per turn h, judge: {args.judge}, {args.num_contexts} contexts; "
          f"reference reward {out['reference_reward']:.3f}" + (f", V* {out['v_star']:.4f}" if out["v_star"] else ""))
    print(out["table"])
    if "judge_parse" in out:
        print(f"judge replies: {out['judge_parse']}")
    if "matrix_table" in out:
        print("\n" + out["matrix_table"])
    if args.output:
        Path(args.output).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
