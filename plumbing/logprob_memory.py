"""plumbing/logprob_memory.py: the pieces that keep simulator's log-probs within memory at a 128k vocabulary.

`target_logprobs` is log softmax(logits / T)[target] with float32 copies of the logits made one chunk of rows at a
time (forward and backward); `token_budget_batches` cuts rows into micro-batches of at most so many padded tokens;
`same_count_across_ranks` makes every rank run as many forwards as the busiest one (ZeRO-3 gathers per forward).
"""
from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

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


def accepts_logits_to_keep(model) -> bool:
    """Whether the model's forward computes logits only for the last k positions (`logits_to_keep`)."""
    try:
        return "logits_to_keep" in inspect.signature(type(unwrap_model(model)).forward).parameters
    except (TypeError, ValueError):
        return False


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


def same_count_across_ranks(n: int, device, fewest: bool = False) -> int:
    """The largest n over the ranks of the default process group (the smallest with fewest=True; n itself outside
    torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return n
    t = torch.tensor([n], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN if fewest else dist.ReduceOp.MAX)
    return int(t.item())


def unwrap_model(model):
    """The HF model inside DDP / DeepSpeed / torch.compile / PEFT wrappers (read only: the forward still goes through
    the wrapper, whose hooks gather ZeRO-3 shards, synchronise gradients and add the adapters)."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if inner is None and hasattr(model, "peft_config") and hasattr(model, "get_base_model"):
            inner = model.get_base_model()
        if not isinstance(inner, torch.nn.Module):
            return model
        model = inner


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
