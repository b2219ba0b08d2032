"""refuel.py: REFUEL, REgressing the RElative FUturE (Gao et al., "Regressing the Relative Future: Efficient Policy
Optimization for Multi-turn RLHF", ICLR 2025), one CleanRL-style script: every step of the algorithm is here; it
reads conversations, log-probs and the sampler from simulator.py.

Algorithm 1, per iteration t (the loop is `main`):
  1. collect D with pi_t: x_1 ~ rho, H ~ U{1..H_max}, h ~ U{1..H}; roll in with pi_t and the user for H turns
     (s_h ~ d_h^{pi_t}); reset to s_h and sample y'_h ~ pi_t(.|s_h); roll both branches out to turn H; score both
     whole conversations with the conversation-level reward r(s_{H+1}).
                                                 -> `collect_pairs` (`draw_turns`, `rollin`, `reset_and_rollout`)
  2. regress the relative future reward, Eq. (1):
        min_pi  E_D ( (1/eta) [ ln pi(y_h|s_h)/pi_t(y_h|s_h) - ln pi(y'_h|s_h)/pi_t(y'_h|s_h) ]
                      - ( r(s_{H+1}) - r(s'_{H+1}) ) )^2                        -> `refuel_loss`, `train_on_pairs`
     Only turn h's tokens carry gradient.
Options from the paper (Appendix C.1): Eq. (11) KL reward shaping r = RM - gamma (ln pi_t(y_h) - ln pi_0(y_h))
against the frozen initial policy; a length penalty Gamma replacing the reward of a turn h that hit the token
budget (both `training_rewards`); the cosine schedule with warm-up of Appendix C.3 (`get_lr`); training only the top
layers (`prepare_for_training`); setting one (one large collection per iteration, several epochs of minibatches)
and setting two (small online batches) are the same loop with different sizes.

Branch y_h keeps the roll-in's own continuation: it is already an independent rollout of (s_h, y_h) to H, so only
branch y'_h is generated anew. This is equal in distribution to rolling both out afresh and costs no extra tokens.

Runs as `python refuel.py` (CPU, the embedded tutor task) or `accelerate launch [--config_file configs/...]
refuel.py --model_name_or_path ... --env chat ...`. Each rank collects its own shard; pairs are then balanced so
every rank takes the same number of optimizer steps (`balance_pairs`). The launch plumbing (accelerator, ZeRO-3,
FSDP2, vLLM weight sync) is plumbing/distributed.py's, the run's files (metrics, TensorBoard, W&B, checkpoints) plumbing/run_io.py's;
`setup`, `resume` and `finish` put them together. With --lora_r only adapters train (plumbing/lora.py) and pi_0 is
the policy's own weights with the adapters off.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
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
    """REFUEL's flags; the environment's (--env, --prompts_path, --user_model, --reward_model, ...) come from
    envs/flags.EnvArgs, the rollout engine's (--vllm, ...) from vllm_engine.VLLMArgs, LoRA's (--lora_r, ...) from
    plumbing/lora.LoraArgs."""
    exp_name: str = "refuel"
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
    """H_max: H ~ U{1..H_max}"""

    # policy and sampling
    model_name_or_path: str = "tutor"
    """initial policy pi_0 ('tutor' = the embedded SFT base policy, built on first use)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed on logits / temperature everywhere"""
    max_new_tokens: int = 12
    """per-turn token budget"""
    gen_batch_size: int = 256
    """max sequences per sampling call (memory)"""
    max_tokens_per_batch: Optional[int] = None
    """max padded tokens per log-prob forward (memory; a training step's also needs --gradient_accumulation_steps)"""

    # REFUEL
    eta: float = 3.0
    """eta of Eq. (1)"""
    gamma: float = 0.0
    """Eq. (11) KL shaping coefficient against the frozen initial policy (0 = off)"""
    length_penalty: Optional[float] = None
    """Gamma: the reward of a conversation whose turn h hit the token budget (None = off)"""
    drop_identical: bool = True
    """drop pairs whose y_h and y'_h are identical (they carry no signal)"""

    # optimisation
    num_iterations: int = 300
    """iterations t of Algorithm 1"""
    prompts_per_iteration: int = 256
    """|D| per iteration across all ranks, drawn from the prompts (setting two: 32); 0 = a pass over the whole
    training prompt set each iteration, every prompt once, in a new order (setting one)"""
    num_epochs: int = 2
    """passes over D per iteration"""
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
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """cosine = the paper's cosine decay over num_iterations"""
    warmup_ratio: float = 0.0
    """share of optimizer steps spent in linear warm-up (paper: 0.1)"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    train_top_layers: int = 0
    """train only the top N transformer layers (paper's setting two: 4); 0 = all parameters"""
    train_head: bool = True
    """with --train_top_layers: also train the final norm and the output head (tied input embeddings train too)"""
    gradient_checkpointing: bool = False
    """trade compute for memory on large models"""
    bf16: Optional[bool] = None
    """bf16 mixed precision (default: on when CUDA is available)"""
    time_budget_minutes: float = 12.0
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
    """prompts collected per rank per iteration (computed at runtime)"""
    local_minibatch: int = 0
    """pairs per optimizer step per rank (computed at runtime)"""
    steps_per_iteration: int = 0
    """nominal optimizer steps per iteration, the learning-rate schedule's unit (computed at runtime)"""


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 1: data collection
# ----------------------------------------------------------------------------------------------------------------
def prompt_pass(env, iteration: int, accelerator, args):
    """--prompts_per_iteration 0 (setting one: "iterations over the whole prompt set"): every training prompt once,
    shuffled anew each iteration with a generator all ranks share, each rank taking its own equal share."""
    everything = env.all_contexts("train")
    order = np.random.default_rng([args.seed, iteration]).permutation(len(everything))
    return [everything[i] for i in order[accelerator.process_index::accelerator.num_processes][:args.local_prompts]]


def rollin(policy, tokenizer, env, contexts, H, rng, args, engine=None):
    """Roll in with pi_t and the user for H[i] turns from each context (batched across different lengths)."""
    return sim.continue_dialogues(policy, tokenizer, env, [c.messages for c in contexts], [c.user for c in contexts],
                                  H, rng, args.max_new_tokens, args.temperature, args.gen_batch_size, engine=engine)


def reset_and_rollout(policy, tokenizer, env, rolled_in, contexts, H, h, rng, args, engine=None):
    """Reset to s_h, sample y'_h ~ pi_t(.|s_h) and roll the new branch out to turn H with fresh user turns."""
    s_h = [sim.prefix_to_turn(c, hi) for c, hi in zip(rolled_in, h)]
    return sim.continue_dialogues(policy, tokenizer, env, s_h, [c.user for c in contexts], H, rng,
                                  args.max_new_tokens, args.temperature, args.gen_batch_size, engine=engine)


def draw_turns(contexts, rng, args):
    """H ~ U{1..H_max} (setting one), or the record's own number of turns where it has one (setting two, Sec. 4.2);
    then h ~ U{1..H}."""
    H = rng.integers(1, args.max_turns + 1, size=len(contexts))
    H = np.array([getattr(c, "max_turns", None) or Hi for c, Hi in zip(contexts, H)])
    return H, np.array([rng.integers(1, Hi + 1) for Hi in H])


def collect_pairs(policy, tokenizer, env, contexts, rng, args, ref_policy=None, engine=None):
    """D for one iteration: a list of pair dicts, and this rank's collection metrics by name. Batched at every turn,
    no per-sample generation."""
    n = len(contexts)
    H, h = draw_turns(contexts, rng, args)
    conv_a, info_a = rollin(policy, tokenizer, env, contexts, H, rng, args, engine)  # s_h ~ d_h^{pi_t}, y_h, its future
    conv_b, info_b = reset_and_rollout(policy, tokenizer, env, conv_a, contexts, H, h, rng, args,
                                       engine)  # y'_h, its future
    r_a, r_b = env.reward(conv_a), env.reward(conv_b)
    if not (torch.isfinite(r_a).all() and torch.isfinite(r_b).all()):
        raise FloatingPointError("the reward is NaN or infinite for some conversations")
    turn = lambda c, hi: c[sim.assistant_turn_index(c, hi)]["content"]
    identical = [args.drop_identical and turn(conv_a[i], h[i]) == turn(conv_b[i], h[i]) for i in range(n)]
    length = lambda c: sim.dialogue_token_count(tokenizer, c)
    too_long = [bool(args.max_dialogue_tokens) and not identical[i] and  # Sec. 4.1: generated dialogues too
                max(length(conv_a[i]), length(conv_b[i])) > args.max_dialogue_tokens for i in range(n)]
    keep = [i for i in range(n) if not (identical[i] or too_long[i])]
    pairs = []
    if keep:
        convs = [conv_a[i] for i in keep] + [conv_b[i] for i in keep]
        turns = [int(h[i]) for i in keep] * 2
        with torch.no_grad():  # log pi_t(y_h|s_h) through the same tokenisation as the loss
            budget = dict(max_tokens_per_batch=args.max_tokens_per_batch)
            old = sim.turn_logprob(policy, tokenizer, convs, turns, args.temperature, **budget).cpu()
            ref = sim.turn_logprob(ref_policy, tokenizer, convs, turns, args.temperature, **budget).cpu() \
                if ref_policy is not None else None
        k = len(keep)
        for j, i in enumerate(keep):
            p = dict(prompt_index=contexts[i].index, H=int(H[i]), h=int(h[i]), conv_a=conv_a[i], conv_b=conv_b[i],
                     reward_a=float(r_a[i]), reward_b=float(r_b[i]), logprob_a=float(old[j]),
                     logprob_b=float(old[k + j]), hit_budget_a=info_a[i][h[i]][1], hit_budget_b=info_b[i][h[i]][1])
            if ref is not None:
                p["ref_logprob_a"], p["ref_logprob_b"] = float(ref[j]), float(ref[k + j])
            pairs.append(p)
    metrics = {"charts/rollin_reward": float(r_a.mean()), "charts/dropped_identical_frac": sum(identical) / n,
               "charts/dropped_too_long_frac": sum(too_long) / n,
               "charts/hit_budget_frac": float(np.mean([info_a[i][h[i]][1] for i in range(n)]))}
    return pairs, metrics


def training_rewards(pair, gamma=0.0, length_penalty=None):
    """The regression targets' rewards of a pair: the length penalty Gamma in place of the reward of a side whose
    turn h ran out of tokens, then Eq. (11)'s shaping on either side (as the authors' code does)."""
    out = []
    for side in "ab":
        r = pair[f"reward_{side}"]
        if length_penalty is not None and pair[f"hit_budget_{side}"]:
            r = length_penalty  # Gamma replaces the reward model's score
        if gamma:
            r -= gamma * (pair[f"logprob_{side}"] - pair[f"ref_logprob_{side}"])  # Eq. (11)
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Algorithm 1, step 2: regression to the relative future reward
# ----------------------------------------------------------------------------------------------------------------
def refuel_loss(logp_a, logp_b, old_logp_a, old_logp_b, reward_a, reward_b, eta):
    """Eq. (1) times eta: mean over pairs of ((ln pi/pi_t(y_h) - ln pi/pi_t(y'_h)) - eta (r - r'))^2 / eta. The same
    minimiser as Eq. (1); its gradient at pi = pi_t is -2 (r - r') grad(log-ratio difference) whatever eta, where
    Eq. (1) as written gives 1/eta of that (at eta = 1e3 too small for clipping and Adam's eps:
    docs/refuel.md#the-loss-and-its-scale). Divided by eta it is Eq. (1)'s value, which the script logs."""
    logratio_diff = (logp_a - old_logp_a) - (logp_b - old_logp_b)  # Eq. (1): the relative future predicted by pi
    return ((logratio_diff - eta * (reward_a - reward_b)) ** 2).mean() / eta  # Eq. (1) x eta, onto r - r'


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
    """Algorithm 1, line 4: num_epochs passes over this rank's pairs in minibatches. Returns the training metrics by
    name (means over minibatches) and the optimizer steps taken so far (the learning-rate schedule's clock)."""
    logs = {"losses/refuel_loss": [], "losses/abs_logratio_diff": [], "losses/mean_logratio_a": []}
    for _ in range(args.num_epochs):
        for rows, weight in micro_batches(rng.permutation(len(pairs)), args):
            batch = [pairs[i] for i in rows]
            with accelerator.accumulate(model):
                convs = [p["conv_a"] for p in batch] + [p["conv_b"] for p in batch]
                logp = sim.turn_logprob(model, tokenizer, convs, [p["h"] for p in batch] * 2, args.temperature,
                                        max_tokens_per_batch=args.max_tokens_per_batch,
                                        sync_ranks=accelerator.num_processes > 1)  # same forwards on every rank
                stored = lambda key: torch.tensor([p[key] for p in batch], device=logp.device)
                rewards = torch.tensor([training_rewards(p, args.gamma, args.length_penalty) for p in batch],
                                       device=logp.device)
                k = len(batch)
                loss = refuel_loss(logp[:k], logp[k:], stored("logprob_a"), stored("logprob_b"), rewards[:, 0],
                                   rewards[:, 1], args.eta)  # Eq. (1)
                accelerator.backward(loss * weight)  # the minibatch's mean over its micro-batches
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(optimizer_steps, args)
                optimizer.step()
                optimizer.zero_grad()
                optimizer_steps += int(accelerator.sync_gradients)
            if not weight:  # a padding micro-batch: nothing to report
                continue
            with torch.no_grad():
                logratio_a, logratio_b = logp[:k] - stored("logprob_a"), logp[k:] - stored("logprob_b")
            logs["losses/refuel_loss"].append(loss.item() / args.eta)  # Eq. (1)'s value
            logs["losses/abs_logratio_diff"].append((logratio_a - logratio_b).abs().mean().item())
            logs["losses/mean_logratio_a"].append(logratio_a.mean().item())
    return {name: float(np.mean(values)) if values else 0.0 for name, values in logs.items()}, optimizer_steps


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
    """--train_top_layers (App. C.1, setting two: the top 4), --gradient_checkpointing, and training mode with
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
    positive = ["eta", "temperature", "max_new_tokens", "gen_batch_size", "max_turns", "num_iterations", "num_epochs",
                "minibatch_size", "gradient_accumulation_steps", "eval_every", "adam_eps",
                "num_eval", "save_every", "reward_max_length", "user_max_concurrency", "user_timeout", "user_retries",
                "max_tokens_per_batch", "max_dialogue_tokens", "vllm_gpu_memory_utilization"]
    non_negative = ["gamma", "lr", "weight_decay", "max_grad_norm", "train_top_layers", "time_budget_minutes",
                    "threads", "prompts_per_iteration"]
    bad = [f"--{k} must be > 0" for k in positive if getattr(args, k) is not None and not getattr(args, k) > 0]
    bad += [f"--{k} must be >= 0" for k in non_negative if not getattr(args, k) >= 0]
    if not 0 <= args.warmup_ratio <= 1:
        bad.append("--warmup_ratio must lie in [0, 1]")
    if not all(0 <= b < 1 for b in args.adam_betas):
        bad.append("--adam_betas must lie in [0, 1)")
    if args.minibatch_size % args.gradient_accumulation_steps:
        bad.append("--minibatch_size must be divisible by --gradient_accumulation_steps")
    bad += lora.check_lora_args(args)
    if bad:
        hint = " (greedy sampling makes y_h = y'_h, so every pair would be dropped)" * (args.temperature <= 0)
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
    args.local_prompts = args.prompts_per_iteration // args.world_size  # 0: set from the prompt set in setup
    args.local_minibatch = args.minibatch_size // args.world_size
    args.steps_per_iteration = args.num_epochs * math.ceil(args.local_prompts / args.local_minibatch)
    run_dir = make_run_dir(args, accelerator)
    set_seed(args.seed + accelerator.process_index)  # per-rank sampling randomness
    rng = np.random.default_rng(args.seed + accelerator.process_index)

    frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    if args.model_name_or_path == "tutor":  # rank 0 builds and caches mu
        with accelerator.main_process_first(), outside_zero3_init(accelerator):
            policy, tokenizer = load_policy("tutor")
    else:  # under ZeRO-3 this loads straight into shards; prepare() takes it from there
        # with LoRA the base is frozen: loaded in the precision the frozen models use
        policy, tokenizer = load_policy(args.model_name_or_path, frozen_dtype if args.lora_r else torch.float32)
    if args.lora_r:  # only the adapters train
        policy = lora.add_adapters(policy, args, args.model_name_or_path, accelerator)
    with outside_zero3_init(accelerator):
        env = make_env_from_args(args, args.max_turns, str(accelerator.device), frozen_dtype, tokenizer)
        ref_policy = None
        if args.gamma and args.lora_r:  # pi_0 for Eq. (11): the policy's own weights with the adapters off
            ref_policy = lora.AdaptersOff(policy)
        elif args.gamma:  # pi_0 for Eq. (11), a frozen copy
            ref_policy = load_policy(args.model_name_or_path, frozen_dtype)[0].to(accelerator.device).eval()
            ref_policy.requires_grad_(False)
    if not args.prompts_per_iteration:  # a pass over the whole training prompt set per iteration
        args.local_prompts = len(env.all_contexts("train")) // args.world_size
        if not args.local_prompts:
            raise ValueError("--prompts_per_iteration 0: the training prompts are fewer than the processes")
        args.steps_per_iteration = args.num_epochs * math.ceil(args.local_prompts / args.local_minibatch)
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


def finish(accelerator, policy, tokenizer, env, logger, run_dir: Path, initial_reward: float, final_eval: dict,
           iterations: int, minutes: float, args) -> dict:
    """summary.json (and with --merge_on_save the merged LoRA model) and the closing line; ranks tear the process
    group down together."""
    if args.merge_on_save:  # runs/<run>/merged: a plain HF model of the final policy
        lora.write_merged(accelerator, policy, tokenizer, run_dir)
    summary = {"initial_reward": initial_reward, "final_reward": final_eval["eval/mean_reward"],
               "final_stderr": final_eval["eval/reward_stderr"], "iterations": iterations, "minutes": minutes,
               "run_dir": str(run_dir), "num_processes": accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type).split(".")[-1],
               "ranks_in_sync": ranks_in_sync(policy, accelerator)}
    logger.close()
    if accelerator.is_main_process:
        v_star = f", V* = {env.optimal_value():.3f}" if env.optimal_value() is not None else ""
        print(f"mean reward: start of run {summary['initial_reward']:.3f} -> REFUEL {summary['final_reward']:.3f} "
              f"+- {summary['final_stderr']:.3f} after {iterations} iterations, {minutes:.1f} min{v_star}")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()  # not one rank leaving while another still writes
    accelerator.end_training()
    return summary


def main(args: Args) -> dict:
    """Algorithm 1, line 2: per iteration, collect D with pi_t (line 3), then regress (line 4); evaluate, log by
    name and checkpoint on the way."""
    accelerator, run_dir, rng, policy, tokenizer, env, ref_policy, optimizer, engine = setup(args)
    counters = resume(accelerator, run_dir, rng, env, args)  # iteration, elapsed, pairs, optimizer_steps, ...
    logger = Logger(run_dir, args, accelerator.is_main_process)
    eval_seed = 10_000 + args.seed
    latest_eval = counters.pop("evaluation", None)  # a resumed checkpoint's evaluation, already logged
    if latest_eval is None:
        latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
        logger.log(counters["iteration"], {**latest_eval, "charts/elapsed_min": counters["elapsed"] / 60})
    counters.setdefault("initial_reward", latest_eval["eval/mean_reward"])  # pi_0's, kept across --resume
    start = time.time() - counters["elapsed"]
    iterations = range(counters["iteration"], args.num_iterations)
    for it in tqdm(iterations, disable=not accelerator.is_main_process, desc="refuel"):
        iteration_start = time.time()
        contexts = prompt_pass(env, it, accelerator, args) if not args.prompts_per_iteration else \
            env.contexts(args.local_prompts, "train", rng)
        with sampling_weights(policy, accelerator, engine=engine) as pi_t:  # Algorithm 1, line 3
            pairs, collection = collect_pairs(pi_t, tokenizer, env, contexts, rng, args, ref_policy, engine)
        collect_seconds = time.time() - iteration_start
        if args.save_rollouts:
            append_rollouts(args.save_rollouts, it, pairs, accelerator)
        pairs = balance_pairs(pairs, accelerator)  # as many on every rank
        training, counters["optimizer_steps"] = train_on_pairs(policy, tokenizer, pairs, optimizer, accelerator, rng,
                                                               args, counters["optimizer_steps"])  # Algorithm 1, line 4
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
    return finish(accelerator, policy, tokenizer, env, logger, run_dir, counters["initial_reward"], latest_eval,
                  counters["iteration"], (time.time() - start) / 60, args)

if __name__ == "__main__":
    import tyro

    cli_args = tyro.cli(Args)
    with resume_hint(cli_args):  # an endpoint that stays down: the error names the checkpoint and the --resume command
        main(cli_args)
