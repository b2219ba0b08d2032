"""simulator.py: the contract every algorithm script reads: conversations, turn log-probs, the sampler, environments.

A conversation is a list of {"role", "content"} messages (user x_1, assistant y_1, user x_2, ...); the policy plays
the assistant. Here: the policy's tokens of a conversation (`conversation_ids`: token in, token out) and log pi(y_h|s_h)
(`turn_logprob`, the sum over the tokens of assistant turn h as it was sampled, its stop token included and its role
header excluded, with logits / temperature; `token_logprobs` per token); the batched sampler (`sample_turns`,
`continue_dialogues`); the Environment interface (contexts, a user, a reward r(s_{H+1}), a preference, and V* where
known) that envs/ implements; `evaluate_policy`. Every name a script reads as sim.NAME is defined here.

Below it, plumbing/ (nothing there imports this file): the sampler's compiled fast path (fast_decode.py), the
memory-bounded log-prob pieces (logprob_memory.py), the optional vLLM engine the sampler hands turns to
(vllm_engine.py, which samples token ids: the rendering and stopping rule stay here).

A sampled turn is scored on the ids that were sampled (kept in its message as "token_ids"), never on a re-rendering
of its text; user and system messages take the chat template's own tokens; a turn that ran out of tokens is scored
without the end-of-turn token it never sampled: docs/implementation_notes.md#chat-templates has the rules.
"""
from __future__ import annotations

import abc
import collections
import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
import torch

import torch.nn.functional as F

from plumbing import fast_decode
from plumbing.logprob_memory import (accepts_logits_to_keep, last_logprobs, same_count_across_ranks,
                                     target_logprobs, token_budget_batches, unwrap_model)

Conversation = list  # list[dict[str, str]]


# ----------------------------------------------------------------------------------------------------------------
# Conversations as the policy's tokens (token in, token out)
# ----------------------------------------------------------------------------------------------------------------
class ChatTemplateError(ValueError):
    """A tokenizer's chat template is missing or cannot be used to cut a conversation into turns."""


def model_name(tokenizer) -> str:
    return getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__


def end_of_turn_id(tokenizer) -> int:
    """The token that closes an assistant turn: the template's own end-of-turn marker if it has one, else EOS."""
    key = ("eot", id(tokenizer), tokenizer.chat_template, tokenizer.eos_token_id)
    if key not in _template_cache:  # get_vocab() copies the whole vocabulary: 0.1 s at 128k
        vocab = tokenizer.get_vocab()
        found = [vocab[name] for name in ("<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<eot>")
                 if name in vocab and name in (tokenizer.chat_template or "")]
        if not found and tokenizer.eos_token_id is None:
            raise ChatTemplateError(f"{model_name(tokenizer)}: no end-of-turn token found and no eos_token set")
        _template_cache[key] = found[0] if found else tokenizer.eos_token_id
    return _template_cache[key]


def stop_token_ids(tokenizer, model=None, eot_id: Optional[int] = None) -> list[int]:
    """The ids that end a sampled turn: the template's end-of-turn token first, then the tokenizer's eos_token_id
    and the eos_token_id (one id or a list) of the model's generation_config, e.g. Llama-3-Instruct's
    <|end_of_text|> and <|eom_id|> beside <|eot_id|>. A turn keeps the stop token it sampled: that token is scored."""
    ids = [end_of_turn_id(tokenizer) if eot_id is None else eot_id, tokenizer.eos_token_id]
    if model is not None:
        eos = getattr(getattr(unwrap_model(model), "generation_config", None), "eos_token_id", None)
        ids += list(eos) if isinstance(eos, (list, tuple)) else [eos]
    out = []
    for i in ids:
        if i is not None and int(i) not in out:
            out.append(int(i))
    return out


# Every apply_chat_template of the run (policy, user, reward model, judge) gets these keyword arguments: --chat_
# template_kwargs (e.g. {"enable_thinking": false} for Qwen3), and a template that reads today's date (Llama-3.2's
# strftime_now) a fixed date_string: the run's, or a prompt's tokens would change at midnight and on a --resume the
# next day. Set once per run: set_chat_template_kwargs.
CHAT_TEMPLATE_KWARGS: dict = {}
TEMPLATE_DATE: list = []  # [date_string] once set


def set_chat_template_kwargs(kwargs: Optional[dict], date_string: Optional[str] = None) -> None:
    if not isinstance(kwargs or {}, dict):
        raise ValueError(f"chat template kwargs must be a JSON object, got {kwargs!r}")
    CHAT_TEMPLATE_KWARGS.clear()
    CHAT_TEMPLATE_KWARGS.update(kwargs or {})
    TEMPLATE_DATE[:] = [date_string] if date_string else []
    _template_cache.clear()


def _template_kwargs(tokenizer) -> dict:
    dated = TEMPLATE_DATE and "strftime_now" in (tokenizer.chat_template or "")
    return {**({"date_string": TEMPLATE_DATE[0]} if dated else {}), **CHAT_TEMPLATE_KWARGS}


def _template_key(tokenizer) -> tuple:
    return id(tokenizer), tokenizer.chat_template, repr(sorted(_template_kwargs(tokenizer).items()))


def _apply_template(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ChatTemplateError(f"{model_name(tokenizer)} has no chat template; set tokenizer.chat_template "
                                f"(or pass a chat model) before using it as a policy")
    plain = [{"role": m["role"], "content": m["content"]} for m in messages]  # without token_ids, truncated
    return tokenizer.apply_chat_template(plain, tokenize=False, add_generation_prompt=add_generation_prompt,
                                         **_template_kwargs(tokenizer))


def folds_system_prompt(tokenizer) -> bool:
    """True when the template has no usable system role: it raises on one (Gemma-2), or it does not put the system
    text before the first user message (Mistral v3 puts it into the last user message only). Such a template gets
    the system prompt folded into the first user message (`template_messages`), as Gemma-3's own template does."""
    key = ("folds",) + _template_key(tokenizer)
    if key not in _template_cache:
        probe = [{"role": "system", "content": "SYSTEMPROBE"}, {"role": "user", "content": "USERPROBE1"},
                 {"role": "assistant", "content": "REPLYPROBE"}, {"role": "user", "content": "USERPROBE2"}]
        try:
            text = _apply_template(tokenizer, probe, True)
            _template_cache[key] = not 0 <= text.find("SYSTEMPROBE") < text.find("USERPROBE1")
        except ChatTemplateError:
            raise
        except Exception:  # jinja's raise_exception: "System role not supported"
            _template_cache[key] = True
    return _template_cache[key]


def template_messages(tokenizer, messages: Sequence[dict]) -> list:
    """The messages a template is given: a leading system message folded into the first user message
    ("SYSTEM\\n\\nUSER") when the template has no usable system role (`folds_system_prompt`); else as they are.
    The same rule everywhere the tokenizer renders: sampling, scoring, reward models, judges."""
    if not any(m["role"] == "system" for m in messages) or not folds_system_prompt(tokenizer):
        return list(messages)
    if messages[0]["role"] != "system" or len(messages) < 2 or messages[1]["role"] != "user" \
            or any(m["role"] == "system" for m in messages[1:]):
        raise ChatTemplateError(f"{model_name(tokenizer)}: its chat template has no system role, and the rule that "
                                f"folds a system prompt into the first user message needs the system message first, "
                                f"followed by a user message (roles here: {[m['role'] for m in messages]})")
    folded = {"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}
    return [folded, *messages[2:]]


def render_text(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> str:
    """The chat template's text of a conversation, with the run's template kwargs and the system-prompt rule: what
    a reward model, a judge or a prompted user reads. The policy's own tokens come from `conversation_ids`."""
    try:
        return _apply_template(tokenizer, template_messages(tokenizer, messages), add_generation_prompt)
    except ChatTemplateError:
        raise
    except Exception as e:  # jinja errors: roles out of order, unsupported roles
        raise ChatTemplateError(f"{model_name(tokenizer)}: its chat template failed on the roles "
                                f"{[m['role'] for m in messages]}: {e}") from None


def render_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    """Token ids of `render_text` (the template's own BOS included, no extra one added; special-token strings in
    the text are read as those tokens, as transformers' apply_chat_template(tokenize=True) does)."""
    return tokenizer(render_text(tokenizer, messages, add_generation_prompt), add_special_tokens=False)["input_ids"]


def dialogue_token_count(tokenizer, conv: Sequence[dict]) -> int:
    """Length of a whole conversation in the policy's tokens (`conversation_ids`): what the papers' length filter
    counts (REFUEL paper, App. C: dataset dialogues and generated trajectories over 2,048 tokens are dropped)."""
    return len(conversation_ids(tokenizer, conv).ids)


def assistant_turns(messages: Sequence[dict]) -> int:
    """How many assistant turns a conversation holds (H of a finished one)."""
    return sum(m["role"] == "assistant" for m in messages)


def assistant_turn_index(messages: Sequence[dict], h: int) -> int:
    """Index in `messages` of assistant turn h (1-based)."""
    idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not 1 <= h <= len(idx):
        raise ValueError(f"turn h={h} requested but the conversation has {len(idx)} assistant turns")
    return idx[h - 1]


@dataclass
class ConversationIds:
    ids: list  # the policy's tokens of the whole conversation (ending with a generation prompt when asked for)
    turns: list  # per assistant turn, [start, end) of its scored tokens in ids


_template_cache: dict = {}  # token spans of user/system runs and of dataset assistant turns, per template
_BASE = ({"role": "user", "content": "BASEUSERTEXT"}, {"role": "assistant", "content": "BASEREPLYTEXT"})


def _encode(tokenizer, text: str) -> list:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _after_base_ids(tokenizer, text: str, what: str) -> tuple[list, list]:
    """(ids of `text` up to the fixed base's end-of-turn, ids after it); text renders _BASE + more messages."""
    eot = tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer))
    at = text.find(_BASE[1]["content"])
    cut = text.find(eot, at) if at >= 0 else -1
    if cut < 0:
        raise ChatTemplateError(f"{model_name(tokenizer)}: its chat template does not close an assistant turn with "
                                f"{eot!r} (the end-of-turn token), so {what} cannot be cut out of it")
    head, whole = _encode(tokenizer, text[: cut + len(eot)]), _encode(tokenizer, text)
    if whole[: len(head)] != head:
        raise ChatTemplateError(f"{model_name(tokenizer)}: the tokens of {what} merge with the end-of-turn token "
                                f"before them; this tokenizer cannot be cut at turn boundaries")
    return head, whole[len(head):]


def _run_ids(tokenizer, run: tuple, first: bool, add_generation_prompt: bool) -> list:
    """The tokens of a run of user/system messages (and the assistant header after it when add_generation_prompt):
    the opening run as the template renders it alone, a later one as the template's delta after a fixed base
    conversation's end-of-turn token (templates need not be prefix-consistent: Qwen3 rewrites earlier turns)."""
    key = ("run", first, add_generation_prompt, run) + _template_key(tokenizer)
    if key not in _template_cache:
        messages = [{"role": r, "content": c} for r, c in run]
        if first:
            ids = _encode(tokenizer, render_text(tokenizer, messages, add_generation_prompt))
        else:
            text = render_text(tokenizer, [*_BASE, *messages], add_generation_prompt)
            ids = _after_base_ids(tokenizer, text, f"the {run[0][0]} message after an assistant turn")[1]
        _template_cache[key] = ids
    return _template_cache[key]


def _dataset_turn_ids(tokenizer, content: str) -> list:
    """A turn the policy did not sample (a dataset's): what the template writes for it after the generation
    prompt, through its end-of-turn token (the last one: the same string inside the text does not end it)."""
    key = ("turn", content) + _template_key(tokenizer)
    if key not in _template_cache:
        user = [_BASE[0]]
        prompt = _encode(tokenizer, render_text(tokenizer, user, True))
        whole = _encode(tokenizer, render_text(tokenizer, [*user, {"role": "assistant", "content": content}], False))
        eot = end_of_turn_id(tokenizer)
        rest = whole[len(prompt):]
        if whole[: len(prompt)] != prompt or eot not in rest:
            raise ChatTemplateError(f"{model_name(tokenizer)}: its chat template does not write an assistant turn "
                                    f"as the generation prompt followed by the turn and the end-of-turn token {eot}")
        _template_cache[key] = rest[: len(rest) - rest[::-1].index(eot)]
    return _template_cache[key]


def conversation_ids(tokenizer, messages: Sequence[dict], add_generation_prompt: bool = False) -> ConversationIds:
    """The policy's tokens of a conversation, built message by message (token in, token out): an assistant turn the
    policy sampled is its sampled ids ("token_ids": the stop token it sampled included; a turn that hit the token
    budget is followed by the end-of-turn token, not scored); a dataset's assistant turn is what the template
    writes for it after the generation prompt; user and system messages are the template's own text for them
    (`_run_ids`). So the prompt a turn was sampled from is exactly the prefix it is scored under, on any template,
    and a special-token string inside a sampled turn never cuts it. docs/implementation_notes.md#chat-templates."""
    messages = template_messages(tokenizer, messages)
    if messages and messages[0]["role"] == "assistant":
        raise ChatTemplateError("a conversation must open with a user (or system) message, not an assistant turn")
    eot = end_of_turn_id(tokenizer)
    ids, turns, i = [], [], 0
    while i < len(messages):
        m = messages[i]
        if m["role"] == "assistant":
            turn = list(m["token_ids"]) if m.get("token_ids") is not None else _dataset_turn_ids(tokenizer, m["content"])
            if m.get("truncated") and m.get("token_ids") is None and turn and turn[-1] == eot:
                turn = turn[:-1]  # a truncated turn from before token_ids were kept: its content only
            turns.append((len(ids), len(ids) + len(turn)))
            ids += turn
            if m.get("truncated"):
                ids.append(eot)  # never sampled, not scored; later turns see a closed turn, as the template writes it
            i += 1
            continue
        j = next((k for k in range(i, len(messages)) if messages[k]["role"] == "assistant"), len(messages))
        run = tuple((x["role"], x["content"]) for x in messages[i:j])
        ids += _run_ids(tokenizer, run, i == 0, j < len(messages) or add_generation_prompt)
        i = j
    return ConversationIds(ids, turns)


def split_turn(tokenizer, messages: Sequence[dict], h: int) -> tuple[list[int], list[int]]:
    """(ids of s_h with the generation prompt, the scored ids of assistant turn h), from `conversation_ids`: a
    sampled turn's own ids (content + the stop token it sampled; a turn marked {"truncated": True}, which hit the
    sampler's token budget, has no stop token to score)."""
    i = assistant_turn_index(messages, h)
    conv = conversation_ids(tokenizer, messages[: i + 1])
    start, end = conv.turns[h - 1]
    return conv.ids[:start], conv.ids[start:end]


def turn_batch(tokenizer, convs: Sequence[Conversation], turns: Sequence[int],
               pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, turn_mask) for s_h + y_h, turn_mask over y_h's scored tokens."""
    pieces = [split_turn(tokenizer, c, h) for c, h in zip(convs, turns)]
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


# ----------------------------------------------------------------------------------------------------------------
# Batched turn sampling
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TurnSamples:
    texts: list  # decoded turn contents
    token_ids: list  # per sample, the sampled ids (the stop token included when one was produced)
    logprobs: list  # per sample, per-token log-probs under the sampling distribution (logits / temperature)
    hit_budget: torch.Tensor  # bool, True where the turn ran out of tokens before any stop token


def finish_turns(tokenizer, toks, lps, stop_ids: Sequence[int]) -> TurnSamples:
    """TurnSamples from a decode loop's sampled ids and their log-probs (the sampler's stopping rule, for any decode
    loop that samples turns: ours, B x n tensors; vLLM's, B ragged lists): each row is cut after its first stop id
    (padding written after a row's stop may itself be a stop id), hit_budget where it has none, texts decoded
    without special tokens and stripped, the stop token left out of them."""
    stop = {int(i) for i in stop_ids}
    rows = toks.tolist() if torch.is_tensor(toks) else [list(r) for r in toks]  # bookkeeping, not generation
    lps = lps.cpu() if torch.is_tensor(lps) else lps  # one copy, not one per row
    ids, kept, hit = [], [], []
    for row, lp in zip(rows, lps):
        end = next((t for t, tok in enumerate(row) if tok in stop), None)
        n = len(row) if end is None else end + 1
        ids.append(row[:n])
        kept.append(torch.as_tensor(lp[:n], dtype=torch.float32))
        hit.append(end is None)
    content = [row if h else row[:-1] for row, h in zip(ids, hit)]
    texts = [answer_text(t) for t in tokenizer.batch_decode(content, skip_special_tokens=True)]
    return TurnSamples(texts, ids, kept, torch.tensor(hit, dtype=torch.bool))


def answer_text(decoded: str) -> str:
    """A sampled turn's text as the user, the reward model and the judges read it: stripped, and without a
    reasoning model's think block (what follows the last </think>). The policy's tokens keep the block as sampled."""
    return decoded.rsplit("</think>", 1)[-1].strip()


def assistant_message(samples: TurnSamples, j: int) -> dict:
    """Sample j as an assistant message: its text, its sampled ids (what `conversation_ids` scores) and, when it hit
    the token budget, "truncated" (no stop token was sampled, none is scored)."""
    msg = {"role": "assistant", "content": samples.texts[j], "token_ids": list(samples.token_ids[j])}
    if bool(samples.hit_budget[j]):
        msg["truncated"] = True
    return msg


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
    fast (default: on CUDA for models with a static cache): plumbing/fast_decode.py's static KV cache and compiled step;
    keep_cache=True keeps the cache for the next call. engine: a `vllm_engine.VLLMEngine` samples instead."""
    stop_ids = list(stop_token_ids(tokenizer, model, eot_id) if stop_ids is None else stop_ids)
    if not stop_ids:
        raise ValueError("sample_turns: stop_ids must hold at least one token id (the end-of-turn token first)")
    if partner is not None and (fast or engine is not None or combine is None):
        raise ValueError("sample_turns: a partner model needs combine=, and runs on the plain loop (no fast=True, "
                         "no engine)")
    if engine is not None:  # vLLM samples from the same prompt ids; the same stopping rule cuts its rows
        prompts = [conversation_ids(tokenizer, c, add_generation_prompt=True).ids for c in convs]
        return finish_turns(tokenizer, *engine.generate(prompts, max_new_tokens, temperature, stop_ids), stop_ids)
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
        prompts = [conversation_ids(tokenizer, c, add_generation_prompt=True).ids for c in convs[s:s + max_batch_size]]
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

    def all_contexts(self, split: str) -> list[Context]:
        """Every context of the split once, in order (a pass over a whole prompt set, REFUEL's setting one)."""
        raise ValueError(f"env {self.name!r} generates its contexts: it has no fixed prompt set to pass over "
                         f"(give --prompts_per_iteration N)")

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

    def scripted_policies(self) -> dict:
        """Policies the environment plays by code, by name: {name: play(contexts, rng) -> whole conversations}
        (evaluate.py --scripted puts them beside trained policies: the tutor's scripted reference, its judge's Nash)."""
        return {}

    def supported_turns(self, user) -> Optional[int]:
        """The most assistant turns a conversation with this user state can reach (None: no limit)."""
        return None

    split = "train"  # the rollouts now played: `evaluating` sets "eval"; the tallies below are kept per split

    def counts(self) -> collections.Counter:
        """This process's running tallies by name (e.g. "user_fallbacks/eval"; the same names on every rank), a
        live Counter: the scripts sum it over ranks, keep the sum in checkpoints and add it back to rank 0's on
        --resume, and log charts(the sum)."""
        if "_tally" not in self.__dict__:
            self._tally = collections.Counter()
        return self._tally

    def charts(self, totals: dict) -> dict:
        """charts/ metrics from the run's tallies summed over ranks (e.g. charts/user_parse_fallback_rate)."""
        return {}

    def dialogue_metrics(self, convs: Sequence[Conversation]) -> dict:
        """Task-specific eval/ metrics of finished conversations (evaluate_policy logs them)."""
        return {}

    def optimal_value(self) -> Optional[float]:
        """V*, the best expected reward any policy can reach, where the task knows it exactly (the tutor task does;
        the scripts then log eval/fraction_of_v_star); None when unknown."""
        return None

    @classmethod
    def from_flags(cls, args, max_turns: int, tokenizer=None, device: str = "cpu", dtype=torch.float32,
                   **extra) -> "Environment":
        """How `--env module:ClassName` builds the environment from a script's flags (args: its parsed Args, with
        the --env flags of envs/flags.EnvArgs; max_turns: the script's H_max; extra: offline_path for the
        baselines). This default calls cls() and sets max_turns; a flag it would ignore is an error. Override it to
        read --prompts_path, --reward_model, ... or to put a model on `device`."""
        ignored = [f"--{k}" for k in ("prompts_path", "user_model", "user_api_base", "user_prompt_path",
                                      "reward_model") if getattr(args, k, None) is not None]
        ignored += [f"--{k}" for k, v in extra.items() if v is not None]
        if ignored:
            raise ValueError(f"{cls.__name__}.from_flags reads none of {', '.join(ignored)}: they would be ignored "
                             f"(override from_flags to use them)")
        env = cls()
        env.max_turns = max_turns
        return env


@contextlib.contextmanager
def evaluating(env: Environment):
    """The environment's user, judge and reward calls inside are tallied under "eval", not "train"."""
    saved, env.split = env.split, "eval"
    try:
        yield
    finally:
        env.split = saved


def continue_dialogues(model, tokenizer, env: Environment, convs: list, users: list, n_turns: Sequence[int],
                       rng: np.random.Generator, max_new_tokens: int, temperature: float = 1.0,
                       max_batch_size: int = 256, reply_after_last: bool = False, engine=None,
                       sample=None) -> tuple[list, list]:
    """Continue each conversation (ending with a user message) until it has n_turns[i] assistant turns.

    Conversations of different lengths advance together: one batched sampler call per step over every
    conversation still short of its target, then one batched user call. Returns (conversations, per conversation
    a list {turn h: (summed log-prob, hit_budget)} of the turns sampled here). A turn that hit the token budget is
    appended with "truncated": True (`assistant_message`): no end-of-turn token is scored after it.
    The user speaks after every sampled turn but the last, and after the last too when the environment's reward
    reads the user's reaction (the tutor) or reply_after_last=True (a roll-in to s_{h+1}, which ends with the
    user's x_{h+1}). Asking for more turns than a conversation's user state supports (setting two's pre-sampled
    questions: `Environment.supported_turns`, the contexts' max_turns) is a ValueError before any sampling.
    engine: a `vllm_engine.VLLMEngine` holding the policy's current weights samples the turns (see sample_turns).
    sample: convs -> TurnSamples, another sampler of the assistant's turns (MTPO-tau's mixture of pi and mu);
    default sample_turns with the arguments above.
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
            batch = [convs[i] for i in active]
            out = sample(batch) if sample is not None else sample_turns(
                model, tokenizer, batch, max_new_tokens, temperature, max_batch_size, keep_cache=True, engine=engine)
            for j, i in enumerate(active):
                convs[i].append(assistant_message(out, j))
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


# ----------------------------------------------------------------------------------------------------------------
# Evaluation shared by the scripts: the policy plays H turns from held-out contexts
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_policy(model, tokenizer, env: Environment, n: int, seed: int, max_new_tokens: int,
                    temperature: float = 1.0, max_batch_size: int = 256, engine=None) -> dict:
    rng = np.random.default_rng(seed)
    ctx = env.contexts(n, "eval", rng)  # H_max turns, or a record's own number (Context.max_turns)
    with evaluating(env):
        convs, _ = continue_dialogues(model, tokenizer, env, [c.messages for c in ctx], [c.user for c in ctx],
                                      [c.max_turns or env.max_turns for c in ctx], rng, max_new_tokens, temperature,
                                      max_batch_size, engine=engine)
        r = env.reward(convs)
    out = {"eval/mean_reward": float(r.mean()), "eval/reward_stderr": float(r.std() / math.sqrt(n))}
    out.update(env.dialogue_metrics(convs))  # the tutor: lessons learned per turn, ask rate
    return out
