"""baselines_dpo_rebel.py: the single-turn and multi-turn baselines of the REFUEL paper (Gao et al., ICLR 2025,
Section 4.1): DPO (Rafailov et al., 2023) and REBEL (Gao et al., 2024), each with four data schemes.

Where the state comes from, which turn is trained, and whether the replies are rolled out
(`collect_pairs`: `turns_of`, `states`, `replies`):
  LT-OFFLINE  s_H, y_H, y'_H all from the offline dataset D_off; reward on the two one-turn completions.
  LT-MIXED    s_H from D_off; y_H, y'_H ~ pi_t; reward on the two one-turn completions.
  LT-ONLINE   s_H rolled in on-policy with pi_t and the user; y_H, y'_H ~ pi_t; one-turn completions.
  MT-MIXED    h ~ U{1..H}, s_h from D_off; y_h, y'_h ~ pi_t, each rolled out to H with pi_t and the user.
(REFUEL = on-policy roll-in + every turn + rollouts to H; see refuel.py.) H ~ U{1..H_max} everywhere, so "last turn"
means the last turn of a conversation of H turns: LT-* methods optimise each turn for its immediate reward only.

Losses, over the pairs of one iteration (`pair_loss` picks one; `train_on_pairs` takes epochs of minibatches):
  DPO    -log sigmoid( beta [ ln pi(y_w)/pi_ref(y_w) - ln pi(y_l)/pi_ref(y_l) ] ), y_w the higher-reward reply
         (ties dropped), pi_ref the frozen initial policy.                                   -> `dpo_loss`
  REBEL  ( (1/eta) [ ln pi(y)/pi_t(y) - ln pi(y')/pi_t(y') ] - (r - r') )^2, REFUEL's Eq. (1) on one turn.
                                                                                             -> `rebel_loss`
The pairs' rewards may carry REFUEL's Eq. (11) KL shaping (REBEL) and the length penalty Gamma (`training_rewards`).
On the tutor task D_off is the simulator's fixed set of scripted-reference dialogues, and LT-OFFLINE's second reply
is the reference teacher resampled at s_H; on `--env chat` it is `--offline_path` (chosen/rejected pairs).
The launch plumbing (accelerator, ZeRO-3, FSDP2, vLLM weight sync) is plumbing/distributed.py's, the run's files (metrics,
TensorBoard, W&B, checkpoints) plumbing/run_io.py's; `setup`, `resume` and `finish` put them together. With --lora_r
only adapters train (plumbing/lora.py) and pi_ref = pi_0 is the policy's own weights with the adapters off.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import simulator as sim
from envs.flags import EnvArgs, make_env_from_args
from envs.loading import load_policy
from plumbing import lora, vllm_engine
from plumbing.distributed import (configure_deepspeed, enable_gradient_checkpointing, env_tallies, make_accelerator,
                                  outside_zero3_init, ranks_in_sync, reduce_mean, sampling_weights, without_dropout)
from plumbing.run_io import (Logger, RunArgs, forget_lost_iterations, load_checkpoint, make_run_dir, record_evaluation,
                             resume_hint, save_checkpoint)


@dataclass
class Args(EnvArgs, vllm_engine.VLLMArgs, lora.LoraArgs, RunArgs):
    """DPO's and REBEL's flags; the environment's (--env, --prompts_path, --user_model, --reward_model, ...) come
    from envs/flags.EnvArgs, the rollout engine's (--vllm, ...) from vllm_engine.VLLMArgs, LoRA's (--lora_r, ...)
    from plumbing/lora.LoraArgs."""
    loss: Literal["dpo", "rebel"] = "rebel"
    """the pairwise loss"""
    mode: Literal["lt-offline", "lt-mixed", "lt-online", "mt-mixed"] = "lt-online"
    """the data scheme (see the module docstring)"""
    exp_name: str = "baseline"
    """experiment name (in args.json; the default run_name starts with LOSS-MODE instead)"""
    run_name: Optional[str] = None
    """runs/<run_name>/ holds metrics, checkpoints and rollouts (default: loss-mode__env__seed__time)"""
    resume: bool = False
    """continue runs/<run_name>/checkpoint (needs --run_name)"""
    seed: int = 1
    """random seed (rank r uses seed + r for sampling)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    offline_path: Optional[str] = None
    """chat: D_off, JSONL of full dialogues or {"chosen": [...], "rejected": [...]} pairs"""
    max_turns: int = 5
    """H_max: H ~ U{1..H_max}"""

    # policy and sampling
    model_name_or_path: str = "tutor"
    """initial policy pi_0 = pi_ref of DPO ('tutor' = the embedded SFT base policy)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed on logits / temperature everywhere"""
    max_new_tokens: int = 12
    """per-turn token budget"""
    gen_batch_size: int = 256
    """max sequences per sampling call (memory)"""
    max_tokens_per_batch: Optional[int] = None
    """max padded tokens per log-prob forward (memory; a training step's also needs --gradient_accumulation_steps)"""

    # losses
    beta: float = 0.1
    """DPO's beta"""
    eta: float = 3.0
    """REBEL's eta"""
    gamma: float = 0.0
    """REBEL: REFUEL's Eq. (11) KL shaping coefficient against the frozen initial policy (0 = off)"""
    length_penalty: Optional[float] = None
    """Gamma: the reward of a sampled reply that hit the token budget (None = off)"""

    # optimisation
    num_iterations: int = 150
    """collect-then-train iterations"""
    prompts_per_iteration: int = 256
    """pairs collected per iteration across all ranks"""
    num_epochs: int = 2
    """passes over each iteration's pairs"""
    minibatch_size: int = 128
    """pairs per optimizer step across all ranks"""
    gradient_accumulation_steps: int = 1
    """micro-batches per optimizer step"""
    lr: Optional[float] = None
    """AdamW learning rate; None = 3e-4 for the tutor's tiny model, 1e-6 for a pretrained chat model
    (docs/implementation_notes.md#learning-rates-for-real-models)"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    adam_eps: float = 1e-8
    """AdamW's epsilon (its floor on the per-element step size: raise it with tiny gradients, lower it for bf16-scale
    updates of large models)"""
    weight_decay: float = 1e-6
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """cosine = cosine decay over num_iterations (as REFUEL's --lr_schedule)"""
    warmup_ratio: float = 0.0
    """share of optimizer steps spent in linear warm-up"""
    train_top_layers: int = 0
    """train only the top N transformer layers (as REFUEL's setting two: 4); 0 = all parameters"""
    train_head: bool = True
    """with --train_top_layers: also train the final norm and the output head (tied input embeddings train too)"""
    gradient_checkpointing: bool = False
    """trade compute for memory on large models"""
    bf16: Optional[bool] = None
    """bf16 mixed precision (default: on when CUDA is available)"""
    time_budget_minutes: float = 8.0
    """stop after the iteration that passes this wall time (then evaluate and save); 0 = no limit"""

    # evaluation, logging, checkpoints
    eval_every: int = 10
    """evaluate every N iterations (and at the start and the end)"""
    num_eval: int = 512
    """held-out contexts per evaluation (each played for H_max turns)"""
    save_every: int = 10
    """write an atomic checkpoint every N iterations (and at the end)"""
    save_rollouts: Optional[str] = None
    """append every collected pair to this JSONL file"""

    # derived after parsing
    world_size: int = 0
    """number of processes (computed at runtime)"""
    local_prompts: int = 0
    """pairs collected per rank per iteration (computed at runtime)"""
    local_minibatch: int = 0
    """pairs per optimizer step per rank (computed at runtime)"""
    steps_per_iteration: int = 0
    """nominal optimizer steps per iteration, the learning-rate schedule's unit (computed at runtime)"""


# ----------------------------------------------------------------------------------------------------------------
# Data: where s_h comes from, which turn, whether the replies are rolled out
# ----------------------------------------------------------------------------------------------------------------
def states(policy, tokenizer, env, contexts, dialogues, h, rng, args, engine=None):
    """s_h for each context: from its D_off dialogue (offline roll-in), or rolled in on-policy with pi_t and the user
    (LT-ONLINE). Each s_h ends with the user's x_h."""
    if args.mode != "lt-online":
        return [sim.prefix_to_turn(d, hi) for d, hi in zip(dialogues, h)]
    # reply_after_last: the user's x_h after y_{h-1} (an environment that scores only the assistant's turns would
    # otherwise stop after it, and y_h would follow two assistant turns)
    return sim.continue_dialogues(policy, tokenizer, env, [c.messages for c in contexts], [c.user for c in contexts],
                                  h - 1, rng, args.max_new_tokens, args.temperature, args.gen_batch_size,
                                  reply_after_last=True, engine=engine)[0]


def replies(policy, tokenizer, env, contexts, s_h, dialogues, h, H, rng, args, engine=None):
    """The two branches from s_h, each a conversation and {turn: (log-prob, hit_budget)} for sampled turns."""
    users = [c.user for c in contexts]
    if args.mode == "lt-offline":  # D_off's own y_h and a second reply of its behaviour policy; none from pi_t
        own = [d[sim.assistant_turn_index(d, hi)]["content"] for d, hi in zip(dialogues, h)]
        alt = env.offline_alternative(contexts, s_h, rng)
        branches = []
        for ys in (own, alt):
            convs = [s + [{"role": "assistant", "content": y}] for s, y in zip(s_h, ys)]
            if env.scores_final_user_reply:  # the tutor's reward reads the student's reaction
                for c, x in zip(convs, env.user_turn(convs, users, rng)):
                    c.append({"role": "user", "content": x})
            branches.append((convs, [{hi: (float("nan"), False)} for hi in h]))
        return branches
    target = H if args.mode == "mt-mixed" else h  # MT-MIXED rolls out to H; LT-* stop after the trained turn
    return [sim.continue_dialogues(policy, tokenizer, env, s_h, users, target, rng, args.max_new_tokens,
                                   args.temperature, args.gen_batch_size, engine=engine) for _ in range(2)]


def turns_of(contexts, H, u, args):
    """(H, h) per context: a record's own number of turns where it has one (setting two's prompts; D_off dialogues,
    whose last turn the LT modes train), else the drawn H ~ U{1..H_max}; h = H (LT-*) or h ~ U{1..H} (MT-MIXED,
    from the uniform draws u)."""
    H = np.array([getattr(c, "max_turns", None) or Hi for c, Hi in zip(contexts, H)])
    return H, (u * H).astype(int) + 1 if args.mode == "mt-mixed" else H


def collect_pairs(policy, tokenizer, env, rng, args, ref_policy=None, engine=None):
    """One iteration's pairs (dicts) and this rank's collection metrics by name. Batched at every turn."""
    n = args.local_prompts
    H = rng.integers(1, args.max_turns + 1, size=n)  # H ~ U{1..H_max}
    u = rng.random(n) if args.mode == "mt-mixed" else None
    if args.mode == "lt-online":
        contexts, dialogues = env.contexts(n, "train", rng), None
    else:
        contexts, dialogues = env.offline(n, rng)
    H, h = turns_of(contexts, H, u, args)
    s_h = states(policy, tokenizer, env, contexts, dialogues, h, rng, args, engine)
    (conv_a, info_a), (conv_b, info_b) = replies(policy, tokenizer, env, contexts, s_h, dialogues, h, H, rng, args,
                                                   engine)
    r_a, r_b = env.reward(conv_a), env.reward(conv_b)
    if not (torch.isfinite(r_a).all() and torch.isfinite(r_b).all()):
        raise FloatingPointError("the reward is NaN or infinite for some conversations")
    turn = lambda c, hi: c[sim.assistant_turn_index(c, hi)]["content"]
    same = [turn(conv_a[i], h[i]) == turn(conv_b[i], h[i]) for i in range(n)]
    length = lambda c: sim.dialogue_token_count(tokenizer, c)
    too_long = [bool(args.max_dialogue_tokens) and not same[i] and  # REFUEL Sec. 4.1: generated dialogues too
                max(length(conv_a[i]), length(conv_b[i])) > args.max_dialogue_tokens for i in range(n)]
    keep = [i for i in range(n) if not (same[i] or too_long[i])]
    pairs = []
    if keep:
        convs = [conv_a[i] for i in keep] + [conv_b[i] for i in keep]
        turns = [int(h[i]) for i in keep] * 2
        with torch.no_grad():  # through the same tokenisation as the loss
            budget = dict(max_tokens_per_batch=args.max_tokens_per_batch)
            old = sim.turn_logprob(policy, tokenizer, convs, turns, args.temperature, **budget).cpu()
            ref = sim.turn_logprob(ref_policy, tokenizer, convs, turns, args.temperature, **budget).cpu() \
                if ref_policy is not None else old
        k = len(keep)
        for j, i in enumerate(keep):
            pairs.append(dict(mode=args.mode, prompt_index=contexts[i].index, H=int(H[i]), h=int(h[i]),
                              state_source="online" if args.mode == "lt-online" else "offline",
                              conv_a=conv_a[i], conv_b=conv_b[i], reward_a=float(r_a[i]), reward_b=float(r_b[i]),
                              logprob_a=float(old[j]), logprob_b=float(old[k + j]), ref_logprob_a=float(ref[j]),
                              ref_logprob_b=float(ref[k + j]), hit_budget_a=info_a[i][h[i]][1],
                              hit_budget_b=info_b[i][h[i]][1]))
    if args.loss == "dpo":
        pairs = untied(pairs, args.gamma, args.length_penalty)
    metrics = {"charts/pair_reward": float(torch.cat([r_a, r_b]).mean()),
               "charts/dropped_identical_frac": sum(same) / n, "charts/dropped_too_long_frac": sum(too_long) / n,
               "charts/dropped_ties_frac": (len(keep) - len(pairs)) / n}
    return pairs, metrics


def training_rewards(pair, gamma=0.0, length_penalty=None):
    """The pair's rewards as the losses read them: the length penalty Gamma in place of the reward of a side whose
    turn h ran out of tokens, then REFUEL's Eq. (11) KL shaping against pi_0 on either side."""
    out = []
    for side in "ab":
        r = pair[f"reward_{side}"]
        if length_penalty is not None and pair[f"hit_budget_{side}"]:
            r = length_penalty  # Gamma replaces the reward model's score
        if gamma:
            r -= gamma * (pair[f"logprob_{side}"] - pair[f"ref_logprob_{side}"])  # Eq. (11)
        out.append(r)
    return out


def untied(pairs, gamma=0.0, length_penalty=None):
    """DPO's pairs: those whose rewards as the loss reads them (Gamma and Eq. (11) included) differ. A tie has no
    winner; two sides that both ran out of tokens both score Gamma, whatever the reward model said."""
    return [p for p in pairs if len(set(training_rewards(p, gamma, length_penalty))) == 2]


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta):
    """DPO: -log sigmoid(beta [ln pi/pi_ref (y_w) - ln pi/pi_ref (y_l)]), mean over pairs."""
    return -F.logsigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))).mean()


def rebel_loss(logp_a, logp_b, old_logp_a, old_logp_b, reward_a, reward_b, eta):
    """REBEL (REFUEL Eq. (1), one turn) times eta: ((ln pi/pi_t (y) - ln pi/pi_t (y')) - eta (r - r'))^2 / eta, mean
    over pairs: the same minimiser, a gradient at pi = pi_t that does not shrink with eta
    (docs/refuel.md#the-loss-and-its-scale); divided by eta it is the equation's value."""
    logratio_diff = (logp_a - old_logp_a) - (logp_b - old_logp_b)
    return ((logratio_diff - eta * (reward_a - reward_b)) ** 2).mean() / eta


def pair_loss(logp_a, logp_b, batch, args):
    t = lambda key: torch.tensor([p[key] for p in batch], device=logp_a.device)
    rewards = torch.tensor([training_rewards(p, args.gamma, args.length_penalty) for p in batch],
                           device=logp_a.device)
    if args.loss == "rebel":
        return rebel_loss(logp_a, logp_b, t("logprob_a"), t("logprob_b"), rewards[:, 0], rewards[:, 1], args.eta)
    a_wins = rewards[:, 0] > rewards[:, 1]  # ties (of these rewards) were dropped at collection
    logp_w, logp_l = torch.where(a_wins, logp_a, logp_b), torch.where(a_wins, logp_b, logp_a)
    ref_w = torch.where(a_wins, t("ref_logprob_a"), t("ref_logprob_b"))
    ref_l = torch.where(a_wins, t("ref_logprob_b"), t("ref_logprob_a"))
    return dpo_loss(logp_w, logp_l, ref_w, ref_l, args.beta)


def get_lr(step: int, args) -> float:
    """Learning rate at optimizer step `step` (0-based): linear warm-up over warmup_ratio of the run's nominal steps,
    then constant or cosine decay to 0 at its end (Appendix C.3: cosine, 10% warm-up). A function of the optimizer
    step alone, so 1 and N processes follow the same schedule."""
    total = args.num_iterations * args.steps_per_iteration
    warmup = int(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(step - warmup, total - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches(order, args):
    """An epoch's minibatches of --minibatch_size pairs (this rank's share), each cut into exactly
    --gradient_accumulation_steps micro-batches, with the weight that makes their losses the minibatch's mean
    (accelerate divides by the step count). Every minibatch, a short last one included, ends on accelerate's
    accumulation boundary, so no micro-batch joins the next epoch's or iteration's step. A minibatch of fewer pairs
    than micro-batches pads with a repeated pair of weight 0 (a backward on every micro-step keeps DDP in step)."""
    steps = args.gradient_accumulation_steps
    for s in range(0, len(order), args.local_minibatch):
        minibatch = order[s:s + args.local_minibatch]
        for part in np.array_split(minibatch, steps):
            yield (part, len(part) * steps / len(minibatch)) if len(part) else (minibatch[:1], 0.0)


def train_on_pairs(model, tokenizer, pairs, optimizer, accelerator, rng, args, optimizer_steps: int):
    """num_epochs passes over this rank's pairs; returns the mean loss by name and the optimizer steps taken so far
    (the learning-rate schedule's clock)."""
    losses = []
    for _ in range(args.num_epochs):
        for rows, weight in micro_batches(rng.permutation(len(pairs)), args):
            batch = [pairs[i] for i in rows]
            with accelerator.accumulate(model):
                convs = [p["conv_a"] for p in batch] + [p["conv_b"] for p in batch]
                logp = sim.turn_logprob(model, tokenizer, convs, [p["h"] for p in batch] * 2, args.temperature,
                                        max_tokens_per_batch=args.max_tokens_per_batch,
                                        sync_ranks=accelerator.num_processes > 1)  # same forwards on every rank
                loss = pair_loss(logp[: len(batch)], logp[len(batch):], batch, args)
                accelerator.backward(loss * weight)  # the minibatch's mean over its micro-batches
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(optimizer_steps, args)
                optimizer.step()
                optimizer.zero_grad()
                optimizer_steps += int(accelerator.sync_gradients)
            if weight:
                losses.append(loss.item() / (args.eta if args.loss == "rebel" else 1.0))  # REBEL: the equation's value
    return {f"losses/{args.loss}_loss": float(np.mean(losses)) if losses else 0.0}, optimizer_steps


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: balancing across ranks, models for training, evaluation, setup, resume, finish
# ----------------------------------------------------------------------------------------------------------------
def balance_pairs(pairs, accelerator):
    """Gather every rank's pairs and give each rank an equal share, so all ranks take the same optimizer steps."""
    if accelerator.num_processes == 1:
        return pairs
    from accelerate.utils import gather_object

    everything = gather_object([pairs])  # one list per rank
    flat = [p for rank_pairs in everything for p in rank_pairs]
    share = len(flat) // accelerator.num_processes
    return flat[accelerator.process_index * share:(accelerator.process_index + 1) * share]


def append_rollouts(path: str, iteration: int, pairs, accelerator) -> None:
    """--save_rollouts: every rank's pairs, appended to one JSONL file by the main process."""
    from accelerate.utils import gather_object

    everything = gather_object([pairs]) if accelerator.num_processes > 1 else [pairs]
    if accelerator.is_main_process:
        with open(path, "a") as f:
            f.writelines(json.dumps({"iteration": iteration, **p}) + "\n" for rank in everything for p in rank)


def prepare_for_training(policy, args):
    """--train_top_layers (as REFUEL's setting two: the top 4), --gradient_checkpointing, and training mode with
    dropout off (log pi_t at collection and log pi in the loss are then the same function of the weights)."""
    if args.train_top_layers:
        policy.requires_grad_(False)
        top = list(policy.get_decoder().layers[-args.train_top_layers:])
        if args.train_head:
            top += [policy.get_decoder().norm, policy.get_output_embeddings()]
        for module in top:
            module.requires_grad_(True)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(policy)
    return without_dropout(policy)


def evaluate(model, tokenizer, env, accelerator, args, seed, engine=None):
    """Mean reward (and per-turn detail on the tutor) on held-out contexts; each rank plays its share."""
    n = max(1, args.num_eval // accelerator.num_processes)
    with sampling_weights(model, accelerator, engine=engine) as policy:
        out = sim.evaluate_policy(policy, tokenizer, env, n, seed + 7919 * accelerator.process_index,
                                  args.max_new_tokens, args.temperature, args.gen_batch_size, engine)
    keys = sorted(k for k in out if k != "eval/reward_stderr")
    vals = accelerator.gather(torch.tensor([out[k] for k in keys], device=accelerator.device)[None]).mean(0)
    res = dict(zip(keys, vals.tolist()))
    res["eval/reward_stderr"] = out["eval/reward_stderr"] / math.sqrt(accelerator.num_processes)
    if env.optimal_value() is not None:  # V*, where the task knows it exactly
        res["eval/fraction_of_v_star"] = res["eval/mean_reward"] / env.optimal_value()
    return res


def check_args(args: Args) -> None:
    """Every flag in its range, named in the error: a bad value otherwise fails deep inside a run, or trains on
    nothing without a word."""
    if args.lr is None:  # the tutor's 3e-4 moved a pretrained model's log-ratios by 17 nats in one iteration
        args.lr = 3e-4 if args.model_name_or_path == "tutor" else 1e-6
    positive = ["eta", "beta", "temperature", "max_new_tokens", "gen_batch_size", "max_turns", "num_iterations",
                "prompts_per_iteration", "num_epochs", "minibatch_size", "gradient_accumulation_steps", "eval_every",
                "num_eval", "save_every", "reward_max_length", "user_max_concurrency", "user_timeout", "user_retries",
                "max_tokens_per_batch", "max_dialogue_tokens", "vllm_gpu_memory_utilization", "adam_eps"]
    non_negative = ["gamma", "lr", "weight_decay", "max_grad_norm", "train_top_layers", "time_budget_minutes",
                    "threads"]
    bad = [f"--{k} must be > 0" for k in positive if getattr(args, k) is not None and not getattr(args, k) > 0]
    bad += [f"--{k} must be >= 0" for k in non_negative if not getattr(args, k) >= 0]
    if not 0 <= args.warmup_ratio <= 1:
        bad.append("--warmup_ratio must lie in [0, 1]")
    if not all(0 <= b < 1 for b in args.adam_betas):
        bad.append("--adam_betas must lie in [0, 1)")
    if args.minibatch_size % args.gradient_accumulation_steps:
        bad.append("--minibatch_size must be divisible by --gradient_accumulation_steps")
    if args.gamma and args.loss == "dpo":
        bad.append("--gamma is REBEL's Eq. (11) shaping; DPO's KL to pi_ref is --beta")
    bad += lora.check_lora_args(args)
    if bad:
        hint = " (greedy sampling makes both replies identical: every pair dropped)" * (args.temperature <= 0)
        raise ValueError("invalid flags: " + "; ".join(bad) + hint)



def setup(args: Args):
    """Processes, derived sizes, the run directory, seeds, models and the optimizer, prepared for the launch."""
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args.bf16, args.gradient_accumulation_steps)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.world_size = accelerator.num_processes
    if args.prompts_per_iteration % args.world_size or args.minibatch_size % args.world_size:
        raise ValueError("prompts_per_iteration and minibatch_size must be divisible by the number of processes")
    args.local_prompts = args.prompts_per_iteration // args.world_size
    args.local_minibatch = args.minibatch_size // args.world_size
    args.steps_per_iteration = args.num_epochs * math.ceil(args.local_prompts / args.local_minibatch)
    run_dir = make_run_dir(args, accelerator, f"{args.loss}-{args.mode}")
    set_seed(args.seed + accelerator.process_index)
    rng = np.random.default_rng(args.seed + accelerator.process_index)

    frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    tutor = args.model_name_or_path == "tutor"  # built by SFT on first use: rank 0 builds it, outside zero.Init
    with accelerator.main_process_first(), (outside_zero3_init(accelerator) if tutor
                                            else contextlib.nullcontext()):
        # with LoRA the base is frozen: loaded in the precision the frozen models use
        policy, tokenizer = load_policy(args.model_name_or_path, frozen_dtype if args.lora_r else torch.float32)
    if args.lora_r:  # only the adapters train
        policy = lora.add_adapters(policy, args, args.model_name_or_path, accelerator)
    with outside_zero3_init(accelerator):
        env = make_env_from_args(args, args.max_turns, str(accelerator.device), frozen_dtype, tokenizer,
                                     offline_path=args.offline_path)
        ref_policy = None
        if (args.loss == "dpo" or args.gamma) and args.lora_r:  # pi_ref = pi_0: the policy with its adapters off
            ref_policy = lora.AdaptersOff(policy)
        elif args.loss == "dpo" or args.gamma:  # DPO's pi_ref, or pi_0 for Eq. (11); a frozen copy
            ref_policy = load_policy(args.model_name_or_path, frozen_dtype)[0].to(accelerator.device).eval()
            ref_policy.requires_grad_(False)
    prepare_for_training(policy, args)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=get_lr(0, args),
                                  betas=args.adam_betas, eps=args.adam_eps, weight_decay=args.weight_decay)
    configure_deepspeed(accelerator, max(1, args.local_minibatch // args.gradient_accumulation_steps),
                                    args.gradient_accumulation_steps, args.max_grad_norm)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    engine = vllm_engine.make_engine(policy, accelerator, args)  # None without --vllm
    return accelerator, run_dir, rng, policy, tokenizer, env, ref_policy, optimizer, engine


def resume(accelerator, run_dir: Path, rng, env, args) -> dict:
    """The run's counters: zero, or with --resume those of runs/<run>/checkpoint (or the .old one a crash mid-replace
    left), whose model, optimizer and RNG states are restored in place (load_checkpoint); what the stopped
    run wrote after that checkpoint is dropped (it is done again), and its environment tallies carried on."""
    counters = dict(iteration=0, elapsed=0.0, pairs=0, optimizer_steps=0)
    if args.resume:
        counters.update(load_checkpoint(accelerator, run_dir, rng)[0])
        forget_lost_iterations(accelerator, run_dir, counters, args.save_rollouts)
        if accelerator.is_main_process:  # the sum over ranks is then the whole run's
            env.counts().update(counters.get("env_counts", {}))
    return counters


def finish(accelerator, policy, tokenizer, logger, run_dir: Path, args, initial_reward: float, final_eval: dict,
           iterations: int, minutes: float) -> dict:
    """summary.json (and with --merge_on_save the merged LoRA model) and the closing line; ranks tear the process
    group down together."""
    if args.merge_on_save:  # runs/<run>/merged: a plain HF model of the final policy
        lora.write_merged(accelerator, policy, tokenizer, run_dir)
    summary = {"initial_reward": initial_reward, "final_reward": final_eval["eval/mean_reward"],
               "final_stderr": final_eval["eval/reward_stderr"], "iterations": iterations, "minutes": minutes,
               "run_dir": str(run_dir), "num_processes": accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type).split(".")[-1],
               "ranks_in_sync": ranks_in_sync(policy, accelerator),
               **{k: v for k, v in final_eval.items() if k.startswith("eval/learned")}}
    logger.close()
    if accelerator.is_main_process:
        print(f"mean reward ({args.loss}, {args.mode}): start of run {summary['initial_reward']:.3f} -> "
              f"{summary['final_reward']:.3f} +- {summary['final_stderr']:.3f} after {iterations} iterations, "
              f"{minutes:.1f} min")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()  # not one rank leaving while another still writes
    accelerator.end_training()
    return summary


def main(args: Args) -> dict:
    """Per iteration: collect pairs with the mode's data scheme, then take epochs of minibatches of the chosen loss;
    evaluate, log by name and checkpoint on the way."""
    accelerator, run_dir, rng, policy, tokenizer, env, ref_policy, optimizer, engine = setup(args)
    counters = resume(accelerator, run_dir, rng, env, args)  # iteration, elapsed, pairs, optimizer_steps, ...
    logger = Logger(run_dir, args, accelerator.is_main_process)
    eval_seed = 10_000 + args.seed
    latest_eval = counters.pop("evaluation", None)  # a resumed checkpoint's evaluation, already logged
    if latest_eval is None:
        latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
        logger.log(counters["iteration"], {**latest_eval, "charts/elapsed_min": counters["elapsed"] / 60})
    counters.setdefault("initial_reward", latest_eval["eval/mean_reward"])  # the base policy's, kept across --resume
    start = time.time() - counters["elapsed"]
    iterations = range(counters["iteration"], args.num_iterations)
    for it in tqdm(iterations, disable=not accelerator.is_main_process, desc=f"{args.loss}-{args.mode}"):
        iteration_start = time.time()
        with sampling_weights(policy, accelerator, engine=engine) as pi_t:
            pairs, collection = collect_pairs(pi_t, tokenizer, env, rng, args, ref_policy, engine)
        collect_seconds = time.time() - iteration_start
        if args.save_rollouts:
            append_rollouts(args.save_rollouts, it, pairs, accelerator)
        pairs = balance_pairs(pairs, accelerator)  # as many on every rank
        training, counters["optimizer_steps"] = train_on_pairs(policy, tokenizer, pairs, optimizer, accelerator, rng,
                                                               args, counters["optimizer_steps"])
        counters["pairs"] += len(pairs) * args.world_size
        counters["iteration"] = it + 1
        counters["env_counts"] = env_tallies(accelerator, env)  # user/judge/reward tallies, all ranks
        seconds = time.time() - iteration_start
        metrics = reduce_mean(accelerator, {**collection, **training})  # means over ranks
        metrics.update({
            "charts/pairs_trained": counters["pairs"], "charts/lr": optimizer.param_groups[0]["lr"],
            "charts/optimizer_steps": counters["optimizer_steps"], "charts/iterations_per_sec": 1 / seconds,
            "charts/pairs_per_sec": len(pairs) * args.world_size / seconds,
            "charts/collect_share": collect_seconds / seconds, "charts/elapsed_min": (time.time() - start) / 60,
            **{f"charts/vllm_{k}": v for k, v in (engine.timings if engine else {}).items()},
            **env.charts(counters["env_counts"])})
        logger.log(it + 1, metrics, echo=False)
        out_of_time = args.time_budget_minutes and time.time() - start > 60 * args.time_budget_minutes
        last = it == args.num_iterations - 1 or out_of_time
        if (it + 1) % args.save_every == 0 or last:  # before the evaluation: a failing endpoint loses no iteration
            counters["elapsed"] = time.time() - start
            save_checkpoint(accelerator, policy, tokenizer, run_dir, counters, rng)
        if (it + 1) % args.eval_every == 0 or last:
            latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
            logger.log(it + 1, {**latest_eval, "charts/elapsed_min": (time.time() - start) / 60})
            record_evaluation(accelerator, run_dir, it + 1, latest_eval,
                                     env_tallies(accelerator, env))
        if out_of_time:
            break
    return finish(accelerator, policy, tokenizer, logger, run_dir, args, counters["initial_reward"], latest_eval,
                  counters["iteration"], (time.time() - start) / 60)


if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args)
    with resume_hint(cli_args):  # an endpoint that stays down: the error names the checkpoint and the --resume command
        main(cli_args)
