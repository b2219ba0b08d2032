"""simulator.py: the environments every algorithm script in this repository trains in.

A conversation is a list of {"role", "content"} messages (user x_1, assistant y_1, user x_2, ...). The policy
plays the assistant; an environment supplies
  * initial contexts            (x_1 from a prompt source, plus the user's hidden state),
  * `user_turn(convs, users)`   the next user messages x_{h+1} ~ T(.|s_h, y_h), batched and random,
  * `reward(convs)`             a conversation-level reward r(s_{H+1}), read off the conversation alone,
  * `preference(a, b)`          P(a preferred to b).

Two families live here:
  * "tutor", the embedded default (a small cousin of the MTPO paper's Education Dialogue). A teacher (the policy)
    teaches a student with a hidden learning style and a hidden patience over H = 5 teacher turns. Everything is
    built in code: a word-level tokenizer with a chat template, a tiny Llama-architecture reference policy mu
    trained by SFT on a scripted reference teacher, an offline dataset D_off, and the exact values V*
    (expectimax over beliefs), V(reference) and the last-turn-only bound, so learning is measured against a
    known optimum.
  * "chat", the papers' setting: prompts and dialogues from JSONL/JSON files or the hub (message lists,
    UltraInteract, Anthropic HH, Education Dialogue), an HF causal LM or an OpenAI-compatible endpoint prompted as
    the user (REFUEL paper, Appendix C.2 format: a justification line, then a "Question:" line; Education
    Dialogue's student knows its hidden learning preference), pre-sampled user turns (setting two), an HF
    sequence-classification reward model scoring the chat-templated conversation, and prompted judges.

Tokens are made only through `tokenizer.apply_chat_template`. log pi(y_h|s_h) is always the sum over the tokens
of assistant turn h, its end-of-turn token included and its role header excluded, with logits / temperature; a turn
that ran out of tokens is marked {"truncated": True} and scored without the end-of-turn token the template adds
(it was never sampled). Sampled turns are decoded without special tokens, stripped and re-rendered by the template:
the tokens scored can differ from the tokens sampled (a turn that stopped at another stop token, e.g. Llama-3's
<|end_of_text|>, is scored with the template's end-of-turn token instead; text that re-tokenizes differently is
scored as re-tokenized). Old and new log-probs both go through `turn_logprob`, so they agree with each other.

Run `python simulator.py` to build (or load) the tutor's reference policy and print its value beside the
scripted reference, V* and the last-turn-only bound.
"""
from __future__ import annotations

import abc
import functools
import inspect
import json
import math
import os
import re
import shutil
import time
import warnings
import weakref
from collections import Counter
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Conversation = list  # list[dict[str, str]]
ROOT = Path(__file__).resolve().parent


# ----------------------------------------------------------------------------------------------------------------
# Conversations and chat templates
# ----------------------------------------------------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """A tokenizer's chat template is missing or cannot be used to cut a conversation into turns."""


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def validate_conversation(messages: Sequence[dict], where: str = "conversation") -> None:
    """Roles must be an optional system message, then user/assistant alternating, starting with the user."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r:.200}")
    start = 1 if messages[0].get("role") == "system" else 0
    if start == len(messages):
        raise ValueError(f"{where}: only a system message, no user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"{where}: message {i} must be a dict with string 'role' and 'content', got {m!r:.200}")
        if i >= start:
            want = "user" if (i - start) % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"{where}: roles must alternate user/assistant starting with user; "
                                 f"message {i} has role {m['role']!r}, expected {want!r}")


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


# Float32 elements of one log-softmax chunk (128 MiB): float32 copies of the logits exist one chunk at a time.
LOGPROB_CHUNK_ELEMENTS = 2 ** 25


class _TargetLogprobs(torch.autograd.Function):
    """log softmax(logits / T)[target] for each row of a (N, V) logits tensor, in row chunks.

    The plain `logits.float() / T` -> `log_softmax` -> `gather` holds three float32 N x V tensors in the forward and
    saves one for the backward; here only one chunk is ever float32, and the backward keeps the logits in their own
    dtype (they exist anyway) and recomputes each chunk's softmax from them."""

    @staticmethod
    def forward(ctx, logits, targets, temperature, chunk):
        out = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], chunk):
            lp = (logits[s:s + chunk].float() / temperature).log_softmax(-1)
            out[s:s + chunk] = lp.gather(1, targets[s:s + chunk, None]).squeeze(1)
        ctx.save_for_backward(logits, targets)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.mark_non_differentiable(targets)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        grad = torch.empty_like(logits)
        for s in range(0, logits.shape[0], ctx.chunk):
            g = grad_out[s:s + ctx.chunk, None].float()
            # d log p_t / d logit_j = (1[j = t] - p_j) / T
            p = (logits[s:s + ctx.chunk].float() / ctx.temperature).softmax(-1)
            d = (-p * g).scatter_add_(1, targets[s:s + ctx.chunk, None], g)
            grad[s:s + ctx.chunk] = d / ctx.temperature
        return grad, None, None, None


def target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / temperature) at `targets` (float32, shape of targets) for logits of shape
    targets.shape + (V,), float32 only one chunk of rows at a time. Differentiable."""
    V = logits.shape[-1]
    flat = logits.reshape(-1, V)  # a view for the contiguous output of an LM head
    chunk = max(1, LOGPROB_CHUNK_ELEMENTS // V)
    return _TargetLogprobs.apply(flat, targets.reshape(-1), float(temperature), chunk).view(targets.shape)


def unwrap_model(model):
    """The HF model inside DDP / DeepSpeed / torch.compile wrappers (read only: the forward still goes through the
    wrapper, whose hooks gather ZeRO-3 shards and synchronise gradients)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward computes logits only for the last k positions (`logits_to_keep`)."""
    try:
        return "logits_to_keep" in inspect.signature(type(unwrap_model(model)).forward).parameters
    except (TypeError, ValueError):
        return False


def last_logprobs(model, input_ids, attention_mask, k: int, temperature: float = 1.0) -> torch.Tensor:
    """log pi of each row's last k tokens given what precedes them (B x k, float32), for LEFT-padded rows.

    The LM head runs at the last k + 1 positions only (`logits_to_keep`), so the logits cost B x (k + 1) x V, not
    B x L x V; positions come from the mask (cumsum - 1), so a row's values do not depend on its left padding;
    no KV cache is built (use_cache=False)."""
    pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    kw = dict(logits_to_keep=k + 1) if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=pos, use_cache=False,
                   **kw).logits
    logits = logits[:, -(k + 1):]  # a no-op view with logits_to_keep
    # position j predicts token j + 1: the last position predicts nothing and gets a dummy target (dropped below)
    targets = F.pad(input_ids[:, -k:], (0, 1)) if k else input_ids.new_zeros((len(input_ids), 1))
    return target_logprobs(logits, targets, temperature)[:, :-1]


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0,
                   target_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log pi(token_t | tokens_<t) for t >= 1 (shape B x (L-1); entry j is token j + 1's), with logits / temperature.

    target_mask (B x (L-1), bool): the entries that are needed (e.g. the turns in a loss); the others are 0. With
    it, each right-padded row is cut after its last needed token (a causal model's earlier log-probs do not depend
    on later tokens), the rows are re-aligned at their ends (left padding, positions from the mask), and the LM head
    runs only over the span from each row's first needed token: memory B x span x V instead of B x L x V. Without
    it every position is computed, as before. Either way no KV cache is built and float32 copies of the logits are
    made one chunk at a time."""
    B, L = input_ids.shape
    if target_mask is None:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        targets = F.pad(input_ids[:, 1:], (0, 1))  # the last position predicts nothing: a dummy target, dropped
        return target_logprobs(logits, targets, temperature)[:, :-1]
    need = target_mask.to(device=input_ids.device, dtype=torch.bool)
    has = need.any(1)
    if not has.any():
        return torch.zeros((B, L - 1), device=input_ids.device)
    j = torch.arange(L - 1, device=input_ids.device)
    first = torch.where(need, j, L).min(1).values
    last = torch.where(need, j, -1).max(1).values
    n = torch.where(has, last + 2, 1)  # tokens kept per row: up to the last needed target token
    k = int(torch.where(has, last - first + 1, 0).max())
    Lp = int(n.max())
    src = torch.arange(Lp, device=input_ids.device) - (Lp - n)[:, None]  # left padding: row ends aligned
    ids = input_ids.gather(1, src.clamp(min=0))
    attn = attention_mask.gather(1, src.clamp(min=0)) * (src >= 0)
    lp = last_logprobs(model, ids, attn, k, temperature)
    t = n[:, None] - k - 1 + torch.arange(k, device=input_ids.device)  # the target index of each kept entry
    ok = t >= 0
    out = torch.zeros((B, L - 1), dtype=lp.dtype, device=lp.device).scatter_add(1, t.clamp(min=0), lp * ok)
    return out * need


def token_budget_batches(lengths: Sequence[int], max_batch_size: int = 64,
                         max_tokens_per_batch: Optional[int] = None) -> list[list[int]]:
    """Index lists of micro-batches: at most max_batch_size rows and (when set) at most max_tokens_per_batch padded
    tokens (rows x the longest row) each; a row longer than the budget goes alone. With a budget, rows are grouped
    by length (longest first) so little is padding; without one, consecutive chunks as before."""
    order = list(range(len(lengths)))
    if max_tokens_per_batch is None:
        return [order[s:s + max_batch_size] for s in range(0, len(order), max_batch_size)]
    order.sort(key=lambda i: -lengths[i])
    out, cur = [], []
    for i in order:  # longest first: a batch's first row sets its padded length
        if cur and (len(cur) >= max_batch_size or (len(cur) + 1) * lengths[cur[0]] > max_tokens_per_batch):
            out.append(cur)
            cur = []
        cur.append(i)
    return out + [cur] if cur else out


def _same_count_across_ranks(n: int, device) -> int:
    """The largest n over the ranks of the default process group (n itself outside torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


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
    n_forwards = _same_count_across_ranks(len(batches), device) if sync_ranks else len(batches)
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
def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: an FSDP2 shard (DTensor) is all-gathered, a plain tensor returned as is.
    (Duck-typed: importing torch.distributed.tensor at the end of a two-process gloo run made a rank
    abort at exit now and then.)"""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# Per-model sampler state, held weakly: it goes with its model, and a later model at the same address never finds
# an earlier one's copy, cache or compiled step.
_SAMPLING_COPIES = weakref.WeakKeyDictionary()  # model -> its unsharded copy
_COMPILED_STEPS = weakref.WeakKeyDictionary()  # model -> its compiled decode step
_STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> ((batch, length), its kept static cache)
_FAST_PATH_FAILED = weakref.WeakSet()  # models the default fast path failed on


@torch.no_grad()
def sampling_copy(model, dtype: Optional[torch.dtype] = None):
    """An unsharded copy of an FSDP2-sharded HF causal LM for sampling, refreshed in place on every call: each
    parameter is all-gathered once per collection, not once per layer per decoded token, and ranks whose decode loops
    stop at different steps cannot deadlock. Costs one full copy of the weights per rank (in `dtype`, e.g. bf16 when
    the shards are fp32 masters under mixed precision)."""
    params = dict(model.named_parameters())
    first = next(iter(params.values()))
    copy = _SAMPLING_COPIES.get(model)
    if copy is None:
        from transformers import AutoModelForCausalLM

        copy = AutoModelForCausalLM.from_config(model.config).to(first.device, dtype or first.dtype).eval()
        copy.requires_grad_(False)
        if getattr(model, "generation_config", None) is not None:  # its EOS ids are stop tokens (stop_token_ids)
            copy.generation_config = model.generation_config
        _SAMPLING_COPIES[model] = copy
    for name, p in copy.named_parameters():
        p.copy_(full_tensor(params[name].detach()))
    for name, b in model.named_buffers():  # e.g. rotary frequencies: replicated, copied as they are
        copy.get_buffer(name).copy_(full_tensor(b))
    return copy


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


def cache_kwarg(model) -> str:
    """The forward() keyword of the KV cache: `cache` in recent transformers, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def returned_cache(out):
    return out["cache"] if "cache" in out else out["past_key_values"]


def use_fast_path(model, fast: Optional[bool]) -> bool:
    """fast=None: the static-cache compiled decode step on CUDA for models that support a static cache, else the
    plain dynamic-cache loop; True forces it (CPU included, where it is tested); False turns it off."""
    if fast is None:
        return next(model.parameters()).is_cuda and bool(getattr(model, "_can_compile_fullgraph", False))
    return fast


def decode_step(model, compile_step: bool):
    """One decode step on a static KV cache, compiled once per model (CUDA graphs on GPU: the per-step Python and
    kernel-launch overhead that dominates eager decoding is replayed from one captured graph). The step reaches its
    model through a weak reference, so the kept compiled step does not keep the model alive."""
    if compile_step and model in _COMPILED_STEPS:
        return _COMPILED_STEPS[model]
    ref, kw = weakref.ref(model), cache_kwarg(model)

    def step(ids, attn, pos, cache_position, cache):
        out = ref()(input_ids=ids, attention_mask=attn, position_ids=pos, cache_position=cache_position,
                    use_cache=True, **{kw: cache})
        return out.logits[:, -1]
    if not compile_step:
        return step
    mode = "reduce-overhead" if next(model.parameters()).is_cuda else "default"
    import torch._dynamo

    cfg = torch._dynamo.config
    cfg.recompile_limit = max(cfg.recompile_limit, STEP_RECOMPILE_LIMIT)
    _COMPILED_STEPS[model] = torch.compile(step, mode=mode, fullgraph=True, dynamic=False)
    return _COMPILED_STEPS[model]


def static_cache(model, batch: int, length: int):
    """A static KV cache for (batch, length), zeroed. The last one of each model is reused by the next call with the
    same shape (a compiled step, CUDA graphs above all, is bound to its tensors) until `free_static_caches()`:
    at 8B, 256 x 1152 it holds 38 GB, which training must not find still allocated."""
    from transformers import StaticCache

    shape = (batch, length)
    if model in _STATIC_CACHES and _STATIC_CACHES[model][0] == shape:
        cache = _STATIC_CACHES[model][1]
        cache.reset()
        return cache
    _STATIC_CACHES.pop(model, None)
    cache = StaticCache(config=model.config, max_cache_len=length)
    _STATIC_CACHES[model] = (shape, cache)
    return cache


def free_static_caches(model=None) -> None:
    """Drop the kept static cache of `model` (of every model when None)."""
    if model is None:
        _STATIC_CACHES.clear()
    else:
        _STATIC_CACHES.pop(model, None)


def bucket(n: int, step: int = 64) -> int:
    """Round a length up to a multiple of step."""
    return -(-n // step) * step


def ladder(n: int, floor: int) -> int:
    """The smallest of floor x {1, 1.5, 2, 3, 4, 6, 8, ...} that is >= n: a compiled decode step sees about two
    shapes per doubling (its compiles grow with log(length), not with length), and a static cache or a batch of
    filler rows is at most 1.5x what is needed (a third of it unused at worst)."""
    size = floor
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3  # 2^k -> 1.5 x 2^k -> 2^(k+1)
    return size


# Distinct (batch, cache length) shapes one compiled decode step may be compiled for. torch's default recompile
# limit (8 per code object, shared by every model's step) would be reached by an ordinary run whose dialogues grow
# over the turns; past it the step cannot compile and the sampler falls back to the plain loop for good.
STEP_RECOMPILE_LIMIT = 64


@torch.no_grad()
def sample_turns(model, tokenizer, convs: Sequence[Conversation], max_new_tokens: int, temperature: float = 1.0,
                 max_batch_size: int = 256, eot_id: Optional[int] = None, fast: Optional[bool] = None,
                 compile_step: Optional[bool] = None, keep_cache: bool = False,
                 stop_ids: Optional[Sequence[int]] = None, engine=None) -> TurnSamples:
    """Sample the next assistant turn of every conversation: left-padded, batched, KV-cached decoding.

    A turn ends at the first of `stop_ids` (default `stop_token_ids(tokenizer, model, eot_id)`: the template's
    end-of-turn token and the model's other EOS ids), or after max_new_tokens (hit_budget).

    A hand decode loop instead of `model.generate`: the sampling distribution is exactly softmax(logits / T)
    whatever a hub model's generation_config says (top-p, top-k, repetition penalty), and its log-probs come out
    of the same computation. Chunked by max_batch_size for memory. temperature 0 = greedy (log-probs at T = 1).
    The fast path (`use_fast_path`) preallocates a static KV cache (length rounded up on `ladder`) and runs a
    compiled decode step (compile_step: default on CUDA; batch padded up on `ladder` too, so the step is compiled
    for a bounded set of shapes); the sampling itself is the same code on both paths.
    keep_cache=True leaves the static cache allocated for the next call (continue_dialogues frees it at its end).
    engine: a `vllm_engine.VLLMEngine` holding this policy's weights samples instead (same contract, same stops).
    """
    if engine is not None:
        stop_ids = list(stop_token_ids(tokenizer, model, eot_id) if stop_ids is None else stop_ids)
        return engine.sample_turns(tokenizer, convs, max_new_tokens, temperature, stop_ids=stop_ids)
    auto = fast is None
    fast = use_fast_path(model, fast) and not (auto and model in _FAST_PATH_FAILED)  # fast=True is always honoured
    stop_ids = list(stop_token_ids(tokenizer, model, eot_id) if stop_ids is None else stop_ids)
    if not stop_ids:
        raise ValueError("sample_turns: stop_ids must hold at least one token id (the end-of-turn token first)")
    args = (model, tokenizer, convs, max_new_tokens, temperature, max_batch_size, stop_ids)
    if not (fast and auto):
        return _sample_turns(*args, fast, compile_step, keep_cache)
    rng_state = (torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        return _sample_turns(*args, True, compile_step, keep_cache)
    except ValueError:  # bad input (a chat template, say): the plain loop would fail the same way
        raise
    except Exception as e:  # a model or torch build the default fast path cannot handle: the plain loop, for good
        warnings.warn(f"sampler fast path failed for this model ({type(e).__name__}: {str(e)[:300]}); "
                      f"using the plain decode loop from now on")
        _FAST_PATH_FAILED.add(model)
        free_static_caches(model)
        torch.random.set_rng_state(rng_state[0])
        if rng_state[1] is not None:
            torch.cuda.set_rng_state_all(rng_state[1])
        return _sample_turns(*args, False, compile_step, keep_cache)


@torch.no_grad()
def _sample_turns(model, tokenizer, convs: Sequence[Conversation], max_new_tokens: int, temperature: float = 1.0,
                 max_batch_size: int = 256, stop_ids: Sequence[int] = (), fast: bool = False,
                 compile_step: Optional[bool] = None, keep_cache: bool = False) -> TurnSamples:
    """The decode loop of sample_turns, on the fast path or not; stop_ids[0] is the end-of-turn token."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    device = next(model.parameters()).device
    stops_dev = torch.tensor(stop_ids, dtype=torch.long, device=device)
    kw = cache_kwarg(model)  # read once per call, not per decode step
    compile_step = fast and (device.type == "cuda" if compile_step is None else compile_step)
    step = decode_step(model, compile_step) if fast else None
    was_training = model.training
    model.eval()
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
        # the prefill keeps the last position's logits only (1 x V a row, not L x V)
        keep = dict(logits_to_keep=1) if accepts_logits_to_keep(model) else {}
        if fast:  # the mask covers the whole cache from the start; the causal mask hides columns not yet written
            # bucketed shapes: a compiled step is compiled once per (batch, cache length), so few of them
            cache_len, extra = ladder(L + max_new_tokens, 64), (ladder(B, 16) - B if compile_step else 0)
            if extra:  # a compiled step sees few batch shapes: filler rows (one visible pad token) are dropped
                ids, pos = F.pad(ids, (0, 0, 0, extra), value=pad_id), F.pad(pos, (0, 0, 0, extra))
                attn = torch.cat([attn, F.pad(attn.new_ones((extra, 1)), (L - 1, 0))])
            cache = static_cache(model, B + extra, cache_len)
            attn = torch.cat([attn, attn.new_ones((B + extra, cache_len - L))], 1)
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True,
                        cache_position=torch.arange(L, device=device), **{kw: cache}, **keep)
        else:  # (the plain loop's DynamicCache grows by torch.cat: every step copies the whole cache)
            out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, **keep)
            cache = returned_cache(out)
        logits, next_pos = out.logits[:B, -1], pos[:, -1:] + 1
        del out  # nothing of the prefill's output but the cache and one row of logits outlives it
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
                step_ids = F.pad(toks[:, t:t + 1], (0, 0, 0, extra), value=pad_id)
                logits = step(step_ids, attn, next_pos, torch.tensor([L + t], device=device), cache)[:B].clone()
            else:
                attn = torch.cat([attn, torch.ones((B, 1), dtype=attn.dtype, device=device)], 1)
                out = model(input_ids=toks[:, t:t + 1], attention_mask=attn, position_ids=next_pos, use_cache=True,
                            **{kw: cache})
                cache, logits = returned_cache(out), out.logits[:, -1]
            next_pos = next_pos + 1
        done_turns = finish_turns(tokenizer, toks[:, :n], lps[:, :n], stop_ids)
        texts += done_turns.texts
        ids_out += done_turns.token_ids
        lps_out += done_turns.logprobs
        hit.append(done_turns.hit_budget)
    model.train(was_training)
    if not keep_cache:
        free_static_caches(model)
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
        if sum(m["role"] == "assistant" for m in c) >= n_turns[i]:
            continue  # nothing to sample, no user turn to ask for
        most = env.supported_turns(u)
        if most is not None and n > most:
            raise ValueError(f"conversation {i}: {n_turns[i]} assistant turns"
                             f"{' and a user reply after the last' if n > n_turns[i] else ''} requested, but its "
                             f"record's pre-sampled user turns support {most} (draw H <= Context.max_turns, or "
                             f"pass --user_model)")
    try:
        return _continue_dialogues(model, tokenizer, env, convs, users, n_turns, rng, max_new_tokens, temperature,
                                   max_batch_size, reply_after_last, engine)
    finally:
        free_static_caches(model)  # the only cache kept across calls (keep_cache=True below)


def _continue_dialogues(model, tokenizer, env, convs, users, n_turns, rng, max_new_tokens, temperature,
                        max_batch_size, reply_after_last=False, engine=None):
    convs = [list(c) for c in convs]
    info = [dict() for _ in convs]
    while True:
        active = [i for i, c in enumerate(convs) if sum(m["role"] == "assistant" for m in c) < n_turns[i]]
        if not active:
            return convs, info
        out = sample_turns(model, tokenizer, [convs[i] for i in active], max_new_tokens, temperature,
                           max_batch_size, keep_cache=True, engine=engine)
        for j, i in enumerate(active):
            msg = {"role": "assistant", "content": out.texts[j]}
            if bool(out.hit_budget[j]):
                msg["truncated"] = True  # its end-of-turn token was never sampled: not scored (split_turn)
            convs[i].append(msg)
            h = sum(m["role"] == "assistant" for m in convs[i])
            info[i][h] = (float(out.logprobs[j].sum()), bool(out.hit_budget[j]))
        talk = [i for i in active if sum(m["role"] == "assistant" for m in convs[i]) < n_turns[i]
                or env.scores_final_user_reply or reply_after_last]
        if talk:
            replies = env.user_turn([convs[i] for i in talk], [users[i] for i in talk], rng)
            for i, r in zip(talk, replies):
                convs[i].append({"role": "user", "content": r})


def prefix_to_turn(conv: Conversation, h: int) -> Conversation:
    """s_h: every message before assistant turn h (ends with the user message x_h)."""
    return list(conv[: assistant_turn_index(conv, h)])


# ----------------------------------------------------------------------------------------------------------------
# The embedded task "tutor"
# ----------------------------------------------------------------------------------------------------------------
STYLES = ("pictures", "stories", "songs", "puzzles")
TOPICS = ("fractions", "planets", "volcanoes", "grammar", "rivers", "insects", "magnets", "poems")
ASK = "how do you like to learn ?"
TEACH = "let us learn with {} ."
GREETING = "hello teacher , please teach me {} ."
NAMED, NOT_SURE = "i like {} best .", "i am not sure ."
LEARNED, NEUTRAL, BORED = "i learned it , thank you !", "hmm , i did not get that .", "this is boring ."
ASLEEP, CONFUSED = "zzz ... i am asleep .", "i do not understand you ."
_TEACH_RE = re.compile(r"^let us learn with (\w+) \.$")


@dataclass(frozen=True)
class TutorRules:
    """Constants of the tutor task; the exact values below are computed from them."""
    p_name_style: float = 0.7  # an asked student names its style, else says it is not sure
    p_learn_match: float = 0.9  # a lesson in the student's style is learned
    p_learn_mismatch: float = 0.1  # a lesson in another style is learned (and uses one unit of patience)
    p_bored: float = 0.7  # an unlearned mismatched lesson makes the student say it is bored
    patience: tuple = (1, 2)  # mismatched lessons tolerated, drawn uniformly; then the student is asleep
    max_turns: int = 5  # H: teacher turns; reward = lessons learned / (H - 1)
    ref_ask: float = 0.2  # reference teacher: asks at turn 1 with this probability
    ref_repeat: float = 0.6  # reference teacher: repeats a style whose lesson was just learned
    ref_follow_answer: bool = True  # "V1": after asking at turn 1 and hearing a style, teach it at turn 2


def parse_teacher(text: str) -> tuple[str, int]:
    """('ask', -1) | ('teach', style index) | ('other', -1)."""
    text = " ".join(text.split())
    if text == ASK:
        return "ask", -1
    m = _TEACH_RE.match(text)
    if m and m.group(1) in STYLES:
        return "teach", STYLES.index(m.group(1))
    return "other", -1


def student_reply(conv: Conversation, style: int, patience: int, rules: TutorRules, u: np.ndarray) -> str:
    """The student's answer to the last teacher turn; u holds 3 uniforms. Patience is replayed from history."""
    left = patience
    teacher = [m["content"] for m in conv if m["role"] == "assistant"]
    for text in teacher[:-1]:
        kind, s = parse_teacher(text)
        if left > 0 and kind == "teach" and s != style:
            left -= 1
    if left == 0:
        return ASLEEP
    kind, s = parse_teacher(teacher[-1])
    if kind == "ask":
        return NAMED.format(STYLES[style]) if u[0] < rules.p_name_style else NOT_SURE
    if kind == "other":
        return CONFUSED
    if s == style:
        return LEARNED if u[0] < rules.p_learn_match else NEUTRAL
    if u[0] < rules.p_learn_mismatch:
        return LEARNED
    return BORED if u[1] < rules.p_bored else NEUTRAL


def lessons_learned(conv: Conversation) -> list[int]:
    """Per teacher turn, 1 if the student's next message says the lesson was learned."""
    out, teacher_seen = [], False
    for m in conv:
        if m["role"] == "assistant":
            out.append(0)
            teacher_seen = True
        elif m["role"] == "user" and teacher_seen:
            out[-1] = int(" ".join(m["content"].split()) == LEARNED)
    return out


def reference_teacher(conv: Conversation, rules: TutorRules, u: np.ndarray) -> str:
    """The scripted reference teacher's next turn (the behaviour mu imitates); u holds 2 uniforms."""
    teacher = [m["content"] for m in conv if m["role"] == "assistant"]
    t = len(teacher) + 1
    if t == 1:
        return ASK if u[0] < rules.ref_ask else TEACH.format(STYLES[int(u[1] * 4)])
    last_kind, last_style = parse_teacher(teacher[-1])
    reply = " ".join(conv[-1]["content"].split())
    if t == 2 and rules.ref_follow_answer and last_kind == "ask":
        named = [s for s in STYLES if reply == NAMED.format(s)]
        if named:
            return TEACH.format(named[0])
    if last_kind == "teach" and reply == LEARNED and u[0] < rules.ref_repeat:
        return TEACH.format(STYLES[last_style])
    return TEACH.format(STYLES[int(u[1] * 4)])


class TutorEnv(Environment):
    """The embedded teacher/student task. user = (style, patience), hidden from the policy."""
    name = "tutor"
    scores_final_user_reply = True

    def __init__(self, rules: TutorRules = TutorRules(), offline_size: int = 10000, offline_seed: int = 0):
        self.rules = rules
        self.max_turns = rules.max_turns
        self.offline_size, self.offline_seed, self._pool = offline_size, offline_seed, None

    def offline_pool(self) -> tuple[list[Context], list[Conversation]]:
        """D_off: a fixed set of full reference-teacher dialogues (same seed, same rows), with their students."""
        if self._pool is None:
            rng = np.random.default_rng(self.offline_seed)
            ctx = self.contexts(self.offline_size, "offline", rng)
            self._pool = ctx, self.reference_dialogues(ctx, rng)
        return self._pool

    def offline(self, n, rng):
        ctx, convs = self.offline_pool()
        idx = rng.integers(len(convs), size=n)
        return [ctx[i] for i in idx], [convs[i] for i in idx]

    def offline_alternative(self, contexts, prefixes, rng):
        u = rng.random((len(prefixes), 2))  # D_off's behaviour policy (the scripted reference), resampled
        return [reference_teacher(p, self.rules, u[i]) for i, p in enumerate(prefixes)]

    def contexts(self, n, split, rng):
        # "train" and "eval" prompts differ only in their randomness; the topic does not matter to the student
        topics = rng.integers(len(TOPICS), size=n)
        styles = rng.integers(len(STYLES), size=n)
        patience = rng.choice(self.rules.patience, size=n)
        return [Context(i, [{"role": "user", "content": GREETING.format(TOPICS[topics[i]])}],
                        (int(styles[i]), int(patience[i]))) for i in range(n)]

    def user_turn(self, convs, users, rng):
        u = rng.random((len(convs), 3))
        return [student_reply(c, s, p, self.rules, u[i]) for i, (c, (s, p)) in enumerate(zip(convs, users))]

    def reward(self, convs):
        return torch.tensor([sum(lessons_learned(c)) / (self.max_turns - 1) for c in convs], dtype=torch.float32)

    def reference_dialogues(self, n_or_contexts, rng: np.random.Generator, n_turns: Optional[int] = None) -> list:
        """Full dialogues of the scripted reference teacher from n new contexts (or the given ones)."""
        ctx = self.contexts(n_or_contexts, "offline", rng) if isinstance(n_or_contexts, int) else n_or_contexts
        n = len(ctx)
        convs, users = [list(c.messages) for c in ctx], [c.user for c in ctx]
        for _ in range(n_turns or self.max_turns):
            u = rng.random((n, 2))
            for i, c in enumerate(convs):
                c.append({"role": "assistant", "content": reference_teacher(c, self.rules, u[i])})
            for c, r in zip(convs, self.user_turn(convs, users, rng)):
                c.append({"role": "user", "content": r})
        return convs


# Exact values by expectimax over beliefs on the hidden (style, patience left).
def _obs_model(rules: TutorRules, state: tuple, action: int) -> list:
    """[(observation, probability, next state)]; action -1 = ask, 0..3 = teach that style."""
    style, left = state
    if left == 0:
        return [("asleep", 1.0, state)]
    if action < 0:
        return [(f"named{style}", rules.p_name_style, state), ("notsure", 1 - rules.p_name_style, state)]
    if action == style:
        return [("learned", rules.p_learn_match, state), ("neutral", 1 - rules.p_learn_match, state)]
    nxt = (style, left - 1)
    pl, pb = rules.p_learn_mismatch, rules.p_bored
    return [("learned", pl, nxt), ("bored", (1 - pl) * pb, nxt), ("neutral", (1 - pl) * (1 - pb), nxt)]


def _reference_policy(rules: TutorRules, t: int, memory: tuple) -> dict:
    """Action distribution of the scripted reference at turn t; memory = (turn-1 named style, last action, obs)."""
    named, last_a, last_o = memory
    uniform = {a: 1 / len(STYLES) for a in range(len(STYLES))}
    if t == 1:
        return {-1: rules.ref_ask, **{a: (1 - rules.ref_ask) / len(STYLES) for a in uniform}}
    if t == 2 and rules.ref_follow_answer and named is not None:
        return {named: 1.0}
    if last_a >= 0 and last_o == "learned":
        return {a: (1 - rules.ref_repeat) / len(STYLES) + (rules.ref_repeat if a == last_a else 0) for a in uniform}
    return uniform


def tutor_value(rules: TutorRules = TutorRules(), policy: str = "optimal") -> float:
    """Exact expected reward of: 'optimal' (V*), 'reference', 'last_turn' (reference, then a Bayes-optimal last
    turn: the best any last-turn-only method can reach from the reference's states) or 'never_ask' (best policy
    that only teaches)."""
    H = rules.max_turns
    states = [(s, p) for s in range(len(STYLES)) for p in range(max(rules.patience) + 1)]
    prior = tuple(1 / (len(STYLES) * len(rules.patience)) if p in rules.patience else 0.0 for s, p in states)

    @functools.lru_cache(maxsize=None)
    def value(belief: tuple, t: int, memory: tuple) -> float:
        if t > H:
            return 0.0

        def q(a):  # expected learned lessons from action a onwards
            obs = {}
            for (st, b) in zip(states, belief):
                if b > 0:
                    for o, p, nxt in _obs_model(rules, st, a):
                        post, tot = obs.setdefault(o, ([0.0] * len(states), [0.0]))
                        post[states.index(nxt)] += b * p
                        tot[0] += b * p
            total = 0.0
            for o, (post, tot) in obs.items():
                nb = tuple(round(x / tot[0], 12) for x in post)
                named = int(o[5:]) if (t == 1 and o.startswith("named")) else memory[0]
                total += tot[0] * ((o == "learned") + value(nb, t + 1, (named, a, o)))
            return total

        teach = range(len(STYLES))
        if policy == "optimal" or (policy == "last_turn" and t == H):
            return max(q(a) for a in [-1, *teach])
        if policy == "never_ask":
            return max(q(a) for a in teach)
        return sum(p * q(a) for a, p in _reference_policy(rules, t, memory).items())

    return value(prior, 1, (None, None, None)) / (H - 1)


# The word-level tokenizer and the tiny Llama reference policy mu.
def build_tutor_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<bos>", "<eot>", "<|user|>", "<|assistant|>", "<|system|>"]
    texts = [ASK, TEACH, GREETING, NAMED, NOT_SURE, LEARNED, NEUTRAL, BORED, ASLEEP, CONFUSED]
    words = sorted({w for t in texts for w in t.split()} - {"{}"} | set(STYLES) | set(TOPICS))
    vocab = {w: i for i, w in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eot>", clean_up_tokenization_spaces=False,
                                  additional_special_tokens=special[4:])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eot> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok.name_or_path = "tutor-wordlevel"
    return tok


def tutor_model_config(tokenizer):
    from transformers import LlamaConfig

    # initializer_range 0.1, not HF's 0.02: with 0.02 SFT stalls and never learns "repeat the style that worked"
    # (a copy from context), whatever the lr or steps (docs/implementation_notes.md#initialising-mu).
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       initializer_range=0.1, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def sft_batch(tokenizer, convs: Sequence[Conversation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask over every assistant turn's tokens (for SFT)."""
    rows = []
    for c in convs:
        full = render_ids(tokenizer, c, add_generation_prompt=False)
        mask = [False] * len(full)
        eot = end_of_turn_id(tokenizer)
        for i in (i for i, m in enumerate(c) if m["role"] == "assistant"):
            start = len(render_ids(tokenizer, c[:i], add_generation_prompt=True))
            end = full.index(eot, start) + 1
            mask[start:end] = [True] * (end - start)
        rows.append((full, mask))
    L = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for b, (full, m) in enumerate(rows):
        ids[b, : len(full)], attn[b, : len(full)], mask[b, : len(full)] = torch.tensor(full), 1, torch.tensor(m)
    return ids, attn, mask


def atomic_save_pretrained(objs: Sequence, path: Path) -> None:
    """save_pretrained every object into path via a temporary sibling and a rename: never a half-written dir."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for o in objs:
        o.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def train_base_policy(env: TutorEnv, steps: int = 900, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      pool: int = 12800, log_every: int = 250):
    """SFT of a tiny Llama on D_off (the scripted reference teacher's dialogues); returns (model, tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = build_tutor_tokenizer()
    model = LlamaForCausalLM(tutor_model_config(tok))
    data = env.reference_dialogues(pool, rng)
    batches = [sft_batch(tok, data[i:i + batch_size]) for i in range(0, pool, batch_size)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    start = time.time()
    for step in range(steps):
        ids, attn, mask = batches[rng.integers(len(batches))]
        lp = token_logprobs(model, ids, attn)
        loss = -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[sft] step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return model, tok


DEFAULT_BASE_POLICY = ROOT / "runs" / "tutor_base_policy"


def load_tutor_base_policy(path: Path = DEFAULT_BASE_POLICY, rebuild: bool = False, **sft_kwargs):
    """mu for the tutor task: loaded from `path` when present, else built by SFT and saved there atomically."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if rebuild or not (path / "config.json").exists():
        print(f"[simulator] building the tutor base policy by SFT into {path} (once; about 2 minutes on CPU)")
        model, tok = train_base_policy(TutorEnv(), **sft_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_pretrained([model, tok], path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tok


# ----------------------------------------------------------------------------------------------------------------
# The papers' setting: prompt files, LLM users, pre-sampled users, reward models
# ----------------------------------------------------------------------------------------------------------------
def read_records(path: str, what: str):
    """(where, record) pairs from a local .jsonl file, a .json file (a list of records), or, with the `hf:` prefix,
    a hub dataset `hf:NAME[:SPLIT]` (default split train; the `datasets` package is imported only then)."""
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{what} {path}: loading from the hub needs `pip install datasets` "
                              f"(or download the files and pass a local path)") from None
        ds = datasets.load_dataset(name, split=split or "train")
        for n, rec in enumerate(ds):
            yield f"{name}[{n}]", dict(rec)
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = p.read_text()
    if p.suffix == ".json" and text.lstrip().startswith("["):  # one JSON list (Education Dialogue's files)
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for n, rec in enumerate(recs):
            yield f"{path}[{n}]", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


DATASET_FORMATS = ("auto", "messages", "ultrainteract", "hh", "education")
EDUCATION_SYSTEM = "You are a teacher. Teach the student about {topic}; adapt to how the student likes to learn."
EDUCATION_OPENING = "Hi! I'm here for today's lesson about {topic}."  # the teacher speaks first in the data


def detect_format(rec) -> str:
    if isinstance(rec, list) or (isinstance(rec, dict) and "messages" in rec):
        return "messages"
    if isinstance(rec, dict) and "trajectory" in rec:
        return "ultrainteract"
    if isinstance(rec, dict) and "background_info" in rec and "conversation" in rec:
        return "education"
    if isinstance(rec, dict) and isinstance(rec.get("chosen"), str) and "Human:" in rec["chosen"]:
        return "hh"
    if isinstance(rec, dict) and isinstance(rec.get("chosen"), list):
        return "messages"
    raise ValueError(f"unrecognised record (keys {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); "
                     f"expected one of the formats {DATASET_FORMATS[1:]}")


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH's '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript as messages."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n")) if text.strip() else []
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def record_to_dialogue(rec, fmt: str) -> dict:
    """{"messages", "alternative" (a rejected last reply or None), "user" (per-dialogue user state)} of one record;
    ValueError when the record does not have the format's shape."""
    if fmt == "auto":
        fmt = detect_format(rec)
    user, alt = {}, None
    if fmt == "messages":
        msgs = rec if isinstance(rec, list) else rec.get("messages", rec.get("chosen"))
        if isinstance(rec, dict):
            user["questions"] = rec.get("questions")
            rej = rec.get("rejected")
            if rej is not None:
                validate_conversation(rej, "rejected")
                if len(rej) != len(msgs) or rej[:-1] != msgs[:-1] or rej[-1]["role"] != "assistant":
                    raise ValueError("'chosen' and 'rejected' must differ only in the last assistant turn")
                alt = rej[-1]["content"]
    elif fmt == "ultrainteract":  # openbmb/UltraInteract_pair: trajectory [{from, value}] + chosen/rejected replies
        roles = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
        try:
            msgs = [{"role": roles[t["from"].lower()], "content": t["value"]} for t in rec["trajectory"]]
        except (KeyError, AttributeError, TypeError):
            raise ValueError("an UltraInteract record needs 'trajectory': [{'from': user|assistant, 'value'}]") \
                from None
        if isinstance(rec.get("chosen"), str) and msgs and msgs[-1]["role"] == "user":
            msgs.append({"role": "assistant", "content": rec["chosen"]})
            alt = rec.get("rejected") if isinstance(rec.get("rejected"), str) else None
    elif fmt == "hh":  # Anthropic/hh-rlhf: chosen/rejected transcripts differing in the last assistant turn
        msgs, rej = parse_hh(rec.get("chosen", "")), parse_hh(rec.get("rejected", ""))
        if rej and len(rej) == len(msgs) and rej[:-1] == msgs[:-1] and rej[-1]["role"] == "assistant":
            alt = rej[-1]["content"]
    elif fmt == "education":  # Education Dialogue: the teacher (our assistant) opens, the student is the user
        info, turns = rec.get("background_info"), rec.get("conversation")
        if not isinstance(info, dict) or "topic" not in info or not isinstance(turns, list):
            raise ValueError("an Education Dialogue record needs background_info.topic and a conversation list")
        msgs = [{"role": "system", "content": EDUCATION_SYSTEM.format(topic=info["topic"])},
                {"role": "user", "content": EDUCATION_OPENING.format(topic=info["topic"])}]
        roles = {"teacher": "assistant", "student": "user"}
        try:
            msgs += [{"role": roles[t["role"].lower()], "content": t["text"]} for t in turns]
        except (KeyError, AttributeError, TypeError):
            raise ValueError("Education Dialogue turns need role Teacher|Student and text") from None
        user = {**info, "questions": None}
    else:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {DATASET_FORMATS}")
    validate_conversation(msgs)
    return {"messages": msgs, "alternative": alt, "user": user, "format": fmt}


def load_dialogues(path: str, fmt: str = "auto", max_turns: Optional[int] = None, max_tokens: Optional[int] = None,
                   tokenizer=None, bad_records: str = "skip", what: str = "dataset") -> list[dict]:
    """Dialogues from a local file or hub dataset in any of DATASET_FORMATS (auto-detected per record), with the
    papers' filters: at most `max_turns` assistant turns (REFUEL paper: 5; Education Dialogue's 10-15-turn lessons
    are cut to max_turns instead, since only their openings and student profiles are used) and at most `max_tokens`
    chat-templated tokens under `tokenizer` (REFUEL paper: 2048). Records that do not parse (roles out of order,
    missing fields) are skipped and counted (bad_records='skip') or raise naming the record ('error')."""
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {DATASET_FORMATS}")
    if bad_records not in ("skip", "error"):
        raise ValueError(f"bad_records must be 'skip' or 'error', got {bad_records!r}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("a token limit on dialogues needs the policy's tokenizer")
    out, skipped, first_bad = [], Counter(), None
    for where, rec in read_records(path, what):
        try:
            d = record_to_dialogue(rec, fmt)
        except ValueError as e:
            if bad_records == "error":
                raise ValueError(f"{where}: {e} (pass --bad_records skip to skip such records)") from None
            skipped["malformed"] += 1
            first_bad = first_bad or f"{where}: {e}"
            continue
        msgs, n_turns = d["messages"], sum(m["role"] == "assistant" for m in d["messages"])
        if max_turns is not None and n_turns > max_turns:
            if d["format"] != "education":
                skipped[f"more than {max_turns} turns"] += 1
                continue
            d["messages"] = msgs[:assistant_turn_index(msgs, max_turns) + 1]
        if max_tokens is not None and dialogue_token_count(tokenizer, d["messages"]) > max_tokens:
            skipped[f"over {max_tokens} tokens"] += 1
            continue
        out.append(d)
    if skipped:
        print(f"{what} {path}: kept {len(out)} dialogues, skipped " +
              ", ".join(f"{v} {k}" for k, v in skipped.items()) + (f" (first: {first_bad})" if first_bad else ""))
    if not out:
        raise ValueError(f"{what} {path} holds no usable dialogues" +
                         (f" (skipped: {dict(skipped)})" if skipped else ""))
    return out


def split_opening(msgs: Sequence[dict]) -> tuple[list, list]:
    """(the messages up to the first user turn, the contents of the later user turns)."""
    first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    return list(msgs[:first + 1]), [m["content"] for m in msgs[first + 1:] if m["role"] == "user"]


def is_education(records: Sequence[dict]) -> bool:
    """Whether prompt records come from Education Dialogue (their user state carries the lesson's topic)."""
    return bool(records) and "topic" in (records[0].get("user") or {})


def opening(d: dict) -> dict:
    """A prompt record from a dialogue: the messages up to its first user turn, and the user's state (for setting
    two its later user turns, pre-sampled questions, unless the record brought its own)."""
    msgs = d["messages"]
    if d["format"] == "messages" and msgs[-1]["role"] == "user":
        return {"messages": msgs, "user": dict(d["user"])}  # a prompt file's record is the context as given
    context, later = split_opening(msgs)
    user = dict(d["user"])
    if user.get("questions") is None and d["format"] != "education":
        user["questions"] = later or None
    return {"messages": context, "user": user}


def load_prompts(path: str, fmt: str = "auto", **filters) -> list[dict]:
    """Initial contexts: a prompt file (message lists ending with a user turn) or any dialogue dataset's openings."""
    return [opening(d) for d in load_dialogues(path, fmt, what="prompt file", **filters)]


def load_offline(path: str, fmt: str = "auto", **filters) -> list[dict]:
    """D_off: dialogues cut to end with an assistant turn; the rejected reply is kept only for an uncut last turn."""
    rows = []
    for d in load_dialogues(path, fmt, what="offline dataset", **filters):
        msgs = d["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        rows.append({"messages": msgs[:last + 1], "user": d["user"],
                     "alternative": d["alternative"] if last == len(msgs) - 1 else None})
    if not rows:
        raise ValueError(f"offline dataset {path} holds no dialogue with an assistant turn")
    return rows


JUDGE_PROMPT = """I require a leaderboard for various chatbots. I'll provide you with dialogues with these chatbots. \
Your task is to assess these dialogues, and select the dialogue that produces the best outputs from a human \
perspective.

Dialogue A:

{dialogue_a}

Dialogue B:

{dialogue_b}

Instructions:

FIRST provide a one-sentence comparison of the two dialogues, explaining which you prefer and why. SECOND, on a new \
line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""  # REFUEL paper, App. C.5 (UltraInteract prompt)


def parse_judge_reply(text: str) -> tuple[Optional[str], str]:
    """('A' | 'B' | None, how): how = 'format' (a 'Preferred: X' line), 'fallback' (a last line that is only A or B,
    or a 'Dialogue X' named in the last line), 'failed'."""
    m = re.findall(r"preferred\s*:\s*[\"'(\[*<]*\s*([AB])\b", text, flags=re.IGNORECASE)
    if m:
        return m[-1].upper(), "format"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        bare = re.fullmatch(r"[\"'(\[*<\s]*([AB])[\"')\]*>.\s]*", lines[-1])
        if bare:
            return bare.group(1), "fallback"
        named = set(re.findall(r"dialogue\s+([AB])\b", lines[-1], flags=re.IGNORECASE))
        if len(named) == 1:
            return named.pop().upper(), "fallback"
    return None, "failed"


def format_dialogue(conv: Conversation) -> str:
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Chatbot'}: {m['content']}" for m in conv
                       if m["role"] != "system")


# MTPO paper, App. C (Education Dialogue's preference oracle), in our words and in JUDGE_PROMPT's answer format
EDUCATION_JUDGE_PROMPT = """You are an expert at assessing teachers. Below are two lessons between a teacher (the \
Chatbot) and a student (the User).

Dialogue A:

{dialogue_a}

Dialogue B:

{dialogue_b}

A good lesson is more than whether the student understood the topic: the teacher presents the material clearly and \
with enthusiasm, invites questions and participation, and adapts to how the student likes to learn; the student \
feels free to ask for clarification, offer ideas and challenge them. Do not let the order of the lessons affect \
your answer.

FIRST give a one-sentence comparison of the two lessons. SECOND, on a new line, state only "A" or "B". Use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""


def judge_prompt(env, path: Optional[str] = None) -> str:
    """The judge's template: a file (with {dialogue_a} and {dialogue_b}), else the Education Dialogue oracle for
    Education Dialogue data, else JUDGE_PROMPT."""
    if path:
        text = Path(path).read_text()
        if "{dialogue_a}" not in text or "{dialogue_b}" not in text:
            raise ValueError(f"judge prompt {path} must contain {{dialogue_a}} and {{dialogue_b}}")
        return text
    return EDUCATION_JUDGE_PROMPT if is_education(getattr(env, "records", None) or []) else JUDGE_PROMPT


class JudgePreference:
    """P(a preferred to b) from a prompted judge (JUDGE_PROMPT): both orders are asked and the two verdicts
    averaged, which removes position bias; p is then 0, 1/2 or 1. generate(prompts) -> replies: an HF chat model
    (`hf_greedy_generate`) or `OpenAIChatClient(...).complete`. Unparsed verdicts count as ties and are counted."""

    def __init__(self, generate, template: str = JUDGE_PROMPT):
        self.generate, self.template, self.n_verdicts, self.n_fallbacks, self.n_failed = generate, template, 0, 0, 0

    def __call__(self, convs_a, convs_b) -> torch.Tensor:
        n = len(convs_a)
        prompts = [self.template.format(dialogue_a=format_dialogue(x), dialogue_b=format_dialogue(y))
                   for x, y in [*zip(convs_a, convs_b), *zip(convs_b, convs_a)]]
        parsed = [parse_judge_reply(t) for t in self.generate(prompts)]
        self.n_verdicts += len(parsed)
        self.n_fallbacks += sum(how == "fallback" for _, how in parsed)
        self.n_failed += sum(how == "failed" for _, how in parsed)
        first = torch.tensor([{"A": 1.0, "B": 0.0}.get(c, 0.5) for c, _ in parsed[:n]])
        second = torch.tensor([{"A": 0.0, "B": 1.0}.get(c, 0.5) for c, _ in parsed[n:]])  # a was shown as B
        return (first + second) / 2


def hf_greedy_generate(model, tokenizer, max_new_tokens: int = 256, max_batch_size: int = 16):
    """generate(prompts) -> greedy replies of an HF chat model, batched through sample_turns."""
    def generate(prompts):
        convs = [[{"role": "user", "content": p}] for p in prompts]
        return sample_turns(model, tokenizer, convs, max_new_tokens, temperature=0.0,
                            max_batch_size=max_batch_size).texts
    return generate


def make_judge_preference(judge_model: str, api_base: Optional[str] = None, device: str = "cpu",
                          dtype=torch.float32, max_new_tokens: int = 256, template: str = JUDGE_PROMPT,
                          max_concurrency: int = 32, timeout: float = 120.0, retries: int = 3) -> JudgePreference:
    """A JudgePreference from flags: an OpenAI-compatible endpoint's model when api_base is set (max_concurrency
    requests in flight, each with `timeout` seconds and `retries` tries: see OpenAIChatClient for sizing them),
    else an HF model."""
    if api_base:
        client = OpenAIChatClient(api_base, judge_model, max_workers=max_concurrency, timeout=timeout,
                                  retries=retries)
        judge = JudgePreference(lambda prompts: client.complete(prompts, max_new_tokens, temperature=0.0), template)
        judge.client = client
        return judge
    model, tok = load_policy(judge_model, dtype)
    return JudgePreference(hf_greedy_generate(model.to(device).eval(), tok, max_new_tokens), template)


USER_PROMPT = """Below is a dialogue between a user and an AI assistant. Play the user: what would you ask next?

### Dialogue:
{dialogue}

### Instructions:
First give a one-sentence justification of the question you want to ask. Then, on a new line, state only the question.
Use exactly this format:
Justification: <one sentence>
Question: <the question to ask next>"""

# Education Dialogue's student (MTPO paper): the hidden learning preference and reaction come from the record's
# background_info; the teacher (the policy) never sees them.
STUDENT_PROMPT = """You are playing a student in a one-to-one lesson about {topic}. You like {student_prefrences}; \
you prefer to learn this way, {student_reactions}. The teacher does not know this.

### Lesson so far:
{dialogue}

### Instructions:
Write the student's next message, true to your preferences. First give a one-sentence justification, then the \
message on a new line. Use exactly this format:
Justification: <one sentence>
Student: <the student's next message>"""


def parse_user_question(text: str, key: str = "Question") -> tuple[str, bool]:
    """The text after the last '<key>:' (case-insensitive); falls back to the last non-empty line.
    Returns (question, parsed)."""
    m = re.findall(rf"{key}\s*:\s*(.+)", text, flags=re.IGNORECASE)
    if m and m[-1].strip():
        return m[-1].strip(), True
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lower().startswith("justification")]
    return (lines[-1] if lines else text.strip()), False


class PromptedUser:
    """A chat model playing the user, prompted in the REFUEL paper's Appendix C.2 format; batched. Either an HF
    model in-process (model, tokenizer) or an OpenAI-compatible endpoint (client=OpenAIChatClient(...)), which is how
    a 70B user served by vLLM or TGI runs beside an 8B policy."""

    def __init__(self, model=None, tokenizer=None, prompt_template: str = USER_PROMPT, max_new_tokens: int = 128,
                 temperature: float = 1.0, max_batch_size: int = 64, client: Optional["OpenAIChatClient"] = None,
                 reply_key: str = "Question", role_names: Optional[dict] = None):
        """The template's {dialogue} receives the conversation; any other {field} is read from the context's user
        state (e.g. Education Dialogue's {topic}, {student_prefrences}); the reply is parsed after '<reply_key>:'."""
        if "{dialogue}" not in prompt_template:
            raise ValueError("the user prompt template must contain a {dialogue} placeholder")
        if client is None and (model is None or tokenizer is None):
            raise ValueError("PromptedUser needs an HF model and tokenizer, or an endpoint client")
        self.model, self.tokenizer, self.template, self.client = model, tokenizer, prompt_template, client
        self.max_new_tokens, self.temperature, self.max_batch_size = max_new_tokens, temperature, max_batch_size
        self.reply_key, self.role_names = reply_key, role_names or {"user": "User", "assistant": "Assistant"}
        self.n_calls = self.n_fallbacks = 0

    def prompt(self, conv, user) -> str:
        dialogue = "\n\n".join(f"{self.role_names[m['role']]}: {m['content']}" for m in conv if m["role"] != "system")
        try:
            return self.template.format_map({**(user if isinstance(user, dict) else {}), "dialogue": dialogue})
        except KeyError as e:
            raise ValueError(f"the user prompt template asks for {{{e.args[0]}}}, which this context's user state "
                             f"lacks (it has: {sorted(user) if isinstance(user, dict) else 'nothing'})") from None

    def __call__(self, convs, users, rng):
        asks = [self.prompt(c, u) for c, u in zip(convs, users)]
        if self.client is not None:
            texts = self.client.complete(asks, self.max_new_tokens, self.temperature)
        else:
            texts = sample_turns(self.model, self.tokenizer, [[{"role": "user", "content": a}] for a in asks],
                                 self.max_new_tokens, self.temperature, self.max_batch_size).texts
        parsed = [parse_user_question(t, self.reply_key) for t in texts]
        self.n_calls += len(parsed)
        self.n_fallbacks += sum(not ok for _, ok in parsed)
        return [q for q, _ in parsed]


class OpenAIChatClient:
    """Completions from an OpenAI-compatible chat endpoint (vLLM, TGI, OpenAI): a 70B user or a GPT-4 judge that
    does not fit beside the policy. Standard library only; requests go out concurrently, not one by one.

    max_workers: requests in flight from this process (each rank of a multi-process run has its own client, so
    the server sees ranks x max_workers). timeout: seconds one request may take, its wait in the server's queue
    included. retries: tries per request (a retry sends the whole prompt again), with exponential backoff.
    Sizing: the last request of a wave is answered only once the server has got through every prompt token in
    flight. At 8 ranks x 32 requests of ~7k prompt tokens, 1.8M prompt tokens arrive at once: at P prefill tokens/s
    the last answer comes after about 1.8M / P s (90 s at 20k tokens/s, 180 s at 10k, plus decoding and the queue
    of what the server can batch), so a 120 s timeout expires and each retry sends the same load again. Measure P
    for the served user model, then either lower the concurrency (8 ranks x 8 requests is 0.45M tokens a wave) or
    set the timeout to the whole wave's time with a margin (e.g. 600 s at 8 x 32)."""

    def __init__(self, api_base: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_workers: int = 32,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):
        if int(max_workers) < 1:
            raise ValueError(f"endpoint {api_base}: the concurrency (requests in flight) must be >= 1, got "
                             f"{max_workers}")
        if not timeout > 0:
            raise ValueError(f"endpoint {api_base}: the timeout must be > 0 seconds, got {timeout}")
        if int(retries) < 1:
            raise ValueError(f"endpoint {api_base}: the number of tries must be >= 1, got {retries}")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env, "EMPTY")
        self.max_workers, self.timeout, self.retries, self.backoff = max_workers, timeout, retries, backoff
        self.n_requests = self.n_retries = 0

    def _one(self, prompt: str, max_tokens: int, temperature: float) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json",
                                                       "Authorization": f"Bearer {self.api_key}"})
        for attempt in range(self.retries):
            self.n_requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    raise ValueError(f"endpoint {self.url} refused the request (HTTP {e.code}): "
                                     f"{e.read()[:300].decode(errors='replace')}") from None
                err = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                err = repr(getattr(e, "reason", e))
            if attempt == self.retries - 1:
                raise ConnectionError(f"endpoint {self.url} (model {self.model}) failed after {self.retries} "
                                      f"tries (timeout {self.timeout}s): {err}")
            self.n_retries += 1
            time.sleep(self.backoff * 2 ** attempt)  # exponential backoff
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"endpoint {self.url} returned an unexpected reply ({e!r}): {raw[:200]!r}") from None

    def complete(self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0) -> list[str]:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda p: self._one(p, max_tokens, temperature), prompts))


class HFRewardModel:
    """An HF sequence-classification reward model scoring the chat-templated conversation.

    A conversation longer than max_length tokens is cut from the LEFT: the end of the conversation, its last turns
    (where the two dialogues of a pair differ), is what is scored. Its first token is kept when it is the
    tokenizer's BOS (the template's <|begin_of_text|>, which such models always saw at position 0); the tokens cut
    are those after it. Truncations are counted (n_truncated; charts/reward_truncated).

    Padding is synced with the model: rows are right-padded with its config.pad_token_id, which is set from the
    tokenizer (its pad token, else its EOS) when the config has none. HF sequence-classification models read the
    score at the last token that is not the pad id. When the pad id also occurs inside a conversation (Llama-3
    reward models that pad with <|eot_id|>, the token that ends every turn), that rule would read another token
    than the last, so such a batch is padded with an id that occurs in none of its rows, and the config's pad id is
    that id for that forward only: every row is scored at its own last real token (its length from the attention
    mask), the same alone as in any padded batch."""

    def __init__(self, model, tokenizer, max_length: int = 4096, max_batch_size: int = 16):
        if max_length < 2:
            raise ValueError(f"reward max_length must be >= 2 tokens, got {max_length}")
        self.model, self.tokenizer, self.max_length, self.max_batch_size = model.eval(), tokenizer, max_length, max_batch_size
        self.n_truncated = 0
        self._configs = [unwrap_model(model).config]
        text = getattr(self._configs[0], "get_text_config", None)
        if text is not None and text() is not self._configs[0]:
            self._configs.append(text())
        pad = self._configs[-1].pad_token_id
        if pad is None:  # HF's classifiers cannot find the last token of padded rows without it
            pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
            for cfg in self._configs:
                cfg.pad_token_id = pad
        self.pad_id = int(pad)
        try:  # the ids a substitute pad may take (see batch_pad_id)
            emb = unwrap_model(model).get_input_embeddings()
        except (AttributeError, NotImplementedError):  # custom models may not say
            emb = None
        self._vocab = getattr(emb, "num_embeddings", None) or getattr(self._configs[-1], "vocab_size", None) \
            or len(tokenizer)
        # a scoring pass needs no KV cache (at 8B, 16 x 4,096 tokens of it are 8 GB); custom models may lack the flag
        try:
            takes = "use_cache" in inspect.signature(type(unwrap_model(model)).forward).parameters
        except (TypeError, ValueError):
            takes = False
        self._no_cache = {"use_cache": False} if takes else {}

    def truncate(self, row: list[int]) -> list[int]:
        """The last max_length tokens of a row, its BOS kept in front when it starts with one."""
        if len(row) <= self.max_length:
            return row
        keep = 1 if self.tokenizer.bos_token_id is not None and row[0] == self.tokenizer.bos_token_id else 0
        return row[:keep] + row[len(row) - (self.max_length - keep):]

    def batch_pad_id(self, rows: Sequence[list[int]]) -> int:
        """The model's pad id, or, when it occurs in a row, the smallest id that occurs in none."""
        used = set().union(*rows)
        if self.pad_id not in used:
            return self.pad_id
        free = next((t for t in range(self._vocab) if t not in used), None)
        if free is None:
            raise ValueError(f"reward model {model_name(self.tokenizer)}: its pad id {self.pad_id} occurs in the "
                             f"conversations and no other id is free to pad with; score with max_batch_size=1")
        return free

    def _forward(self, ids, attn, pad: int):
        if pad == self.pad_id:
            return self.model(input_ids=ids, attention_mask=attn, **self._no_cache)
        for cfg in self._configs:  # for this forward only: the classifier finds each row's last token by it
            cfg.pad_token_id = pad
        try:
            return self.model(input_ids=ids, attention_mask=attn, **self._no_cache)
        finally:
            for cfg in self._configs:
                cfg.pad_token_id = self.pad_id

    @torch.no_grad()
    def __call__(self, convs) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores = []
        for s in range(0, len(convs), self.max_batch_size):
            rows = [render_ids(self.tokenizer, c, add_generation_prompt=False) for c in convs[s:s + self.max_batch_size]]
            self.n_truncated += sum(len(r) > self.max_length for r in rows)
            rows = [self.truncate(r) for r in rows]
            pad = self.batch_pad_id(rows)
            L = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows], device=device)
            attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=device)
            out = self._forward(ids, attn, pad)
            score = getattr(out, "score", None)  # ArmoRM-style custom outputs carry the preference score here
            if score is None:
                if out.logits.dim() != 2 or out.logits.shape[-1] != 1:
                    raise ValueError(f"reward model {model_name(self.tokenizer)} returned logits of shape "
                                     f"{tuple(out.logits.shape)}; expected one score per conversation (num_labels=1),"
                                     f" or a custom output with .score (--reward_trust_remote_code)")
                score = out.logits[:, 0]
            if score.numel() != len(rows):
                raise ValueError(f"reward model returned {score.numel()} scores for {len(rows)} conversations "
                                 f"(shape {tuple(score.shape)})")
            scores.append(score.reshape(-1).float().cpu())
        out = torch.cat(scores)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"reward model returned non-finite scores: {out.tolist()}")
        return out


class ChatEnv(Environment):
    """Prompts from a JSONL file; the user is a PromptedUser or pre-sampled questions; reward from a reward model."""
    name = "chat"

    def __init__(self, records: list, reward_model, user=None, max_turns: int = 5, eval_fraction: float = 0.1,
                 offline_records: Optional[list] = None):
        self.records, self.reward_model, self.user, self.max_turns = records, reward_model, user, max_turns
        self.offline_records = offline_records
        n_eval = max(1, int(len(records) * eval_fraction)) if len(records) > 1 else 0
        self.splits = {"eval": list(range(n_eval)) or [0], "train": list(range(n_eval, len(records))) or [0]}
        self.presampled_used = 0

    def supported_turns(self, user) -> Optional[int]:
        """Setting two (no user model or endpoint): 1 + the record's pre-sampled later user turns; else None."""
        if self.user is not None:
            return None
        return 1 + len((user or {}).get("questions") or [])

    def contexts(self, n, split, rng):
        """n contexts; with pre-sampled questions (setting two) each carries max_turns = min(H_max, its record's
        number of turns), the H the scripts play (REFUEL paper Sec. 4.2, App. C: H is the dialogue's own)."""
        idx = rng.choice(self.splits[split], size=n, replace=n > len(self.splits[split]))
        out = []
        for i in idx:
            user = self.records[i].get("user")
            most = self.supported_turns(user)
            out.append(Context(int(i), list(self.records[i]["messages"]), user,
                               None if most is None else min(self.max_turns, most)))
        return out

    def user_turn(self, convs, users, rng):
        if self.user is not None:
            return self.user(convs, users, rng)
        out = []  # setting two: the next pre-sampled question
        for c, u in zip(convs, users):
            qs = (u or {}).get("questions") or []
            k = sum(m["role"] == "assistant" for m in c) - 1
            if k >= len(qs):
                raise ValueError(f"pre-sampled user turns ran out: this record has {len(qs)} later user turns, so "
                                 f"it supports {len(qs) + 1} assistant turns and a user reply after turn {k + 1} "
                                 f"was asked for (draw H <= Context.max_turns, give the prompt record a "
                                 f"'questions' list with one entry per later turn, or pass --user_model)")
            out.append(qs[k])
        return out

    def reward(self, convs):
        return self.reward_model(convs)

    def offline(self, n, rng):
        if not self.offline_records:
            raise ValueError("this mode needs an offline dataset D_off: pass --offline_path")
        idx = rng.integers(len(self.offline_records), size=n)
        ctx, rows = [], []
        for i in idx:
            d = self.offline_records[i]
            # without a user model, later user turns are the dialogue's own (pre-sampled, setting two)
            context, later = split_opening(d["messages"])
            n_turns = sum(m["role"] == "assistant" for m in d["messages"])
            # max_turns: the dialogue's own last turn (LT-OFFLINE / LT-MIXED train it), at most H_max
            ctx.append(Context(int(i), context, {**(d.get("user") or {}), "questions": later},
                               min(self.max_turns, n_turns)))
            rows.append(list(d["messages"]))
        return ctx, rows

    def offline_alternative(self, contexts, prefixes, rng):
        out = []
        for c, p in zip(contexts, prefixes):
            rec = self.offline_records[c.index]
            if rec["alternative"] is None or len(p) != len(rec["messages"]) - 1:
                raise ValueError(f"offline row {c.index} has no alternative reply for turn "
                                 f"{sum(m['role'] == 'assistant' for m in p) + 1} (needs chosen/rejected pairs, "
                                 f"and the state at their last turn)")
            out.append(rec["alternative"])
        return out

    def metrics(self):
        m = {}
        if isinstance(self.user, PromptedUser) and self.user.n_calls:
            m["charts/user_parse_fallback_rate"] = self.user.n_fallbacks / self.user.n_calls
        if isinstance(self.reward_model, HFRewardModel):
            m["charts/reward_truncated"] = self.reward_model.n_truncated
        return m


def model_load_error(kind: str, name: str, e: Exception) -> ValueError:
    """A load failure that says whether `name` was taken for a local folder that is not there."""
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and Path(name).parent.is_dir())
    where = f" (no local folder {name!r} either; check the path)" if local and not Path(name).exists() else ""
    return ValueError(f"could not load {kind} {name!r}{where}: {e}")


def remote_code_error(kind: str, name: str, e: Exception) -> ValueError:
    """An ImportError/NameError raised while loading a model's own code (trust_remote_code), as a ValueError that
    names the model and what is missing."""
    msg = str(e)
    found = re.search(r"cannot import name '([^']+)'(?: from '([^']+)')?", msg)
    if found:
        missing = f"{found.group(1)!r}" + (f" (from {found.group(2)!r})" if found.group(2) else "")
    else:
        missing = repr(getattr(e, "name", None) or msg)
    return ValueError(f"could not load {kind} {name!r}: its own code (trust_remote_code) failed to import "
                      f"{missing}: {type(e).__name__}: {msg}. The model's modeling file was likely written for "
                      f"another transformers version (this is {_transformers_version()}); use a revision or copy "
                      f"of the model whose code imports names this version has, or install the version it needs")


def _transformers_version() -> str:
    try:
        import transformers

        return f"transformers {transformers.__version__}"
    except ImportError:
        return "an unknown transformers"


def load_policy(name: str, dtype=torch.float32):
    """(model, tokenizer) for a policy: 'tutor' = the embedded base policy, else an HF hub name or local path."""
    if name == "tutor":
        return load_tutor_base_policy()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:  # ValueError: a name that is neither a folder nor a valid hub id
        raise model_load_error("policy model", name, e) from None
    if not getattr(tok, "chat_template", None):
        raise ChatTemplateError(f"{name} has no chat template; use an instruct/chat model or set one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok


def resolve_device(spec: Optional[str], default: str) -> str:
    """A frozen model's device: None = the policy's; 'cuda:+K' = K GPUs after the policy's (e.g. 4 policy ranks
    on GPUs 0-3 and their reward models on 4-7); anything else as given ('cuda:7', 'cpu')."""
    if spec is None:
        return default
    if spec.startswith("cuda:+"):
        base = torch.device(default)
        return f"cuda:{(base.index or 0) + int(spec[6:])}"
    return spec


def load_reward_model(name: str, dtype=torch.float32, device: str = "cpu", trust_remote_code: bool = False,
                      max_length: int = 4096) -> HFRewardModel:
    """An HF sequence-classification reward model (or an ArmoRM-style one with its own code) on `device`
    ('auto' = sharded over the visible GPUs)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(name)
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError) as e:
        raise model_load_error("reward model", name, e) from None
    except (ImportError, NameError) as e:  # remote code written for another transformers (ArmoRM's copies)
        raise remote_code_error("reward model", name, e) from None
    return HFRewardModel(model if device == "auto" else model.to(device), tok, max_length=max_length)


def make_env(env: str = "tutor", prompts_path: Optional[str] = None, user_model: Optional[str] = None,
             reward_model: Optional[str] = None, max_turns: int = 5, device: str = "cpu",
             dtype=torch.float32, trust_remote_code: bool = False, offline_path: Optional[str] = None,
             user_api_base: Optional[str] = None, user_prompt_path: Optional[str] = None,
             dataset_format: str = "auto", bad_records: str = "skip", max_dialogue_tokens: Optional[int] = None,
             tokenizer=None, reward_device: Optional[str] = None, user_device: Optional[str] = None,
             reward_max_length: int = 4096, user_max_concurrency: int = 32, user_timeout: float = 120.0,
             user_retries: int = 3) -> Environment:
    """The environment named by the scripts' flags. The user: --user_model in-process, or served at
    --user_api_base (an OpenAI-compatible endpoint; --user_model names the served model), or, with neither, the
    pre-sampled questions of the dataset. Datasets in any of DATASET_FORMATS; Education Dialogue records make the
    user a student (STUDENT_PROMPT) who knows the record's hidden learning preferences.

    The endpoint user: user_max_concurrency requests in flight per process, user_timeout seconds each (its time
    queued at the server included), user_retries tries. The server sees ranks x user_max_concurrency requests at
    once: at 8 ranks x 32 requests of ~7k tokens a 70B server takes minutes to answer the last, so raise
    user_timeout (e.g. 600) or lower user_max_concurrency (e.g. 8); see OpenAIChatClient."""
    if env == "tutor":
        return TutorEnv(TutorRules(max_turns=max_turns))
    if env != "chat":
        raise ValueError(f"unknown env {env!r}: expected 'tutor' or 'chat'")
    if not prompts_path or not reward_model:
        raise ValueError("--env chat needs --prompts_path (a dataset file) and --reward_model")
    if user_api_base and not user_model:
        raise ValueError("--user_api_base needs --user_model, the model name the endpoint serves")
    filters = dict(max_turns=max_turns, max_tokens=max_dialogue_tokens, tokenizer=tokenizer, bad_records=bad_records)
    records = load_prompts(prompts_path, dataset_format, **filters)
    offline = load_offline(offline_path, dataset_format, **filters) if offline_path else None
    rm = load_reward_model(reward_model, dtype, resolve_device(reward_device, device), trust_remote_code,
                           reward_max_length)
    student = is_education(records)
    template = Path(user_prompt_path).read_text() if user_prompt_path else (STUDENT_PROMPT if student else USER_PROMPT)
    style = dict(reply_key="Student", role_names={"user": "Student", "assistant": "Teacher"}) if student else {}
    user = None
    if user_api_base:
        client = OpenAIChatClient(user_api_base, user_model, max_workers=user_max_concurrency, timeout=user_timeout,
                                  retries=user_retries)
        user = PromptedUser(prompt_template=template, client=client, **style)
    elif user_model:
        u_model, u_tok = load_policy(user_model, dtype)
        user = PromptedUser(u_model.to(resolve_device(user_device, device)).eval(), u_tok, prompt_template=template,
                            **style)
    return ChatEnv(records, rm, user, max_turns, offline_records=offline)


@dataclass
class EnvArgs:
    """The environment's flags, shared by every script (whose Args extend this class, so the flags stay flat:
    --env, --prompts_path, --user_model, ...). --max_turns stays in each script: H means something else in each."""
    env: Literal["tutor", "chat"] = "tutor"
    """'tutor': the embedded task; 'chat': prompts or dialogues from a dataset, a prompted user model (or the
    dataset's pre-sampled questions), an HF reward model"""
    prompts_path: Optional[str] = None
    """chat: dataset of prompts or dialogues (JSONL/JSON, any --dataset_format; later user turns are the
    pre-sampled questions of setting two)"""
    user_model: Optional[str] = None
    """chat: HF model prompted as the user (REFUEL paper, App. C.2); None = pre-sampled questions (setting two)"""
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
    """chat: HF sequence-classification reward model scoring the whole conversation"""
    reward_trust_remote_code: bool = False
    """chat: load the reward model's own code (ArmoRM-style models whose output has a .score)"""
    reward_max_length: int = 4096
    """chat: the reward model sees at most this many tokens of a conversation, its end (cut from the left,
    counted as charts/reward_truncated)"""
    dataset_format: Literal["auto", "messages", "ultrainteract", "hh", "education"] = "auto"
    """chat: format of the dataset files (auto = detected per record); a path `hf:NAME[:SPLIT]` loads from the hub"""
    bad_records: Literal["skip", "error"] = "skip"
    """chat: dataset records that do not parse (roles out of order, missing fields): skip and count, or stop"""
    max_dialogue_tokens: Optional[int] = None
    """chat: drop dataset dialogues (and, in REFUEL and the baselines, generated pairs) longer than this many
    chat-templated tokens (REFUEL paper, Sec. 4.1: 2048)"""
    reward_device: Optional[str] = None
    """chat: the reward model's device (None = the policy's; 'cuda:+4' = 4 GPUs after it; 'auto' = sharded)"""
    user_device: Optional[str] = None
    """chat: an in-process user model's device (as --reward_device)"""


def make_env_from_args(args: EnvArgs, max_turns: int, device: str, dtype=torch.float32, tokenizer=None,
                       **extra) -> Environment:
    """make_env with a script's parsed flags (an EnvArgs); `extra` passes what only some scripts have (offline_path)."""
    names = [f.name for f in dataclasses.fields(EnvArgs) if f.name != "reward_trust_remote_code"]
    return make_env(max_turns=max_turns, device=device, dtype=dtype, tokenizer=tokenizer,
                    trust_remote_code=args.reward_trust_remote_code, **{k: getattr(args, k) for k in names}, **extra)


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
    if isinstance(env, TutorEnv):
        per_turn = np.array([lessons_learned(c) for c in convs]).mean(0)
        out.update({f"eval/learned_turn{h + 1}": float(v) for h, v in enumerate(per_turn)})
        out["eval/ask_rate"] = float(np.mean([[parse_teacher(m["content"])[0] == "ask" for m in c
                                               if m["role"] == "assistant"] for c in convs]))
    return out


@dataclass
class Args:
    base_policy_path: str = str(DEFAULT_BASE_POLICY)
    """where the tutor's reference policy mu is cached (built by SFT when missing)"""
    rebuild: bool = False
    """retrain mu even if a cached copy exists"""
    sft_steps: int = 900
    """SFT steps for mu (batch 64)"""
    num_eval: int = 4000
    """dialogues sampled to measure mu and the scripted reference"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    write_offline: Optional[str] = None
    """also write D_off (scripted reference dialogues, one JSON message list per line) to this path"""
    num_offline: int = 10000
    """dialogues in D_off"""


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = TutorEnv()
    t0 = time.time()
    model, tok = load_tutor_base_policy(Path(args.base_policy_path), args.rebuild, steps=args.sft_steps, seed=args.seed)
    t_build = time.time() - t0
    mu = evaluate_policy(model, tok, env, args.num_eval, seed=args.seed + 1, max_new_tokens=12)
    ref = env.reward(env.reference_dialogues(args.num_eval, np.random.default_rng(args.seed + 2)))
    values = {p: tutor_value(env.rules, p) for p in ("optimal", "reference", "last_turn", "never_ask")}
    se = lambda x: x.std().item() / math.sqrt(len(x))
    print(f"mu (SFT base policy, {args.num_eval} dialogues): {mu['eval/mean_reward']:.4f} +- {mu['eval/reward_stderr']:.4f}"
          f"   (loaded/built in {t_build:.0f}s)")
    print(f"scripted reference, sampled:                   {ref.mean().item():.4f} +- {se(ref):.4f}")
    print(f"scripted reference, exact:                     {values['reference']:.4f}")
    print(f"reference with a Bayes-optimal last turn:      {values['last_turn']:.4f}   (last-turn-only bound)")
    print(f"best never-ask policy:                         {values['never_ask']:.4f}")
    print(f"V* (Bayes-optimal, expectimax over beliefs):   {values['optimal']:.4f}")
    if args.write_offline:
        with open(args.write_offline, "w") as f:
            for c in env.reference_dialogues(args.num_offline, np.random.default_rng(args.seed + 3)):
                f.write(json.dumps(c) + "\n")
        print(f"wrote {args.num_offline} reference dialogues (D_off) to {args.write_offline}")
    return {"mu": mu["eval/mean_reward"], "reference_sampled": ref.mean().item(), **values}


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
