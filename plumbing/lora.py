"""plumbing/lora.py: LoRA adapters (through PEFT, an optional extra) for every algorithm script, and the frozen
references they make free.

With `--lora_r R` the policy's base weights stay frozen and only low-rank adapters train (Hu et al., 2021), so a
policy that equals the initial one is the same weights with the adapters switched off: REFUEL's pi_0 (Eq. (11)),
DPO's pi_ref and MTPO's mu cost no second copy (`AdaptersOff`), and Iterative PPO's pi_i is a copy of the adapters
alone (`AdapterSnapshot`). What is here:

  * `LoraArgs`: the flags (--lora_r, --lora_alpha, --lora_dropout, --lora_target_modules, --merge_on_save);
  * `add_adapters`: the policy wrapped by PEFT (imported only then, with an error naming `pip install peft`);
  * `AdaptersOff`, `AdapterSnapshot`: frozen references read through the trained model's own weights;
  * `merged_weights`: the policy as a plain HF model's (name, tensor) pairs, W + (alpha / r) B A, for the vLLM
    engine's weight sync and for `save_merged`, which writes a `save_pretrained` model any loader reads.

    python -m envs.loading merge runs/<run>/checkpoint/policy merged/   # a LoRA checkpoint -> a plain HF model

docs/lora.md explains the choices and the memory they save.
"""
from __future__ import annotations

import abc
import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

PEFT_MISSING = "--lora_r needs PEFT: `pip install peft` (or drop --lora_r to train every parameter)"


@dataclass
class LoraArgs:
    """LoRA's flags, shared by every script (whose Args extend this class, so the flags stay flat)."""
    lora_r: int = 0
    """LoRA rank (0 = off: every parameter trains). With LoRA the references equal to the initial policy (REFUEL's
    pi_0, DPO's pi_ref, MTPO's mu) are the same weights with the adapters off, and checkpoints hold the adapters"""
    lora_alpha: float = 16.0
    """LoRA's scale: the update is (alpha / r) B A"""
    lora_dropout: float = 0.0
    """dropout on the adapters' input (0: log pi_t at collection equals log pi in the loss at the first step)"""
    lora_target_modules: tuple[str, ...] = ("all-linear",)
    """module names that get adapters ("all-linear" = every linear layer but the output head, as PEFT reads it)"""
    merge_on_save: bool = False
    """at the end of a LoRA run, also write runs/<run>/merged: the merged model in save_pretrained format"""


def check_lora_args(args) -> list[str]:
    """What is wrong with the LoRA flags (for a script's check_args), before any model is loaded."""
    bad = []
    if args.lora_r < 0:
        bad.append("--lora_r must be >= 0")
    if args.lora_r:
        if not args.lora_alpha > 0:
            bad.append("--lora_alpha must be > 0")
        if not 0 <= args.lora_dropout < 1:
            bad.append("--lora_dropout must lie in [0, 1)")
        if not args.lora_target_modules:
            bad.append("--lora_target_modules names no module")
        if getattr(args, "train_top_layers", 0):
            bad.append("--train_top_layers and --lora_r both choose what trains: use one")
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ImportError(PEFT_MISSING) from None
    elif args.merge_on_save:
        bad.append("--merge_on_save merges LoRA adapters: it needs --lora_r")
    return bad


def add_adapters(model, args, base_name: str, accelerator=None):
    """The policy wrapped by PEFT with fresh adapters (B = 0: the wrapped model computes exactly what the base model
    did); only the adapters train. `base_name` (--model_name_or_path) is recorded in the adapter's config, which
    is how envs/loading.load_policy finds the base weights again. Single process, DDP and DeepSpeed ZeRO-2/3; not
    FSDP (its sampling copy and the references read through the policy are not built for adapters here)."""
    if accelerator is not None and getattr(accelerator.state, "fsdp_plugin", None) is not None:
        raise ValueError("--lora_r is supported on one process, DDP and DeepSpeed ZeRO-2/3, not under FSDP: "
                         "launch with configs/deepspeed_zero3.yaml instead")
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ImportError(PEFT_MISSING) from None
    targets = list(args.lora_target_modules)
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules="all-linear" if targets == ["all-linear"] else targets, bias="none",
                        task_type="CAUSAL_LM")
    try:
        peft_model = get_peft_model(model, config)
    except ValueError as e:  # e.g. a target module the model does not have
        raise ValueError(f"--lora_target_modules {' '.join(targets)}: {e}") from None
    peft_model.peft_config["default"].base_model_name_or_path = base_name
    return peft_model


def peft_model_of(model):
    """The PEFT model inside DDP / DeepSpeed wrappers, or None when the model carries no adapters."""
    while not hasattr(model, "peft_config"):
        inner = getattr(model, "module", None)
        if not isinstance(inner, torch.nn.Module):
            return None
        model = inner
    return model


class _ReadsThePolicy(abc.ABC):
    """A frozen reference computed by the trained policy's own module: everything but the forward (the config,
    the parameters' device, the generation config) is the policy's; a subclass says, in `_reference`, how the
    module is switched to the reference for one forward. Not an nn.Module on purpose: a script's .eval() or .to()
    on the reference must not reach the policy it reads."""
    _can_compile_fullgraph = False  # the sampler's compiled CUDA step would capture one state of the switch

    def __init__(self, peft_model):
        self.model = peft_model

    def __getattr__(self, name):
        return getattr(self.model, name)

    @torch.no_grad()
    def __call__(self, *args, **kwargs):
        with self._reference():
            return self.model(*args, **kwargs)

    forward = __call__

    @abc.abstractmethod
    def _reference(self):
        """A context manager under which self.model computes the reference."""


class AdaptersOff(_ReadsThePolicy):
    """The initial policy pi_0 of a LoRA run: the policy's forward with its adapters disabled, i.e. the frozen base
    weights, exactly (no copy, nothing to keep in sync). REFUEL's pi_0, DPO's pi_ref, MTPO's mu."""

    def _reference(self):
        return self.model.disable_adapter()


class AdapterSnapshot(_ReadsThePolicy):
    """A frozen earlier policy of a LoRA run, pi_i in Iterative PPO: the base weights (shared) with a second, frozen
    adapter holding a copy of the trained one as it was at the last `take()` (the adapters' bytes, not the model's).
    Built before accelerator.prepare, so DDP leaves it out and ZeRO-3 partitions it like every other weight; its
    forward activates the copy, then the trained adapter again."""
    NAME = "frozen_copy"

    def __init__(self, peft_model):
        import copy

        super().__init__(peft_model)
        peft_model.add_adapter(self.NAME, copy.deepcopy(peft_model.peft_config["default"]))
        peft_model.set_adapter("default")  # trainable again; the copy stays frozen
        params = dict(peft_model.named_parameters())
        self.pairs = [(params[name.replace(f".{self.NAME}.", ".default.")], p) for name, p in params.items()
                      if f".{self.NAME}." in name]

    @torch.no_grad()
    def take(self) -> None:
        """copy <- the trained adapter (every rank calls it together: under ZeRO-3 the shards are gathered, rank 0's
        copy is written and partitioned again)."""
        every = [p for pair in self.pairs for p in pair]
        if any(hasattr(p, "ds_id") for p in every):
            import deepspeed

            gathered = deepspeed.zero.GatheredParameters(every, modifier_rank=0)
        else:
            gathered = contextlib.nullcontext()
        with gathered:
            for trained, frozen in self.pairs:
                frozen.data.copy_(trained.data)

    @contextlib.contextmanager
    def _reference(self):
        self.model.set_adapter(self.NAME, inference_mode=True)  # the copy, frozen
        try:
            yield
        finally:
            self.model.set_adapter("default")  # the trained adapter, trainable


def merged_weights(peft_model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name in the base model's checkpoint, tensor) of the policy with its active adapters merged in,
    W + (alpha / r) B A for every adapted layer, computed tensor by tensor (nothing in the model is changed; a
    FSDP2 shard is gathered whole). What the vLLM engine loads, and what `save_merged` writes."""
    from plumbing.distributed import full_tensor

    base = peft_model.get_base_model()
    adapter = peft_model.active_adapter
    lora_layers = {name: m for name, m in base.named_modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")}
    for name, t in base.state_dict().items():
        if ".lora_" in name:  # the adapters' own weights (lora_A, lora_B, a DoRA lora_magnitude_vector)
            continue
        plain = name.replace(".base_layer.", ".")
        layer = lora_layers.get(name.rsplit(".base_layer.", 1)[0]) if ".base_layer." in name else None
        t = full_tensor(t).detach()
        if layer is not None and name.endswith("base_layer.weight") and adapter in layer.lora_A:
            t = t + layer.get_delta_weight(adapter).to(t.dtype)
        yield plain, t


def save_merged(peft_model, tokenizer, out_dir) -> Path:
    """Write the policy with its adapters merged as a plain `save_pretrained` model (and its tokenizer) to out_dir:
    transformers, evaluate.py and vLLM load it as they load any checkpoint."""
    out_dir = Path(out_dir)
    base = peft_model.get_base_model()
    weights = dict(merged_weights(peft_model))
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_config(base.config, dtype=next(iter(weights.values())).dtype)
    missing, unexpected = plain.load_state_dict(weights, strict=False)
    missing = [k for k in missing if k not in getattr(plain, "_tied_weights_keys", {}) and "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"merging the adapters: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain.tie_weights()
    if getattr(base, "generation_config", None) is not None:
        plain.generation_config = base.generation_config
    plain.save_pretrained(out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return out_dir


def write_merged(accelerator, model, tokenizer, run_dir, part=None) -> None:
    """--merge_on_save: runs/<run>/merged, the final policy (`part(unwrapped)` of a larger module) with its adapters
    merged, written by the main process; every rank takes part (ZeRO-3 gathers the weights)."""
    from plumbing.distributed import full_weights, outside_zero3_init

    with full_weights(model, accelerator, part) as full:
        if accelerator.is_main_process:
            with outside_zero3_init(accelerator):  # the plain copy is built whole, on this rank alone
                save_merged(part(full) if part else full, tokenizer, Path(run_dir) / "merged")
    accelerator.wait_for_everyone()


def is_adapter_folder(path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base_name(path) -> str:
    """The base model an adapter folder was trained on (the run's --model_name_or_path)."""
    name = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not name:
        raise ValueError(f"{path}/adapter_config.json names no base model (base_model_name_or_path)")
    return name


def load_adapters(base_model, path, trainable: bool = False):
    """base_model with the adapters saved in `path` (a LoRA run's checkpoint/policy)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ImportError(f"{path} holds LoRA adapters: loading them needs PEFT, `pip install peft`") from None
    return PeftModel.from_pretrained(base_model, str(path), is_trainable=trainable)
