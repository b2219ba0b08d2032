"""Rollout and training throughput of the shared sampler and REFUEL's collection, on random-init Llama shapes.

Measures, for each model shape and batch size, on this machine:
  1. the project's batched turn sampler (`simulator.sample_turns`), plain loop and fast path (static KV cache and
     compiled decode step; its compile time is kept out by a warm-up call of the same shape), vs plain
     `model.generate` on the same prompts, in tokens/s and as a share of the decode-step roofline (weights + KV
     cache read once per step at --bandwidth_gbs GB/s);
  2. one REFUEL collection (roll-in, reset, second rollout, user turns from a second model of the same shape) vs
     the same number of generated tokens as one flat batch;
  3. REFUEL's training step (Eq. 1 forward + backward) in tokens/s and MFU (given --peak_tflops);
  4. peak GPU memory (on GPU).
Prints a markdown table and the machine. Models and tokenizers are built in code: nothing is downloaded.

    python benchmarks/throughput.py                                  # CPU, tiny shapes
    python benchmarks/throughput.py --shapes 1b 8b --batches 32 256 --bandwidth_gbs 3350 --peak_tflops 989  # H100
"""
from __future__ import annotations

import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import refuel  # noqa: E402
import simulator as sim  # noqa: E402
from envs import chat_env

SHAPES = {  # hidden, layers, heads, kv heads, intermediate, vocab
    "tiny": (64, 2, 4, 2, 128, 4096),
    "small": (512, 8, 8, 4, 1536, 32000),
    "1b": (2048, 16, 32, 8, 8192, 128256),
    "8b": (4096, 32, 32, 8, 14336, 128256),
}
TEMPLATE = ("{% for m in messages %}<|start|>{{ m['role'] }}<|sep|>{{ m['content'] }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start|>assistant<|sep|>{% endif %}")


@dataclass
class Args:
    shapes: list[str] = field(default_factory=lambda: ["tiny", "small"])
    """model shapes: tiny, small (CPU); 1b, 8b (GPU)"""
    batches: list[int] = field(default_factory=lambda: [8, 32])
    """batch sizes for the sampler comparison"""
    prompt_len: int = 128
    """prompt tokens"""
    new_tokens: int = 32
    """tokens generated per sequence"""
    collection_prompts: int = 16
    """conversations in the REFUEL collection measurement (H_max 3 turns)"""
    bandwidth_gbs: float = 0.0
    """memory bandwidth for the roofline (H100 SXM: 3350); 0 = leave the roofline columns out"""
    peak_tflops: float = 0.0
    """peak dense bf16 TFLOP/s for MFU (H100 SXM: 989); 0 = leave MFU out"""
    device: str = "auto"
    """'auto' = cuda when available"""
    threads: int = 0
    """torch CPU threads (0 = default)"""
    seed: int = 0
    """seed"""
    vllm: bool = False
    """also time the vLLM engine (plumbing/vllm_engine.py, needs vllm) on the same prompts, and the REFUEL collection with
    the engine sampling the policy's turns (prefix caching on)"""
    fast_path: bool = True
    """also time the sampler's fast path (static cache + compiled step: compiles once per shape, minutes on CPU)"""


def word_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|start|>", "<|sep|>", "<|eot_id|>"]
    words = ["<pad>", "<unk>", *specials, "user", "assistant"] + [f"w{i}" for i in range(vocab_size - 7)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=specials)
    tok.chat_template = TEMPLATE
    return tok


def build(shape: str, tok, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=sim.end_of_turn_id(tok))  # LlamaConfig's default eos (2) would be a stop token
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model.eval(), cfg


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def roofline_ms(model, cfg, batch, context, dtype) -> float:
    """One decode step reads every weight once and the KV cache of every sequence once."""
    bytes_per = torch.finfo(dtype).bits // 8
    weights = sum(p.numel() for p in model.parameters()) * bytes_per
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    return (weights + batch * context * kv * bytes_per) / 1e9  # GB; divided by GB/s below -> s; *1e3 -> ms


def prompts(tok, batch, length, rng):
    n_words = len(tok) - 7
    return [[{"role": "user", "content": " ".join(f"w{i}" for i in rng.integers(n_words, size=length - 6))}]
            for _ in range(batch)]


def time_sampler(model, tok, convs, new_tokens, device, **fast):
    sync(device)
    t = time.perf_counter()
    out = sim.sample_turns(model, tok, convs, new_tokens, temperature=1.0, max_batch_size=len(convs), **fast)
    sync(device)
    return sum(len(i) for i in out.token_ids), time.perf_counter() - t


def time_generate(model, tok, convs, new_tokens, device):
    ids = [sim.render_ids(tok, c, add_generation_prompt=True) for c in convs]
    L = max(map(len, ids))
    x = torch.tensor([[tok.pad_token_id] * (L - len(r)) + r for r in ids], device=device)
    attn = (torch.arange(L, device=device)[None] >= torch.tensor([L - len(r) for r in ids], device=device)[:, None])
    eot = sim.end_of_turn_id(tok)
    sync(device)
    t = time.perf_counter()
    out = model.generate(input_ids=x, attention_mask=attn.long(), max_new_tokens=new_tokens, do_sample=True,
                         top_k=0, top_p=1.0, temperature=1.0, eos_token_id=eot, pad_token_id=tok.pad_token_id)
    sync(device)
    gen = out[:, L:]
    return int((gen != tok.pad_token_id).sum()), time.perf_counter() - t


def time_engine(engine, model, tok, convs, new_tokens, device):
    sync(device)
    t = time.perf_counter()
    out = sim.sample_turns(model, tok, convs, new_tokens, temperature=1.0, engine=engine)
    sync(device)
    return sum(len(i) for i in out.token_ids), time.perf_counter() - t


def make_engine(model, tok, device):
    """A vLLM engine holding the model's weights, or (None, why not) where it cannot serve this shape."""
    from plumbing import vllm_engine

    engine = None
    try:
        engine = vllm_engine.VLLMEngine(model, enforce_eager=device != "cuda", gpu_memory_utilization=0.3)
        sim.sample_turns(model, tok, [[{"role": "user", "content": "w1"}]], 1, engine=engine)  # the first step is where it can fail
        return engine, ""
    except Exception as e:  # e.g. vLLM's CPU attention rejects head dimension 16 (the tiny shape)
        if engine is not None:
            engine.close()
        return None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"


def count_generated_tokens():
    """Wrap the simulator's sampler so every call's generated tokens are counted (policy and user alike)."""
    counter = {"tokens": 0, "calls": 0}
    original = sim.sample_turns

    def counted(*a, **k):
        out = original(*a, **k)
        counter["tokens"] += sum(len(i) for i in out.token_ids)
        counter["calls"] += 1
        return out
    sim.sample_turns = counted
    return counter, lambda: setattr(sim, "sample_turns", original)


def collection(model, user_model, tok, args, device, rng, engine=None):
    """One REFUEL collection vs the same token count as one flat batch (with a vLLM engine: the policy's turns and
    the flat batch sampled by it). user_model: an LLM user on the HF sampler; None: pre-sampled user turns (setting
    two), so only the policy samples and the ratio is what multi-turn sampling costs over a flat batch."""
    records = [{"messages": c, "user": None if user_model is not None else {"questions": [
        " ".join(f"w{i}" for i in rng.integers(len(tok) - 7, size=16)) for _ in range(2)]}}
        for c in prompts(tok, args.collection_prompts, 32, rng)]
    user = user_model and chat_env.PromptedUser(user_model, tok, prompt_template="{dialogue}", max_new_tokens=16)
    env = chat_env.ChatEnv(records, reward_model=lambda convs: torch.zeros(len(convs)), user=user, max_turns=3)
    rargs = refuel.Args(max_turns=3, max_new_tokens=16, gen_batch_size=1024)
    counter, restore = count_generated_tokens()
    sync(device)
    t = time.perf_counter()
    try:
        refuel.collect_pairs(model, tok, env, env.contexts(args.collection_prompts, "train", rng), rng, rargs,
                             engine=engine)
    finally:
        restore()
    sync(device)
    t_coll, tokens = time.perf_counter() - t, counter["tokens"]
    per_seq = 16
    n_flat = max(1, tokens // per_seq)
    flat = prompts(tok, n_flat, 64, rng)
    t_flat = time_engine(engine, model, tok, flat, per_seq, device)[1] if engine else \
        time_sampler(model, tok, flat, per_seq, device)[1]
    return dict(tokens=tokens, calls=counter["calls"], t_collection=t_coll, t_flat=t_flat)


def train_step(model, tok, batch, seq, device, rng):
    convs = [[{"role": "user", "content": " ".join(f"w{i}" for i in rng.integers(len(tok) - 7, size=seq // 2))},
              {"role": "assistant", "content": " ".join(f"w{i}" for i in rng.integers(len(tok) - 7, size=seq // 2))}]
             for _ in range(2 * batch)]
    model.train()
    sync(device)
    t = time.perf_counter()
    logp = sim.turn_logprob(model, tok, convs, [1] * len(convs), max_batch_size=len(convs))
    loss = refuel.refuel_loss(logp[:batch], logp[batch:], logp[:batch].detach(), logp[batch:].detach(),
                              torch.ones(batch, device=logp.device), torch.zeros(batch, device=logp.device), 3.0)
    loss.backward()
    sync(device)
    dt = time.perf_counter() - t
    model.zero_grad(set_to_none=True)
    model.eval()
    n_tok = sum(len(sim.render_ids(tok, c, False)) for c in convs)
    return n_tok, dt


def main(args: Args) -> None:
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    machine = (torch.cuda.get_device_name() if device == "cuda" else
               f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads")
    print(f"device: {machine}; torch {torch.__version__}; dtype {dtype}; prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens\n")
    rows, other, vllm_rows = [], [], []
    for shape in args.shapes:
        tok = word_tokenizer(SHAPES[shape][5])
        model, cfg = build(shape, tok, device, dtype)
        n_params = sum(p.numel() for p in model.parameters())
        engine, why = make_engine(model, tok, device) if args.vllm else (None, "")
        for b in args.batches:
            convs = prompts(tok, b, args.prompt_len, rng)
            time_sampler(model, tok, convs[:2], 2, device)  # warm-up
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            n_s, t_s = time_sampler(model, tok, convs, args.new_tokens, device)
            n_g, t_g = time_generate(model, tok, convs, args.new_tokens, device)
            n_f, t_f = float("nan"), float("nan")
            if args.fast_path:
                fast = dict(fast=True, compile_step=True)
                time_sampler(model, tok, convs, args.new_tokens, device, **fast)  # compiles for this shape
                n_f, t_f = time_sampler(model, tok, convs, args.new_tokens, device, **fast)
            mem = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device == "cuda" else "-"
            step_s, step_f, step_g = (1e3 * x / args.new_tokens for x in (t_s, t_f, t_g))
            roof = ""
            if args.bandwidth_gbs:
                r = 1e3 * roofline_ms(model, cfg, b, args.prompt_len + args.new_tokens // 2, dtype) / args.bandwidth_gbs
                roof = f" | {r:.2f} | {100 * r / step_s:.1f}% | {100 * r / step_f:.1f}% | {100 * r / step_g:.1f}%"
            rows.append(f"| {shape} ({n_params / 1e6:.1f}M) | {b} | {n_s / t_s:.0f} | {n_f / t_f:.0f} | "
                        f"{n_g / t_g:.0f} | {step_s:.1f} | {step_f:.1f} | {step_g:.1f}{roof} | {mem} |")
            if args.vllm:
                if engine is None:
                    vllm_rows.append(f"| {shape} | {b} | - ({why}) | - |")
                    continue
                time_engine(engine, model, tok, convs[:2], 2, device)  # warm-up
                n_v, t_v = time_engine(engine, model, tok, convs, args.new_tokens, device)
                step_v = 1e3 * t_v / args.new_tokens
                r = 1e3 * roofline_ms(model, cfg, b, args.prompt_len + args.new_tokens // 2, dtype)
                share = f"{100 * r / args.bandwidth_gbs / step_v:.1f}%" if args.bandwidth_gbs else "-"
                vllm_rows.append(f"| {shape} | {b} | {n_v / t_v:.0f} | {n_s / t_s:.0f} | {step_v:.1f} | {share} |")
        user_model, _ = build(shape, tok, device, dtype)
        n_tok, dt = train_step(model, tok, 8, 256, device, rng)
        mfu = f"{100 * 6 * n_params * n_tok / dt / (args.peak_tflops * 1e12):.1f}%" if args.peak_tflops else "-"
        for sampler, eng in [("HF", None)] + [("vLLM", engine)] * (engine is not None):
            for user_name, user in (("LLM user", user_model), ("pre-sampled user turns", None)):
                c = collection(model, user, tok, args, device, rng, eng)
                other.append(f"| {shape}, {sampler} policy, {user_name} | {c['tokens']} tokens in {c['calls']} "
                             f"sampler calls: {c['t_collection']:.2f} s | {c['t_flat']:.2f} s | "
                             f"{c['t_collection'] / c['t_flat']:.2f}x | {n_tok / dt:.0f} | {mfu} |")
        if engine is not None:
            engine.close()
        del model, user_model
    roof_head = " | roofline ms/step | sampler share | fast share | generate share" if args.bandwidth_gbs else ""
    print("| shape | batch | sampler tok/s | fast path tok/s | generate tok/s | sampler ms/step | fast path ms/step | "
          "generate ms/step" + roof_head + " | peak GiB |")
    print("|" + "---|" * (12 if args.bandwidth_gbs else 8) + "---|")
    print("\n".join(rows))
    print("\n| shape, sampler, user | REFUEL collection (H_max 3) | same tokens, one flat batch | ratio | "
          "train step tok/s | MFU |\n|---|---|---|---|---|---|")
    print("\n".join(other))
    if vllm_rows:
        print("\n| shape | batch | vLLM tok/s | HF sampler tok/s | vLLM ms/step | vLLM roofline share |\n"
              "|---|---|---|---|---|---|")
        print("\n".join(vllm_rows))
    sys.stdout.flush()  # before vLLM's exit handlers run (a fork there would print the buffered tables twice)


if __name__ == "__main__":
    main(tyro.cli(Args))
