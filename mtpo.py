"""mtpo.py: MTPO, MTPO-tau and the multi-turn RLHF baseline (Shani et al., "Multi-turn Reinforcement Learning from
Preference Human Feedback", NeurIPS 2024; the derivations and design notes are in docs/mtpo.md), one
self-contained CleanRL-style script.

The game (Sec. 3, Lemmas 3.1-3.2): the regularised preference
P_a(pi > pi') = P(pi > pi') - a KL_p(pi||mu) + a KL_p(pi'||mu); its Nash equilibrium is the target. Self-play
mirror descent, Eq. (1)/(2): pi_{t+1}(y|x) ~ mu^(a eta) pi_t^(1 - a eta)
exp(eta Q_a^{pi_t,pi_t}(x, y)), with Q_a(x_h, y_h) = E[P(x_{H+1} > pi') - a sum_{h'>=h} KL(pi||mu)[x_h']]: the opponent's
conversation starts afresh from the context (no shared prefix). The deep version (Sec. 4.1) is an actor-critic:
  --variant mtpo      per context two whole conversations from pi_theta; p = P(conv 1 > conv 2) from the preference
                      oracle; rewards p and 1 - p ("2 generations, 2 updates per context").       -> `rollout`
  --variant mtpo-tau  the same, both conversations sampled from the geometric mixture pi^tau ~ pi^(1-tau) mu^tau
                      (Theorem B.2), per token: softmax((1 - tau) logits_pi + tau logits_mu), a two-model KV-cached
                      decode loop batched over all conversations.                          -> `mixture_sample_turns`
  --variant rlhf      one conversation per context, the conversation-level reward instead (Theorem B.6): the
                      environment's own (--reward exact, a control as the paper's Car Dealer online oracle) or,
                      --reward learned, a Bradley-Terry reward model r_phi fitted before training on pairs of mu's
                      conversations labelled by the preference oracle (the paper's baseline, Sec. 5).
                                                            -> `learned_reward_model`, `bradley_terry_loss`
Losses for agent turn y_h at state x_h (Sec. 4.1):
  L_policy = -A_h log pi(y_h|x_h) + a KL(pi||mu)[x_h]                                       -> `policy_loss`
  L_value  = (V_hat_h - V(x_h))^2                                                           -> `value_loss`
with log pi(y_h|x_h) the SUM of the turn's token log-probs, a turn-level value (one scalar per agent state), GAE with
lambda = 0.95, gamma = 1 over agent turns (`gae`), advantages normalised over the batch, and the value trained alone
for the first --value_warmup_iterations ("policy learning delay"). No mirror-descent term to pi_t (the paper drops it).

Choices the paper leaves open, and why:
  * KL without double counting (docs/mtpo.md#kl-without-double-counting). The explicit +a KL(pi||mu)[x_h] of
    L_policy supplies the gradient of
    the CURRENT state's KL; GAE must then carry only the FUTURE states' KL: r_h = -a KLhat[x_{h+1}] for h < H and
    r_H = R (the preference p, 1 - p or the reward), with V(x_h) the value before paying x_h's KL (`turn_rewards`).
    KLhat[x] = sum over the sampled turn of log pi_t - log mu (unbiased on pi_t's samples). The gradient of the
    explicit term is the score-function estimator with the token-level reward-to-go of log pi/mu inside the turn,
    sum_t sg(sum_{t'>=t} log pi/mu) grad log pi(y_t) (unbiased for grad KL(pi(.|x)||mu(.|x)) over whole turns; the
    per-token analytic KL would miss how early tokens change later tokens' KL). The alternative (r_h = -a log pi/mu
    of the current turn and no explicit term) has the same expected gradient; the paper's loss as written keeps
    the current state's KL term out of the advantage normalisation (future states' KL passes through it).
  * Turn-level value: a scalar head on a SEPARATE copy of the initial policy's backbone (as the paper, which
    initialises V from a pretrained checkpoint), read at the last token of x_h (its generation prompt). One forward
    over each whole conversation yields every turn's log-prob and every state's value (causal attention), so the
    batch costs one pass per conversation, not one per turn.
  * MTPO-tau trains on mixture samples with the on-policy loss (tau is small; the paper does the same;
    docs/mtpo.md#training-on-mixture-samples).
  * The preference probability p is used as the reward (the paper's model "outputs the probability"), not a
    Bernoulli draw. The oracle is the simulator's: Bradley-Terry sigmoid(4 (r_a - r_b)) on the tutor task, or a
    prompted judge (--judge_model [--judge_api_base]) asked in both orders and averaged (sim.JudgePreference).
  * Value targets are not renormalised: p lies in [0, 1], so the value loss is already O(1).
  * The learned reward (docs/mtpo.md#the-learned-reward-model): two whole conversations from mu per context, a
    binary label drawn from the oracle's p (the paper's preference data are labelled pairs; --rm_labels soft fits p
    itself), r_phi = a scalar head on a copy of the initial policy's backbone read at the conversation's last token,
    fitted with the Bradley-Terry loss, gradients averaged over ranks, then frozen and shifted to mean 0 on mu's
    conversations (no rescaling: on the tutor task r_phi ~ 4 r + c, the oracle's scale).
Hyperparameters (the paper's a = 0.01/0.005/0.0025, lr 4e-5, 16 contexts are for T5 models): the defaults are the
first settings tried on the tutor task, which worked; they were not swept (README).

Runs as `python mtpo.py --variant mtpo-tau` (CPU, the tutor task) or `accelerate launch [--config_file configs/...]
mtpo.py ...`; every rank collects its own contexts and all ranks take the same optimizer steps.
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
from tqdm.auto import tqdm

import simulator as sim


@dataclass
class Args:
    variant: Literal["mtpo", "mtpo-tau", "rlhf"] = "mtpo-tau"
    """mtpo: self-play from pi; mtpo-tau: self-play from the geometric mixture; rlhf: one conversation, the reward"""
    exp_name: str = "mtpo"
    """experiment name, the first part of run_name"""
    run_name: Optional[str] = None
    """runs/<run_name>/ holds metrics and checkpoints (default: exp_name-variant__env__seed__time)"""
    resume: bool = False
    """continue runs/<run_name>/checkpoint (needs --run_name)"""
    seed: int = 1
    """random seed (rank r uses seed + r for sampling)"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""

    # environment and preference oracle
    env: Literal["tutor", "chat"] = "tutor"
    """'tutor': the embedded task; 'chat': JSONL prompts, an HF user model (or pre-sampled questions), an HF reward model"""
    prompts_path: Optional[str] = None
    """chat: dataset of prompts or dialogues (JSONL/JSON, any --dataset_format; later user turns are the
    pre-sampled questions of setting two)"""
    user_model: Optional[str] = None
    """chat: HF model prompted as the user; None = pre-sampled questions"""
    user_api_base: Optional[str] = None
    """chat: serve the user from an OpenAI-compatible endpoint (vLLM/TGI, e.g. http://host:8000/v1; --user_model
    names the served model; key from $OPENAI_API_KEY)"""
    user_prompt_path: Optional[str] = None
    """chat: a text file replacing the user's prompt template (must contain {dialogue})"""
    user_max_concurrency: int = 32
    """chat, endpoint user (and an endpoint judge): requests in flight per process"""
    user_timeout: float = 120.0
    """chat, endpoint user (and an endpoint judge): seconds per request, time queued at the server included"""
    user_retries: int = 3
    """chat, endpoint user (and an endpoint judge): tries per request (exponential backoff)"""
    reward_model: Optional[str] = None
    """chat: HF sequence-classification reward model (rlhf's reward; Bradley-Terry oracle when no judge is set)"""
    reward_trust_remote_code: bool = False
    """chat: load the reward model's own code"""
    reward_max_length: int = 4096
    """chat: the reward model sees at most this many tokens of a conversation (right-truncated, counted as
    charts/reward_truncated)"""
    dataset_format: Literal["auto", "messages", "ultrainteract", "hh", "education"] = "auto"
    """chat: format of the dataset files (auto = detected per record); a path `hf:NAME[:SPLIT]` loads from the hub"""
    bad_records: Literal["skip", "error"] = "skip"
    """chat: dataset records that do not parse (roles out of order, missing fields): skip and count, or stop"""
    max_dialogue_tokens: Optional[int] = None
    """chat: drop dataset dialogues longer than this many chat-templated tokens (REFUEL paper: 2048)"""
    reward_device: Optional[str] = None
    """chat: the reward model's device (None = the policy's; 'cuda:+4' = 4 GPUs after it; 'auto' = sharded)"""
    user_device: Optional[str] = None
    """chat: an in-process user model's device (as --reward_device)"""
    judge_model: Optional[str] = None
    """preference oracle: a prompted judge model comparing two conversations (both orders averaged); None = the
    environment's Bradley-Terry oracle sigmoid(4 (r_a - r_b))"""
    judge_api_base: Optional[str] = None
    """an OpenAI-compatible endpoint serving --judge_model (key from $OPENAI_API_KEY); None = a local HF model"""
    judge_prompt_path: Optional[str] = None
    """a text file replacing the judge's prompt (with {dialogue_a} and {dialogue_b}; default: the REFUEL paper's
    comparison prompt, or the MTPO paper's teacher-assessment prompt on Education Dialogue data)"""
    max_turns: int = 5
    """H: agent turns per conversation"""

    # policy and sampling
    model_name_or_path: str = "tutor"
    """initial policy = reference mu ('tutor' = the embedded SFT base policy)"""
    temperature: float = 1.0
    """sampling temperature; log-probs are computed on logits / temperature everywhere"""
    max_new_tokens: int = 12
    """per-turn token budget"""
    gen_batch_size: int = 256
    """max sequences per sampling call (memory)"""

    # MTPO
    alpha: float = 0.02
    """KL(pi||mu) coefficient a (paper: 0.01 RLHF / 0.005 MTPO / 0.0025 MTPO-tau at T5 scale)"""
    tau: float = 0.0375
    """mtpo-tau: mixing coefficient of pi^tau ~ pi^(1-tau) mu^tau (paper 0.0375); ignored by the other variants"""
    gae_lambda: float = 0.95
    """GAE lambda over agent turns (paper 0.95)"""
    gamma: float = 1.0
    """discount over agent turns (1: finite horizon)"""
    value_warmup_iterations: int = 3
    """policy learning delay: the value trains alone for this many iterations"""

    # multi-turn RLHF's reward (--variant rlhf)
    reward: Literal["exact", "learned"] = "exact"
    """rlhf: 'exact' = the environment's reward (the Car-Dealer-style control); 'learned' = a Bradley-Terry reward
    model r_phi fitted before training on pairs of mu's conversations labelled by the preference oracle (the
    paper's multi-turn RLHF baseline)"""
    rm_pairs: int = 2048
    """learned: pairs of whole conversations sampled from mu (two per context) across all ranks"""
    rm_labels: Literal["sampled", "soft"] = "sampled"
    """learned: 'sampled' = a binary label drawn from the oracle's p (preference data, as the paper's labelled
    pairs); 'soft' = p itself as the Bradley-Terry target"""
    rm_epochs: int = 4
    """learned: passes over the reward model's training pairs"""
    rm_lr: float = 1e-3
    """learned: reward model AdamW learning rate"""
    rm_batch_size: int = 64
    """learned: pairs per reward model step (per rank)"""
    rm_heldout_fraction: float = 0.2
    """learned: pairs held out of the fit, for reward_model/heldout_accuracy and reward_model/heldout_loss"""
    rm_model_name_or_path: Optional[str] = None
    """learned: the reward model's backbone (None = a copy of the initial policy's), with its own tokenizer"""

    # optimisation
    num_iterations: int = 1000
    """iterations (collect, then update)"""
    prompts_per_iteration: int = 128
    """contexts per iteration across all ranks (mtpo/mtpo-tau play two conversations per context, rlhf one)"""
    num_epochs: int = 1
    """passes over each batch (1 = on-policy, as the paper)"""
    num_minibatches: int = 1
    """optimizer steps per epoch (each a forward and backward over its share of the conversations: memory)"""
    max_tokens_per_batch: Optional[int] = None
    """max padded tokens per no-grad forward (pi_t's and mu's log-probs, V): memory at long conversations"""
    value_backbone: Literal["separate", "shared"] = "separate"
    """the value network's backbone: a copy of the initial policy's (the paper), or the policy's own (saves one
    trained 8B backbone: its weights, gradients and optimizer state)"""
    lr: float = 3e-4
    """policy AdamW learning rate"""
    value_lr: float = 1e-3
    """value model AdamW learning rate"""
    adam_betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas"""
    weight_decay: float = 0.0
    """AdamW weight decay"""
    max_grad_norm: float = 1.0
    """gradient clipping"""
    gradient_checkpointing: bool = False
    """trade compute for memory on large models (policy and value backbones)"""
    bf16: Optional[bool] = None
    """bf16 mixed precision (default: on when CUDA is available)"""
    time_budget_minutes: float = 8.0
    """stop after the iteration that passes this wall time (then evaluate and save); 0 = no limit"""

    # evaluation, logging, checkpoints
    eval_every: int = 20
    """evaluate every N iterations (and at the start and the end)"""
    num_eval: int = 512
    """held-out contexts per evaluation (policy and mu each play them; the oracle compares)"""
    save_every: int = 20
    """write an atomic checkpoint every N iterations (and at the end)"""
    tensorboard: bool = False
    """also write TensorBoard scalars"""
    output_dir: str = "runs"
    """parent of runs/<run_name>/"""

    # derived after parsing
    world_size: int = 0
    """number of processes (computed at runtime)"""
    local_prompts: int = 0
    """contexts per rank per iteration (computed at runtime)"""


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the geometric mixture pi^(1-tau) mu^tau, two KV caches, batched
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def mixture_sample_turns(policy, ref, tokenizer, convs, max_new_tokens: int, temperature: float = 1.0,
                         tau: float = 0.0, max_batch_size: int = 256) -> sim.TurnSamples:
    """Next assistant turn of every conversation from softmax(((1 - tau) logits_pi + tau logits_mu) / T), the
    per-token normalised geometric mixture pi^(1-tau) mu^tau (Theorem B.2; docs/mtpo.md#the-mixture-sampler).
    Both models keep their KV cache; tau = 0 runs the policy alone (= sim.sample_turns). Log-probs are under the
    mixture."""
    if not 0.0 <= tau <= 1.0:
        raise ValueError(f"tau must lie in [0, 1], got {tau}")
    if tau == 0 or ref is None:
        return sim.sample_turns(policy, tokenizer, convs, max_new_tokens, temperature, max_batch_size)
    stop_ids = sim.stop_token_ids(tokenizer, policy)  # where the HF sampler stops: end-of-turn, the model's EOS
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(policy.parameters()).device
    stops = torch.tensor(stop_ids, device=device)
    models, modes = (policy, ref), [m.training for m in (policy, ref)]
    [m.eval() for m in models]
    chunks = []
    for s in range(0, len(convs), max_batch_size):
        prompts = [sim.render_ids(tokenizer, c, add_generation_prompt=True) for c in convs[s:s + max_batch_size]]
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding
            ids[b, L - len(p):] = torch.tensor(p)
            attn[b, L - len(p):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        outs = [m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
                for m in models]  # the prefill keeps the last position's logits only
        pasts, next_pos = [sim.returned_cache(o) for o in outs], pos[:, -1:] + 1
        kws = [sim.cache_kwarg(m) for m in models]  # the cache keyword, read once, not per decode step
        logits = [o.logits[:, -1].float() for o in outs]
        toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lps = torch.zeros((B, max_new_tokens), device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for t in range(max_new_tokens):
            mixed = (1 - tau) * logits[0] + tau * logits[1]  # log pi^tau = (1-tau) log pi + tau log mu + c
            logp = (mixed / (temperature or 1.0)).log_softmax(-1)
            tok = logp.argmax(-1) if temperature == 0 else torch.multinomial(logp.exp(), 1).squeeze(1)
            toks[:, t] = torch.where(done, pad_id, tok)
            lps[:, t] = torch.where(done, 0.0, logp.gather(1, tok[:, None]).squeeze(1))
            done = done | torch.isin(tok, stops)
            n = t + 1
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
            outs = [m(input_ids=toks[:, t:t + 1], attention_mask=attn, position_ids=next_pos, use_cache=True,
                      **{kw: pk}) for m, kw, pk in zip(models, kws, pasts)]
            pasts, next_pos = [sim.returned_cache(o) for o in outs], next_pos + 1
            logits = [o.logits[:, -1].float() for o in outs]
        chunks.append(sim.finish_turns(tokenizer, toks[:, :n], lps[:, :n], stop_ids))  # the sampler's stop rule
    [m.train(mode) for m, mode in zip(models, modes)]
    return sim.TurnSamples([t for c in chunks for t in c.texts], [i for c in chunks for i in c.token_ids],
                           [lp for c in chunks for lp in c.logprobs], torch.cat([c.hit_budget for c in chunks]))


def rollout(policy, ref, tokenizer, env, messages, users, rng, args, tau=0.0, n_turns=None):
    """Whole conversations of H agent turns from the start (no shared prefix; H = n_turns[i], by default H_max):
    one batched sampler call and one batched user call per turn over every conversation still short of its H.
    A turn that hit the token budget is marked "truncated" (its never-sampled end-of-turn token is not scored).
    Returns (conversations, hit_budget N x H_max, False past a conversation's H)."""
    convs = [list(m) for m in messages]
    n_turns = [args.max_turns] * len(convs) if n_turns is None else list(n_turns)
    hit = torch.zeros((len(convs), args.max_turns), dtype=torch.bool)
    for h in range(args.max_turns):
        active = [i for i in range(len(convs)) if h < n_turns[i]]
        if not active:
            break
        out = mixture_sample_turns(policy, ref, tokenizer, [convs[i] for i in active], args.max_new_tokens,
                                   args.temperature, tau, args.gen_batch_size)
        for j, i in enumerate(active):
            convs[i].append({"role": "assistant", "content": out.texts[j],
                             **({"truncated": True} if out.hit_budget[j] else {})})
            hit[i, h] = bool(out.hit_budget[j])
        talk = [i for i in active if h < n_turns[i] - 1 or env.scores_final_user_reply]
        if talk:
            for i, r in zip(talk, env.user_turn([convs[i] for i in talk], [users[i] for i in talk], rng)):
                convs[i].append({"role": "user", "content": r})
    return convs, hit


def preference(env, convs_a, convs_b) -> torch.Tensor:
    """p = P(a preferred to b) from the environment's oracle, checked: a NaN or out-of-range p is an error."""
    p = torch.as_tensor(env.preference(convs_a, convs_b), dtype=torch.float32).flatten()
    if p.shape[0] != len(convs_a):
        raise ValueError(f"preference oracle returned {p.shape[0]} values for {len(convs_a)} pairs")
    if not torch.isfinite(p).all() or (p < 0).any() or (p > 1).any():
        raise ValueError(f"preference oracle returned NaN or a value outside [0, 1]: {p[~((p >= 0) & (p <= 1))][:5]}")
    return p


# ----------------------------------------------------------------------------------------------------------------
# Batches: one forward per whole conversation gives every turn's log-prob and every state's value
# ----------------------------------------------------------------------------------------------------------------
def conversation_batch(tokenizer, convs, H: int):
    """Right-padded (input_ids N x L, attention_mask, token_turn N x (L-1): h for target tokens of assistant turn h
    else 0, state_pos N x H: position of x_h's last token (its generation prompt), turn_mask N x H)."""
    eot = sim.end_of_turn_id(tokenizer)
    rows = []
    for c in convs:
        full = sim.render_ids(tokenizer, c, add_generation_prompt=False)
        n_turns = sum(m["role"] == "assistant" for m in c)
        spans = []
        for h in range(1, min(n_turns, H) + 1):
            prompt, turn = sim.split_turn(tokenizer, c, h, eot, check_full=False)
            if full[: len(prompt) + len(turn)] != prompt + turn:
                raise sim.ChatTemplateError(f"{sim.model_name(tokenizer)}: the chat template is not prefix-consistent")
            spans.append((len(prompt), len(turn)))
        rows.append((full, spans))
    L = max(len(f) for f, _ in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    token_turn = torch.zeros((len(rows), L - 1), dtype=torch.long)
    state_pos = torch.zeros((len(rows), H), dtype=torch.long)
    turn_mask = torch.zeros((len(rows), H), dtype=torch.bool)
    for i, (full, spans) in enumerate(rows):
        ids[i, : len(full)] = torch.tensor(full)
        attn[i, : len(full)] = 1
        for h, (start, length) in enumerate(spans, 1):
            token_turn[i, start - 1: start - 1 + length] = h  # target index j predicts ids[j + 1]
            state_pos[i, h - 1], turn_mask[i, h - 1] = start - 1, True
    return ids, attn, token_turn, state_pos, turn_mask


def row_chunks(attn, args, accelerator) -> list:
    """Row chunks for the no-grad passes: num_minibatches of them, more where --max_tokens_per_batch asks, the same
    number on every rank (ZeRO-3's per-forward parameter gathers need equal forward counts)."""
    n = args.num_minibatches
    if args.max_tokens_per_batch:
        rows_per_chunk = max(1, args.max_tokens_per_batch // attn.shape[1])  # rows are padded to one length
        n = max(n, math.ceil(attn.shape[0] / rows_per_chunk))
        n = int(accelerator.gather(torch.tensor([n], device=attn.device)).max())
    pieces = np.array_split(np.arange(attn.shape[0]), min(n, attn.shape[0]))
    return [torch.as_tensor(c, device=attn.device) for c in pieces]


def per_turn(x, token_turn, H: int):
    """Sum of a per-token quantity (N x T) over each assistant turn's tokens -> N x H."""
    out = torch.zeros((x.shape[0], H + 1), dtype=x.dtype, device=x.device)
    return out.scatter_add(1, token_turn.to(x.device), x * (token_turn > 0).to(x.device))[:, 1:]


class ActorCritic(torch.nn.Module):
    """The policy pi_theta and a turn-level value V_phi with a scalar head read at each state's last token, on its
    own backbone (a copy of the initial policy's) or, value_backbone=None, on the policy's; one module so DDP /
    DeepSpeed wrap one model. (A shared backbone is not registered twice: ZeRO-3 would hook it twice.)"""

    def __init__(self, policy, value_backbone=None):
        super().__init__()
        self.policy, self.value_backbone = policy, value_backbone
        self.value_head = torch.nn.Linear(policy.config.hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.constant_(self.value_head.bias, 0.5)

    def forward(self, input_ids, attention_mask, state_pos, temperature: float = 1.0, target_mask=None):
        """(per-token log pi at logits / T, N x (L-1), 0 outside target_mask when given; V(x_h), N x H)."""
        lp = sim.token_logprobs(self.policy, input_ids, attention_mask, temperature, target_mask=target_mask)
        backbone = self.value_backbone if self.value_backbone is not None else self.policy.get_decoder()
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = hidden.gather(1, state_pos[..., None].expand(-1, -1, hidden.shape[-1]))
        return lp, self.value_head(h.float()).squeeze(-1)


# ----------------------------------------------------------------------------------------------------------------
# Rewards, GAE, losses
# ----------------------------------------------------------------------------------------------------------------
def turn_rewards(final_reward, logratio_turn, turn_mask, alpha: float):
    """r_h = -a KLhat[x_{h+1}] for h < H_k, r_{H_k} = R (docs/mtpo.md#kl-without-double-counting): the KL of a
    state is paid on the turn before it, the current state's KL is the explicit term of L_policy, so none is
    counted twice."""
    r = torch.zeros_like(logratio_turn)
    r[:, :-1] = -alpha * logratio_turn[:, 1:] * turn_mask[:, 1:]
    last = turn_mask.long().sum(1) - 1  # H_k - 1
    r[torch.arange(len(r)), last] = final_reward.to(r.dtype)
    return r * turn_mask


def gae(rewards, values, turn_mask, gamma: float = 1.0, lam: float = 0.95):
    """GAE over agent turns (Schulman et al. 2016; docs/mtpo.md#gae-over-agent-turns):
    delta_h = r_h + gamma V(x_{h+1}) - V(x_h), V = 0 after the last turn; A_h = sum_l (gamma lam)^l delta_{h+l};
    returns (A, V_hat = A + V)."""
    N, H = rewards.shape
    adv = torch.zeros_like(rewards)
    last = torch.zeros(N, dtype=rewards.dtype, device=rewards.device)
    for h in reversed(range(H)):
        nxt = turn_mask[:, h + 1].to(rewards.dtype) if h + 1 < H else torch.zeros_like(last)
        next_v = values[:, h + 1] * nxt if h + 1 < H else torch.zeros_like(last)
        delta = rewards[:, h] + gamma * next_v - values[:, h]
        last = (delta + gamma * lam * nxt * last) * turn_mask[:, h]
        adv[:, h] = last
    return adv, (adv + values) * turn_mask


def normalize(adv, turn_mask, eps: float = 1e-8):
    """Advantage normalisation over the batch's valid turns (Sec. 4.1: "batch-normalize ... advantage")."""
    a = adv[turn_mask]
    return ((adv - a.mean()) / (a.std() + eps)) * turn_mask if a.numel() > 1 else adv


def policy_loss(logp_tokens, ref_logp_tokens, token_turn, advantages, turn_mask, alpha: float):
    """Mean over agent turns of -A_h log pi(y_h|x_h) + a KL(pi||mu)[x_h] (Sec. 4.1, L_policy). The KL term's
    gradient is the turn's score-function estimator with the in-turn reward-to-go of log pi/mu."""
    H = advantages.shape[1]
    logp_turn = per_turn(logp_tokens, token_turn, H)
    pg = -(advantages.detach() * logp_turn)  # -A_h log pi(y_h|x_h)
    lr = (logp_tokens.detach() - ref_logp_tokens) * (token_turn > 0)
    rtg = torch.zeros_like(lr)
    for h in range(1, H + 1):  # sum_{t' >= t, same turn} log pi/mu (t')
        m = token_turn == h
        rtg = rtg + (lr * m).flip(1).cumsum(1).flip(1) * m
    kl = per_turn(rtg * logp_tokens, token_turn, H)  # grad = E[grad KL(pi||mu)[x_h]]
    n = turn_mask.sum().clamp(min=1)
    return ((pg + alpha * kl) * turn_mask).sum() / n


def value_loss(values, returns, turn_mask):
    """Mean over agent states of (V_hat_h - V(x_h))^2 (Sec. 4.1, L_value)."""
    return (((values - returns.detach()) ** 2) * turn_mask).sum() / turn_mask.sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------------------
# Multi-turn RLHF with a learned reward: a Bradley-Terry reward model fitted on mu's conversations
# ----------------------------------------------------------------------------------------------------------------
def bradley_terry_loss(r_a, r_b, target):
    """Mean over pairs of -[t log sigmoid(r_a - r_b) + (1 - t) log sigmoid(r_b - r_a)]: t = 1 when conversation a
    is the preferred one (a sampled label; -log sigmoid(r_chosen - r_rejected)), or t = p for a soft target.
    Gradient with respect to r_a: (sigmoid(r_a - r_b) - t) / n."""
    d = r_a - r_b
    target = target.to(d.dtype)
    return -(target * torch.nn.functional.logsigmoid(d) + (1 - target) * torch.nn.functional.logsigmoid(-d)).mean()


class RewardModel(torch.nn.Module):
    """r_phi(x_{H+1}): a scalar head on an LM backbone, read at the last token of the whole conversation (its final
    user reply included where the environment scores it), rendered with the backbone's own chat template."""

    def __init__(self, backbone, tokenizer):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # the same on every rank; r_phi = 0 before the fit
        torch.nn.init.zeros_(self.head.bias)

    def inputs(self, convs):
        """Right-padded (input_ids, attention_mask) of whole conversations."""
        rows = [sim.render_ids(self.tokenizer, c, add_generation_prompt=False) for c in convs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sim.end_of_turn_id(
            self.tokenizer)
        ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
        return ids, attn

    def forward(self, convs):
        """r_phi of each conversation (differentiable)."""
        device = self.head.weight.device
        ids, attn = [x.to(device) for x in self.inputs(convs)]
        hidden = self.backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(convs), device=device), attn.sum(1) - 1]
        return self.head(last.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, convs, batch_size: int = 256) -> torch.Tensor:
        """r_phi of each conversation, batched, on the CPU."""
        out = torch.cat([self(convs[s:s + batch_size]).float().cpu() for s in range(0, len(convs), batch_size)])
        if not torch.isfinite(out).all():
            raise FloatingPointError("the learned reward model returned NaN or infinite values")
        return out


def build_reward_model(args, accelerator) -> RewardModel:
    """r_phi's backbone: a copy of the initial policy's (or --rm_model_name_or_path's), whole on every rank (built
    outside zero.Init: it is trained here, before and apart from the prepared models, then frozen)."""
    with outside_zero3_init(accelerator):
        lm, tok = sim.load_policy(args.rm_model_name_or_path or args.model_name_or_path)
    rm = RewardModel(lm.get_decoder(), tok).to(accelerator.device)
    rm.eval()  # dropout off for the fit as well; gradients still flow
    return rm


def preference_pairs(ref, tokenizer, env, args, accelerator, seed: int):
    """This rank's share of --rm_pairs: two whole conversations from mu per context (same context and student
    profile, independent samples), and the oracle's p = P(a > b). The training sampler's RNG is left untouched."""
    n = args.rm_pairs // accelerator.num_processes
    rng = np.random.default_rng(seed + 7919 * accelerator.process_index)
    ctx = env.contexts(n, "train", rng)
    msgs, users = [c.messages for c in ctx] * 2, [c.user for c in ctx] * 2
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919 * accelerator.process_index)
        convs = rollout(ref, None, tokenizer, env, msgs, users, rng, args,
                        n_turns=[c.max_turns or args.max_turns for c in ctx] * 2)[0]
    a, b = convs[:n], convs[n:]
    return a, b, preference(env, a, b), rng


def sync_gradients(module, accelerator) -> None:
    """All-reduce (mean) the gradients of a replicated model that is not prepared, so every rank takes the same
    step."""
    if accelerator.num_processes == 1:
        return
    params = [p for p in module.parameters() if p.requires_grad]
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = accelerator.reduce(flat, "mean")
    n = 0
    for p in params:
        p.grad = flat[n:n + p.numel()].view_as(p).clone()
        n += p.numel()


def same_on_all_ranks(module, accelerator) -> bool:
    """Whether every rank holds the same weights of a replicated module that is not prepared (r_phi)."""
    checksum = sum(p.detach().double().sum() for p in module.state_dict().values())
    sums = accelerator.gather(torch.tensor([float(checksum)], device=accelerator.device, dtype=torch.float64))
    return bool((sums.max() - sums.min()).abs() <= 1e-6 * (1 + sums.abs().max()))


def pair_metrics(r_a, r_b, p, target) -> torch.Tensor:
    """Sums over pairs: [pairs, expected agreement with an oracle label (p where r_phi prefers a, 1 - p where it
    prefers b, 1/2 on a tie), the same for the oracle's own best guess max(p, 1 - p) (the ceiling), untied pairs
    (p != 1/2), untied pairs whose side r_phi picks, Bradley-Terry loss]."""
    d = r_a - r_b
    agree = torch.where(d > 0, p, torch.where(d < 0, 1 - p, torch.full_like(p, 0.5)))
    untied = p != 0.5
    right = untied & ((d > 0) == (p > 0.5)) & (d != 0)
    return torch.stack([torch.tensor(float(len(p))), agree.sum(), torch.maximum(p, 1 - p).sum(),
                        untied.sum().float(), right.sum().float(), bradley_terry_loss(r_a, r_b, target) * len(p)])


def fit_reward_model(rm, convs_a, convs_b, p, target, args, accelerator, rng) -> dict:
    """Bradley-Terry fit of r_phi on this rank's training pairs, gradients averaged over ranks (every rank takes
    the same steps from the same start, so all end with the same r_phi; rank 0's weights are then broadcast to
    make that exact). Then r_phi is shifted to mean 0 on mu's training conversations. Returns the reward_model/*
    metrics, held-out ones over all ranks' held-out pairs."""
    n = len(convs_a)
    k = min(n - 1, max(1, round(args.rm_heldout_fraction * n)))
    perm = rng.permutation(n)
    held, train = perm[:k], perm[k:]
    optimizer = torch.optim.AdamW(rm.parameters(), lr=args.rm_lr, betas=args.adam_betas, weight_decay=0.0)
    losses = []
    for _ in range(args.rm_epochs):
        order = rng.permutation(train)
        for s in range(0, len(order), args.rm_batch_size):
            idx = order[s:s + args.rm_batch_size]
            with accelerator.autocast():
                r = rm([convs_a[i] for i in idx] + [convs_b[i] for i in idx])
            loss = bradley_terry_loss(r[: len(idx)], r[len(idx):], target[idx].to(r.device))
            loss.backward()
            sync_gradients(rm, accelerator)
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(rm.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    if accelerator.num_processes > 1:  # exact agreement, whatever the reductions' rounding
        for t in rm.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    with accelerator.autocast():
        score = lambda convs, idx: rm.score([convs[i] for i in idx], args.gen_batch_size)
        (ha, hb), (ta, tb) = [(score(convs_a, ix), score(convs_b, ix)) for ix in (held, train)]
    dev = accelerator.device
    sums = accelerator.reduce(torch.stack([pair_metrics(ha, hb, p[held], target[held]),
                                           pair_metrics(ta, tb, p[train], target[train])]).to(dev), "sum")
    mu_sum = accelerator.reduce(torch.tensor([float(ta.sum() + tb.sum()), float((ta ** 2).sum() + (tb ** 2).sum()),
                                              2.0 * len(train)], device=dev, dtype=torch.float64), "sum")
    mean = float(mu_sum[0] / mu_sum[2])
    with torch.no_grad():
        rm.head.bias -= mean  # r_phi averages 0 on mu's training conversations (a BT reward's offset is free)
    h, t = sums[0].tolist(), sums[1].tolist()
    return {"reward_model/heldout_accuracy": h[1] / h[0], "reward_model/heldout_accuracy_ceiling": h[2] / h[0],
            "reward_model/heldout_untied_accuracy": h[4] / max(h[3], 1.0), "reward_model/heldout_loss": h[5] / h[0],
            "reward_model/train_accuracy": t[1] / t[0], "reward_model/train_loss": t[5] / t[0],
            "reward_model/last_epoch_loss": float(np.mean(losses[-max(1, len(losses) // args.rm_epochs):])),
            "reward_model/heldout_pairs": h[0], "reward_model/train_pairs": t[0],
            "reward_model/untied_fraction": (h[3] + t[3]) / (h[0] + t[0]),
            "reward_model/mu_score_std": math.sqrt(max(float(mu_sum[1] / mu_sum[2]) - mean ** 2, 0.0)),
            "reward_model/steps": float(len(losses))}


def learned_reward_model(args, accelerator, ref, tokenizer, env, run_dir: Path):
    """--reward learned: sample mu's pairs, label them with the oracle, fit r_phi (or, on --resume, load the one
    the run fitted). Returns (r_phi, its reward_model/* metrics)."""
    rm = build_reward_model(args, accelerator)
    path = run_dir / "reward_model"
    if args.resume and (path / "model.pt").exists():
        rm.load_state_dict(torch.load(path / "model.pt", map_location=accelerator.device))
        return rm, json.loads((path / "metrics.json").read_text())
    t0 = time.time()
    a, b, p, rng = preference_pairs(ref, tokenizer, env, args, accelerator, 20_000 + args.seed)
    target = (torch.as_tensor(rng.random(len(p)), dtype=torch.float32) < p).float() if args.rm_labels == "sampled" \
        else p  # the paper's preference data are labelled pairs (the judge answers 1 or 2): sampled by default
    metrics = fit_reward_model(rm, a, b, p, target, args, accelerator, rng)
    metrics["reward_model/minutes"] = (time.time() - t0) / 60
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(rm.state_dict(), path / "model.pt")
        (path / "metrics.json").write_text(json.dumps(metrics))
    accelerator.print("reward model: " + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()))
    return rm, metrics


# ----------------------------------------------------------------------------------------------------------------
# Plumbing: generation under ZeRO-3, checkpoints, logging, evaluation
# ----------------------------------------------------------------------------------------------------------------
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
                              kwargs_handlers=handlers)
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
    config["gradient_accumulation_steps"] = 1
    config["train_batch_size"] = micro_batch * accelerator.num_processes
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


def prepare_for_training(model, args):
    """--gradient_checkpointing on both backbones, and training mode with dropout off."""
    if args.gradient_checkpointing:  # renamed activation_checkpointing_enable in recent transformers
        for backbone in filter(None, (model.policy, model.value_backbone)):
            getattr(backbone, "activation_checkpointing_enable", backbone.gradient_checkpointing_enable)()
    # transformers recomputes activations only in training mode (from_pretrained returns eval mode); dropout stays
    # off so that log pi_t (no grad, at collection) and log pi (the loss) are the same function of the weights.
    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


@contextlib.contextmanager
def full_weights(model, accelerator, policy_only: bool = True):
    """The unwrapped ActorCritic (its policy alone gathered when policy_only) with full weights on every rank."""
    unwrapped = accelerator.unwrap_model(model)
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    if ds is None or ds.zero_stage != 3:
        yield unwrapped
        return
    import deepspeed

    offload = model.optimizer.parameter_offload  # the engine's ZeRO-3 per-module hooks
    with deepspeed.zero.GatheredParameters(list((unwrapped.policy if policy_only else unwrapped).parameters())):
        # Gathering alone leaves the hooks in place: after each layer's forward they release its parameters and the
        # next token gathers them again (all layers per token), and ranks whose decode loops stop at different
        # steps then issue different numbers of all-gathers and hang. Off for the collection.
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield unwrapped
        finally:
            offload._register_deepspeed_module(offload.module)


@contextlib.contextmanager
def generation_policy(model, accelerator):
    """The policy for sampling, with full weights for the whole collection (FSDP2: an unsharded copy)."""
    if getattr(accelerator.state, "fsdp_plugin", None) is not None:
        if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
            raise ValueError("sampling under FSDP needs FSDP2 (fsdp_version: 2, as in configs/fsdp.yaml)")
        half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        yield sim.sampling_copy(accelerator.unwrap_model(model).policy, half)  # all-gathered once per collection
        return
    with full_weights(model, accelerator) as unwrapped:
        yield unwrapped.policy


def ranks_in_sync(model, accelerator) -> bool:
    """Whether every rank holds the same full weights (policy and value network). With replicas (DDP, ZeRO-1/2) a
    silently unsynced run shows up here; under ZeRO-3 and FSDP2 there is one sharded copy, so this checks the
    gathered weights."""
    with full_weights(model, accelerator, policy_only=False) as full:
        checksum = sum(sim.full_tensor(p.detach()).double().sum() for p in full.parameters())
    sums = accelerator.gather(torch.tensor([float(checksum)], device=accelerator.device, dtype=torch.float64))
    return bool((sums.max() - sums.min()).abs() <= 1e-6 * (1 + sums.abs().max()))


def save_checkpoint(accelerator, model, tokenizer, run_dir: Path, meta: dict, rng) -> None:
    """runs/<run>/checkpoint/{policy (save_pretrained), state (accelerate: policy, value, optimizer), meta.json},
    replaced atomically."""
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        policy_sd = {k[len("policy."):]: v for k, v in state_dict.items() if k.startswith("policy.")}
        accelerator.unwrap_model(model).policy.save_pretrained(tmp / "policy", state_dict=policy_sd)
        tokenizer.save_pretrained(tmp / "policy")
    accelerator.save_state(str(tmp / "state"))
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    with open(tmp / "state" / f"numpy_rng_{accelerator.process_index}.json", "w") as f:
        json.dump(rng.bit_generator.state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class Logger:
    """Scalars to runs/<run>/metrics.jsonl (and TensorBoard when asked), one console line per call."""

    def __init__(self, run_dir: Path, tensorboard: bool, enabled: bool):
        self.enabled, self.path, self.tb = enabled, run_dir / "metrics.jsonl", None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir))

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if echo:
            tqdm.write(f"[{step:4d}] " + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                                           if not k.startswith("eval/learned")))


@torch.no_grad()
def evaluate(model, ref, tokenizer, env, accelerator, args, seed, cache, reward_model=None):
    """On held-out contexts: the policy's mean reward, and its win rate against mu under the preference oracle
    (mean of P(pi's conversation > mu's), same contexts and students). mu's conversations are sampled once. With a
    learned reward model, also its score of both (eval/rm_reward, eval/mu_rm_reward): what RLHF optimises."""
    n = max(1, args.num_eval // accelerator.num_processes)
    s = seed + 7919 * accelerator.process_index
    ctx = env.contexts(n, "eval", np.random.default_rng(s))
    msgs, users = [c.messages for c in ctx], [c.user for c in ctx]
    turns = [c.max_turns or args.max_turns for c in ctx]  # H_max, or a record's own number (setting two)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):  # evaluation leaves the training sampler's RNG untouched
        if "mu" not in cache:
            torch.manual_seed(s + 2)
            cache["mu"] = rollout(ref, None, tokenizer, env, msgs, users, np.random.default_rng(s + 2), args,
                                  n_turns=turns)[0]
        torch.manual_seed(s + 1)
        with generation_policy(model, accelerator) as policy:
            convs = rollout(policy, None, tokenizer, env, msgs, users, np.random.default_rng(s + 1), args,
                            n_turns=turns)[0]
    r, p = env.reward(convs), preference(env, convs, cache["mu"])
    out = {"eval/mean_reward": r.mean(), "eval/win_rate_vs_mu": p.mean(), "eval/mu_reward": env.reward(cache["mu"]).mean()}
    if reward_model is not None:
        with accelerator.autocast():
            out["eval/rm_reward"] = reward_model.score(convs, args.gen_batch_size).mean()
            out["eval/mu_rm_reward"] = reward_model.score(cache["mu"], args.gen_batch_size).mean()
    if isinstance(env, sim.TutorEnv):
        for h, v in enumerate(torch.tensor([sim.lessons_learned(c) for c in convs], dtype=torch.float).mean(0)):
            out[f"eval/learned_turn{h + 1}"] = v
        out["eval/ask_rate"] = torch.tensor([sim.parse_teacher(m["content"])[0] == "ask" for c in convs for m in c
                                             if m["role"] == "assistant"], dtype=torch.float).mean()
    keys = sorted(out)
    vals = accelerator.gather(torch.stack([torch.as_tensor(out[k]).float() for k in keys]).to(accelerator.device)[None])
    res = dict(zip(keys, vals.mean(0).tolist()))
    world = accelerator.num_processes
    res["eval/reward_stderr"] = float(r.std() / math.sqrt(n * world))
    res["eval/win_rate_stderr"] = float(p.std() / math.sqrt(n * world))
    if isinstance(env, sim.TutorEnv):
        res["eval/fraction_of_v_star"] = res["eval/mean_reward"] / sim.tutor_value(env.rules, "optimal")
    return res


# ----------------------------------------------------------------------------------------------------------------
# Training loop
# ----------------------------------------------------------------------------------------------------------------
def check_args(args: Args) -> None:
    """Every flag in its range, named in the error: a bad value otherwise fails deep inside a run, or trains on
    nothing without a word."""
    positive = ["temperature", "max_new_tokens", "gen_batch_size", "max_turns", "num_iterations",
                "prompts_per_iteration", "num_epochs", "num_minibatches", "eval_every", "num_eval", "save_every",
                "reward_max_length", "max_dialogue_tokens", "user_max_concurrency", "user_timeout", "user_retries"]
    positive.append("max_tokens_per_batch")
    non_negative = ["alpha", "lr", "value_lr", "weight_decay", "max_grad_norm", "value_warmup_iterations",
                    "time_budget_minutes", "threads"]
    bad = [f"--{k} must be > 0" for k in positive if getattr(args, k) is not None and not getattr(args, k) > 0]
    bad += [f"--{k} must be >= 0" for k in non_negative if not getattr(args, k) >= 0]
    bad += [f"--{k} must lie in [0, 1]" for k in ("tau", "gamma", "gae_lambda") if not 0 <= getattr(args, k) <= 1]
    if args.reward == "learned":
        bad += [f"--{k} must be > 0" for k in ("rm_pairs", "rm_epochs", "rm_lr", "rm_batch_size")
                if not getattr(args, k) > 0]
        if not 0 < args.rm_heldout_fraction < 1:
            bad.append("--rm_heldout_fraction must lie in (0, 1)")
        if args.variant != "rlhf":
            bad.append("--reward learned is the multi-turn RLHF baseline's: it needs --variant rlhf")
    if not all(0 <= b < 1 for b in args.adam_betas):
        bad.append("--adam_betas must lie in [0, 1)")
    if bad:
        raise ValueError("invalid flags: " + "; ".join(bad))


def setup(args: Args):
    """Processes, derived sizes, the run directory, seeds, models and the optimizer, prepared for the launch."""
    from accelerate.utils import set_seed

    check_args(args)
    accelerator = make_accelerator(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.world_size = accelerator.num_processes
    if args.prompts_per_iteration % args.world_size:
        raise ValueError("prompts_per_iteration must be divisible by the number of processes")
    if args.reward == "learned" and args.rm_pairs // args.world_size < 2:
        raise ValueError("--rm_pairs must give every process at least 2 pairs (one to fit, one held out)")
    args.local_prompts = args.prompts_per_iteration // args.world_size
    if args.resume and not args.run_name:
        raise ValueError("--resume needs --run_name (the run directory under output_dir)")
    args.run_name = args.run_name or f"{args.exp_name}-{args.variant}__{args.env}__{args.seed}__{int(time.time())}"
    run_dir = Path(args.output_dir) / args.run_name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=1))
    set_seed(args.seed + accelerator.process_index)  # per-rank sampling randomness
    rng = np.random.default_rng(args.seed + accelerator.process_index)

    tutor = args.model_name_or_path == "tutor"  # built by SFT on first use: rank 0 builds it, outside zero.Init
    with accelerator.main_process_first(), (outside_zero3_init(accelerator) if tutor else contextlib.nullcontext()):
        policy, tokenizer = sim.load_policy(args.model_name_or_path)
    value_backbone = None if args.value_backbone == "shared" else \
        sim.load_policy(args.model_name_or_path)[0].get_decoder()  # trained: zero.Init is fine
    dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else torch.float32
    with outside_zero3_init(accelerator):
        ref = sim.load_policy(args.model_name_or_path, dtype)[0].to(accelerator.device).eval()  # mu, frozen
        ref.requires_grad_(False)
        env = sim.make_env(args.env, args.prompts_path, args.user_model, args.reward_model, args.max_turns,
                           str(accelerator.device), dtype, args.reward_trust_remote_code,
                           user_api_base=args.user_api_base, user_prompt_path=args.user_prompt_path,
                           dataset_format=args.dataset_format, bad_records=args.bad_records,
                           max_dialogue_tokens=args.max_dialogue_tokens, tokenizer=tokenizer,
                           reward_device=args.reward_device, user_device=args.user_device,
                           reward_max_length=args.reward_max_length, user_max_concurrency=args.user_max_concurrency,
                           user_timeout=args.user_timeout, user_retries=args.user_retries)
        if args.judge_model:  # pluggable oracle: a prompted judge, both orders averaged
            env.judge = sim.make_judge_preference(args.judge_model, args.judge_api_base, str(accelerator.device),
                                                  dtype, template=sim.judge_prompt(env, args.judge_prompt_path),
                                                  max_concurrency=args.user_max_concurrency,
                                                  timeout=args.user_timeout, retries=args.user_retries)
    model = prepare_for_training(ActorCritic(policy, value_backbone), args)
    optimizer = torch.optim.AdamW(
        [{"params": list(model.policy.parameters()), "lr": args.lr},
         {"params": [*model.value_head.parameters(), *(model.value_backbone or torch.nn.Module()).parameters()],
          "lr": args.value_lr}],
        betas=args.adam_betas, weight_decay=args.weight_decay)
    conversations = args.local_prompts * (1 if args.variant == "rlhf" else 2)
    configure_deepspeed(accelerator, max(1, conversations // args.num_minibatches), args)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, run_dir, rng, model, tokenizer, ref, env, optimizer


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


def finish(accelerator, model, run_dir: Path, args, first_eval: dict, final: dict, iterations: int,
           minutes: float, extra: Optional[dict] = None) -> dict:
    """summary.json and the closing line; ranks tear the process group down together."""
    summary = {"initial_reward": first_eval["eval/mean_reward"], "final_reward": final["eval/mean_reward"],
               "final_stderr": final["eval/reward_stderr"], "mu_reward": final["eval/mu_reward"],
               "initial_win_rate_vs_mu": first_eval["eval/win_rate_vs_mu"],
               "final_win_rate_vs_mu": final["eval/win_rate_vs_mu"],
               "final_win_rate_stderr": final["eval/win_rate_stderr"], "variant": args.variant,
               "iterations": iterations, "minutes": minutes, "run_dir": str(run_dir),
               "num_processes": accelerator.num_processes,
               "distributed_type": str(accelerator.distributed_type).split(".")[-1],
               "ranks_in_sync": ranks_in_sync(model, accelerator), "reward": args.reward, **(extra or {})}
    if accelerator.is_main_process:
        print(f"{args.variant}: mean reward {summary['initial_reward']:.3f} -> {summary['final_reward']:.3f} +- "
              f"{summary['final_stderr']:.3f} (mu {summary['mu_reward']:.3f}); win rate vs mu under the oracle "
              f"{summary['final_win_rate_vs_mu']:.3f} +- {summary['final_win_rate_stderr']:.3f}; "
              f"{iterations} iterations, {minutes:.1f} min")
        (run_dir / "summary.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()  # not one rank leaving while another still writes
    accelerator.end_training()
    return summary


def main(args: Args) -> dict:
    accelerator, run_dir, rng, model, tokenizer, ref, env, optimizer = setup(args)
    meta = resume(accelerator, run_dir, rng) if args.resume else {}
    start_iter, elapsed_before = meta.get("iteration", 0), meta.get("elapsed", 0.0)
    tau = args.tau if args.variant == "mtpo-tau" else 0.0
    logger = Logger(run_dir, args.tensorboard, accelerator.is_main_process)
    eval_seed, eval_cache = 10_000 + args.seed, {}
    rm, rm_metrics = learned_reward_model(args, accelerator, ref, tokenizer, env, run_dir) \
        if args.reward == "learned" else (None, {})
    first_eval = latest_eval = evaluate(model, ref, tokenizer, env, accelerator, args, eval_seed, eval_cache, rm)
    logger.log(start_iter, {**first_eval, **rm_metrics})
    start = time.time() - elapsed_before
    H, it = args.max_turns, start_iter
    bar = tqdm(range(start_iter, args.num_iterations), disable=not accelerator.is_main_process, desc=args.variant)
    for it in bar:
        t0 = time.time()
        contexts = env.contexts(args.local_prompts, "train", rng)
        k = 1 if args.variant == "rlhf" else 2  # two whole conversations per context for self-play
        msgs, users = [c.messages for c in contexts] * k, [c.user for c in contexts] * k
        with generation_policy(model, accelerator) as pi:  # H_max turns, or a record's own number (setting two)
            convs, hit = rollout(pi, ref, tokenizer, env, msgs, users, rng, args, tau,
                                 [c.max_turns or args.max_turns for c in contexts] * k)
        n = len(contexts)
        if args.variant == "rlhf":  # Theorem B.6: r_RLHF(x_{H+1}), the environment's or a learned r_phi
            R = env.reward(convs) if rm is None else rm.score(convs, args.gen_batch_size)
            if not torch.isfinite(R).all():
                raise FloatingPointError("the reward is NaN or infinite for some conversations")
        else:
            p = preference(env, convs[:n], convs[n:])  # p = P(conv 1 > conv 2)
            R = torch.cat([p, 1 - p])  # docs/mtpo.md#the-rewards-of-the-two-conversations
        t_collect = time.time() - t0
        dev = accelerator.device
        ids, attn, token_turn, state_pos, turn_mask = [x.to(dev) for x in conversation_batch(tokenizer, convs, H)]
        with torch.no_grad():  # pi_t's and mu's log-probs and V(x_h), in chunks (memory)
            chunks = row_chunks(attn, args, accelerator)
            agent = token_turn > 0  # the LM head runs over the agent turns' span only
            old_lp, old_v = [torch.cat(x) for x in zip(*[
                model(ids[c], attn[c], state_pos[c], args.temperature, agent[c]) for c in chunks])]
            ref_lp = torch.cat([sim.token_logprobs(ref, ids[c], attn[c], args.temperature, target_mask=agent[c]).float()
                                for c in chunks])
            logratio_turn = per_turn(old_lp - ref_lp, token_turn, H)  # KLhat[x_h] = sum log pi_t/mu over y_h
            rewards = turn_rewards(R.to(dev), logratio_turn, turn_mask, args.alpha)
            adv, returns = gae(rewards, old_v, turn_mask, args.gamma, args.gae_lambda)
            adv_n = normalize(adv, turn_mask)
        policy_on = it >= args.value_warmup_iterations  # policy learning delay
        logs = []
        for _ in range(args.num_epochs):
            order = torch.as_tensor(rng.permutation(len(convs)), device=dev)
            for mb in order.chunk(args.num_minibatches):
                lp, v = model(ids[mb], attn[mb], state_pos[mb], args.temperature, agent[mb])
                pl = policy_loss(lp, ref_lp[mb], token_turn[mb], adv_n[mb], turn_mask[mb], args.alpha)
                vl = value_loss(v, returns[mb], turn_mask[mb])
                loss = (pl if policy_on else 0.0 * pl) + vl  # 0 * pl keeps DDP's gradient hooks in step
                accelerator.backward(loss)
                if args.max_grad_norm:
                    accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                logs.append((pl.item(), vl.item()))
        pl_mean, vl_mean = np.mean(logs, 0)
        stats = accelerator.reduce(torch.tensor(
            [pl_mean, vl_mean, float(R.mean()), float(logratio_turn.sum(1).mean()), float(hit.float().mean()),
             float((R - 0.5).abs().mean()), float(old_v[turn_mask].mean())], device=dev, dtype=torch.float64), "mean")
        dt = time.time() - t0
        metrics = {"losses/policy_loss": stats[0].item(), "losses/value_loss": stats[1].item(),
                   "charts/train_reward": stats[2].item(), "charts/kl_to_mu": stats[3].item(),
                   "charts/hit_budget_frac": stats[4].item(), "charts/abs_pref_margin": stats[5].item(),
                   "charts/value_mean": stats[6].item(), "charts/policy_on": float(policy_on),
                   "charts/iterations_per_sec": 1 / dt, "charts/steps_per_sec": len(logs) / dt,
                   "charts/conversations_per_sec": len(convs) * args.world_size / dt,
                   "charts/collect_share": t_collect / dt, "charts/elapsed_min": (time.time() - start) / 60,
                   **env.metrics()}
        if rm is not None:  # what r_phi's optimiser does to the environment's own reward
            metrics["charts/true_reward"] = accelerator.reduce(env.reward(convs).mean().to(dev), "mean").item()
        out_of_time = args.time_budget_minutes and time.time() - start > 60 * args.time_budget_minutes
        last = it == args.num_iterations - 1 or out_of_time
        if (it + 1) % args.eval_every == 0 or last:
            latest_eval = evaluate(model, ref, tokenizer, env, accelerator, args, eval_seed, eval_cache, rm)
            metrics.update(latest_eval)
        logger.log(it + 1, metrics, echo="eval/mean_reward" in metrics)
        if (it + 1) % args.save_every == 0 or last:
            save_checkpoint(accelerator, model, tokenizer, run_dir,
                            dict(iteration=it + 1, elapsed=time.time() - start), rng)
        if out_of_time:
            break
    extra = {} if rm is None else {
        "reward_model_heldout_accuracy": rm_metrics["reward_model/heldout_accuracy"],
        "reward_model_heldout_accuracy_ceiling": rm_metrics["reward_model/heldout_accuracy_ceiling"],
        "reward_model_heldout_untied_accuracy": rm_metrics["reward_model/heldout_untied_accuracy"],
        "reward_model_minutes": rm_metrics["reward_model/minutes"],
        "initial_rm_reward": first_eval["eval/rm_reward"], "final_rm_reward": latest_eval["eval/rm_reward"],
        "mu_rm_reward": latest_eval["eval/mu_rm_reward"],
        "reward_model_ranks_in_sync": same_on_all_ranks(rm, accelerator)}
    return finish(accelerator, model, run_dir, args, first_eval, latest_eval, it + 1, (time.time() - start) / 60,
                  extra)


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
