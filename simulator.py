"""simulator.py: what every algorithm script reads: conversations, turn log-probs, the sampler, environments.

A conversation is a list of {"role", "content"} messages (user x_1, assistant y_1, user x_2, ...); the policy plays
the assistant. Here: chat-template turn cutting (`split_turn`, `turn_batch`) and log pi(y_h|s_h) (`turn_logprob`,
the sum over the tokens of assistant turn h, its end-of-turn token included and its role header excluded, with
logits / temperature); the batched sampler (`sample_turns`, `continue_dialogues`); the Environment interface
(contexts, a user, a reward r(s_{H+1}), a preference); `make_env` and `evaluate_policy`. Beside it, reachable as
sim.NAME all the same:

    loading.py         the scripts' --policy (load_policy) and --env flags (EnvArgs, make_env_from_args)
    tutor_task.py      the embedded task "tutor": rules, exact values (V*), the SFT reference policy mu
    chat_datasets.py   the papers' dataset formats (message lists, UltraInteract, HH, Education Dialogue)
    chat_env.py        the chat setting: prompted users (in-process or an endpoint), judges, HF reward model
    fast_decode.py     the sampler's static-cache compiled decode step (CUDA)
    logprob_memory.py  log-probs at a 128k vocabulary: chunked log-softmax, scored-span passes (`token_logprobs`,
                       the whole-sequence pass MTPO and Iterative PPO read), token-budget micro-batches
    distributed.py     launch plumbing shared by the scripts (and the FSDP2 sampling copy)

Sampled turns are re-rendered by the chat template before they are scored, and a turn that ran out of tokens is
scored without the end-of-turn token it never sampled: docs/implementation_notes.md has why.

    python simulator.py    # build (or load) the tutor's mu and print its value beside V*
"""
from __future__ import annotations

import abc
import functools
import importlib
import math
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

import fast_decode
from logprob_memory import (accepts_logits_to_keep, last_logprobs, same_count_across_ranks, token_budget_batches,
                            unwrap_model)

Conversation = list  # list[dict[str, str]]
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------
# Conversations and chat templates
# ----------------------------------------------------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """A tokenizer's chat template is missing or cannot be used to cut a conversation into turns."""


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the template's own end-of-turn marker if it has one, else EOS."""
    vocab = tokenizer.get_vocab()
    for name in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<eot>"):
        if name in vocab and name in (tokenizer.chat_template or ""):
            return vocab[name]
    if tokenizer.eos_token_id is None:
        raise ChatTemplateError(f"{model_name(tokenizer)}: no end-of-turn token found and no eos_token set")
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer, model=None, eot_id: Optional[int] = None) -> list[int]:
    """The ids that end a sampled turn: the template's end-of-turn token first, then the tokenizer's eos_token_id
    and the eos_token_id (one id or a list) of the model's generation_config, e.g. Llama-3-Instruct's
    <|end_of_text|> and <|eom_id|> beside <|eot_id|>. A turn that stops at one of the others ends there all the
    same; its text is then re-rendered by the chat template, whose end-of-turn token takes the sampled stop token's
    place in the tokens that are scored (see the module docstring)."""
    ids = [end_of_turn_id(tokenizer) if eot_id is None else eot_id, tokenizer.eos_token_id]
    if model is not None:
        eos = getattr(getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None)
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    out = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


def render_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of a chat-templated conversation (the template's own BOS included, no extra one added)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{model_name(tokenizer)} has no chat template; set tokenizer.chat_template "
                                f"(or pass a chat model) before using it as a policy")
    text = tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def dialogue_token_count(tokenizer, conv: Sequence[dict]) -> int:
    """Chat-templated length of a whole conversation under `tokenizer` (no generation prompt): what the papers'
    length filter counts (REFUEL paper, App. C: dataset dialogues and generated trajectories over 2,048 tokens are
    dropped)."""
    return len(render_ids(tokenizer, conv, add_generation_prompt=False))


def assistant_turns(messages: Sequence[dict]) -> int:
    """How many assistant turns a conversation holds (H of a finished one)."""
    return sum(m["role"] == "assistant" for m in messages)


def assistant_turn_index(messages: Sequence[dict], h: int) -> int:
    """Index in `messages` of assistant turn h (1-based)."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not 1 <= h <= len(idx):
        raise ValueError(f"turn h={h} requested but the conversation has {len(idx)} assistant turns")
    return idx[h - 1]


def split_turn(tokenizer, messages: Sequence[dict], h: int, eot_id: Optional[int] = None,
               check_full: bool = True) -> tuple[list[int], list[int]]:
    """(ids of s_h with the generation prompt, ids of assistant turn h: content + end-of-turn).

    A turn marked {"truncated": True} (it hit the sampler's token budget: see `continue_dialogues`) is its content
    only: the end-of-turn token the template puts after it was never sampled, so it is not scored.
    Checks prefix consistency: the tokens of s_h + y_h must start with the tokens of s_h, and (check_full) the
    whole conversation's tokens must start with s_h + y_h. Templates that rewrite earlier turns break both.
    """
    eot_id = end_of_turn_id(tokenizer) if eot_id is None else eot_id
    i = assistant_turn_index(messages, h)
    prompt = render_ids(tokenizer, messages[:i], add_generation_prompt=True)
    with_turn = render_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
    if with_turn[: len(prompt)] != prompt:
        raise ChatTemplateError(f"{model_name(tokenizer)}: the chat template is not prefix-consistent: tokens of "
                                f"the conversation up to turn {h} do not start with the tokens of its prompt")
    rest = with_turn[len(prompt):]
    if eot_id not in rest:
        raise ChatTemplateError(f"{model_name(tokenizer)}: assistant turn {h} does not end with the end-of-turn "
                                f"token id {eot_id} in the chat template")
    # content + end-of-turn; template whitespace after it is not generated. A truncated turn: content only.
    turn = rest[: rest.index(eot_id) + (0 if messages[i].get("truncated") else 1)]
    if check_full and len(messages) > i + 1:
        full = render_ids(tokenizer, messages, add_generation_prompt=False)
        if full[: len(prompt) + len(turn)] != prompt + turn:
            raise ChatTemplateError(f"{model_name(tokenizer)}: the chat template is not prefix-consistent: whole-"
                                    f"conversation tokens differ from the tokens of the prefix up to turn {h}")
    return prompt, turn


def turn_batch(tokenizer, convs: Sequence[Conversation], turns: Sequence[int], pad_id: int,
               check_full: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, turn_mask) for s_h + y_h, turn_mask over y_h's tokens (as
    `split_turn` cuts them: a truncated turn's end-of-turn token is neither in the row nor in the mask)."""
    pieces = [split_turn(tokenizer, c, h, check_full=check_full) for c, h in zip(convs, turns)]
    length = max(len(p) + len(t) for p, t in pieces)
    ids = torch.full((len(pieces), length), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for b, (p, t) in enumerate(pieces):
        ids[b, : len(p) + len(t)] = torch.tensor(p + t)
        attn[b, : len(p) + len(t)] = 1
        mask[b, len(p): len(p) + len(t)] = True
    return ids, attn, mask


def turn_logprob(model, tokenizer, convs, turns, temperature=1.0, pad_id=None, max_batch_size=64,
                 max_tokens_per_batch: Optional[int] = None, sync_ranks: bool = False) -> torch.Tensor:
    """Sum of log pi(y_h|s_h) over turn h's tokens for each (conversation, h), the tokens `split_turn` gives (a
    turn marked truncated: without the end-of-turn token it never sampled). Differentiable.

    Each row is s_h + y_h only (tokens after turn h do not change its log-probs in a causal model), left-padded so
    the turns end together, and the LM head runs at the last (longest turn + 1) positions: memory grows with the
    turn tokens, not with batch x length x vocabulary. Micro-batches hold at most max_batch_size rows and, when set,
    at most max_tokens_per_batch padded tokens (under autograd every forward's saved tensors live until the
    caller's backward: a training step bounds its memory by calling backward on each micro-batch of
    `token_budget_batches` in turn, i.e. gradient accumulation). sync_ranks=True (every rank calling together, under
    torch.distributed) makes every rank run the same number of forwards (extra ones on a one-token row), which
    ZeRO-3's per-forward parameter gathers and DDP's buffer broadcasts need when ranks' batches split differently."""
    pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    device = next(model.parameters()).device
    pieces = [split_turn(tokenizer, c, h) for c, h in zip(convs, turns)]
    batches = token_budget_batches([len(p) + len(t) for p, t in pieces], max_batch_size, max_tokens_per_batch)
    n_forwards = same_count_across_ranks(len(batches), device) if sync_ranks else len(batches)
    sums = [None] * len(pieces)
    extra = []
    for b in range(n_forwards):
        if b >= len(batches):  # this rank has run out of rows: a one-token forward keeps the ranks in step
            one = torch.full((1, 2), pad_id, dtype=torch.long, device=device)
            extra.append(last_logprobs(model, one, torch.ones_like(one), 1, temperature).sum() * 0.0)
            continue
        rows = [pieces[i] for i in batches[b]]
        L, k = max(len(p) + len(t) for p, t in rows), max(len(t) for _, t in rows)
        ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for r, (p, t) in enumerate(rows):  # left padding: every turn ends at column L - 1
            ids[r, L - len(p) - len(t):] = torch.tensor(p + t)
            attn[r, L - len(p) - len(t):] = 1
        in_turn = torch.arange(k) >= k - torch.tensor([len(t) for _, t in rows])[:, None]
        lp = last_logprobs(model, ids.to(device), attn.to(device), k, temperature)
        for r, s in zip(batches[b], (lp * in_turn.to(device)).sum(-1)):
            sums[r] = s
    out = torch.stack(sums) if sums else torch.zeros(0, device=device)
    return out + sum(extra) if extra else out


# ----------------------------------------------------------------------------------------------------------------
# Batched turn sampling
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TurnSamples:
    texts: list  # decoded turn contents
    token_ids: list  # per sample, the sampled ids (the stop token included when one was produced)
    logprobs: list  # per sample, per-token log-probs under the sampling distribution (logits / temperature)
    hit_budget: torch.Tensor  # bool, True where the turn ran out of tokens before any stop token


def finish_turns(tokenizer, toks: torch.Tensor, lps: torch.Tensor, stop_ids: Sequence[int]) -> TurnSamples:
    """TurnSamples from a decode loop's B x n sampled ids and their log-probs (the sampler's stopping rule, for
    any decode loop that samples turns): each row is cut after its first stop id (padding written after a
    row's stop may itself be a stop id), hit_budget where it has none, texts decoded without special tokens
    and stripped, the stop token left out of them."""
    toks, lps = toks.cpu(), lps.cpu()
    B, n = toks.shape
    is_stop = torch.isin(toks, torch.as_tensor(list(stop_ids), dtype=toks.dtype))
    has_stop = is_stop.any(1)
    length = torch.where(has_stop, is_stop.float().argmax(1) + 1, torch.full((B,), n))
    ids = [toks[b, : length[b]].tolist() for b in range(B)]  # bookkeeping on finished tensors, not generation
    content = [row[:-1] if has_stop[b] else row for b, row in enumerate(ids)]
    texts = [t.strip() for t in tokenizer.batch_decode(content, skip_special_tokens=True)]
    return TurnSamples(texts, ids, [lps[b, : length[b]] for b in range(B)], ~has_stop)


@torch.no_grad()
def sample_turns(model, tokenizer, convs: Sequence[Conversation], max_new_tokens: int, temperature: float = 1.0,
                 max_batch_size: int = 256, eot_id: Optional[int] = None, fast: Optional[bool] = None,
                 compile_step: Optional[bool] = None, keep_cache: bool = False,
                 stop_ids: Optional[Sequence[int]] = None, engine=None, partner=None, combine=None) -> TurnSamples:
    """Sample the next assistant turn of every conversation: left-padded, batched, KV-cached decoding, chunked by
    max_batch_size. A turn ends at the first of `stop_ids` (default `stop_token_ids`: the template's end-of-turn
    token and the model's other EOS ids), or after max_new_tokens (hit_budget).

    A hand decode loop instead of `model.generate`: the sampling distribution is exactly softmax(logits / T)
    whatever a hub model's generation_config says, and its log-probs come out of the same computation.
    temperature 0 = greedy (log-probs at T = 1). partner, combine: a second model decoded alongside, and
    combine(logits, partner_logits), float32, gives the logits sampled from (MTPO-tau's mixture; plain loop only).
    fast (default: on CUDA for models with a static cache): fast_decode.py's static KV cache and compiled step;
    keep_cache=True keeps the cache for the next call. engine: a `vllm_engine.VLLMEngine` samples instead."""
    stop_ids = list(stop_token_ids(tokenizer, model, eot_id) if stop_ids is None else stop_ids)
    if not stop_ids:
        raise ValueError("sample_turns: stop_ids must hold at least one token id (the end-of-turn token first)")
    if partner is not None and (fast or engine is not None or combine is None):
        raise ValueError("sample_turns: a partner model needs combine=, and runs on the plain loop (no fast=True, "
                         "no engine)")
    if engine is not None:
        return engine.sample_turns(tokenizer, convs, max_new_tokens, temperature, stop_ids=stop_ids)
    auto = fast is None
    fast = partner is None and fast_decode.use_fast_path(model, fast) and not (auto and fast_decode.failed(model))
    decode = functools.partial(_sample_turns, model, tokenizer, convs, max_new_tokens, temperature, max_batch_size,
                               stop_ids, compile_step=compile_step, keep_cache=keep_cache)
    if fast and auto:  # the default fast path: the plain loop, for good, if this model or torch build fails on it
        return fast_decode.with_fallback(model, decode)
    return decode(fast=fast, partner=partner, combine=combine)  # fast=True is always honoured


@torch.no_grad()
def _sample_turns(model, tokenizer, convs: Sequence[Conversation], max_new_tokens: int, temperature: float = 1.0,
                  max_batch_size: int = 256, stop_ids: Sequence[int] = (), fast: bool = False,
                  compile_step: Optional[bool] = None, keep_cache: bool = False, partner=None,
                  combine=None) -> TurnSamples:
    """The decode loop of sample_turns, on the fast path or not; stop_ids[0] is the end-of-turn token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    stops_dev = torch.tensor(stop_ids, dtype=torch.long, device=device)
    models = [model] if partner is None else [model, partner]
    kws = [fast_decode.cache_kwarg(m) for m in models]  # read once per call, not per decode step
    # the prefill keeps the last position's logits only (1 x V a row, not L x V)
    keeps = [dict(logits_to_keep=1) if accepts_logits_to_keep(m) else {} for m in models]
    mix = (lambda logits: logits[0]) if partner is None else (lambda logits: combine(*[x.float() for x in logits]))
    compile_step = fast and (device.type == "cuda" if compile_step is None else compile_step)
    was_training = [m.training for m in models]
    [m.eval() for m in models]
    texts, ids_out, lps_out, hit = [], [], [], []
    for s in range(0, len(convs), max_batch_size):
        prompts = [render_ids(tokenizer, c, add_generation_prompt=True) for c in convs[s:s + max_batch_size]]
        B, L = len(prompts), max(len(p) for p in prompts)
        ids = torch.full((B, L), pad_id, dtype=torch.long)
        attn = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(prompts):  # left padding: every row's next token sits at column L
            ids[b, L - len(p):] = torch.tensor(p)
            attn[b, L - len(p):] = 1
        ids, attn = ids.to(device), attn.to(device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        if fast:  # a static cache sized on a ladder of shapes, and the compiled step
            decoder = fast_decode.StaticDecoder(model, ids, attn, pos, max_new_tokens, pad_id, compile_step, keeps[0])
            logits = decoder.logits
        else:  # (the plain loop's DynamicCache grows by torch.cat: every step copies the whole cache)
            outs = [m(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **k)
                    for m, k in zip(models, keeps)]
            caches, logits = [fast_decode.returned_cache(o) for o in outs], mix([o.logits[:, -1] for o in outs])
            del outs  # nothing of the prefill's output but the caches and one row of logits outlives it
        next_pos = pos[:, -1:] + 1
        toks = torch.full((B, max_new_tokens), pad_id, dtype=torch.long, device=device)
        lps = torch.zeros((B, max_new_tokens), device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        n = 0
        for t in range(max_new_tokens):
            logp = (logits.float() / (temperature or 1.0)).log_softmax(-1)
            tok = logp.argmax(-1) if temperature == 0 else torch.multinomial(logp.exp(), 1).squeeze(1)
            toks[:, t] = torch.where(done, pad_id, tok)
            lps[:, t] = torch.where(done, 0.0, logp.gather(1, tok[:, None]).squeeze(1))
            done = done | torch.isin(tok, stops_dev)
            n = t + 1
            if bool(done.all()) or t == max_new_tokens - 1:
                break
            if fast:
                logits = decoder.step(toks[:, t:t + 1], next_pos, L + t)
            else:
                attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
                outs = [m(input_ids=toks[:, t:t + 1], attention_mask=attn, position_ids=next_pos, use_cache=True,
                          **{kw: c}) for m, kw, c in zip(models, kws, caches)]
                caches, logits = [fast_decode.returned_cache(o) for o in outs], mix([o.logits[:, -1] for o in outs])
            next_pos = next_pos + 1
        done_turns = finish_turns(tokenizer, toks[:, :n], lps[:, :n], stop_ids)
        texts += done_turns.texts
        ids_out += done_turns.token_ids
        lps_out += done_turns.logprobs
        hit.append(done_turns.hit_budget)
    [m.train(mode) for m, mode in zip(models, was_training)]
    if not keep_cache:
        fast_decode.free_static_caches(model)
    return TurnSamples(texts, ids_out, lps_out, torch.cat(hit))


# ----------------------------------------------------------------------------------------------------------------
# The environment interface
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class Context:
    index: int  # position in the prompt source (for logging and pairing)
    messages: list  # the conversation so far: x_1 (an optional system message before it)
    user: Any = None  # the user's hidden state: the tutor's student profile, a list of pre-sampled questions, None
    # The assistant turns this context's record supports, or None when any H <= H_max can be played (a user model,
    # an endpoint, the tutor). Set where the record fixes the dialogue: pre-sampled user turns (setting two, whose
    # H is the record's own number of turns: REFUEL paper Sec. 4.2, App. C) and D_off dialogues (LT-OFFLINE and
    # LT-MIXED train each dialogue's own last turn). Scripts draw H <= max_turns.
    max_turns: Optional[int] = None


class Environment(abc.ABC):
    """Base class: a prompt source, a user, a reward and a preference. Batched calls everywhere."""
    name = "env"
    max_turns = 5  # H_max
    scores_final_user_reply = False  # True when r(s_{H+1}) needs the user's reaction to y_H (the tutor's)

    @abc.abstractmethod
    def contexts(self, n: int, split: str, rng: np.random.Generator) -> list[Context]:
        """n initial contexts from the 'train' or 'eval' prompts."""

    @abc.abstractmethod
    def user_turn(self, convs: Sequence[Conversation], users: Sequence[Any], rng: np.random.Generator) -> list[str]:
        """The next user message of each conversation (each ends with an assistant turn)."""

    @abc.abstractmethod
    def reward(self, convs: Sequence[Conversation]) -> torch.Tensor:
        """r(s_{H+1}) of each whole conversation."""

    def offline(self, n: int, rng: np.random.Generator) -> tuple[list[Context], list[Conversation]]:
        """n draws from the offline dataset D_off: (contexts whose index is the D_off row, full dialogues)."""
        raise ValueError(f"env {self.name!r} has no offline dataset D_off")

    def offline_alternative(self, contexts: Sequence[Context], prefixes: Sequence[Conversation],
                            rng: np.random.Generator) -> list[str]:
        """A second reply of D_off's behaviour policy at each state s_h (for LT-OFFLINE)."""
        raise ValueError(f"env {self.name!r} has no alternative offline replies")

    judge = None  # a JudgePreference; None = Bradley-Terry on the reward

    def preference(self, convs_a, convs_b, scale: float = 4.0) -> torch.Tensor:
        """P(a preferred to b): the prompted judge when one is set, else Bradley-Terry on rewards,
        sigmoid(scale * (r(a) - r(b)))."""
        if self.judge is not None:
            return self.judge(convs_a, convs_b)
        return torch.sigmoid(scale * (self.reward(convs_a) - self.reward(convs_b)))

    def supported_turns(self, user) -> Optional[int]:
        """The most assistant turns a conversation with this user state can reach (None: no limit)."""
        return None

    def metrics(self) -> dict:
        """Running counters to log with the training metrics (e.g. charts/reward_truncated)."""
        return {}

    def dialogue_metrics(self, convs: Sequence[Conversation]) -> dict:
        """Task-specific eval/ metrics of finished conversations (evaluate_policy logs them)."""
        return {}


def continue_dialogues(model, tokenizer, env: Environment, convs: list, users: list, n_turns: Sequence[int],
                       rng: np.random.Generator, max_new_tokens: int, temperature: float = 1.0,
                       max_batch_size: int = 256, reply_after_last: bool = False, engine=None) -> tuple[list, list]:
    """Continue each conversation (ending with a user message) until it has n_turns[i] assistant turns.

    Conversations of different lengths advance together: one batched sampler call per step over every
    conversation still short of its target, then one batched user call. Returns (conversations, per conversation
    a list {turn h: (summed log-prob, hit_budget)} of the turns sampled here). A turn that hit the token budget is
    appended as {"role": "assistant", "content": ..., "truncated": True}: `split_turn` then leaves out the
    end-of-turn token the template adds after it (never sampled), and chat templates ignore the extra key.
    The user speaks after every sampled turn but the last, and after the last too when the environment's reward
    reads the user's reaction (the tutor) or reply_after_last=True (a roll-in to s_{h+1}, which ends with the
    user's x_{h+1}). Asking for more turns than a conversation's user state supports (setting two's pre-sampled
    questions: `Environment.supported_turns`, the contexts' max_turns) is a ValueError before any sampling.
    engine: a `vllm_engine.VLLMEngine` holding the policy's current weights samples the turns (see sample_turns).
    """
    need = [n + int(bool(reply_after_last) and not env.scores_final_user_reply) for n in n_turns]
    for i, (c, u, n) in enumerate(zip(convs, users, need)):
        if assistant_turns(c) >= n_turns[i]:
            continue  # nothing to sample, no user turn to ask for
        most = env.supported_turns(u)
        if most is not None and n > most:
            raise ValueError(f"conversation {i}: {n_turns[i]} assistant turns"
                             f"{' and a user reply after the last' if n > n_turns[i] else ''} requested, but its "
                             f"record's pre-sampled user turns support {most} (draw H <= Context.max_turns, or "
                             f"pass --user_model)")
    convs, info = [list(c) for c in convs], [dict() for _ in convs]
    try:
        while True:
            active = [i for i, c in enumerate(convs) if assistant_turns(c) < n_turns[i]]
            if not active:
                return convs, info
            out = sample_turns(model, tokenizer, [convs[i] for i in active], max_new_tokens, temperature,
                               max_batch_size, keep_cache=True, engine=engine)
            for j, i in enumerate(active):
                msg = {"role": "assistant", "content": out.texts[j]}
                if bool(out.hit_budget[j]):
                    msg["truncated"] = True  # its end-of-turn token was never sampled: not scored (split_turn)
                convs[i].append(msg)
                info[i][assistant_turns(convs[i])] = (float(out.logprobs[j].sum()), bool(out.hit_budget[j]))
            talk = [i for i in active if assistant_turns(convs[i]) < n_turns[i]
                    or env.scores_final_user_reply or reply_after_last]
            if talk:
                replies = env.user_turn([convs[i] for i in talk], [users[i] for i in talk], rng)
                for i, r in zip(talk, replies):
                    convs[i].append({"role": "user", "content": r})
    finally:
        fast_decode.free_static_caches(model)  # the only cache kept across calls (keep_cache=True above)


def prefix_to_turn(conv: Conversation, h: int) -> Conversation:
    """s_h: every message before assistant turn h (ends with the user message x_h)."""
    return list(conv[: assistant_turn_index(conv, h)])


def make_env(env: str = "tutor", prompts_path: Optional[str] = None, user_model: Optional[str] = None,
             reward_model: Optional[str] = None, max_turns: int = 5, device: str = "cpu",
             dtype=torch.float32, trust_remote_code: bool = False, offline_path: Optional[str] = None,
             user_api_base: Optional[str] = None, user_prompt_path: Optional[str] = None,
             dataset_format: str = "auto", bad_records: str = "skip", max_dialogue_tokens: Optional[int] = None,
             tokenizer=None, reward_device: Optional[str] = None, user_device: Optional[str] = None,
             reward_max_length: int = 4096, user_max_concurrency: int = 32, user_timeout: float = 120.0,
             user_retries: int = 3) -> Environment:
    """The environment named by the scripts' flags (`loading.EnvArgs` documents each). The user: --user_model
    in-process, or served at --user_api_base (an OpenAI-compatible endpoint), or, with neither, the dataset's
    pre-sampled questions. Education Dialogue records make the user a student who knows the record's hidden
    learning preferences. chat_env.make_chat_env builds the chat world; sizing the endpoint: OpenAIChatClient."""
    if env == "tutor":
        from tutor_task import TutorEnv, TutorRules

        return TutorEnv(TutorRules(max_turns=max_turns))
    if env != "chat":
        raise ValueError(f"unknown env {env!r}: expected 'tutor' or 'chat'")
    from chat_env import make_chat_env

    return make_chat_env(prompts_path, user_model, reward_model, max_turns, device, dtype, trust_remote_code,
                         offline_path, user_api_base, user_prompt_path, dataset_format, bad_records,
                         max_dialogue_tokens, tokenizer, reward_device, user_device, reward_max_length,
                         user_max_concurrency, user_timeout, user_retries)


# ----------------------------------------------------------------------------------------------------------------
# Evaluation shared by the scripts: the policy plays H turns from held-out contexts
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(model, tokenizer, env: Environment, n: int, seed: int, max_new_tokens: int,
                    temperature: float = 1.0, max_batch_size: int = 256, engine=None) -> dict:
    rng = np.random.default_rng(seed)
    ctx = env.contexts(n, "eval", rng)  # H_max turns, or a record's own number (Context.max_turns)
    convs, _ = continue_dialogues(model, tokenizer, env, [c.messages for c in ctx], [c.user for c in ctx],
                       [c.max_turns or env.max_turns for c in ctx], rng, max_new_tokens, temperature, max_batch_size,
                       engine=engine)
    r = env.reward(convs)
    out = {"eval/mean_reward": float(r.mean()), "eval/reward_stderr": float(r.std() / math.sqrt(n))}
    out.update(env.dialogue_metrics(convs))  # the tutor: lessons learned per turn, ask rate
    return out


# ----------------------------------------------------------------------------------------------------------------
# What lives in sibling modules, reachable as sim.NAME all the same
# ----------------------------------------------------------------------------------------------------------------
SIBLING_MODULES = ("loading", "tutor_task", "chat_datasets", "chat_env", "fast_decode", "logprob_memory", "distributed")


def __getattr__(name: str):
    """sim.TutorEnv, sim.ChatEnv, sim.load_prompts, sim.sampling_copy, ...: the tutor task, the chat world, the
    sampler's fast path and the sampling copy live in the files named in SIBLING_MODULES (imported on first use)."""
    if not name.startswith("__"):
        for module_name in SIBLING_MODULES:
            found = vars(importlib.import_module(module_name)).get(name)
            if found is not None and not isinstance(found, types.ModuleType):
                return found
    raise AttributeError(f"module 'simulator' has no attribute {name!r}")


if __name__ == "__main__":  # build (or load) the tutor's mu and print its value beside V*: see tutor_task.main
    import tyro

    import tutor_task

    tutor_task.main(tyro.cli(tutor_task.Args))
