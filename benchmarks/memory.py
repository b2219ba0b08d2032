"""Per-rank peak GPU memory of each phase of the README's GPU commands at the Llama-3-8B shape.

Approach: analytic. Every phase's peak is a sum of closed-form byte counts (below) computed from the model shape
and the command's flags; no model is built, so `python benchmarks/memory.py` runs in a second on a CPU. With
`--measure` a random-init model of `--shape` is built and the same phases are run and measured on one process
(`torch.cuda.max_memory_allocated` on CUDA, a TorchDispatchMode that counts live tensor bytes on a CPU), next to
the same formulas' prediction for that single-process setting, so the formulas can be checked on a GPU.

Per-rank terms, N ranks, P policy parameters, bf16 (2 bytes) unless said:
  states      ZeRO-3: 16 P / N (bf16 weights 2 + bf16 grads 2 + fp32 master, Adam m and v 12, all sharded).
              ZeRO-2: 2 P (whole bf16 weights) + 14 P_train / N (grads and optimizer state of the trained params).
              A second trained backbone (MTPO's value network) adds its own.
  frozen      models resident on every rank for the whole run: the reward model (2 x its parameters), pi_0 or mu
              (2 P) where the command keeps one; a user or judge served from an endpoint costs nothing here.
  gathered    sampling under ZeRO-3 uses one all-gathered bf16 copy of the policy (2 P); ZeRO-2 needs none.
  live        ZeRO-3 forward/backward keeps up to stage3_max_live_parameters (DeepSpeed default 1e9, i.e. 2 GB)
              of gathered parameters beside the shards.
  kv          KV cache: rows x cache length x 2 (K, V) x layers x KV heads x head dim x 2 bytes; the sampler's
              static cache length is `plumbing/fast_decode.ladder(context + new tokens, 64)`.
  act(no grad) one layer's transient activations: tokens x (3 I + 2 h) x 2 (the MLP's gate, up and product).
  act(grad)   with --gradient_checkpointing: layers x tokens x h x 2 (a checkpoint per layer) + one layer
              recomputed and its gradients, 2 x tokens x (6 h + 2 kv + 4 I) x 2; without it, layers x that.
  logits      before (full-vocabulary float32 log-softmax at every position): logits rows x T x V x 2 plus float32
              temporaries, 10 bytes per element at the forward's peak, 14 in the backward; the sampler's prefill
              kept rows x context x V x 2 through the decode, and no-grad passes also built a KV cache.
              after (this repository): rows x (k + 1) x V x 2 for the k scored tokens (a turn: <= new tokens;
              MTPO's whole conversation: all but the first prompt), the same again for its gradient in the
              backward, plus two float32 chunks of 2^25 elements (256 MiB); the prefill keeps rows x V.
A phase's peak is the sum of its terms. "Fits" means at most 76 GiB: 80 GiB less 4 GiB for the CUDA context, NCCL
buffers and fragmentation. Sequence lengths are the worst case of each command (the longest first prompt, every turn
at its token limit); "before" is the code before issue 17 (full-vocabulary log-softmax, whole-prompt prefill logits,
KV caches in scoring passes), "now" this repository's, and the third row of a command adds the flags that make it
fit ("(to add)": the script does not have that flag yet).

    python benchmarks/memory.py                              # the table, analytic, any machine
    python benchmarks/memory.py --measure --shape 1b         # also measure (CUDA: max_memory_allocated)
    python benchmarks/memory.py --measure --shape tiny       # the measuring code path on a CPU
"""
from __future__ import annotations

import dataclasses
import re
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from plumbing import logprob_memory  # noqa: E402
import simulator as sim  # noqa: E402
from envs import chat_env
from plumbing import fast_decode

GiB = 2 ** 30
CAPACITY = 80 * GiB
USABLE = CAPACITY - 4 * GiB  # the CUDA context, NCCL buffers, fragmentation
CHUNK_BYTES = 2 * logprob_memory.LOGPROB_CHUNK_ELEMENTS * 4  # two float32 chunks of the chunked log-softmax
ZERO3_LIVE = 2 * 10 ** 9  # stage3_max_live_parameters (1e9, DeepSpeed's default) in bf16

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 128, 128256),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}


@dataclass(frozen=True)
class Shape:
    h: int
    layers: int
    heads: int
    kv_heads: int
    inter: int
    vocab: int

    @property
    def head_dim(self) -> int:
        return self.h // self.heads

    def layer_params(self) -> int:
        kv = self.kv_heads * self.head_dim
        return self.h * (2 * self.h + 2 * kv) + 3 * self.h * self.inter + 2 * self.h

    def params(self, lm_head: bool = True) -> int:
        """Untied embedding and LM head, as Llama-3-8B."""
        return self.vocab * self.h * (2 if lm_head else 1) + self.layers * self.layer_params() + self.h

    def lora_params(self, r: int) -> int:
        """LoRA adapters of rank r on every linear layer but the LM head (--lora_target_modules all-linear): r x
        (inputs + outputs) for q, k, v, o, gate, up and down."""
        kv = self.kv_heads * self.head_dim
        return self.layers * r * (2 * (self.h + self.h) + 2 * (self.h + kv) + 3 * (self.h + self.inter))

    def kv_per_token(self, dtype_bytes: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * dtype_bytes

    def act_nograd(self, tokens: int, b: int = 2) -> int:
        return tokens * (3 * self.inter + 2 * self.h) * b

    def act_layer(self, tokens: int, b: int = 2) -> int:
        """Saved activations of one layer for the backward (inputs of the norms, q/k/v/out, the MLP's three)."""
        return tokens * (6 * self.h + 2 * self.kv_heads * self.head_dim + 4 * self.inter) * b

    def act_grad(self, tokens: int, checkpointing: bool, b: int = 2) -> int:
        if checkpointing:
            return self.layers * tokens * self.h * b + 2 * self.act_layer(tokens, b)
        return self.layers * self.act_layer(tokens, b) + self.act_layer(tokens, b)


LLAMA3_8B = Shape(*SHAPES["8b"])


def logits_bytes(rows: int, positions: int, vocab: int, before: bool, grad: bool, b: int = 2) -> int:
    """The LM head's output and the log-softmax's temporaries (see the module docstring)."""
    elems = rows * positions * vocab
    if before:
        return elems * (14 if grad else 10)
    return elems * b * (2 if grad else 1) + CHUNK_BYTES


@dataclass
class Command:
    name: str
    zero: int  # 2 or 3
    prompt_tokens: int  # the longest first prompt (--max_dialogue_tokens)
    max_new_tokens: int
    max_turns: int
    gen_batch_size: int
    train_rows: int  # sequences per training forward (pairs x 2 for REFUEL)
    trained_fraction: float = 1.0  # --train_top_layers
    checkpointing: bool = True
    frozen_params: tuple = ()  # (label, parameters) of frozen bf16 models on every rank
    trained_backbones: int = 1  # MTPO: the policy and the value network
    whole_conversation: bool = False  # MTPO scores every assistant turn of the conversation in one pass
    user_tokens: int = 128  # an assumed user turn length
    logprob_rows: int = 64  # turn_logprob's max_batch_size
    reward_rows: int = 16  # HFRewardModel's max_batch_size
    reward_max_length: int = 4096
    n_ranks: int = 8
    script: str = "refuel.py"
    accum_flag: str = "gradient_accumulation_steps"  # the script's flag that splits a minibatch into backwards
    # flags that change memory (None = the script's default)
    max_tokens_per_batch: Optional[int] = None
    gradient_accumulation_steps: int = 1
    shared_value_backbone: bool = False  # MTPO's value head on the policy's backbone
    lora_r: int = 0  # --lora_r: bf16 base weights frozen, fp32 adapters trained; pi_0 / mu are the adapters off

    @property
    def context(self) -> int:
        """The longest conversation: the first prompt, then H turns with a user turn between each two."""
        return self.prompt_tokens + (self.max_turns - 1) * (self.max_new_tokens + self.user_tokens) \
            + self.max_new_tokens

    @property
    def scored(self) -> int:
        """Tokens whose log-probs one row needs: one turn, or (MTPO) every position after the first prompt."""
        return self.context - self.prompt_tokens if self.whole_conversation else self.max_new_tokens


def budget_rows(rows: int, tokens: int, budget: Optional[int]) -> int:
    return rows if budget is None else max(1, min(rows, budget // tokens))


def phases(c: Command, s: Shape = LLAMA3_8B, before: bool = False) -> dict:
    """Per-rank peak bytes of each phase of command c."""
    P = s.params()
    trained = c.trained_backbones * P
    if c.lora_r:  # one process: the whole bf16 base, and the adapters' fp32 weights, grads and Adam m, v (16 bytes)
        states, gathered, live = 2 * P + 16 * s.lora_params(c.lora_r), 0, 0
    elif c.zero == 3:
        states = 16 * trained // c.n_ranks
        gathered, live = 2 * P, ZERO3_LIVE
    else:
        states = 2 * trained + int(14 * trained * c.trained_fraction) // c.n_ranks
        gathered, live = 0, 0
    frozen = sum(2 * n for _, n in c.frozen_params)
    base = states + frozen
    T, k = c.context, c.scored
    # sampling: the longest prompt of the last turn, its new tokens in the static cache
    prompt = T - c.max_new_tokens
    B = c.gen_batch_size
    cache = B * (prompt + c.max_new_tokens if before else fast_decode.ladder(prompt + c.max_new_tokens, 64))
    prefill_logits = B * prompt * s.vocab * 2 if before else B * s.vocab * (2 + 4 + 4)
    sampling = base + gathered + cache * s.kv_per_token() + s.act_nograd(B * prompt) + prefill_logits
    # old log-probs (no grad): rows of T tokens, turn k scored
    rows = budget_rows(c.logprob_rows, T, None if before else c.max_tokens_per_batch)
    lp_kv = rows * T * s.kv_per_token() if before else 0  # use_cache defaulted to True
    old_lp = base + live + s.act_nograd(rows * T) + lp_kv + logits_bytes(rows, T if before else k + 1, s.vocab,
                                                                         before, grad=False)
    # a training micro-batch (forward + backward, all forwards' tensors live until the backward)
    tr = max(1, c.train_rows // c.gradient_accumulation_steps)
    train = base + live + c.trained_backbones * s.act_grad(tr * T, c.checkpointing) \
        + logits_bytes(tr, T if before else k + 1, s.vocab, before, grad=True)
    if c.zero == 2 and not c.lora_r:  # whole bf16 gradients of the trained params before the reduce-scatter (one
        train += int(2 * trained * c.trained_fraction) // c.n_ranks  # bucket at a time in DeepSpeed; as its shard)
    # the reward call: HFRewardModel, right-truncated rows, no grad (before: a KV cache too)
    rT = min(T, c.reward_max_length)
    reward = base + s.act_nograd(c.reward_rows * rT) + (c.reward_rows * rT * s.kv_per_token() if before else 0)
    return {"sampling": sampling, "old log-probs": old_lp, "training micro-batch": train, "reward call": reward}


README_COMMANDS = {
    # README "Setting one": refuel.py, ZeRO-3, 70B user at an endpoint, ArmoRM on every rank,
    # 128 pairs per step over 8 ranks = 16 pairs = 32 sequences a forward, --gradient_checkpointing
    "refuel setting one (ZeRO-3)": Command(
        "refuel setting one", zero=3, prompt_tokens=2048, max_new_tokens=1024, max_turns=5, gen_batch_size=16,
        train_rows=32, max_tokens_per_batch=16384, gradient_accumulation_steps=4,
        frozen_params=(("ArmoRM", LLAMA3_8B.params(lm_head=False)),)),
    # README "Setting two": refuel.py, ZeRO-2, pre-sampled user turns, FsfairX RM, --gamma 0.05 keeps pi_0,
    # 32 pairs over 8 ranks = 4 pairs = 8 sequences, top 4 of 32 layers trained, --gradient_checkpointing
    "refuel setting two (ZeRO-2)": Command(
        "refuel setting two", zero=2, prompt_tokens=2048, max_new_tokens=256, max_turns=5, gen_batch_size=32,
        train_rows=8, trained_fraction=4 / 32, checkpointing=True, max_tokens_per_batch=16384,
        frozen_params=(("FsfairX RM", LLAMA3_8B.params(lm_head=False)), ("pi_0", LLAMA3_8B.params()))),
    # README "MTPO on Education Dialogue": mtpo.py, ZeRO-3, student and judge at an endpoint, a BT reward model
    # and mu on every rank, the value head on the policy's backbone; 128 contexts x 2 conversations / 8 ranks =
    # 32 conversations, in 4 minibatches; the whole conversation is scored in one pass
    "mtpo education (ZeRO-3)": Command(
        "mtpo education", zero=3, prompt_tokens=512, max_new_tokens=128, max_turns=10, gen_batch_size=16,
        train_rows=32, checkpointing=True, trained_backbones=1, whole_conversation=True, logprob_rows=32,
        script="mtpo.py", accum_flag="num_minibatches", max_tokens_per_batch=16384, gradient_accumulation_steps=4,
        shared_value_backbone=True,
        frozen_params=(("reward model", LLAMA3_8B.params(lm_head=False)), ("mu", LLAMA3_8B.params()))),
}
LORA_R = 16


def with_lora(c: Command, r: int = LORA_R) -> Command:
    """The command with --lora_r r on ONE GPU: the same rows per forward (the 8 ranks' batch becomes 8x the
    gradient accumulation, time not memory), the base loaded in bf16, no ZeRO, and pi_0 / mu no longer resident."""
    frozen = tuple((n, p) for n, p in c.frozen_params if n not in ("pi_0", "mu"))
    return dataclasses.replace(c, name=f"{c.name} + LoRA", n_ranks=1, zero=0, lora_r=r, trained_fraction=1.0,
                               frozen_params=frozen)


LORA_COMMANDS = {f"{title.split(' (')[0]} + LoRA r={LORA_R}, 1 GPU": with_lora(c)
                 for title, c in README_COMMANDS.items()}
# the flags that make each command fit, found by `fix` below and printed with the table
TOKEN_BUDGET = 16384
MIN_GEN_BATCH = 16  # below this sampling is too slow to be the answer; a model copy has to go instead


def fix(c: Command) -> Command:
    """The command with flags changed until every phase fits: a token budget for the log-prob passes, then
    gradient checkpointing, more gradient accumulation, a smaller sampling batch, and (MTPO) a value head on the
    policy's backbone when the resident models leave no room to sample MIN_GEN_BATCH rows."""
    c = dataclasses.replace(c, max_tokens_per_batch=TOKEN_BUDGET)
    for _ in range(40):
        p = phases(c)
        if max(p.values()) <= USABLE:
            break
        small = dataclasses.replace(c, gen_batch_size=min(c.gen_batch_size, MIN_GEN_BATCH))
        if c.trained_backbones > 1 and phases(small)["sampling"] > USABLE:
            c = dataclasses.replace(c, trained_backbones=1, shared_value_backbone=True)
        elif p["training micro-batch"] > USABLE and not c.checkpointing:
            c = dataclasses.replace(c, checkpointing=True)
        elif p["training micro-batch"] > USABLE and c.train_rows // c.gradient_accumulation_steps > 1:
            c = dataclasses.replace(c, gradient_accumulation_steps=c.gradient_accumulation_steps * 2)
        elif p["sampling"] > USABLE and c.gen_batch_size > 1:
            c = dataclasses.replace(c, gen_batch_size=c.gen_batch_size // 2)
        else:
            break
    return c


def script_has(script: str, flag: str) -> bool:
    """Whether the script's Args has this flag (read from its source, so the table follows the scripts)."""
    path = ROOT / script
    return path.exists() and re.search(rf"^\s+{flag}\s*:", path.read_text(), re.M) is not None


def flags(c: Command, base: Command) -> str:
    out = []
    if c.max_tokens_per_batch != base.max_tokens_per_batch:
        out.append(("max_tokens_per_batch", f" {c.max_tokens_per_batch}"))
    if c.checkpointing != base.checkpointing:
        out.append(("gradient_checkpointing", ""))
    if c.gradient_accumulation_steps != base.gradient_accumulation_steps:
        out.append((c.accum_flag, f" {c.gradient_accumulation_steps}"))
    if c.gen_batch_size != base.gen_batch_size:
        out.append(("gen_batch_size", f" {c.gen_batch_size}"))
    text = [f"--{f}{v}" + ("" if script_has(c.script, f) else " (to add)") for f, v in out]
    if c.shared_value_backbone:  # the value head on the policy's backbone
        text.append("--value_backbone shared" + ("" if script_has(c.script, "value_backbone") else " (to add)"))
    return ", ".join(text) or "(none)"


def gb(x: float) -> str:
    return f"{x / GiB:.1f}"


PHASES = ["sampling", "old log-probs", "training micro-batch", "reward call"]


def header(*columns: str) -> list:
    """A phase table's two header lines: `columns`, each phase, the peak and the verdict."""
    cells = [*columns, *PHASES, "peak", "fits 80 GB"]
    return ["| " + " | ".join(cells) + " |", "|" + "---|" * len(cells)]


def phase_cells(p: dict) -> str:
    """Each phase's GiB, the peak and whether it fits, as the end of a table row."""
    peak = max(p.values())
    return " | ".join(gb(p[n]) for n in PHASES) + f" | {gb(peak)} | " + ("yes" if peak <= USABLE else "**no**") + " |"


def table() -> str:
    lines = header("command", "code", "flags")
    for title, c in README_COMMANDS.items():
        fixed = fix(c)
        for code, cmd, before in (("before", c, True), ("now", c, False), ("now", fixed, False)):
            if cmd is fixed and fixed == c:
                continue
            lines.append(f"| {title} | {code} | {flags(cmd, c) if cmd is fixed else 'README'} | "
                         + phase_cells(phases(cmd, before=before)))
    return "\n".join(lines)


def lora_table() -> str:
    """The README's commands with LoRA on one 80 GB GPU (the flags that make each fit added by `fix`)."""
    lines = header("command", "flags", "adapters")
    for title, c in LORA_COMMANDS.items():
        fixed = fix(c)
        adapters = f"{LLAMA3_8B.lora_params(c.lora_r) / 1e6:.0f}M"
        extra = f", {flags(fixed, c)}" if fixed != c else ""
        lines.append(f"| {title} | --lora_r {c.lora_r}{extra} | {adapters} | " + phase_cells(phases(fixed)))
    return "\n".join(lines)


def assumptions() -> str:
    rows = []
    for title, c in README_COMMANDS.items():
        rows.append(f"- {title}: longest conversation {c.context} tokens ({c.prompt_tokens}-token prompt, "
                    f"{c.max_turns} turns of {c.max_new_tokens} new tokens, {c.user_tokens}-token user turns), "
                    f"{'whole conversation' if c.whole_conversation else 'one turn'} scored "
                    f"({c.scored} tokens), {c.gen_batch_size} rows sampled, {c.train_rows} rows a training "
                    f"forward, frozen on every rank: {', '.join(n for n, _ in c.frozen_params) or 'none'}.")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------------------------
class PeakBytes:
    """Peak bytes of tensors allocated inside the block beyond those alive at its start: a TorchDispatchMode that
    counts each new storage once and drops it when the storage is freed (any device; on CUDA prefer
    torch.cuda.max_memory_allocated, which also sees the allocator's rounding)."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        tracker = self
        self.live, self.now, self.peak = {}, 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # views and in-place results share an input's storage: not a new allocation (a parameter's
                # transpose would otherwise count the whole weight)
                seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and t.device.type != "meta"}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta" \
                            and t.untyped_storage().data_ptr() not in seen:
                        tracker._track(t.untyped_storage())
                return out
        self.mode = Mode()

    def _track(self, storage):
        key = storage.data_ptr()
        if key and key not in self.live:
            self.live[key] = storage.nbytes()
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self._free, key)

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __enter__(self):
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


class CudaPeak:
    """torch.cuda.max_memory_allocated above what was allocated at the start of the block."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() - self.start


def measure(shape_name: str, batch: int, prompt_tokens: int, new_tokens: int, device: str) -> list:
    """Run the four phases once on a random-init model of the shape (one process, no ZeRO) and return rows of
    (phase, measured bytes above the weights, the formulas' prediction for the same single-process setting)."""
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    s = Shape(*SHAPES[shape_name])
    tok = throughput_tokenizer()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    b = 2 if dtype == torch.bfloat16 else 4
    cfg = dict(vocab_size=s.vocab, hidden_size=s.h, intermediate_size=s.inter, num_hidden_layers=s.layers,
               num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, max_position_embeddings=8192,
               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
               eos_token_id=sim.end_of_turn_id(tok))  # LlamaConfig's default eos (2) would be a stop token
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 on the GPU: no float32 copy of 8B weights on the way
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**cfg))
            rm = LlamaForSequenceClassification(LlamaConfig(**cfg, num_labels=1)).eval()
    finally:
        torch.set_default_dtype(default)
    words = "the cat sat on a mat and then it ran far away from home"
    prompt = " ".join((words.split() * (prompt_tokens // 12 + 1))[: max(1, prompt_tokens - 8)])
    turn = " ".join((words.split() * (new_tokens // 12 + 1))[: max(1, new_tokens - 1)])
    convs = [[{"role": "user", "content": prompt}, {"role": "assistant", "content": turn}]] * batch
    T = len(sim.render_ids(tok, convs[0], add_generation_prompt=False))
    _, turn_ids = sim.split_turn(tok, convs[0], 1)
    k = len(turn_ids)
    counter = CudaPeak if device == "cuda" else PeakBytes
    out = []
    with counter() as m:
        sim.sample_turns(model.eval(), tok, [c[:1] for c in convs], new_tokens, 1.0)
    L = T - k
    cache = batch * (fast_decode.ladder(L + new_tokens, 64) if device == "cuda" else L + new_tokens)
    out.append(("sampling", m.peak, cache * s.kv_per_token(b) + s.act_nograd(batch * L, b) + batch * s.vocab * (b + 8)))
    with counter() as m, torch.no_grad():
        sim.turn_logprob(model, tok, convs, [1] * batch)
    out.append(("old log-probs", m.peak, s.act_nograd(batch * T, b) + batch * (k + 1) * s.vocab * b
                + min(CHUNK_BYTES, 2 * batch * (k + 1) * s.vocab * 4)))
    model.train()
    with counter() as m:
        sim.turn_logprob(model, tok, convs, [1] * batch).sum().backward()
    model.zero_grad(set_to_none=True)
    out.append(("training micro-batch", m.peak, s.act_grad(batch * T, False, b) + s.params() * b
                + 2 * batch * (k + 1) * s.vocab * b + min(CHUNK_BYTES, 2 * batch * (k + 1) * s.vocab * 4)))
    scorer = chat_env.HFRewardModel(rm, tok, max_length=4096, max_batch_size=batch)
    with counter() as m:
        scorer(convs)
    out.append(("reward call", m.peak, s.act_nograd(batch * T, b)))
    return out


def throughput_tokenizer():
    """The word-level chat tokenizer the throughput benchmark builds in code (nothing is downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|start|>", "<|sep|>", "<|eot_id|>"]
    words = "the cat sat on a mat and then it ran far away from home user assistant".split()
    vocab = {w: i for i, w in enumerate(specials + sorted(set(words)))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=specials[2:], clean_up_tokenization_spaces=False)
    tok.chat_template = ("{% for m in messages %}<|start|> {{ m['role'] }} <|sep|> {{ m['content'] }} <|eot_id|> "
                         "{% endfor %}{% if add_generation_prompt %}<|start|> assistant <|sep|> {% endif %}")
    return tok


@dataclass
class Args:
    measure: bool = False
    """also build a random-init model of --shape and measure each phase (CUDA: max_memory_allocated; CPU: a
    TorchDispatchMode byte counter)"""
    shape: str = "tiny"
    """the measured model's shape: tiny, 1b or 8b (the table is always at the 8B shape)"""
    batch: int = 4
    """rows of the measured phases"""
    prompt_tokens: int = 96
    """prompt length of the measured phases"""
    new_tokens: int = 16
    """new tokens (the scored turn) of the measured phases"""


def main(args: Args) -> str:
    out = ["Per-rank peak GiB of each phase at the Llama-3-8B shape, 8 ranks (analytic; `benchmarks/memory.py`):",
           "", table(), "", assumptions(), "",
           f"With LoRA (--lora_r {LORA_R}, all linear layers) on one GPU: the bf16 base frozen, the references read "
           "through it with the adapters off (GiB):", "", lora_table()]
    if args.measure:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        out += ["", f"Measured on {device} ({args.shape} shape, one process, {args.batch} rows, "
                f"{args.prompt_tokens}-token prompts, {args.new_tokens}-token turns), MiB above the weights:", "",
                "| phase | measured | predicted |", "|---|---|---|"]
        for name, got, want in measure(args.shape, args.batch, args.prompt_tokens, args.new_tokens, device):
            out.append(f"| {name} | {got / 2 ** 20:.1f} | {want / 2 ** 20:.1f} |")
    text = "\n".join(out)
    print(text)
    return text


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
