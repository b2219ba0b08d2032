"""Memory of the log-prob passes at a real vocabulary size, and the memory benchmark."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import simulator as sim
from plumbing import logprob_memory
from conftest import ROOT, subprocess_env
from test_simulator import dialogue, llama3_tokenizer

VOCAB = 128256  # Llama-3's


def load_benchmark():
    spec = importlib.util.spec_from_file_location("memory_benchmark", ROOT / "benchmarks" / "memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


bench = load_benchmark()


def big_vocab_llama(tok, seed=0):
    """A tiny Llama (hidden 32, one layer) with Llama-3's 128,256-token vocabulary: the LM head dominates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      pad_token_id=tok.pad_token_id)
    return LlamaForCausalLM(cfg).eval()


def old_turn_logprob(model, tok, convs, turns, temperature=1.0):
    """The implementation before this file's tests: every position's full-vocabulary float32 log-softmax on the
    whole right-padded conversation up to turn h, masked to the turn."""
    ids, attn, mask = sim.turn_batch(tok, convs, turns, tok.pad_token_id)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / temperature
    lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    return (lp * mask[:, 1:]).sum(-1)


def conversation(prompt_words: int, turn_words: int, seed: int = 0):
    """A user message of about prompt_words tokens, an assistant turn of turn_words tokens, and a later exchange
    (which the log-prob of turn 1 must not pay for)."""
    words = "hello teacher , please teach me planets with songs and stories".split()
    pick = lambda n, k: " ".join(words[(i * 7 + k) % len(words)] for i in range(n))
    return [{"role": "user", "content": pick(prompt_words, seed)},
            {"role": "assistant", "content": pick(turn_words, seed + 1)},
            {"role": "user", "content": pick(prompt_words, seed + 2)},
            {"role": "assistant", "content": pick(turn_words, seed + 3)}]


def peak(fn):
    with bench.PeakBytes() as m:
        out = fn()
    return m.peak, out


def test_turn_logprob_memory_grows_with_turn_tokens_not_length_times_vocab():
    tok = llama3_tokenizer()
    model = big_vocab_llama(tok)
    B = 2
    row_bytes = B * VOCAB * 4  # one position's float32 logits for every row

    def run(prompt_words, turn_words, old=False):
        convs = [conversation(prompt_words, turn_words, seed=s) for s in range(B)]
        f = old_turn_logprob if old else sim.turn_logprob
        with torch.no_grad():
            p, out = peak(lambda: f(model, tok, convs, [1] * B))
        k = len(sim.split_turn(tok, convs[0], 1)[1])
        L = max(len(sim.render_ids(tok, c[:2], False)) for c in convs)
        return p, out, k, L

    short_old, v_old, k, L_short = run(100, 6, old=True)
    short_new, v_new, _, _ = run(100, 6)
    torch.testing.assert_close(v_new, v_old, atol=1e-5, rtol=0)
    long_old, v_old, _, L = run(300, 6, old=True)
    long_new, v_new, _, _ = run(300, 6)
    torch.testing.assert_close(v_new, v_old, atol=1e-5, rtol=0)
    turn_new, _, k4, _ = run(300, 24)
    print(f"\nno grad, {B} rows, vocab {VOCAB}: old {short_old / 2**20:.1f} MiB at {L_short} tokens, "
          f"{long_old / 2**20:.1f} MiB at {L}; new {short_new / 2**20:.1f} MiB at {L_short} and "
          f"{long_new / 2**20:.1f} MiB at {L} tokens ({k}-token turn), {turn_new / 2**20:.1f} MiB for a {k4}-token "
          f"turn")
    assert long_old >= L * row_bytes  # the old pass holds every position's logits (at least once)
    assert long_old > 2.5 * short_old  # and grows with the length
    assert long_new <= 3 * (k + 1) * row_bytes + 2 * 2**20  # the new one holds the turn's, a few times over
    assert long_new <= 1.1 * short_new + 2**20  # not the prompt's: the same at three times the length
    assert long_new < long_old / 10
    assert turn_new > 2 * long_new  # it grows with the number of turn tokens


def test_turn_logprob_training_memory_and_gradients_match_the_old_computation():
    tok = llama3_tokenizer()
    model = big_vocab_llama(tok)
    convs = [conversation(150, 6, seed=s) for s in range(2)]

    def step(f):
        model.zero_grad(set_to_none=True)
        p, out = peak(lambda: f(model, tok, convs, [1, 1], 0.7).sum().backward())
        return p, [x.grad.clone() for x in model.parameters()]

    old_peak, old_grads = step(old_turn_logprob)
    new_peak, new_grads = step(sim.turn_logprob)
    for a, b in zip(new_grads, old_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    grads = sum(x.numel() * 4 for x in model.parameters())  # allocated by the backward in both
    print(f"\nforward + backward: old {old_peak / 2**20:.1f} MiB, new {new_peak / 2**20:.1f} MiB "
          f"({grads / 2**20:.1f} MiB of them the parameters' gradients)")
    assert new_peak - grads < (old_peak - grads) / 5


def test_token_logprobs_target_mask_equals_the_dense_pass():
    """MTPO's whole-conversation pass and Iterative PPO's response pass ask for some positions only: those
    equal the dense pass's (right-padded rows of different lengths), the others are 0; both are differentiable."""
    from test_simulator import tiny_llama

    tok = llama3_tokenizer()
    model = tiny_llama(tok)
    convs = [dialogue(3), dialogue(1), dialogue(2)]
    rows = [sim.render_ids(tok, c, add_generation_prompt=False) for c in convs]
    L = max(map(len, rows))
    ids = torch.full((3, L), tok.pad_token_id)
    attn = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, :len(r)], attn[b, :len(r)] = torch.tensor(r), 1
    dense = sim.token_logprobs(model, ids, attn, 0.8)
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.8  # the old computation
    torch.testing.assert_close(dense, logits.log_softmax(-1).gather(2, ids[:, 1:, None]).squeeze(2), atol=1e-5,
                               rtol=0)
    g = torch.Generator().manual_seed(0)
    for mask in (torch.rand(3, L - 1, generator=g) < 0.3,  # scattered positions (every assistant turn)
                 torch.arange(L - 1) >= torch.tensor([[len(r) - 6] for r in rows]),  # a response at the end
                 torch.zeros(3, L - 1, dtype=torch.bool)):
        mask = mask & attn[:, 1:].bool()
        part = sim.token_logprobs(model, ids, attn, 0.8, target_mask=mask)
        torch.testing.assert_close(part, dense * mask, atol=1e-5, rtol=0)
    model.zero_grad()
    sim.token_logprobs(model, ids, attn, 0.8, target_mask=mask | attn[:, 1:].bool()).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_token_budget_batches_and_turn_logprob_with_a_budget():
    lengths = [50, 10, 300, 40, 40, 120]
    batches = logprob_memory.token_budget_batches(lengths, max_batch_size=3, max_tokens_per_batch=200)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for b in batches:
        assert len(b) <= 3 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 200)
    assert logprob_memory.token_budget_batches(lengths, 4) == [[0, 1, 2, 3], [4, 5]]  # without a budget: as before
    from test_simulator import tiny_llama

    tok = llama3_tokenizer()
    model = tiny_llama(tok)
    convs, turns = [dialogue(3), dialogue(1), dialogue(2), dialogue(3)], [3, 1, 2, 1]
    whole = sim.turn_logprob(model, tok, convs, turns)
    budget = sim.turn_logprob(model, tok, convs, turns, max_tokens_per_batch=40)
    torch.testing.assert_close(budget, whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(whole, old_turn_logprob(model, tok, convs, turns), atol=1e-5, rtol=0)


def _sync_ranks_worker(rank, path, n_rows, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from test_simulator import tiny_llama

    dist.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    tok = llama3_tokenizer()
    model = DistributedDataParallel(tiny_llama(tok))  # broadcasts buffers at every forward: forwards must match
    convs = [dialogue(2)] * n_rows[rank]
    lp = sim.turn_logprob(model, tok, convs, [1] * len(convs), max_tokens_per_batch=30, max_batch_size=1,
                          sync_ranks=True)
    lp.sum().backward()
    grad = next(model.parameters()).grad
    out.put((rank, len(lp), grad.abs().sum().item()))
    out.close()
    out.join_thread()  # the result is in the pipe before this process ends
    # Both ranks leave together: a rank that exits while the other still finishes the gradient all-reduce closes
    # the gloo connection under it, and gloo's threads abort the other process ("terminate called without an
    # active exception", seen once under load). Then skip interpreter finalisation, where gloo's worker threads can
    # still be joinable and abort the same way (pytorch/pytorch#179291; tests/test_fsdp.py does the same).
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_sync_ranks_runs_the_same_number_of_forwards_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_sync_ranks_worker, args=(r, str(tmp_path / "store"), (3, 1), q)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in procs)
    res = dict((r, (n, g)) for r, n, g in (q.get(timeout=5) for _ in procs))
    assert res[0][0] == 3 and res[1][0] == 1
    assert res[0][1] == pytest.approx(res[1][1])  # DDP averaged the gradients of both ranks' rows


def test_memory_benchmark_table_and_measurement():
    out = subprocess.run([sys.executable, "benchmarks/memory.py"], cwd=ROOT, capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [x for x in out.stdout.splitlines() if (x.startswith("| refuel") or x.startswith("| mtpo"))
             and "LoRA" not in x]
    # each README command before the log-prob changes (does not fit) and now, with the flags it is written with
    assert len(lines) == 6 and {x.split(" | ")[1] for x in lines} == {"before", "now"}
    assert all(x.endswith("| yes |") for x in lines if "| now |" in x)
    assert all(x.endswith("| **no** |") for x in lines if "| before |" in x)
    # with LoRA on one GPU: the bf16 base and 16 bytes per adapter parameter (fp32 weight, grad, Adam m and v), no
    # pi_0 or mu; Llama-3-8B's all-linear adapters at r = 16 are 41.9M parameters (r x (in + out) per projection)
    assert bench.LLAMA3_8B.lora_params(16) == 32 * 16 * (2 * 8192 + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    lora_lines = [x for x in out.stdout.splitlines() if "+ LoRA r=16, 1 GPU" in x]
    assert len(lora_lines) == 3 and all(x.endswith("| yes |") for x in lora_lines)
    two = bench.LORA_COMMANDS["refuel setting two + LoRA r=16, 1 GPU"]
    assert all(name != "pi_0" for name, _ in two.frozen_params) and two.n_ranks == 1
    P, rm = bench.LLAMA3_8B.params(), bench.LLAMA3_8B.params(lm_head=False)
    resident = 2 * P + 16 * bench.LLAMA3_8B.lora_params(16) + 2 * rm  # base, adapters' states, the reward model
    assert bench.phases(two)["reward call"] - resident == bench.LLAMA3_8B.act_nograd(two.reward_rows * 3840)
    # the measuring path, on a CPU with the byte counter: the formulas predict what is measured
    rows = bench.measure("tiny", batch=2, prompt_tokens=48, new_tokens=8, device="cpu")
    assert [r[0] for r in rows] == ["sampling", "old log-probs", "training micro-batch", "reward call"]
    for name, got, want in rows:
        assert 0 < got and want / 3 < got < 3 * want + 2 ** 20, (name, got, want)
