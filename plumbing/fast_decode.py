"""plumbing/fast_decode.py: the sampler's fast path and its KV-cache helpers (simulator.sample_turns reads them).

On CUDA, for models that support a static KV cache, `simulator.sample_turns` preallocates one (its length rounded up
on `ladder`) and runs one compiled decode step (CUDA graphs: the per-step Python and kernel-launch overhead that
dominates eager decoding is replayed from one captured graph). The sampling itself is the same code on both paths;
this file holds the caches, the compiled step and the shape buckets that keep its compiles few.
"""
from __future__ import annotations

import inspect
import warnings
import weakref
from typing import Optional

import torch
import torch.nn.functional as F

# Per-model sampler state, held weakly: it goes with its model, and a later model at the same address never finds
# an earlier one's cache or compiled step.
_COMPILED_STEPS = weakref.WeakKeyDictionary()  # model -> its compiled decode step
_STATIC_CACHES = weakref.WeakKeyDictionary()  # model -> ((batch, length), its kept static cache)
_FAST_PATH_FAILED = weakref.WeakSet()  # models the default fast path failed on


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


def failed(model) -> bool:
    """Whether the default fast path already failed on this model (it then uses the plain loop for good)."""
    return model in _FAST_PATH_FAILED


def mark_failed(model) -> None:
    _FAST_PATH_FAILED.add(model)
    free_static_caches(model)


class StaticDecoder:
    """The fast path's prefill and decode steps for one batch of left-padded prompts (B x L): a static cache of
    length ladder(L + max_new_tokens), the batch padded up on a ladder too when the step is compiled (filler rows,
    one visible pad token each, are dropped from the logits), so a compiled step sees a bounded set of shapes."""

    def __init__(self, model, ids, attn, pos, max_new_tokens: int, pad_id: int, compile_step: bool, keep: dict):
        B, L = ids.shape
        self.B, self.device, self.pad_id = B, ids.device, pad_id
        cache_len, self.extra = ladder(L + max_new_tokens, 64), (ladder(B, 16) - B if compile_step else 0)
        if self.extra:
            ids, pos = F.pad(ids, (0, 0, 0, self.extra), value=pad_id), F.pad(pos, (0, 0, 0, self.extra))
            attn = torch.cat([attn, F.pad(attn.new_ones((self.extra, 1)), (L - 1, 0))])
        self.cache = static_cache(model, B + self.extra, cache_len)
        # the mask covers the whole cache from the start; the causal mask hides columns not yet written
        self.attn = torch.cat([attn, attn.new_ones((B + self.extra, cache_len - L))], 1)
        self.step_fn = decode_step(model, compile_step)
        out = model(input_ids=ids, attention_mask=self.attn, position_ids=pos, use_cache=True,
                    cache_position=torch.arange(L, device=self.device), **{cache_kwarg(model): self.cache}, **keep)
        self.logits = out.logits[:B, -1]

    def step(self, tokens, next_pos, position: int):
        """Logits (B x V) after feeding each row's last sampled token at cache position `position`."""
        step_ids = F.pad(tokens, (0, 0, 0, self.extra), value=self.pad_id)
        next_pos = F.pad(next_pos, (0, 0, 0, self.extra))
        return self.step_fn(step_ids, self.attn, next_pos, torch.tensor([position], device=self.device),
                            self.cache)[:self.B].clone()


def with_fallback(model, decode):
    """decode(fast=True); if the fast path fails on this model or torch build (not on bad input: a ValueError is
    raised as it is), a warning, decode(fast=False) from the same RNG state, and the plain loop for good after."""
    rng_state = (torch.random.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    try:
        return decode(fast=True)
    except ValueError:  # bad input (a chat template, say): the plain loop would fail the same way
        raise
    except Exception as e:
        warnings.warn(f"sampler fast path failed for this model ({type(e).__name__}: {str(e)[:300]}); "
                      f"using the plain decode loop from now on")
        mark_failed(model)
        torch.random.set_rng_state(rng_state[0])
        if rng_state[1] is not None:
            torch.cuda.set_rng_state_all(rng_state[1])
        return decode(fast=False)
