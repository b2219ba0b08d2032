"""plumbing/distributed.py: the launch plumbing every algorithm script shares, and no algorithm.

One process on a laptop CPU, DDP (GPUs, or CPU processes over gloo), DeepSpeed ZeRO-2/3 (GPUs, or CPU processes
through DeepSpeed's CPU accelerator) and FSDP2 (GPUs) all go through `accelerate launch --config_file configs/...`;
what each of them needs from a script whose data are rollouts (not a DataLoader) and that samples from the model
it trains is here:

  * `make_accelerator`: the Accelerator the launch asked for, or an error (never silently something else);
  * `configure_deepspeed`: DeepSpeed's batch sizes and clipping, set from the script's flags;
  * `outside_zero3_init`: frozen models (a reward model, pi_0, mu, a judge) loaded whole under ZeRO-3;
  * `full_weights` / `sampling_weights`: every rank holds full weights for a whole collection (ZeRO-3 gathered once
    and its per-module hooks off, FSDP2 an unsharded copy), so ranks whose decode loops stop at different steps
    cannot deadlock;
  * `ranks_in_sync`, `reduce_mean`, `env_tallies`, `sync_gradients` (of a replicated model that is not prepared),
    `without_dropout`, `enable_gradient_checkpointing`.

docs/implementation_notes.md explains the choices (why not accelerate's own zero3_init_context_manager, why the
hooks come off).
"""
from __future__ import annotations

import contextlib
import os
import weakref
from typing import Callable, Optional

import torch



def make_accelerator(bf16: Optional[bool], gradient_accumulation_steps: int = 1):
    """The Accelerator for any launch. bf16=None: bf16 mixed precision on CUDA, fp32 on CPU."""
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
    bf16 = cuda if bf16 is None else bf16
    accelerator = Accelerator(cpu=not cuda and not deepspeed, mixed_precision="bf16" if bf16 else "no",
                              gradient_accumulation_steps=gradient_accumulation_steps, kwargs_handlers=handlers)
    if deepspeed != (accelerator.distributed_type == DistributedType.DEEPSPEED):
        raise RuntimeError(f"launched with a DeepSpeed config = {deepspeed}, but accelerate set up "
                           f"{accelerator.distributed_type}: refusing to train with something else than asked")
    return accelerator


def configure_deepspeed(accelerator, micro_batch: int, gradient_accumulation_steps: int,
                        max_grad_norm: float) -> None:
    """DeepSpeed asserts train_batch_size = micro-batch x accumulation x ranks. accelerate fills the configs' "auto"
    sizes from a prepared DataLoader, and there is none here (rollouts are collected, not loaded), so set them."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = gradient_accumulation_steps
    config["train_batch_size"] = micro_batch * gradient_accumulation_steps * accelerator.num_processes
    config["gradient_clipping"] = max_grad_norm
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


def zero3(accelerator) -> bool:
    ds = getattr(accelerator.state, "deepspeed_plugin", None)
    return ds is not None and ds.zero_stage == 3


@contextlib.contextmanager
def full_weights(model, accelerator, part: Optional[Callable] = None):
    """The unwrapped model with full weights on every rank while the context lasts; under ZeRO-3 the parameters of
    `part(unwrapped)` (default: all of them) are gathered once. FSDP2 is `sampling_weights`' business."""
    unwrapped = accelerator.unwrap_model(model)
    if not zero3(accelerator):
        yield unwrapped
        return
    import deepspeed

    offload = model.optimizer.parameter_offload  # the engine's ZeRO-3 per-module hooks
    with deepspeed.zero.GatheredParameters(list((part(unwrapped) if part else unwrapped).parameters())):
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
def sampling_weights(model, accelerator, part: Optional[Callable] = None, engine=None):
    """The model to sample from (`part(unwrapped)`, e.g. an actor-critic's policy), with full weights on every rank
    for the whole collection. With a vLLM engine the weights are copied into it on entry, and the engine sleeps
    again on exit, leaving the GPU to training."""
    with _full_sampling_model(model, accelerator, part or (lambda m: m)) as policy:
        if engine is not None:
            engine.sync_weights(policy)
        yield policy
    if engine is not None:
        engine.sleep()


@contextlib.contextmanager
def _full_sampling_model(model, accelerator, part: Callable):
    if getattr(accelerator.state, "fsdp_plugin", None) is None:  # ZeRO-3: gathered once; otherwise already whole
        with full_weights(model, accelerator, part) as full:
            yield part(full)
        return
    if getattr(accelerator.state.fsdp_plugin, "fsdp_version", 1) != 2:
        raise ValueError("sampling under FSDP needs FSDP2 (fsdp_version: 2, as in configs/fsdp.yaml)")
    half = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
    yield sampling_copy(part(accelerator.unwrap_model(model)), half)  # an unsharded copy, all-gathered once


def ranks_in_sync(model, accelerator, *replicas) -> bool:
    """Whether every rank holds the same full weights of `model` (and of `replicas`, models kept whole on every
    rank). With replicas (DDP, ZeRO-1/2) a silently unsynced run shows up here; under ZeRO-3 and FSDP2 there is one
    sharded copy, so this checks the gathered weights that every rank samples with."""
    with full_weights(model, accelerator) as full:
        params = [*full.parameters(), *(p for r in replicas for p in r.parameters())]
        checksum = sum(full_tensor(p.detach()).double().sum() for p in params)  # while gathered
    return same_on_all_ranks([checksum], accelerator)


def same_on_all_ranks(tensors, accelerator) -> bool:
    """Whether every rank holds the same `tensors` (a checksum each, gathered; to a relative 1e-6)."""
    checksum = sum(t.detach().double().sum() for t in tensors)
    sums = accelerator.gather(torch.tensor([float(checksum)], device=accelerator.device, dtype=torch.float64))
    return bool((sums.max() - sums.min()).abs() <= 1e-6 * (1 + sums.abs().max()))


def reduce_mean(accelerator, values: dict) -> dict:
    """The mean over ranks of each named scalar (one all-reduce for all of them)."""
    keys = sorted(values)
    means = accelerator.reduce(torch.tensor([float(values[k]) for k in keys], device=accelerator.device,
                                            dtype=torch.float64), "mean")
    return dict(zip(keys, means.tolist()))


def env_tallies(accelerator, env) -> dict:
    """The environment's running tallies (`Environment.counts`: user replies, parse fallbacks, retries, judge
    verdicts, ...) summed over ranks; after a --resume rank 0's include the checkpoint's totals, so the sum is the
    whole run's."""
    counts = env.counts()
    keys = sorted(counts)
    if not keys:
        return {}
    sums = accelerator.reduce(torch.tensor([float(counts[k]) for k in keys], device=accelerator.device,
                                           dtype=torch.float64), "sum")
    return dict(zip(keys, sums.tolist()))


def sync_gradients(model, accelerator) -> None:
    """All-reduce (mean) the gradients of a replicated model that does not go through prepare() (a Q-model, a critic,
    a reward model fitted in the run), so every rank takes the same step. No-op on one process (or accelerator=None)."""
    if accelerator is None or accelerator.num_processes == 1:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    flat = accelerator.reduce(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                                         for p in params]), "mean")
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p).clone()


def enable_gradient_checkpointing(model) -> None:
    # renamed activation_checkpointing_enable in recent transformers
    getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()


def without_dropout(model):
    """Training mode with every dropout off. transformers recomputes checkpointed activations only in training mode
    (from_pretrained returns eval mode); dropout stays off so that the log-probs taken without grad at collection
    and the ones in the loss are the same function of the weights. LoRA's dropout (--lora_dropout, 0 by default)
    is left as asked: a user who sets it has chosen log-probs that differ between the two."""
    model.train()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Dropout) and ".lora_dropout." not in name:
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a parameter: an FSDP2 shard (DTensor) is all-gathered, a plain tensor returned as is.
    (Duck-typed: importing torch.distributed.tensor at the end of a two-process gloo run made a rank
    abort at exit now and then.)"""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# model -> its unsharded copy, held weakly: it goes with its model, and a later model at the same address never
# finds an earlier one's copy.
_SAMPLING_COPIES = weakref.WeakKeyDictionary()


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
