"""iterative_ppo.py: Iterative PPO (Jiang, Bhandari, Yang, Munos, Lu, "Aligning LLMs Toward Multi-Turn Conversational
Outcomes Using Iterative PPO", arXiv 2511.21638, 2025), CleanRL-style; its inner solver is single_turn_ppo.py.

Batch-online policy iteration (paper Algorithm 1), per outer iteration i:
  4. deploy pi_i: collect N whole conversations with the user (batched at every turn)        -> `rollout`
  5. Monte Carlo policy evaluation (Observation 2): one example per agent turn,
        ((s_h, y_h), G_h),  G_h = sum_{j>=0} gamma^j r_{h+j},  r = 0 except r_H = r(s_{H+1})   -> `monte_carlo_returns`
     and fit a response-level Q_i(s, y) by regression (MSE): an LM backbone with a scalar head read at the last
     token of the chat-templated s_h + y_h (every turn's from one forward of the conversation), a reward-model-shaped
     network; held-out conversations' MSE picks the epoch (early stopping) and is logged.      -> `fit_q_model`
  6. D_single = the states s_h visited by pi_i, as prompts (the very serialisation pi_i saw)
  7. pi_{i+1} = PPO(D_single, reward model = Q_i): ordinary single-turn token-level PPO (Observation 1), maximising
        E_{y~pi(.|s)} Q_i(s, y) - beta KL(pi(.|s) || pi_i(.|s))          (Theorem 2: the KL anchor is pi_i, not mu)
     D_single is cut into PPO batches, each sampled anew and handed with Q_i and pi_i to the solver, single-turn
     PPO that knows nothing of turns (Observation 1)                                                     -> `ppo`
     one PPO batch: sample, score with Q_i, GAE, epochs of minibatches     -> `single_turn_ppo.py:ppo_step_batch`
     the reward is Q_i(s, y) at the last token                                -> `single_turn_ppo.py:ppo_rewards`
     the KL to pi_i, exact per token, in every minibatch's loss             -> `single_turn_ppo.py:token_kl_entropy`
     GAE with PPO's token-level critic (from Q_0, then kept with its optimizer) -> `single_turn_ppo.py:token_gae`
     whitened advantages, clipped surrogate and value loss -> `single_turn_ppo.py:whiten`, `:ppo_clipped_loss`,
     `:value_loss`. No environment step happens inside PPO: the future turns are compressed into Q_i.
     Then KL(pi_{i+1} || pi_i), entropy per turn, on fresh samples at D_single -> `single_turn_ppo.py:policy_shift`
  9. "until Q_i has converged": with --q_converged_tol, stop when Q_i's V^{pi_i}(s_1) (mean Q_i over held-out
     first turns) moves less than the tolerance between iterations; otherwise run num_iterations.

Runs as `python iterative_ppo.py` (CPU, the embedded tutor task) or `accelerate launch [--config_file configs/...]
iterative_ppo.py --model_name_or_path ... --env chat ...`. The policy goes through accelerate (DDP, DeepSpeed, FSDP2:
plumbing/distributed.py); Q_i and the critic are replicated on every rank and kept in sync by an all-reduce of their gradients.
Run files (metrics, checkpoints) are plumbing/run_io.py's; `--vllm` samples every policy turn (rollouts, PPO, evaluation)
with a vLLM engine (plumbing/vllm_engine.py). With --lora_r only adapters train (plumbing/lora.py) and pi_i is a frozen copy
of the adapters inside the policy's module.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from typing import Literal, Optional

import numpy as np
import torch
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

import simulator as sim
from envs.flags import EnvArgs, make_env_from_args
from envs.loading import load_policy, load_tokenizer, model_load_error
from plumbing import lora, vllm_engine
from plumbing.distributed import (configure_deepspeed, enable_gradient_checkpointing, env_tallies, make_accelerator,
                         outside_zero3_init, ranks_in_sync, reduce_mean, sampling_weights, sync_gradients,
                         without_dropout)
from plumbing.logprob_memory import same_count_across_ranks
from plumbing.run_io import (Logger, RunArgs, forget_lost_iterations, load_checkpoint, make_run_dir, record_evaluation,
                    resume_hint, save_checkpoint)
from single_turn_ppo import policy_shift, ppo_step_batch, token_scores


@dataclass
class Args(EnvArgs, vllm_engine.VLLMArgs, lora.LoraArgs, RunArgs):  # --env, --vllm, --lora_r, --output_dir, ...
    exp_name: str = "iterative_ppo"
    """experiment name, the first part of run_name"""
    run_name: Optional[str] = None
    """runs/<run_name>/ holds metrics, checkpoints and rollouts (default: exp_name__env__seed__time)"""
    resume: bool = False
    """continue runs/<run_name>/checkpoint (needs --run_name)"""
    seed: int = 1
    """random seed (rank r uses seed + r for sampling)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    max_turns: int = 5
    """H: agent turns per collected conversation"""

    # policy and sampling
    model_name_or_path: str = "tutor"
    """initial policy pi_0 ('tutor' = the embedded SFT base policy mu, built on first use)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed on logits / temperature everywhere"""
    max_new_tokens: int = 12
    """per-turn token budget"""
    gen_batch_size: int = 256
    """max sequences per sampling call (memory)"""

    # step 5: Monte Carlo Q-model
    gamma: float = 1.0
    """discount of the Monte Carlo return G_h (Observation 2)"""
    q_model_name_or_path: Optional[str] = None
    """Q's backbone (AutoModelForSequenceClassification, 1 label, the policy's vocabulary); None = the policy's"""
    q_warm_start: bool = True
    """start Q_i from Q_{i-1} (False: a fresh head on the initial backbone every iteration)"""
    q_epochs: int = 2
    """max passes over the fit split (early-stopped on the held-out MSE; on the tutor, 1 left Q too rough to learn)"""
    q_patience: int = 2
    """stop fitting after this many epochs without a held-out improvement; the best epoch's weights are kept"""
    q_heldout_fraction: float = 0.1
    """share of conversations held out to measure Q's error"""
    q_revert: bool = False
    """keep Q_{i-1} when no epoch of the fit beats it on the held-out conversations (the old rule: on the tutor it
    threw away pi_i's data in 13-22 of 50 fits, decided on about 26 conversations); off: the best trained epoch"""
    q_lr: float = 1e-3
    """AdamW lr of Q (and of the token critic)"""
    q_minibatch_size: int = 128
    """Q examples per optimizer step across all ranks"""
    q_minibatch_unit: Literal["turn", "conversation"] = "turn"
    """'conversation': minibatches of whole conversations, each read in one forward ((H + 1) / 2 times fewer tokens
    than a forward per turn; on the tutor 6.3 instead of 9.5 minutes a run, but 4 seeds learned worse: 0.46-0.68)"""
    q_converged_tol: float = 0.0
    """Algorithm 1 line 9: stop once |V_hat(Q_i) - V_hat(Q_{i-1})| < tol (0 = run num_iterations)"""

    # step 7: token-level PPO against Q_i
    kl_coef: float = 0.15
    """beta of the KL penalty to pi_i, in Q's units (Theorem 2: maximise Q_i - beta KL); the loss weighs the KL
    beta / (the advantages' spread), as it reads whitened advantages. 0.15 keeps the tutor's KL strength of the
    former default (1.0 on whitened advantages: beta = 1.0 x spread, 0.13-0.18 after the first iteration)"""
    kl_penalty: Literal["loss", "reward"] = "loss"
    """'loss': beta x the exact per-token KL(pi_theta || pi_i) in every minibatch's loss (acts from the first step);
    'reward': -beta (ln pi_old - ln pi_i) per token at sampling (zero in the first PPO batch, where pi_old = pi_i)"""
    d_single_size: Optional[int] = None
    """prompts of D_single per outer iteration across all ranks: a uniform sample, without replacement, of the
    states pi_i visited (about H per conversation); None = prompts_per_iteration, 0 = every state (on several ranks:
    as many per rank as the rank that visited fewest)"""
    ppo_batches: int = 2
    """D_single is shuffled and cut into this many PPO batches; each is sampled anew from the current policy"""
    ppo_epochs: int = 2
    """PPO epochs over each batch of sampled responses"""
    ppo_minibatch_size: int = 128
    """responses per optimizer step across all ranks"""
    cliprange: float = 0.2
    """PPO ratio clip epsilon"""
    cliprange_value: float = 0.2
    """clip of the critic's value change"""
    target_kl: float = 0.02
    """stop a PPO batch's epochs once the mean per-token approx KL to the sampling policy exceeds this (0 = off)"""
    lam: float = 0.95
    """GAE lambda over tokens"""
    ppo_gamma: float = 1.0
    """GAE discount over tokens (1 = the single-turn RLHF convention)"""
    reset_critic: bool = False
    """re-initialise the token critic from Q_i (fresh AdamW) every outer iteration; default: from Q_0, then kept"""
    whiten_rewards: bool = False
    """also whiten the token rewards before GAE (advantages are always whitened)"""
    lr: Optional[float] = None
    """AdamW lr of the policy; None = 3e-4 for the tutor's tiny model, 1e-6 for a pretrained chat model
    (docs/implementation_notes.md#learning-rates-for-real-models)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    adam_eps: float = 1e-8
    """AdamW's epsilon (its floor on the per-element step size: raise it with tiny gradients, lower it for bf16-scale
    updates of large models)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping (policy, Q and critic)"""
    gradient_checkpointing: bool = False
    """trade compute for memory on large models (policy, Q model and critic)"""
    bf16: Optional[bool] = None
    """bf16 mixed precision for the policy (default: on when CUDA is available)"""

    # loop
    num_iterations: int = 30
    """outer iterations i (policy-iteration steps)"""
    prompts_per_iteration: int = 256
    """conversations collected per outer iteration across all ranks"""
    time_budget_minutes: float = 10.0
    """stop after the outer iteration that passes this wall time; 0 = no limit"""
    eval_every: int = 1
    """evaluate with the real user every N outer iterations (and at the start and the end)"""
    num_eval: int = 512
    """held-out contexts per evaluation (each played for max_turns turns)"""
    save_every: int = 5
    """atomic checkpoint every N outer iterations (and at the end)"""
    save_rollouts: Optional[str] = None
    """append every PPO sample (prompt, response, Q score, old and reference log-probs) to this JSONL file"""

    # derived after parsing
    world_size: int = 0
    """number of processes (computed at runtime)"""
    local_prompts: int = 0
    """conversations per rank per outer iteration (computed at runtime)"""
    local_d_single: int = 0
    """prompts of D_single per rank per outer iteration, 0 = every state (computed at runtime)"""


# ----------------------------------------------------------------------------------------------------------------
# Steps 4-5: rollouts and Monte Carlo returns
# ----------------------------------------------------------------------------------------------------------------
def rollout(policy, tokenizer, env, contexts, rng, args, engine=None):
    """Algorithm 1 line 4: whole conversations of pi_i with the user, batched at every turn (H_max turns, or a
    record's own number: setting two's pre-sampled questions); and their rewards."""
    if not contexts:
        raise ValueError("rollout: no contexts")
    convs, _ = sim.continue_dialogues(policy, tokenizer, env, [c.messages for c in contexts],
                                      [c.user for c in contexts], [c.max_turns or env.max_turns for c in contexts],
                                      rng, args.max_new_tokens, args.temperature, args.gen_batch_size, engine=engine)
    rewards = env.reward(convs)
    if not torch.isfinite(rewards).all():
        raise FloatingPointError("the reward is NaN or infinite for some conversations")
    return convs, rewards


def monte_carlo_returns(turn_rewards, gamma: float = 1.0) -> list:
    """Observation 2: G_h = sum_{j>=0} gamma^j r_{h+j} for every turn of every trajectory (lengths may differ)."""
    out = []
    for rs in turn_rewards:
        g, gs = 0.0, []
        for r in reversed([float(r) for r in rs]):
            if not math.isfinite(r):
                raise FloatingPointError(f"non-finite reward {r} in a trajectory")
            g = r + gamma * g
            gs.append(g)
        out.append(gs[::-1])
    return out


def sample_d_single(examples, size: int, rng) -> list:
    """Algorithm 1 line 6: the states s_h pi_i visited (one per Q example); `size` of them drawn uniformly without
    replacement (0 = all): a sample of pi_i's state distribution at a PPO cost set by a flag, not by H."""
    if not size or size >= len(examples):
        return list(examples)
    return [examples[k] for k in sorted(rng.choice(len(examples), size, replace=False))]


def q_examples(convs, rewards, gamma: float) -> list:
    """D^pi: ((s_h, y_h), G_h) per agent turn; the conversation reward is the last turn's reward, the others are 0."""
    turn_rewards = [[0.0] * (sim.assistant_turns(c) - 1) + [float(r)] for c, r in zip(convs, rewards)]
    examples = []
    for g, (c, gs) in enumerate(zip(convs, monte_carlo_returns(turn_rewards, gamma))):
        for h, G in enumerate(gs, 1):
            i = sim.assistant_turn_index(c, h)
            examples.append(dict(messages=c[:i + 1], h=h, group=g, G=G))  # Q's input: s_h + y_h, chat-templated
    if not examples:
        raise ValueError("no Q examples: the conversations have no agent turns")
    return examples


# ----------------------------------------------------------------------------------------------------------------
# Step 5: the response-level Q-model (and the token-level critic that shares its architecture)
# ----------------------------------------------------------------------------------------------------------------
def build_q_model(name_or_path: str, tokenizer):
    """An LM backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1)."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point
    try:
        q_tok = None if name_or_path == tokenizer.name_or_path else load_tokenizer(name_or_path)  # the policy's own
        q = AutoModelForSequenceClassification.from_pretrained(name_or_path, num_labels=1, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise model_load_error("Q model", name_or_path, e) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if q_tok is not None and q_tok is not tokenizer and q_tok.get_vocab() != tokenizer.get_vocab():
        raise ValueError(f"Q model {name_or_path} must share the policy's vocabulary (its input is tokenized "
                         f"with the policy's chat template)")
    q.config.pad_token_id = tokenizer.pad_token_id
    return q


def q_forward(q_model, tokenizer, messages_list, rows=None, ends=None) -> torch.Tensor:
    """Q(s, y) of each (s + y) message list (or of its chat-templated ids, `rows`): the scalar head at the response's
    last token; with `ends` (positions per row), at each of them, concatenated (`conversation_rows`). Differentiable."""
    rows = rows or [sim.conversation_ids(tokenizer, m).ids for m in messages_list]
    ends = ends or [[len(r) - 1] for r in rows]
    device = next(q_model.parameters()).device
    ids = torch.full((len(rows), max(len(r) for r in rows)), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):  # right-padded
        ids[b, :len(r)], attn[b, :len(r)] = torch.tensor(r), 1
    row = torch.tensor([b for b, e in enumerate(ends) for _ in e], device=device)
    pos = torch.tensor([p for e in ends for p in e], device=device)
    return token_scores(q_model, ids.to(device), attn.to(device))[row, pos]


def conversation_rows(groups) -> tuple[list, list]:
    """(ids, turn-end positions) of each conversation's turn examples (their "ids": s_h + y_h, chat-templated): a
    causal backbone's value at y_h's last token does not see what follows, so one forward of the whole conversation
    reads every turn's Q(s_h, y_h), (H + 1) / 2 times fewer tokens than a forward per prefix (3x at the tutor's H 5)."""
    rows, ends = [], []
    for group in groups:
        full = max((e["ids"] for e in group), key=len)
        if any(full[:len(e["ids"])] != e["ids"] for e in group):
            raise sim.ChatTemplateError("the chat template is not prefix-consistent: a conversation's tokens do not "
                                        "start with those of its turn prefixes (Q reads every turn in one forward)")
        rows.append(full)
        ends.append([len(e["ids"]) - 1 for e in group])
    return rows, ends


@torch.no_grad()
def q_predict(q_model, tokenizer, messages_list, batch_size: int = 256, rows=None, ends=None) -> torch.Tensor:
    """Q without grad, batch_size rows at a time (with `ends`: Q at every listed position of each row)."""
    n = len(rows or messages_list)
    if not n:
        raise ValueError("q_predict: empty input")
    was_training = q_model.training
    q_model.eval()
    part = lambda x, s: x[s:s + batch_size] if x else None
    out = torch.cat([q_forward(q_model, tokenizer, part(messages_list, s), part(rows, s), part(ends, s)).cpu()
                     for s in range(0, n, batch_size)])
    q_model.train(was_training)
    if not torch.isfinite(out).all():
        raise FloatingPointError("the Q-model returned NaN or infinite values")
    return out


def split_heldout(examples, fraction: float, rng):
    """Hold out whole conversations (no turn of a held-out conversation is fitted): (fit, held), each a list of
    conversations, each the list of its turn examples in turn order."""
    groups = {}
    for e in examples:
        groups.setdefault(e["group"], []).append(e)
    k = min(len(groups) - 1, max(1, round(fraction * len(groups)))) if fraction > 0 and len(groups) > 1 else 0
    held = set(rng.permutation(sorted(groups))[:k].tolist())
    return [groups[g] for g in sorted(groups) if g not in held], [groups[g] for g in sorted(groups) if g in held]


def fit_q_model(q_model, tokenizer, examples, rng, epochs=6, lr=1e-3, minibatch_size=128, heldout_fraction=0.1,
                patience=2, max_grad_norm=1.0, accelerator=None, weight_decay=0.0, optimizer=None,
                minibatch_unit: str = "turn", revert: bool = False) -> dict:
    """Step 5: regress Q(s_h, y_h) onto G_h (MSE), early-stopped on the held-out MSE, keeping the best trained
    epoch: Q_i has always seen pi_i's data. q/worse_than_before = 1 when no epoch beat the starting weights on the
    held-out conversations; with revert=True (the old rule) Q then comes out unchanged, Q_i = Q_{i-1}
    (q/reverted = 1). q/heldout_mse is the kept epoch's, chosen on those same conversations (optimistic);
    q/heldout_mse_last is the last epoch's."""
    if not examples:
        raise ValueError("fit_q_model: no examples")
    if not all(math.isfinite(e["G"]) for e in examples):
        raise FloatingPointError("fit_q_model: non-finite Monte Carlo return")
    for e in examples:  # tokenize once per fit, not once per epoch
        e.setdefault("ids", sim.conversation_ids(tokenizer, e["messages"]).ids)
    fit, held = split_heldout(examples, heldout_fraction, rng)  # conversations (held-out: read in one forward each)
    n_fit, (held_rows, held_ends) = sum(map(len, fit)), conversation_rows(held)
    device, ranks = next(q_model.parameters()).device, accelerator.num_processes if accelerator is not None else 1
    mean_over_ranks = lambda x: accelerator.reduce(torch.tensor(x, device=device), "mean").item() if ranks > 1 else x
    units = fit if minibatch_unit == "conversation" else [[e] for conv in fit for e in conv]  # each: one forward
    # about minibatch_size turns a minibatch, as many minibatches on every rank (one gradient all-reduce each)
    n_batches = same_count_across_ranks(min(len(units), math.ceil(n_fit / minibatch_size)), device)
    cpu_copy = lambda: {k: v.detach().to("cpu", copy=True) for k, v in q_model.state_dict().items()}
    heldout_mse = lambda: float("nan") if not held else mean_over_ranks(float(((q_predict(q_model, tokenizer, None,
        rows=held_rows, ends=held_ends) - torch.tensor([e["G"] for conv in held for e in conv])) ** 2).mean()))
    trained = [p for p in q_model.parameters() if p.requires_grad]
    opt = optimizer or torch.optim.AdamW(trained, lr, weight_decay=weight_decay)
    q_model.train()
    before = heldout_mse()
    best = before if revert else float("inf")  # the pre-fit weights compete only under the old rule
    best_state, epochs_without_gain, train_mse, epochs_run, steps = cpu_copy(), 0, float("nan"), 0, 0
    mse = before
    for epoch in range(epochs):
        losses = []
        for chunk in np.array_split(rng.permutation(len(units)), n_batches):
            batch = [units[u] for u in chunk]
            opt.zero_grad()
            if batch:  # (empty only where another rank holds more examples: a zero gradient from this one)
                pred = q_forward(q_model, tokenizer, None, *conversation_rows(batch))
                loss = ((pred - torch.tensor([e["G"] for conv in batch for e in conv], device=device)) ** 2).mean()
                if not torch.isfinite(loss):  # ^ "standard regression"
                    raise FloatingPointError("fit_q_model: the Q loss is NaN or infinite")
                loss.backward()
                losses.append(loss.item())
            sync_gradients(q_model, accelerator)
            torch.nn.utils.clip_grad_norm_(q_model.parameters(), max_grad_norm)
            opt.step()
            steps += 1
        train_mse, epochs_run = mean_over_ranks(float(np.mean(losses))), epoch + 1
        if not held:
            continue
        mse = heldout_mse()
        if mse < best:  # the held-out error is the "Q has converged" signal of the fit
            best, epochs_without_gain, best_state = mse, 0, cpu_copy()
        else:
            epochs_without_gain += 1
            if epochs_without_gain >= patience:
                break
    if held:
        q_model.load_state_dict(best_state)
    q_model.eval()
    first = [conv[0] for conv in held or fit]  # each conversation's first turn: V_hat(s_1)
    v_hat = mean_over_ranks(float(q_predict(q_model, tokenizer, [e["messages"] for e in first]).mean()))
    v_mc = mean_over_ranks(float(np.mean([e["G"] for e in first])))
    return {"q/heldout_mse_before": before, "q/heldout_mse": best if held else float("nan"), "q/train_mse": train_mse, "q/epochs": epochs_run,
            "q/v_hat": v_hat, "q/v_monte_carlo": v_mc, "q/examples": n_fit, "q/heldout_examples": sum(map(len, held)),
            "q/heldout_mse_last": mse, "q/worse_than_before": float(bool(held) and best >= before),
            "q/reverted": float(bool(held) and revert and best >= before), "q/optimizer_steps": steps}


# ----------------------------------------------------------------------------------------------------------------
# Step 7: single-turn token-level PPO (single_turn_ppo.py) with Q_i as the reward model and pi_i as the KL anchor
# ----------------------------------------------------------------------------------------------------------------
def ppo(policy, ref_policy, q_model, critic, critic_opt, tokenizer, prompts, optimizer, accelerator, rng, args,
        iteration: int, engine=None):
    """Algorithm 1 line 7: single_turn_ppo.ppo_step_batch with Q_i as the reward model and pi_i as the reference, on
    D_single cut into --ppo_batches batches, each sampled anew (samples appended to --save_rollouts). Returns the
    batches' mean statistics (and the first batch's KL to pi_i) and the optimizer steps (the same on every rank)."""
    q_i = lambda prompts, texts: q_predict(q_model, tokenizer, [p + [{"role": "assistant", "content": t}]
                                                               for p, t in zip(prompts, texts)])  # Q_i(s, y)
    rows, batch_stats = [], []
    for b, chunk in enumerate(np.array_split(rng.permutation(len(prompts)), args.ppo_batches)):
        batch_rows = [] if args.save_rollouts else None
        batch_stats.append(ppo_step_batch(policy, ref_policy, q_i, critic, critic_opt, tokenizer, [prompts[k] for k in
                                          chunk], optimizer, accelerator, rng, args, batch_rows, engine))
        rows += [{**row, "ppo_batch": b} for row in batch_rows or []]
    if args.save_rollouts:
        rows_per_rank = gather_object([rows]) if accelerator.num_processes > 1 else [rows]
        if accelerator.is_main_process:
            with open(args.save_rollouts, "a") as f:
                f.writelines(json.dumps({"iteration": iteration, "rank": r, **row}) + "\n"
                             for r, rank_rows in enumerate(rows_per_rank) for row in rank_rows)
    steps = sum(s.pop("charts/optimizer_steps") for s in batch_stats)
    means = {k: float(np.mean([s[k] for s in batch_stats])) for k in batch_stats[0]}
    return {**means, **{f"{k}_first_batch": batch_stats[0][k] for k in ("ppo/kl_to_pi_i", "ppo/kl_term")}}, steps


# ----------------------------------------------------------------------------------------------------------------
# The run: flags, setup, evaluation, resume, finish, and the outer loop (launch plumbing: plumbing/distributed.py, plumbing/run_io.py)
# ----------------------------------------------------------------------------------------------------------------
CONSOLE_METRICS = ("charts/rollout_reward", "q/heldout_mse_before", "q/heldout_mse", "q/epochs", "q/worse_than_before",
                   "q/v_hat", "ppo/q_score", "ppo/kl_new_to_pi_i", "charts/entropy", "charts/optimizer_steps",
                   "losses/clipfrac", "eval/mean_reward", "eval/ask_rate", "charts/elapsed_min")  # metrics.jsonl: all


def check_args(args: Args) -> None:
    """Every flag in its range, named in the error (a bad value would fail deep inside a run, or train on nothing)."""
    if args.lr is None:  # the tutor's 3e-4 moved a pretrained model's log-ratios by 17 nats in one iteration
        args.lr = 3e-4 if args.model_name_or_path == "tutor" else 1e-6
    positive = ("temperature max_new_tokens gen_batch_size max_turns num_iterations prompts_per_iteration q_epochs "
                "q_minibatch_size ppo_batches ppo_epochs ppo_minibatch_size cliprange cliprange_value eval_every "
                "num_eval save_every reward_max_length max_dialogue_tokens user_max_concurrency user_timeout "
                "user_retries adam_eps").split()
    non_negative = ("q_patience q_lr q_converged_tol kl_coef target_kl lr weight_decay max_grad_norm "
                    "time_budget_minutes threads").split()
    bad = [f"--{k} must be > 0" for k in positive if getattr(args, k) is not None and not getattr(args, k) > 0]
    bad += [f"--{k} must be >= 0" for k in non_negative if not getattr(args, k) >= 0]
    bad += [f"--{k} must lie in [0, 1]" for k in ("gamma", "lam", "ppo_gamma") if not 0 <= getattr(args, k) <= 1]
    bad += ["--q_heldout_fraction must lie in (0, 1)"] * (not 0 < args.q_heldout_fraction < 1)
    bad += ["--d_single_size must lie in [0, prompts_per_iteration]"] * (
        args.d_single_size is not None and not 0 <= args.d_single_size <= args.prompts_per_iteration)
    bad += ["--adam_betas must lie in [0, 1)"] * (not all(0 <= b < 1 for b in args.adam_betas))
    bad += lora.check_lora_args(args)
    if bad:
        raise ValueError("invalid flags: " + "; ".join(bad))


def prepare_for_training(models, args):
    """--gradient_checkpointing (policy, Q model, critic), and training mode with dropout off."""
    for model in models:
        if args.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        without_dropout(model)


def setup(args: Args):
    """Processes, derived sizes, the run directory, seeds, the environment, the models, prepared for the launch."""
    check_args(args)
    accelerator = make_accelerator(args.bf16)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.world_size = W = accelerator.num_processes
    if any(n % W for n in (args.prompts_per_iteration, args.ppo_minibatch_size, args.q_minibatch_size,
                           args.d_single_size or 0)):  # then every rank has as many PPO prompts and minibatches
        raise ValueError("prompts_per_iteration, ppo_minibatch_size, q_minibatch_size and d_single_size must be "
                         "divisible by the number of processes")
    args.local_prompts = args.prompts_per_iteration // W
    args.local_d_single = (args.prompts_per_iteration if args.d_single_size is None else args.d_single_size) // W
    if args.local_prompts < 2:
        raise ValueError("need at least 2 conversations per rank per iteration")
    run_dir = make_run_dir(args, accelerator)
    set_seed(args.seed)  # the same fresh Q head on every rank
    rng = np.random.default_rng(args.seed + accelerator.process_index)
    tutor = args.model_name_or_path == "tutor"  # built by SFT on first use: rank 0 builds it, outside zero.Init
    with accelerator.main_process_first(), (outside_zero3_init(accelerator) if tutor else contextlib.nullcontext()):
        policy, tokenizer = load_policy(args.model_name_or_path, torch.bfloat16 if args.lora_r and
                                        accelerator.mixed_precision == "bf16" else torch.float32)  # LoRA: frozen
    if args.lora_r:  # only the adapters train
        policy = lora.add_adapters(policy, args, args.model_name_or_path, accelerator)
    q_path = args.q_model_name_or_path or policy.name_or_path  # the policy's folder (the tutor's: where mu is cached)
    # Q_i, the critic, pi_i: full replicas outside prepare(), zero.Init (Q, critic all-reduce their own gradients)
    with outside_zero3_init(accelerator):
        env = make_env_from_args(args, args.max_turns, str(accelerator.device), torch.bfloat16
                                     if accelerator.mixed_precision == "bf16" else torch.float32, tokenizer)
        q_model = build_q_model(q_path, tokenizer).to(accelerator.device)
        critic = build_q_model(q_path, tokenizer).to(accelerator.device)
        if args.lora_r:  # pi_i: the policy's base weights with a copy of its adapters, taken per i
            ref_policy = lora.AdapterSnapshot(policy)
        else:  # pi_i, a frozen copy, reloaded from the policy per i
            ref_policy = load_policy(args.model_name_or_path)[0].to(accelerator.device).eval().requires_grad_(False)
    prepare_for_training([policy, q_model, critic], args)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], args.lr, args.adam_betas,
                                  args.adam_eps, weight_decay=args.weight_decay)
    configure_deepspeed(accelerator, max(1, args.ppo_minibatch_size // W), 1, args.max_grad_norm)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    set_seed(args.seed + accelerator.process_index)  # per-rank sampling randomness
    engine = vllm_engine.make_engine(policy, accelerator, args)  # None without --vllm
    return accelerator, run_dir, rng, env, tokenizer, policy, optimizer, ref_policy, q_model, critic, engine


def evaluate(model, tokenizer, env, accelerator, args, seed, engine=None):
    """Mean reward with the real user (and per-turn detail on the tutor) on held-out contexts; ranks share it."""
    with sampling_weights(model, accelerator, engine=engine) as policy:
        out = sim.evaluate_policy(policy, tokenizer, env, max(1, args.num_eval // accelerator.num_processes),
                                  seed + 7919 * accelerator.process_index, args.max_new_tokens, args.temperature,
                                  args.gen_batch_size, engine)
    stderr = out.pop("eval/reward_stderr") / math.sqrt(accelerator.num_processes)
    metrics = {**reduce_mean(accelerator, out), "eval/reward_stderr": stderr}
    if env.optimal_value() is not None:  # V*, where the task knows it exactly
        metrics["eval/fraction_of_v_star"] = metrics["eval/mean_reward"] / env.optimal_value()
    return metrics


def resume(accelerator, run_dir, rng, env, args, q_model, q_opt, critic, critic_opt) -> dict:
    """run_io.load_checkpoint (policy, optimizer, RNGs), then from its q_model.pt Q_i and its optimizer, and the
    token critic and its optimizer where saved (meta["critic_restored"]); what the stopped run wrote after that
    checkpoint is dropped (it is done again), and its environment tallies carried on."""
    meta, ckpt_dir = load_checkpoint(accelerator, run_dir, rng)
    forget_lost_iterations(accelerator, run_dir, meta, args.save_rollouts)
    if accelerator.is_main_process:  # the sum over ranks is then the whole run's
        env.counts().update(meta.get("env_counts", {}))
    path = ckpt_dir / "q_model.pt"  # written by save_checkpoint's `extra` in main
    q_state = torch.load(path, map_location=accelerator.device) if path.exists() else {}
    for key, obj in (("model", q_model), ("opt", q_opt), ("critic", critic), ("critic_opt", critic_opt)):
        if key in q_state:
            obj.load_state_dict(q_state[key])
    meta["critic_restored"] = "critic" in q_state
    return meta


def finish(accelerator, policy, tokenizer, replicas, env, run_dir, logger, initial_reward: float, final_eval: dict,
           iterations: int, minutes: float, totals: dict, args) -> dict:
    """summary.json (ranks_in_sync: the policy, Q_i and the critic), with --merge_on_save the merged LoRA policy,
    and the closing line; ranks end together."""
    if args.merge_on_save:  # runs/<run>/merged: a plain HF model of the final policy
        lora.write_merged(accelerator, policy, tokenizer, run_dir)
    summary = {"initial_reward": initial_reward, "final_reward": final_eval["eval/mean_reward"],
               "final_stderr": final_eval["eval/reward_stderr"], "iterations": iterations, "minutes": minutes,
               "run_dir": str(run_dir), "num_processes": accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type).split(".")[-1],
               "ranks_in_sync": ranks_in_sync(policy, accelerator, *replicas),
               "optimizer_steps": totals["charts/optimizer_steps_total"], "q_reverted": totals["q/reverted_total"]}
    logger.close()
    if accelerator.is_main_process:
        v_star = f", V* = {env.optimal_value():.3f}" if env.optimal_value() is not None else ""
        print(f"mean reward: start of run {summary['initial_reward']:.3f} -> Iterative PPO "
              f"{summary['final_reward']:.3f} +- {summary['final_stderr']:.3f} after {iterations} outer iterations, "
              f"{minutes:.1f} min{v_star}")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()  # not one rank leaving while another still writes
    accelerator.end_training()
    return summary


def main(args: Args) -> dict:
    accelerator, run_dir, rng, env, tokenizer, policy, optimizer, ref_policy, q_model, critic, engine = setup(args)
    W = args.world_size
    # --no-q_warm_start refits every Q_i from Q_0's weights: a full copy (32 GB at 8B), kept on the CPU
    q_initial = None if args.q_warm_start else {k: v.to("cpu", copy=True) for k, v in q_model.state_dict().items()}
    adamw = lambda model: torch.optim.AdamW(model.parameters(), lr=args.q_lr, weight_decay=0.0)  # Q_i's, critic's
    q_opt, critic_opt = adamw(q_model), adamw(critic)  # both kept across outer iterations
    meta = resume(accelerator, run_dir, rng, env, args, q_model, q_opt, critic, critic_opt) if args.resume else {}
    start_iter, v_prev = meta.get("iteration", 0), meta.get("v_hat")
    critic_ready = meta.get("critic_restored", False)  # else initialised from the first Q_i fitted
    totals = {"charts/optimizer_steps_total": 0, "q/reverted_total": 0, **meta.get("totals", {})}
    # shared by all ranks: same held-out split sizes and stopping epochs
    fit_rng = np.random.default_rng(args.seed + 7 * start_iter if args.resume else args.seed)
    logger, eval_seed = Logger(run_dir, args, accelerator.is_main_process), 10_000 + args.seed
    latest_eval = meta.get("evaluation")  # a resumed checkpoint's evaluation, already logged
    if latest_eval is None:
        latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
        logger.log(start_iter, {**latest_eval, "charts/elapsed_min": meta.get("elapsed", 0.0) / 60})
    initial_reward = meta.get("initial_reward", latest_eval["eval/mean_reward"])  # pi_0's, kept across --resume
    start, done = time.time() - meta.get("elapsed", 0.0), start_iter
    for it in tqdm(range(start_iter, args.num_iterations), disable=not accelerator.is_main_process,
                   desc="iterative_ppo"):
        t0 = time.time()
        # line 4: deploy pi_i and collect conversations with the user
        contexts = env.contexts(args.local_prompts, "train", rng)
        with sampling_weights(policy, accelerator, engine=engine) as pi_i:
            convs, rewards = rollout(pi_i, tokenizer, env, contexts, rng, args, engine)
        t_collect = time.time() - t0
        # line 5: Monte Carlo policy evaluation, Q_i by regression on G_h
        examples = q_examples(convs, rewards, args.gamma)
        if q_initial is not None:
            q_model.load_state_dict(q_initial)
            q_opt = adamw(q_model)
        q_stats = fit_q_model(q_model, tokenizer, examples, fit_rng, args.q_epochs, args.q_lr,
                              args.q_minibatch_size // W, args.q_heldout_fraction, args.q_patience,
                              args.max_grad_norm, accelerator, optimizer=q_opt, minibatch_unit=args.q_minibatch_unit,
                              revert=args.q_revert)
        t_q = time.time() - t0 - t_collect
        # line 6: D_single = the states visited by pi_i, as pi_i's prompts
        # --d_single_size 0: every visited state, as many on each rank as the rank that visited fewest has (records
        # of different lengths): the same PPO minibatches everywhere, else the gradient all-reduces would not pair up
        single = sample_d_single(examples, args.local_d_single or same_count_across_ranks(
            len(examples), accelerator.device, fewest=True), rng)
        prompts = [e["messages"][:-1] for e in single]
        # line 7: PPO(D_single, RewardModel = Q_i) with the KL anchor pi_i and the token critic (from Q_0, then kept)
        if args.lora_r:  # a copy of the adapters alone
            ref_policy.take()
        else:
            with sampling_weights(policy, accelerator) as pi_i:  # full weights on every rank, ZeRO-3 included
                ref_policy.load_state_dict(pi_i.state_dict())
        if args.reset_critic or not critic_ready:  # else the critic (and its AdamW state) carries over from i - 1
            critic.load_state_dict(q_model.state_dict())
            critic_opt, critic_ready = adamw(critic), True
        critic.train()
        ppo_stats, steps = ppo(policy, ref_policy, q_model, critic, critic_opt, tokenizer, prompts, optimizer,
                               accelerator, rng, args, it, engine)
        # KL(pi_{i+1} || pi_i) and pi_{i+1}'s entropy per turn, on fresh samples at the states of D_single
        shift = policy_shift(policy, ref_policy, tokenizer, prompts, [e["h"] for e in single], accelerator, args,
                             engine)
        totals["charts/optimizer_steps_total"] += steps
        totals["q/reverted_total"] += int(q_stats["q/reverted"])
        totals["q/worse_than_before_total"] = totals.get("q/worse_than_before_total", 0) + \
            int(q_stats["q/worse_than_before"])
        done, env_counts = it + 1, env_tallies(accelerator, env)  # user/judge/reward tallies over all ranks
        dt = time.time() - t0
        metrics = {**reduce_mean(accelerator, {"charts/rollout_reward": rewards.mean(), **ppo_stats}), **q_stats,
                   **shift, "charts/optimizer_steps": steps, **totals, "charts/outer_iterations_per_sec": 1 / dt,
                   "charts/conversations_per_sec": args.prompts_per_iteration / dt,
                   "charts/ppo_samples_per_sec": len(prompts) * W / max(1e-9, dt - t_collect - t_q),
                   "charts/collect_share": t_collect / dt, "charts/q_fit_share": t_q / dt,
                   "charts/elapsed_min": (time.time() - start) / 60, **env.charts(env_counts),
                   **{f"charts/vllm_{k}": v for k, v in (engine.timings if engine else {}).items()}}
        out_of_time = args.time_budget_minutes and time.time() - start > 60 * args.time_budget_minutes
        converged = bool(args.q_converged_tol and v_prev is not None and
                         abs(q_stats["q/v_hat"] - v_prev) < args.q_converged_tol)  # line 9
        v_prev = q_stats["q/v_hat"]
        last = it == args.num_iterations - 1 or out_of_time or converged
        logger.log(it + 1, metrics, echo=False)
        if (it + 1) % args.save_every == 0 or last:  # before the evaluation: a failing endpoint loses no iteration
            save_checkpoint(accelerator, policy, tokenizer, run_dir,
                            dict(iteration=it + 1, elapsed=time.time() - start, v_hat=v_prev, totals=totals,
                                 initial_reward=initial_reward, env_counts=env_counts), rng,
                            extra={"q_model.pt": dict(model=q_model.state_dict(), opt=q_opt.state_dict(),
                                                      critic=critic.state_dict(), critic_opt=critic_opt.state_dict())})
        if (it + 1) % args.eval_every == 0 or last:
            latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)  # real user, not Q
            metrics.update(latest_eval)
            logger.log(it + 1, {**latest_eval, "charts/elapsed_min": (time.time() - start) / 60}, echo=False)
            record_evaluation(accelerator, run_dir, it + 1, latest_eval, env_tallies(accelerator, env))
        if accelerator.is_main_process:
            tqdm.write(f"[{it + 1:4d}] " + "  ".join(f"{k.split('/')[-1]}={metrics[k]:.4g}"
                                                     for k in CONSOLE_METRICS if k in metrics))
        if out_of_time or converged:
            break
    return finish(accelerator, policy, tokenizer, (q_model, critic), env, run_dir, logger, initial_reward, latest_eval,
                  done, (time.time() - start) / 60, totals, args)


if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args)
    with resume_hint(cli_args):  # an endpoint that stays down: the error names the checkpoint and the --resume command
        main(cli_args)
