"""baselines_dpo_rebel.py: the single-turn and multi-turn baselines of the REFUEL paper (Gao et al., ICLR 2025,
Section 4.1): DPO (Rafailov et al., 2023) and REBEL (Gao et al., 2024), each with four data schemes.

Where the state comes from, which turn is trained, and whether the replies are rolled out:
  LT-OFFLINE  s_H, y_H, y'_H all from the offline dataset D_off; reward on the two one-turn completions.
  LT-MIXED    s_H from D_off; y_H, y'_H ~ pi_t; reward on the two one-turn completions.
  LT-ONLINE   s_H rolled in on-policy with pi_t and the user; y_H, y'_H ~ pi_t; one-turn completions.
  MT-MIXED    h ~ U{1..H}, s_h from D_off; y_h, y'_h ~ pi_t, each rolled out to H with pi_t and the user.
(REFUEL = on-policy roll-in + every turn + rollouts to H; see refuel.py.) H ~ U{1..H_max} everywhere, so "last turn"
means the last turn of a conversation of H turns: LT-* methods optimise each turn for its immediate reward only.

Losses, over the pairs of one iteration:
  DPO    -log sigmoid( beta [ ln pi(y_w)/pi_ref(y_w) - ln pi(y_l)/pi_ref(y_l) ] ), y_w the higher-reward reply
         (ties dropped), pi_ref the frozen initial policy.                                   -> `dpo_loss`
  REBEL  ( (1/eta) [ ln pi(y)/pi_t(y) - ln pi(y')/pi_t(y') ] - (r - r') )^2, REFUEL's Eq. (1) on one turn.
                                                                                             -> `rebel_loss`
On the tutor task D_off is the simulator's fixed set of scripted-reference dialogues, and LT-OFFLINE's second reply
is the reference teacher resampled at s_H; on `--env chat` it is `--offline_path` (chosen/rejected pairs).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import simulator as sim


@dataclass
class Args:
    loss: Literal["dpo", "rebel"] = "rebel"
    """the pairwise loss"""
    mode: Literal["lt-offline", "lt-mixed", "lt-online", "mt-mixed"] = "lt-online"
    """the data scheme (see the module docstring)"""
    exp_name: str = "baseline"
    """experiment name, the first part of run_name"""
    run_name: Optional[str] = None
    """runs/<run_name>/ holds metrics, checkpoints and rollouts (default: loss-mode__env__seed__time)"""
    resume: bool = False
    """continue runs/<run_name>/checkpoint (needs --run_name)"""
    seed: int = 1
    """random seed (rank r uses seed + r for sampling)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""

    # environment
    env: Literal["tutor", "chat"] = "tutor"
    """'tutor': the embedded task; 'chat': JSONL prompts, an HF user model (or pre-sampled questions), an HF reward model"""
    prompts_path: Optional[str] = None
    """chat: dataset of prompts or dialogues (JSONL/JSON, any --dataset_format; later user turns are the
    pre-sampled questions of setting two)"""
    offline_path: Optional[str] = None
    """chat: D_off, JSONL of full dialogues or {"chosen": [...], "rejected": [...]} pairs"""
    user_model: Optional[str] = None
    """chat: HF model prompted as the user; None = pre-sampled questions"""
    user_api_base: Optional[str] = None
    """chat: serve the user from an OpenAI-compatible endpoint (vLLM/TGI, e.g. http://host:8000/v1; --user_model
    names the served model; key from $OPENAI_API_KEY)"""
    user_prompt_path: Optional[str] = None
    """chat: a text file replacing the user's prompt template (must contain {dialogue})"""
    user_max_concurrency: int = 32
    """chat, endpoint user: requests in flight per process (the server sees ranks x this many)"""
    user_timeout: float = 120.0
    """chat, endpoint user: seconds per request, time queued at the server included (raise it, or lower the
    concurrency, when ranks x concurrency x prompt tokens exceed what the server prefills in that time)"""
    user_retries: int = 3
    """chat, endpoint user: tries per request (exponential backoff on timeouts and 5xx)"""
    reward_model: Optional[str] = None
    """chat: HF sequence-classification reward model"""
    reward_trust_remote_code: bool = False
    """chat: load the reward model's own code (ArmoRM-style models whose output has a .score)"""
    reward_max_length: int = 4096
    """chat: the reward model sees at most this many tokens of a conversation (right-truncated, counted as
    charts/reward_truncated)"""
    dataset_format: Literal["auto", "messages", "ultrainteract", "hh", "education"] = "auto"
    """chat: format of the dataset files (auto = detected per record); a path `hf:NAME[:SPLIT]` loads from the hub"""
    bad_records: Literal["skip", "error"] = "skip"
    """chat: dataset records that do not parse (roles out of order, missing fields): skip and count, or stop"""
    max_dialogue_tokens: Optional[int] = None
    """chat: drop dataset dialogues, and generated pairs whose dialogues are longer than this many chat-templated
    tokens (REFUEL paper, Sec. 4.1: 2048)"""
    reward_device: Optional[str] = None
    """chat: the reward model's device (None = the policy's; 'cuda:+4' = 4 GPUs after it; 'auto' = sharded)"""
    user_device: Optional[str] = None
    """chat: an in-process user model's device (as --reward_device)"""
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
    vllm: bool = False
    """sample the policy's turns with a vLLM engine in each process (vllm_engine.py; needs vllm installed), its
    weights synced from the policy once per collection; the HF sampler is the default and the reference"""
    vllm_gpu_memory_utilization: float = 0.3
    """--vllm: share of the GPU the engine takes (its own copy of the weights and its KV cache)"""
    vllm_enforce_eager: bool = False
    """--vllm: no CUDA graphs / compile warm-up (quicker start; on CPU, tens of seconds less)"""
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
    lr: float = 3e-4
    """AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
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
    output_dir: str = "runs"
    """parent of runs/<run_name>/"""

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
    """One iteration's pairs (dicts) and counts. Batched at every turn."""
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
    keep = [i for i in range(n) if not (same[i] or too_long[i]) and (args.loss == "rebel" or r_a[i] != r_b[i])]
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
    stats = dict(collected=n, dropped_identical=sum(same), dropped_too_long=sum(too_long),
                 dropped_ties=n - len(keep) - sum(same) - sum(too_long),
                 reward=float(torch.cat([r_a, r_b]).mean()))
    return pairs, stats


def pair_rewards(pair, length_penalty=None, gamma=0.0):
    """The pair's rewards: REFUEL's Eq. (11) KL shaping against pi_0, and the length penalty Gamma for a sampled
    reply that hit the token budget."""
    out = []
    for side in "ab":
        r = pair[f"reward_{side}"]
        if gamma:
            r -= gamma * (pair[f"logprob_{side}"] - pair[f"ref_logprob_{side}"])  # Eq. (11)
        if length_penalty is not None and pair[f"hit_budget_{side}"]:
            r = length_penalty
        out.append(r)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------------------------------
def dpo_loss(logp_w, logp_l, ref_logp_w, ref_logp_l, beta):
    """DPO: -log sigmoid(beta [ln pi/pi_ref (y_w) - ln pi/pi_ref (y_l)]), mean over pairs."""
    return -F.logsigmoid(beta * ((logp_w - ref_logp_w) - (logp_l - ref_logp_l))).mean()


def rebel_loss(logp_a, logp_b, old_logp_a, old_logp_b, reward_a, reward_b, eta):
    """REBEL: ((1/eta)(ln pi/pi_t (y) - ln pi/pi_t (y')) - (r - r'))^2, mean over pairs (REFUEL Eq. (1), one turn)."""
    predicted = ((logp_a - old_logp_a) - (logp_b - old_logp_b)) / eta
    return ((predicted - (reward_a - reward_b)) ** 2).mean()


def pair_loss(logp_a, logp_b, batch, args):
    t = lambda key: torch.tensor([p[key] for p in batch], device=logp_a.device)
    rewards = torch.tensor([pair_rewards(p, args.length_penalty, args.gamma) for p in batch], device=logp_a.device)
    if args.loss == "rebel":
        return rebel_loss(logp_a, logp_b, t("logprob_a"), t("logprob_b"), rewards[:, 0], rewards[:, 1], args.eta)
    a_wins = rewards[:, 0] > rewards[:, 1]  # ties were dropped at collection
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


def train_on_pairs(model, tokenizer, pairs, optimizer, accelerator, rng, args, optimizer_steps: int):
    """num_epochs passes over this rank's pairs; returns the mean loss and the optimizer steps taken so far."""
    losses = []
    micro = max(1, args.local_minibatch // args.gradient_accumulation_steps)
    for _ in range(args.num_epochs):
        order = rng.permutation(len(pairs))
        for s in range(0, len(order), micro):
            batch = [pairs[i] for i in order[s:s + micro]]
            with accelerator.accumulate(model):
                convs = [p["conv_a"] for p in batch] + [p["conv_b"] for p in batch]
                logp = sim.turn_logprob(model, tokenizer, convs, [p["h"] for p in batch] * 2, args.temperature,
                                        max_tokens_per_batch=args.max_tokens_per_batch,
                                        sync_ranks=accelerator.num_processes > 1)  # same forwards on every rank
                loss = pair_loss(logp[: len(batch)], logp[len(batch):], batch, args)
                accelerator.backward(loss)
                if accelerator.sync_gradients and args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = get_lr(optimizer_steps, args)
                optimizer.step()
                optimizer.zero_grad()
                optimizer_steps += int(accelerator.sync_gradients)
            losses.append(loss.item())
    return (float(np.mean(losses)) if losses else 0.0), optimizer_steps


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: balancing across ranks, generation under ZeRO-3, checkpoints, logging, evaluation
# ----------------------------------------------------------------------------------------------------------------
def reduce_mean(accelerator, values: dict) -> dict:
    """The mean over ranks of each named scalar."""
    keys = sorted(values)
    means = accelerator.reduce(torch.tensor([float(values[k]) for k in keys], device=accelerator.device,
                                            dtype=torch.float64), "mean")
    return dict(zip(keys, means.tolist()))


def balance_pairs(pairs, accelerator):
    """Gather every rank's pairs and give each rank an equal share, so all ranks take the same optimizer steps."""
    if accelerator.num_processes == 1:
        return pairs
    from accelerate.utils import gather_object

    flat = [p for rank_pairs in gather_object([pairs]) for p in rank_pairs]
    share = len(flat) // accelerator.num_processes
    return flat[accelerator.process_index * share:(accelerator.process_index + 1) * share]


def make_accelerator(args):
    """The Accelerator for any launch: one CPU process, DDP (GPUs, or CPU processes over gloo), DeepSpeed ZeRO-2/3
    (GPUs, or CPU processes through DeepSpeed's CPU accelerator), FSDP2 (GPUs)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    cuda = torch.cuda.is_available()
    launched_with = lambda kind: os.environ.get(f"ACCELERATE_USE_{kind}", "false").lower() == "true"
    deepspeed = launched_with("DEEPSPEED")
    if launched_with("FSDP") and not cuda:
        raise ValueError("an FSDP config was given but no GPU is visible: accelerate's FSDP path needs GPUs (on CPU "
                         "it would silently run plain DDP instead)")
    handlers = []
    if deepspeed and not cuda:
        # accelerate makes a process group only for a device or for cpu=True, and cpu=True means plain DDP (the
        # DeepSpeed config would be silently ignored); DeepSpeed's CPU accelerator speaks gloo.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    bf16 = cuda if args.bf16 is None else args.bf16
    accelerator = Accelerator(cpu=not cuda and not deepspeed, mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=args.gradient_accumulation_steps, kwargs_handlers=handlers)
    if deepspeed != (accelerator.distributed_type == DistributedType.DEEPSPEED):
        raise RuntimeError(f"launched with a DeepSpeed config = {deepspeed}, but accelerate set up "
                           f"{accelerator.distributed_type}: refusing to train with something else than asked")
    return accelerator


def configure_deepspeed(accelerator, micro_batch: int, args) -> None:
    """DeepSpeed asserts train_batch_size = micro-batch x accumulation x ranks. accelerate fills the configs' "auto"
    sizes from a prepared DataLoader, and there is none here (rollouts are collected, not loaded), so set them."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = args.gradient_accumulation_steps
    config["train_batch_size"] = micro_batch * args.gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = args.max_grad_norm
    if plugin.zero_stage == 3:  # every checkpoint saves the policy in save_pretrained format, gathered
        config.setdefault("zero_optimization", {})["stage3_gather_16bit_weights_on_model_save"] = True


@contextlib.contextmanager
def outside_zero3_init(accelerator):
    """Load models that are never trained here. They do not pass through prepare(), so under ZeRO-3 with
    zero3_init_flag, from_pretrained inside deepspeed.zero.Init would leave each rank 0-element shards of them.
    (accelerate's zero3_init_context_manager(enable=False) keeps transformers' DeepSpeed config, so it does not.)"""
    from transformers.integrations import is_deepspeed_zero3_enabled, unset_hf_deepspeed_config

    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None or not is_deepspeed_zero3_enabled():
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()  # zero.Init again for models that are trained


def prepare_for_training(policy, args):
    """--train_top_layers, --gradient_checkpointing, and training mode with dropout off."""
    if args.train_top_layers:
        policy.requires_grad_(False)
        top = list(policy.get_decoder().layers[-args.train_top_layers:])
        if args.train_head:
            top += [policy.get_decoder().norm, policy.get_output_embeddings()]
        for module in top:
            module.requires_grad_(True)
    if args.gradient_checkpointing:  # renamed activation_checkpointing_enable in recent transformers
        getattr(policy, "activation_checkpointing_enable", policy.gradient_checkpointing_enable)()
    # transformers recomputes activations only in training mode (from_pretrained returns eval mode); dropout stays
    # off so that log pi_t (no grad, at collection) and log pi (the loss) are the same function of the weights.
    policy.train()
    for module in policy.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return policy


@contextlib.contextmanager
def generation_model(model, accelerator, engine=None):
    """The policy for sampling, with full weights on every rank for the whole collection (and, with a vLLM engine,
    copied into it on entry; the engine sleeps again on exit, leaving the GPU to training)."""
    with full_weights(model, accelerator) as policy:
        if engine is not None:
            engine.sync_weights(policy)
        yield policy
    if engine is not None:
        engine.sleep()


@contextlib.contextmanager
def full_weights(model, accelerator):
    """The unwrapped policy with full weights on every rank for as long as the context lasts."""
    unwrapped = accelerator.unwrap_model(model)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is not None and ds.zero_stage == 3:
        import deepspeed

        offload = model.optimizer.parameter_offload  # the engine's ZeRO-3 per-module hooks
        with deepspeed.zero.GatheredParameters(list(unwrapped.parameters())):
            # Gathering alone leaves the hooks in place: after each layer's forward they release its parameters and
            # the next token gathers them again (all layers per token), and ranks whose decode loops stop at
            # different steps then issue different numbers of all-gathers and hang. Off for the collection.
            for hook in offload.forward_hooks + offload.backward_hooks:
                hook.remove()
            offload.forward_hooks, offload.backward_hooks = [], []
            try:
                yield unwrapped
            finally:
                offload._register_deepspeed_module(offload.module)
    elif getattr(accelerator.state, "fsdp_plugin", None) is not None:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("sampling under FSDP needs FSDP2 (fsdp_version: 2, as in configs/fsdp.yaml)")
        half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        yield sim.sampling_copy(unwrapped, half)  # all-gathered once per collection
    else:
        yield unwrapped


def ranks_in_sync(model, accelerator) -> bool:
    """Whether every rank holds the same full weights. With replicas (DDP, ZeRO-1/2) a silently unsynced run shows
    up here; under ZeRO-3 and FSDP2 there is one sharded copy, so this checks the gathered weights that every rank
    samples with."""
    with full_weights(model, accelerator) as full:
        checksum = sum(p.detach().double().sum() for p in full.parameters())
    sums = accelerator.gather(torch.tensor([float(checksum)], device=accelerator.device, dtype=torch.float64))
    return bool((sums.max() - sums.min()).abs() <= 1e-6 * (1 + sums.abs().max()))


def save_checkpoint(accelerator, model, tokenizer, run_dir: Path, meta: dict, rng) -> None:
    """runs/<run>/checkpoint/{policy (save_pretrained), state (accelerate), meta.json}, replaced atomically."""
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp / "policy", state_dict=state_dict)
        tokenizer.save_pretrained(tmp / "policy")
    accelerator.save_state(str(tmp / "state"))
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    (tmp / "state" / f"numpy_rng_{accelerator.process_index}.json").write_text(json.dumps(rng.bit_generator.state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def evaluate(model, tokenizer, env, accelerator, args, seed, engine=None):
    """Mean reward (and per-turn detail on the tutor) on held-out contexts; each rank plays its share."""
    n = max(1, args.num_eval // accelerator.num_processes)
    with generation_model(model, accelerator, engine) as policy:
        out = sim.evaluate_policy(policy, tokenizer, env, n, seed + 7919 * accelerator.process_index,
                                  args.max_new_tokens, args.temperature, args.gen_batch_size, engine)
    keys = sorted(k for k in out if k != "eval/reward_stderr")
    vals = accelerator.gather(torch.tensor([out[k] for k in keys], device=accelerator.device)[None]).mean(0)
    res = dict(zip(keys, vals.tolist()))
    res["eval/reward_stderr"] = out["eval/reward_stderr"] / math.sqrt(accelerator.num_processes)
    if isinstance(env, sim.TutorEnv):
        res["eval/fraction_of_v_star"] = res["eval/mean_reward"] / sim.tutor_value(env.rules, "optimal")
    return res


def log(run_dir: Path, step: int, metrics: dict, echo: bool) -> None:
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": step, **metrics}) + "\n")
    if echo:
        tqdm.write(f"[{step:4d}] " + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                                               if not k.startswith("eval/learned")))


def check_args(args: Args) -> None:
    """Every flag in its range, named in the error: a bad value otherwise fails deep inside a run, or trains on
    nothing without a word."""
    positive = ["eta", "beta", "temperature", "max_new_tokens", "gen_batch_size", "max_turns", "num_iterations",
                "prompts_per_iteration", "num_epochs", "minibatch_size", "gradient_accumulation_steps", "eval_every",
                "num_eval", "save_every", "reward_max_length", "user_max_concurrency", "user_timeout", "user_retries",
                "max_tokens_per_batch", "max_dialogue_tokens", "vllm_gpu_memory_utilization"]
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
    if bad:
        hint = " (greedy sampling makes both replies identical: every pair dropped)" * (args.temperature <= 0)
        raise ValueError("invalid flags: " + "; ".join(bad) + hint)


def setup(args: Args):
    """Processes, derived sizes, the run directory, seeds, models and the optimizer, prepared for the launch."""
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.world_size = accelerator.num_processes
    if args.prompts_per_iteration % args.world_size or args.minibatch_size % args.world_size:
        raise ValueError("prompts_per_iteration and minibatch_size must be divisible by the number of processes")
    args.local_prompts = args.prompts_per_iteration // args.world_size
    args.local_minibatch = args.minibatch_size // args.world_size
    args.steps_per_iteration = args.num_epochs * math.ceil(args.local_prompts / args.local_minibatch)
    if args.resume and not args.run_name:
        raise ValueError("--resume needs --run_name (the run directory under output_dir)")
    args.run_name = args.run_name or f"{args.loss}-{args.mode}__{args.env}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output_dir) / args.run_name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=1))
    set_seed(args.seed + accelerator.process_index)
    rng = np.random.default_rng(args.seed + accelerator.process_index)

    frozen_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    tutor = args.model_name_or_path == "tutor"  # built by SFT on first use: rank 0 builds it, outside zero.Init
    with accelerator.main_process_first(), (outside_zero3_init(accelerator) if tutor else contextlib.nullcontext()):
        policy, tokenizer = sim.load_policy(args.model_name_or_path)
    with outside_zero3_init(accelerator):
        env = sim.make_env(args.env, args.prompts_path, args.user_model, args.reward_model, args.max_turns,
                           str(accelerator.device), frozen_dtype, args.reward_trust_remote_code, args.offline_path,
                           user_api_base=args.user_api_base, user_prompt_path=args.user_prompt_path,
                           dataset_format=args.dataset_format, bad_records=args.bad_records,
                           max_dialogue_tokens=args.max_dialogue_tokens, tokenizer=tokenizer,
                           reward_device=args.reward_device, user_device=args.user_device,
                           reward_max_length=args.reward_max_length, user_max_concurrency=args.user_max_concurrency,
                           user_timeout=args.user_timeout, user_retries=args.user_retries)
        ref_policy = None
        if args.loss == "dpo" or args.gamma:  # DPO's pi_ref, or pi_0 for Eq. (11); frozen
            ref_policy = sim.load_policy(args.model_name_or_path, frozen_dtype)[0].to(accelerator.device).eval()
            ref_policy.requires_grad_(False)
    prepare_for_training(policy, args)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=get_lr(0, args),
                                  betas=args.adam_betas, weight_decay=args.weight_decay)
    configure_deepspeed(accelerator, max(1, args.local_minibatch // args.gradient_accumulation_steps), args)
    policy, optimizer = accelerator.prepare(policy, optimizer)
    engine = make_engine(policy, accelerator, args) if args.vllm else None
    return accelerator, run_dir, rng, policy, tokenizer, env, ref_policy, optimizer, engine


def make_engine(policy, accelerator, args):
    """The optional vLLM engine for the policy's turns (vllm_engine.py), one per process, built from the policy's
    full weights; MTPO-tau's two-model mixture and the tutor's head_dim-16 policy stay on the HF sampler."""
    import vllm_engine

    with full_weights(policy, accelerator) as full:
        return vllm_engine.VLLMEngine(full, dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else "auto",
                                      gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                                      enforce_eager=args.vllm_enforce_eager)


def resume(accelerator, run_dir: Path, rng) -> dict:
    """Load runs/<run>/checkpoint (or the .old one a crash mid-replace left): model, optimizer, RNGs, counters."""
    ckpt = run_dir / "checkpoint"
    ckpt = ckpt if ckpt.exists() else run_dir / "checkpoint.old"
    if not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}")
    accelerator.load_state(str(ckpt / "state"))
    meta = json.loads((ckpt / "meta.json").read_text())
    rng_file = ckpt / "state" / f"numpy_rng_{accelerator.process_index}.json"
    if rng_file.exists():
        rng.bit_generator.state = json.loads(rng_file.read_text())
    accelerator.print(f"resumed {run_dir} at iteration {meta['iteration']}")
    return meta


def finish(accelerator, policy, run_dir: Path, args, first_eval: dict, final_eval: dict, iterations: int,
           minutes: float) -> dict:
    """summary.json and the closing line; ranks tear the process group down together."""
    summary = {"initial_reward": first_eval["eval/mean_reward"], "final_reward": final_eval["eval/mean_reward"],
               "final_stderr": final_eval["eval/reward_stderr"], "iterations": iterations, "minutes": minutes,
               "run_dir": str(run_dir), "num_processes": accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type).split(".")[-1],
               "ranks_in_sync": ranks_in_sync(policy, accelerator),
               **{k: v for k, v in final_eval.items() if k.startswith("eval/learned")}}
    if accelerator.is_main_process:
        print(f"mean reward ({args.loss}, {args.mode}): start of run {summary['initial_reward']:.3f} -> "
              f"{summary['final_reward']:.3f} +- {summary['final_stderr']:.3f} after {iterations} iterations, "
              f"{minutes:.1f} min")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()  # not one rank leaving while another still writes
    accelerator.end_training()
    return summary


def main(args: Args) -> dict:
    from accelerate.utils import gather_object

    accelerator, run_dir, rng, policy, tokenizer, env, ref_policy, optimizer, engine = setup(args)
    meta = resume(accelerator, run_dir, rng) if args.resume else {}
    start_iter, global_pairs = meta.get("iteration", 0), meta.get("pairs", 0)
    optimizer_steps = meta.get("optimizer_steps", 0)
    main_rank = accelerator.is_main_process
    eval_seed = 10_000 + args.seed
    first_eval = latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
    if main_rank:
        log(run_dir, start_iter, first_eval, echo=True)
    start, it = time.time() - meta.get("elapsed", 0.0), start_iter
    for it in tqdm(range(start_iter, args.num_iterations), disable=not main_rank, desc=f"{args.loss}-{args.mode}"):
        t0 = time.time()
        with generation_model(policy, accelerator, engine) as pi_t:
            pairs, stats = collect_pairs(pi_t, tokenizer, env, rng, args, ref_policy, engine)
        t_collect = time.time() - t0
        if args.save_rollouts:  # every rank's pairs, written by the main process
            everything = gather_object([pairs]) if args.world_size > 1 else [pairs]
            if main_rank:
                with open(args.save_rollouts, "a") as f:
                    f.writelines(json.dumps({"iteration": it, **p}) + "\n" for rank in everything for p in rank)
        pairs = balance_pairs(pairs, accelerator)
        loss = 0.0
        if pairs:  # same on every rank after balancing
            loss, optimizer_steps = train_on_pairs(policy, tokenizer, pairs, optimizer, accelerator, rng, args,
                                                   optimizer_steps)
        global_pairs += len(pairs) * args.world_size
        mean = reduce_mean(accelerator, {**stats, "loss": loss})
        dt = time.time() - t0
        metrics = {f"losses/{args.loss}_loss": mean["loss"], "charts/pair_reward": mean["reward"],
                   "charts/dropped_identical_frac": mean["dropped_identical"] / mean["collected"],
                   "charts/dropped_ties_frac": mean["dropped_ties"] / mean["collected"],
                   "charts/dropped_too_long_frac": mean["dropped_too_long"] / mean["collected"],
                   "charts/pairs_trained": global_pairs, "charts/lr": optimizer.param_groups[0]["lr"],
                   "charts/optimizer_steps": optimizer_steps, "charts/iterations_per_sec": 1 / dt,
                   "charts/pairs_per_sec": len(pairs) * args.world_size / dt, "charts/collect_share": t_collect / dt,
                   "charts/elapsed_min": (time.time() - start) / 60,
                   **{f"charts/vllm_{k}": v for k, v in (engine.timings if engine else {}).items()}, **env.metrics()}
        out_of_time = args.time_budget_minutes and time.time() - start > 60 * args.time_budget_minutes
        last = it == args.num_iterations - 1 or out_of_time
        if (it + 1) % args.eval_every == 0 or last:
            latest_eval = evaluate(policy, tokenizer, env, accelerator, args, eval_seed, engine)
            metrics.update(latest_eval)
        if main_rank:
            log(run_dir, it + 1, metrics, echo="eval/mean_reward" in metrics)
        if (it + 1) % args.save_every == 0 or last:
            save_checkpoint(accelerator, policy, tokenizer, run_dir, dict(
                iteration=it + 1, elapsed=time.time() - start, pairs=global_pairs, optimizer_steps=optimizer_steps),
                rng)
        if out_of_time:
            break
    return finish(accelerator, policy, run_dir, args, first_eval, latest_eval, it + 1, (time.time() - start) / 60)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
