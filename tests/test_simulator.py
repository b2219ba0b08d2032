import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from plumbing import distributed
from plumbing import fast_decode
import simulator as sim
from envs import chat_datasets
from envs import chat_env
from envs import tutor_task
from conftest import ROOT, subprocess_env

from templates import LLAMA3_TEMPLATE
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# A template that only shows the last three messages: not prefix-consistent.
WINDOW_TEMPLATE = ("{% for m in messages[-3:] %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                   "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer(template, specials, name):
    """A word-level tokenizer over the tutor's words plus a real-model-style set of special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tutor_task.build_tutor_tokenizer()
    words = [w for w in base.get_vocab() if not w.startswith("<")] + ["user", "assistant", "system"]
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", *specials, *sorted(set(words))])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  additional_special_tokens=specials, clean_up_tokenization_spaces=False)
    tok.chat_template = template
    tok.name_or_path = name
    return tok


def llama3_tokenizer():
    tok = word_tokenizer(LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>"], "tiny-llama3-template")
    tok.bos_token = "<|begin_of_text|>"
    return tok


def chatml_tokenizer(template=CHATML_TEMPLATE, name="tiny-chatml"):
    return word_tokenizer(template, ["<|im_start|>", "<|im_end|>"], name)


def tiny_llama(tok, seed=0, **shape):
    """A random-init Llama for `tok`; `shape` overrides the tiny defaults (e.g. a head dimension vLLM serves)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    # bos/eos from the tokenizer: LlamaConfig's defaults (1, 2) would make id 2 a stop token of the sampler
    sizes = {**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=512), **shape}
    cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, **sizes)
    return LlamaForCausalLM(cfg).eval()


def save_tiny_reward_model(tok, path, hidden_size=32, num_attention_heads=4):
    """A random-init one-layer sequence-classification reward model over tok's vocabulary, with tok, at path."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=hidden_size,
                                                    intermediate_size=2 * hidden_size, num_hidden_layers=1,
                                                    num_attention_heads=num_attention_heads, num_labels=1,
                                                    pad_token_id=tok.pad_token_id))
    rm.save_pretrained(path)
    tok.save_pretrained(path)


def save_tiny_policy_and_reward_model(path):
    """A tiny Llama-3-template policy at path/policy and a sequence-classification reward model at path/rm."""
    tok = llama3_tokenizer()
    tiny_llama(tok).save_pretrained(path / "policy")
    tok.save_pretrained(path / "policy")
    save_tiny_reward_model(tok, path / "rm")
    return tok


def dialogue(n_turns=3):
    env = tutor_task.TutorEnv()
    return env.reference_dialogues(1, np.random.default_rng(3), n_turns)[0]


# ---------------------------------------------------------------- chat templates and turn masks
@pytest.mark.parametrize("make", [tutor_task.build_tutor_tokenizer, llama3_tokenizer, chatml_tokenizer])
def test_turn_masks_match_whole_conversation(make):
    tok = make()
    conv = dialogue(3)
    eot = sim.end_of_turn_id(tok)
    full = sim.render_ids(tok, conv, add_generation_prompt=False)
    ids, attn, mask = sim.turn_batch(tok, [conv] * 3, [1, 2, 3], tok.pad_token_id)
    for h in (1, 2, 3):
        prompt, turn = sim.split_turn(tok, conv, h)
        content = conv[sim.assistant_turn_index(conv, h)]["content"]
        assert full[: len(prompt) + len(turn)] == prompt + turn  # consistent with whole-conversation tokens
        assert turn[-1] == eot and eot not in turn[:-1]  # content + end-of-turn, nothing after it
        assert tok.decode(turn[:-1], skip_special_tokens=True).strip() == content  # role header excluded
        row = ids[h - 1][attn[h - 1].bool()].tolist()
        assert row == prompt + turn
        assert ids[h - 1][mask[h - 1]].tolist() == turn


def test_a_template_that_is_not_prefix_consistent_still_cuts_every_turn():
    """WINDOW_TEMPLATE shows only the last three messages, so re-rendering a prefix gives other tokens than the
    whole conversation; built message by message, every turn is still its content + end-of-turn, and the prefix a
    turn is scored under is the prompt the sampler sees."""
    tok = chatml_tokenizer(WINDOW_TEMPLATE, name="my-windowed-model")
    conv = dialogue(3)
    eot = sim.end_of_turn_id(tok)
    whole = sim.conversation_ids(tok, conv)
    for h in (1, 2, 3):
        prompt, turn = sim.split_turn(tok, conv, h)
        i = sim.assistant_turn_index(conv, h)
        assert prompt == sim.conversation_ids(tok, conv[:i], add_generation_prompt=True).ids
        assert whole.ids[: len(prompt) + len(turn)] == prompt + turn
        assert turn[-1] == eot and tok.decode(turn[:-1]).strip() == conv[i]["content"]


def test_template_errors_name_the_model():
    no_close = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = chatml_tokenizer(no_close, name="my-unclosed-model")
    tok.eos_token = "<|im_end|>"
    with pytest.raises(sim.ChatTemplateError, match="my-unclosed-model.*end-of-turn"):
        sim.split_turn(tok, dialogue(3), 2)
    tok = chatml_tokenizer(name="no-template-model")
    tok.chat_template = None
    with pytest.raises(sim.ChatTemplateError, match="no-template-model has no chat template"):
        sim.render_ids(tok, dialogue(1), True)


def test_roles_must_alternate():
    with pytest.raises(ValueError, match="alternate"):
        chat_datasets.validate_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(ValueError, match="non-empty"):
        chat_datasets.validate_conversation([])
    chat_datasets.validate_conversation([{"role": "system", "content": "s"}, {"role": "user", "content": "a"},
                               {"role": "assistant", "content": "b"}])


# ---------------------------------------------------------------- batched sampling
@pytest.mark.parametrize("make", [tutor_task.build_tutor_tokenizer, llama3_tokenizer])
def test_sampled_logprobs_equal_a_separate_forward_pass(make):
    tok = make()
    model = tiny_llama(tok)
    convs = [dialogue(0)[:1], dialogue(2)[:3], dialogue(3)[:5]]  # different lengths: left padding in play
    torch.manual_seed(0)
    out = sim.sample_turns(model, tok, convs * 4, max_new_tokens=6, temperature=0.7)
    assert len(out.texts) == 12
    for ids, lps, conv in zip(out.token_ids, out.logprobs, convs * 4):
        prompt = sim.render_ids(tok, conv, add_generation_prompt=True)
        x = torch.tensor([prompt + ids])
        ref = sim.token_logprobs(model, x, torch.ones_like(x), temperature=0.7)[0, len(prompt) - 1:]
        torch.testing.assert_close(lps, ref, atol=1e-4, rtol=0)
    # a random model rarely emits the end-of-turn token in 6 tokens: the budget flag says so
    eot = sim.end_of_turn_id(tok)
    assert out.hit_budget.tolist() == [eot not in ids for ids in out.token_ids]
    assert all(len(ids) == 6 for ids, hit in zip(out.token_ids, out.hit_budget) if hit)


@pytest.mark.parametrize("make", [tutor_task.build_tutor_tokenizer, llama3_tokenizer])
def test_fast_path_static_cache_and_compiled_step_sample_the_same_tokens(make):
    """The sampler's fast path (static KV cache, compiled decode step, batch padded up to 16, 24, 32, ...) against the
    plain dynamic-cache loop: with the same seed, the same tokens and the same log-probs, greedy and sampled."""
    tok = make()
    if make is tutor_task.build_tutor_tokenizer:
        model, tok = tutor_task.load_tutor_base_policy()
    else:
        model = tiny_llama(tok)
    convs = [dialogue(h)[:2 * h + 1] for h in (0, 1, 2)] * 7  # 21 prompts of three lengths: padded to 32 rows
    assert not fast_decode.use_fast_path(model, None)  # on CPU the default stays the plain loop
    for T in (0.0, 1.0):
        runs = []
        for kw in (dict(fast=False), dict(fast=True, compile_step=False), dict(fast=True, compile_step=True)):
            torch.manual_seed(0)
            runs.append(sim.sample_turns(model, tok, convs, 8, T, **kw))
        for other in runs[1:]:
            assert other.token_ids == runs[0].token_ids and other.texts == runs[0].texts
            assert torch.equal(other.hit_budget, runs[0].hit_budget)
            assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(other.logprobs, runs[0].logprobs))
    # a kept static cache is zeroed and reused by the next call of the same shape, then freed
    fast = dict(fast=True, compile_step=False, keep_cache=True)
    torch.manual_seed(0)
    first = sim.sample_turns(model, tok, convs, 8, 1.0, **fast)
    kept = fast_decode._STATIC_CACHES[model][1]
    torch.manual_seed(0)
    again = sim.sample_turns(model, tok, convs, 8, 1.0, **fast)
    assert fast_decode._STATIC_CACHES[model][1] is kept and again.token_ids == first.token_ids == runs[0].token_ids
    fast_decode.free_static_caches()
    assert not fast_decode._STATIC_CACHES


def test_fast_path_compiles_a_bounded_number_of_times_over_many_prompt_lengths(monkeypatch):
    """Prompts of 25 lengths (12 to about 900 tokens) and batches of 1 to 20 rows: the compiled decode step sees
    bucketed shapes only (cache lengths and batch sizes on `ladder`), so it compiles once per bucket, far fewer
    times than there are shapes, never past the recompile limit (the fast path asked for by name would raise)."""
    tok = llama3_tokenizer()
    model = tiny_llama(tok)
    compiles, real_compile = [], torch.compile

    def counting_compile(fn, **kw):  # the same dynamo tracing, a backend that counts graphs and runs them eagerly
        def backend(gm, example_inputs):
            compiles.append(tuple(x.shape for x in example_inputs if isinstance(x, torch.Tensor))[:1])
            return gm.forward
        return real_compile(fn, backend=backend, fullgraph=kw["fullgraph"], dynamic=kw["dynamic"])
    monkeypatch.setattr(torch, "compile", counting_compile)
    words = dialogue(1)[0]["content"].split()
    shapes = set()
    for i in range(25):
        n = 4 + 37 * i
        conv = [{"role": "user", "content": " ".join(words[j % len(words)] for j in range(n))}]
        B = 1 + (7 * i) % 20
        sim.sample_turns(model, tok, [conv] * B, 3, 1.0, fast=True, compile_step=True)
        L = len(sim.render_ids(tok, conv, add_generation_prompt=True))
        shapes.add((fast_decode.ladder(B, 16), fast_decode.ladder(L + 3, 64)))
    assert len(compiles) == len(shapes) <= 16  # 2 batch buckets x 8 length buckets at most, over 25 x 20 shapes
    assert torch._dynamo.config.recompile_limit >= fast_decode.STEP_RECOMPILE_LIMIT
    assert [fast_decode.ladder(n, 64) for n in (1, 64, 65, 96, 97, 129, 200, 3072, 3073)] == \
        [64, 64, 96, 96, 128, 192, 256, 3072, 4096]


def test_default_fast_path_falls_back_to_the_plain_loop_when_it_fails(monkeypatch):
    """On a GPU the fast path is the default; a model it cannot handle gets a warning and the plain loop, with the
    random state rewound so the samples are the plain loop's own."""
    model, tok = tutor_task.load_tutor_base_policy()
    convs = [dialogue(1)[:3]] * 5
    torch.manual_seed(0)
    plain = sim.sample_turns(model, tok, convs, 8, 1.0, fast=False)

    def broken(*a, **k):
        raise RuntimeError("static cache not supported")
    monkeypatch.setattr(fast_decode, "use_fast_path", lambda model, fast: True)  # as on CUDA
    monkeypatch.setattr(fast_decode, "static_cache", broken)
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="fast path failed.*static cache not supported"):
        out = sim.sample_turns(model, tok, convs, 8, 1.0)
    assert out.token_ids == plain.token_ids and model in fast_decode._FAST_PATH_FAILED
    with pytest.raises(RuntimeError, match="static cache not supported"):  # asked for by name, it is still tried
        sim.sample_turns(model, tok, convs, 8, 1.0, fast=True)
    fast_decode._FAST_PATH_FAILED.discard(model)


def test_sampler_chunks_and_stops_at_end_of_turn(base_policy):
    model, tok = base_policy
    convs = [dialogue(2)[:3]] * 10
    torch.manual_seed(0)
    out = sim.sample_turns(model, tok, convs, max_new_tokens=12, max_batch_size=3)
    eot = sim.end_of_turn_id(tok)
    assert len(out.texts) == 10 and not out.hit_budget.any()
    assert all(ids[-1] == eot and eot not in ids[:-1] for ids in out.token_ids)
    assert all(tutor_task.parse_teacher(t)[0] in ("ask", "teach") for t in out.texts)


# ---------------------------------------------------------------- the student follows the rules
def replies(conv, style, patience, n=20000, seed=0):
    rules, rng = tutor_task.TutorRules(), np.random.default_rng(seed)
    u = rng.random((n, 3))
    out = [tutor_task.student_reply(conv, style, patience, rules, u[i]) for i in range(n)]
    return {r: out.count(r) / n for r in set(out)}


def conv_with(*teacher_turns):
    conv = [{"role": "user", "content": tutor_task.GREETING.format("planets")}]
    for t in teacher_turns:
        conv += [{"role": "assistant", "content": t}, {"role": "user", "content": tutor_task.NEUTRAL}]
    return conv[:-1]


def teach(style):
    return tutor_task.TEACH.format(tutor_task.STYLES[style])


def test_student_answer_frequencies():
    tol = 0.015
    f = replies(conv_with(tutor_task.ASK), style=2, patience=1)
    assert abs(f[tutor_task.NAMED.format("songs")] - 0.7) < tol and abs(f[tutor_task.NOT_SURE] - 0.3) < tol
    f = replies(conv_with(teach(2)), style=2, patience=1)
    assert abs(f[tutor_task.LEARNED] - 0.9) < tol and abs(f[tutor_task.NEUTRAL] - 0.1) < tol
    f = replies(conv_with(teach(0)), style=2, patience=1)
    assert abs(f[tutor_task.LEARNED] - 0.1) < tol and abs(f[tutor_task.BORED] - 0.63) < tol and abs(f[tutor_task.NEUTRAL] - 0.27) < tol


def test_student_patience_rules():
    # patience 1: the first mismatch still gets a normal reply, everything after it gets "asleep"
    assert tutor_task.ASLEEP not in replies(conv_with(teach(0)), 2, 1, n=200)
    assert replies(conv_with(teach(0), teach(2)), 2, 1, n=200) == {tutor_task.ASLEEP: 1.0}
    assert replies(conv_with(teach(0), tutor_task.ASK), 2, 1, n=200) == {tutor_task.ASLEEP: 1.0}
    # patience 2 tolerates two mismatches; asking and unparseable turns use none
    assert tutor_task.ASLEEP not in replies(conv_with(teach(0), tutor_task.ASK, "blah blah", teach(1)), 2, 2, n=200)
    assert replies(conv_with(teach(0), teach(1), teach(2)), 2, 2, n=200) == {tutor_task.ASLEEP: 1.0}
    assert replies(conv_with("let us learn with dragons ."), 2, 2, n=200) == {tutor_task.CONFUSED: 1.0}


def test_reward_is_read_off_the_conversation():
    conv = conv_with(teach(1), teach(1), tutor_task.ASK)
    conv[2]["content"], conv[4]["content"] = tutor_task.LEARNED, tutor_task.BORED
    conv.append({"role": "user", "content": tutor_task.LEARNED})  # the learned-looking reply to an ask still counts as text
    env = tutor_task.TutorEnv()
    assert tutor_task.lessons_learned(conv) == [1, 0, 1]
    assert env.reward([conv]).item() == pytest.approx(2 / 4)
    p = env.preference([conv], [conv_with(teach(1))])
    assert p.item() == pytest.approx(torch.sigmoid(torch.tensor(4 * 0.5)).item())


# ---------------------------------------------------------------- exact values
def test_exact_values():
    v1 = tutor_task.TutorRules()
    assert tutor_task.tutor_value(v1, "optimal") == pytest.approx(0.8050, abs=5e-5)
    assert tutor_task.tutor_value(v1, "reference") == pytest.approx(0.2800, abs=5e-5)
    assert tutor_task.tutor_value(v1, "last_turn") == pytest.approx(0.2969, abs=5e-5)
    assert tutor_task.tutor_value(v1, "never_ask") == pytest.approx(0.3914, abs=5e-5)
    original = tutor_task.TutorRules(ref_follow_answer=False)
    assert tutor_task.tutor_value(original, "reference") == pytest.approx(0.2290, abs=5e-5)
    assert tutor_task.tutor_value(original, "last_turn") == pytest.approx(0.2412, abs=5e-5)


def test_sampled_reference_matches_exact_value():
    env = tutor_task.TutorEnv()
    r = env.reward(env.reference_dialogues(20000, np.random.default_rng(0)))
    se = r.std().item() / np.sqrt(len(r))
    assert abs(r.mean().item() - tutor_task.tutor_value(env.rules, "reference")) < 3 * se


def test_base_policy_value_matches_reference(base_policy):
    model, tok = base_policy
    env = tutor_task.TutorEnv()
    torch.manual_seed(0)
    out = sim.evaluate_policy(model, tok, env, 3000, seed=123, max_new_tokens=12)
    exact = tutor_task.tutor_value(env.rules, "reference")
    assert abs(out["eval/mean_reward"] - exact) < 3 * out["eval/reward_stderr"] + 0.01


# ---------------------------------------------------------------- the papers' setting: parsing and bad input
def test_user_question_parsing_and_counted_fallback():
    assert chat_env.parse_user_question("Justification: curious.\nQuestion: Why is the sky blue?") == \
        ("Why is the sky blue?", True)
    assert chat_env.parse_user_question("justification: x\nquestion:  how?  ") == ("how?", True)
    assert chat_env.parse_user_question("Justification: hmm\nI want more detail.") == ("I want more detail.", False)
    # anchored lines, the first complete question, labels stripped (what small and large models write)
    assert chat_env.parse_user_question("Question: In what way does plants make food?\nJustification: The answer to this "
                                   "question is: light.") == ("In what way does plants make food?", True)
    assert chat_env.parse_user_question("Question:\nWhat is X?") == ("What is X?", True)
    assert chat_env.parse_user_question("**Question:** How do I cook rice?") == ("How do I cook rice?", True)
    assert chat_env.parse_user_question("Justification: it is curious.") == ("it is curious.", False)
    assert chat_env.parse_user_question("Question:\nJustification: blah") == ("blah", False)
    assert chat_env.parse_user_question("The question to ask next is: What is the capital of France?\nJustification: "
                                   "The answer is: Paris") == ("What is the capital of France?", False)
    tok = chatml_tokenizer()
    user = chat_env.PromptedUser(tiny_llama(tok), tok, max_new_tokens=5)
    torch.manual_seed(0)
    out = user([dialogue(1)] * 4, [None] * 4, np.random.default_rng(0))
    assert len(out) == 4 and user.n_calls == 4
    assert user.n_fallbacks == 4  # this vocabulary has no "Question:", so every reply falls back and is counted
    env = chat_env.ChatEnv([{"messages": dialogue(0), "user": None}], reward_model=None, user=user)
    env.user_turn([dialogue(1)] * 3, [None] * 3, np.random.default_rng(1))
    with sim.evaluating(env):  # evaluation's replies are tallied apart from training's
        env.user_turn([dialogue(1)] * 2, [None] * 2, np.random.default_rng(2))
    assert env.counts()["user_replies/train"] == 3 and env.counts()["user_replies/eval"] == 2
    charts = env.charts(env.counts())
    assert charts["charts/user_parse_fallback_rate"] == charts["charts/user_parse_fallback_rate_eval"] == 1.0


def test_prompt_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        chat_datasets.load_prompts(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no usable dialogues"):
        chat_datasets.load_prompts(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('[{"role": "user", "content": "hi"}]\n{not json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        chat_datasets.load_prompts(str(bad))
    roles = tmp_path / "roles.jsonl"
    roles.write_text(json.dumps([{"role": "assistant", "content": "hi"}]) + "\n")
    with pytest.raises(ValueError, match="roles.jsonl:1: .*roles must alternate"):
        chat_datasets.load_prompts(str(roles), bad_records="error")
    with pytest.raises(ValueError, match="holds no usable dialogues .skipped: {'malformed': 1}"):
        chat_datasets.load_prompts(str(roles))
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "questions": ["and then?"]}) + "\n")
    recs = chat_datasets.load_prompts(str(good))
    env = chat_env.ChatEnv(recs, reward_model=None)
    conv = recs[0]["messages"] + [{"role": "assistant", "content": "hello"}]
    assert env.user_turn([conv], [recs[0]["user"]], None) == ["and then?"]


def test_offline_dataset_file(tmp_path):
    u, a, b = ({"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "assistant", "content": "go away"})
    path = tmp_path / "off.jsonl"
    path.write_text(json.dumps({"chosen": [u, a], "rejected": [u, b]}) + "\n" + json.dumps([u, a, u, a]) + "\n")
    rows = chat_datasets.load_offline(str(path))
    assert rows[0]["messages"] == [u, a] and rows[0]["alternative"] == "go away" and rows[1]["alternative"] is None
    env = chat_env.ChatEnv([{"messages": [u], "user": None}], reward_model=None, offline_records=rows)
    ctx, convs = env.offline(8, np.random.default_rng(0))
    assert all(c == rows[x.index]["messages"] for x, c in zip(ctx, convs))
    assert all(x.messages == [u] for x in ctx)  # the context is the dialogue up to its first user turn
    assert [x.user["questions"] for x in ctx if x.index == 1][:1] == [["hi"]]  # later user turns, pre-sampled
    ctx0 = [x for x in ctx if x.index == 0][:1]
    assert env.offline_alternative(ctx0, [[u]], None) == ["go away"]
    with pytest.raises(ValueError, match="no alternative reply"):
        env.offline_alternative([x for x in ctx if x.index == 1][:1], [[u, a, u]], None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": [u, a], "rejected": [u, a, u, b]}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl:1: 'chosen' and 'rejected' must differ only in the last"):
        chat_datasets.load_offline(str(bad), bad_records="error")
    ends_with_user = tmp_path / "user.jsonl"
    ends_with_user.write_text(json.dumps([u]) + "\n" + json.dumps([u, a, u]) + "\n")
    assert chat_datasets.load_offline(str(ends_with_user)) == [{"messages": [u, a], "user": {}, "alternative": None}]
    ends_with_user.write_text(json.dumps([u]) + "\n")
    with pytest.raises(ValueError, match="holds no dialogue with an assistant turn"):
        chat_datasets.load_offline(str(ends_with_user))
    with pytest.raises(ValueError, match="--offline_path"):
        chat_env.ChatEnv([{"messages": [u], "user": None}], reward_model=None).offline(1, np.random.default_rng(0))


def test_reward_model_scores_chat_templated_conversations_and_rejects_nan():
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = llama3_tokenizer()
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                                                    pad_token_id=tok.pad_token_id)).eval()
    scorer = chat_env.HFRewardModel(rm, tok, max_length=20)
    convs = [dialogue(1), dialogue(3)]
    s = scorer(convs)
    assert s.shape == (2,) and torch.isfinite(s).all()
    assert scorer.n_truncated == 2  # both conversations exceed 20 tokens
    with torch.no_grad():
        rm.score.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError, match="non-finite"):
        scorer(convs)


def test_cli_help():
    out = subprocess.run([sys.executable, "-m", "envs.tutor_task", "--help"], cwd=ROOT, capture_output=True, text=True,
                         env=subprocess_env(), timeout=120)
    assert out.returncode == 0 and "--base-policy-path" in out.stdout


# ---------------------------------------------------------------- turns cut by the token budget, other stop tokens
@pytest.mark.parametrize("make", [tutor_task.build_tutor_tokenizer, llama3_tokenizer, chatml_tokenizer])
def test_chat_templates_ignore_the_truncated_key(make):
    tok = make()
    conv = dialogue(2)
    marked = [dict(m, truncated=True) if m["role"] == "assistant" else m for m in conv]
    for gen in (False, True):
        assert sim.render_ids(tok, marked, gen) == sim.render_ids(tok, conv, gen)
    eot = sim.end_of_turn_id(tok)
    for h in (1, 2):
        prompt, turn = sim.split_turn(tok, conv, h)
        prompt_t, turn_t = sim.split_turn(tok, marked, h)
        assert prompt_t == prompt and turn_t == turn[:-1] and turn[-1] == eot  # the end-of-turn is not scored


def test_a_turn_that_hit_the_budget_is_scored_without_the_end_of_turn_it_never_sampled(base_policy):
    """Greedy turns cut at 3 tokens: each is marked truncated, and its log-prob through turn_logprob (what old and
    new log-probs both use) is the sampler's own sum over the 3 sampled tokens, without the template's <eot>."""
    model, tok = base_policy
    env = tutor_task.TutorEnv()
    rng = np.random.default_rng(0)
    ctx = env.contexts(6, "train", rng)
    for budget, truncated in ((3, True), (12, False)):
        convs, info = sim.continue_dialogues(model, tok, env, [c.messages for c in ctx], [c.user for c in ctx],
                                             [2] * 6, rng, max_new_tokens=budget, temperature=0.0)
        turns = [(i, h) for i in range(6) for h in (1, 2)]
        for i, h in turns:
            msg = convs[i][sim.assistant_turn_index(convs[i], h)]
            assert info[i][h][1] == truncated and bool(msg.get("truncated")) == truncated
        lp = sim.turn_logprob(model, tok, [convs[i] for i, _ in turns], [h for _, h in turns], temperature=1.0)
        sampled = torch.tensor([info[i][h][0] for i, h in turns])
        torch.testing.assert_close(lp, sampled, atol=1e-4, rtol=0)
        ids, attn, mask = sim.turn_batch(tok, [convs[i] for i, _ in turns], [h for _, h in turns], tok.pad_token_id)
        assert (mask.sum(1) == (3 if truncated else mask.sum(1))).all()
        assert (sim.end_of_turn_id(tok) in ids[mask].tolist()) != truncated


def llama3_with_end_of_text():
    """Llama-3's specials with <|end_of_text|> as the tokenizer's EOS: a stop token besides <|eot_id|>."""
    tok = word_tokenizer(LLAMA3_TEMPLATE, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                           "<|eot_id|>", "<|end_of_text|>"], "tiny-llama3-end-of-text")
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
    return tok


def biased_to(model, token_id, bias=30.0):
    """The model with an LM head that all but always samples token_id."""
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[token_id] = bias
    model.lm_head = head
    return model


@pytest.mark.parametrize("source", ["tokenizer", "generation_config"])
@pytest.mark.parametrize("fast", [False, True])
def test_sampling_stops_at_the_models_other_stop_tokens(source, fast):
    tok = llama3_with_end_of_text()
    end_of_text, eot = tok.convert_tokens_to_ids("<|end_of_text|>"), sim.end_of_turn_id(tok)
    assert eot == tok.convert_tokens_to_ids("<|eot_id|>") != end_of_text
    model = biased_to(tiny_llama(tok), end_of_text)
    if source == "generation_config":  # Llama-3-Instruct: generation_config.json lists several EOS ids
        tok.eos_token = None
        model.generation_config.eos_token_id = [end_of_text, eot]
    convs = [dialogue(0)[:1], dialogue(2)[:5]]
    torch.manual_seed(0)
    out = sim.sample_turns(model, tok, convs, max_new_tokens=6, fast=fast, compile_step=False)
    assert out.token_ids == [[end_of_text]] * 2 and not out.hit_budget.any() and out.texts == ["", ""]
    assert sim.stop_token_ids(tok, model) == [eot, end_of_text]
    # in a dialogue the turn ended (not truncated), and it is scored on the stop token it sampled, <|end_of_text|>:
    # the log-prob a loss reads is the sampler's own
    env = chat_env.ChatEnv([{"messages": convs[0], "user": {"questions": ["why ?"]}}], reward_model=None)
    torch.manual_seed(0)
    done, info = sim.continue_dialogues(model, tok, env, convs[:1], [{"questions": ["why ?"]}], [1],
                                        np.random.default_rng(0), max_new_tokens=6)
    assert "truncated" not in done[0][-1] and info[0][1][1] is False
    assert sim.split_turn(tok, done[0], 1)[1] == [end_of_text] == done[0][-1]["token_ids"]
    torch.testing.assert_close(sim.turn_logprob(model, tok, done, [1]), torch.tensor([info[0][1][0]]), atol=1e-4,
                               rtol=0)


def test_the_sampling_copy_keeps_the_models_stop_tokens():
    """FSDP2's sampling copy is built from the config: it takes the model's generation_config (its EOS ids)."""
    tok = llama3_with_end_of_text()
    tok.eos_token = None
    model = tiny_llama(tok)
    eot, end_of_text = sim.end_of_turn_id(tok), tok.convert_tokens_to_ids("<|end_of_text|>")
    model.generation_config.eos_token_id = [end_of_text, eot]
    copy = distributed.sampling_copy(model)
    assert sim.stop_token_ids(tok, copy) == sim.stop_token_ids(tok, model) == [eot, end_of_text]
    distributed._SAMPLING_COPIES.pop(model, None)


def test_finish_turns_cuts_each_row_at_its_first_stop_token():
    """The stopping rule any decode loop can share (sample_turns uses it; mtpo's mixture sampler and the vLLM
    engine mirror it): cut after the first stop id, even when the padding after it is a stop id too."""
    tok = llama3_with_end_of_text()
    eot, end_of_text = sim.end_of_turn_id(tok), tok.convert_tokens_to_ids("<|end_of_text|>")
    songs, best = tok.convert_tokens_to_ids("songs"), tok.convert_tokens_to_ids("best")
    toks = torch.tensor([[songs, eot, eot, eot], [songs, best, end_of_text, eot], [songs, best, songs, best]])
    lps = -torch.arange(12, dtype=torch.float32).view(3, 4)
    out = sim.finish_turns(tok, toks, lps, [eot, end_of_text])
    assert out.token_ids == [[songs, eot], [songs, best, end_of_text], [songs, best, songs, best]]
    assert out.texts == ["songs", "songs best", "songs best songs best"]
    assert out.hit_budget.tolist() == [False, False, True]
    assert [x.tolist() for x in out.logprobs] == [[0.0, -1.0], [-4.0, -5.0, -6.0], [-8.0, -9.0, -10.0, -11.0]]


# ---------------------------------------------------------------- reward models: left truncation, padding
def tiny_reward_model(tok, pad_token_id, seed=0):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                                      num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                                                      pad_token_id=pad_token_id)).eval()


@torch.no_grad()
def score_at_last_token(rm, ids):
    """The reward model's head at the last token of one unpadded row, computed by hand."""
    hidden = rm.model(input_ids=torch.tensor([ids])).last_hidden_state
    return rm.score(hidden[0, -1]).item()


def test_reward_model_truncates_from_the_left_and_keeps_the_last_turn():
    tok = llama3_tokenizer()
    rm = tiny_reward_model(tok, tok.pad_token_id)
    conv = dialogue(3)
    other = [dict(m) for m in conv]
    other[-1]["content"] = "i do not understand you ."  # the same dialogue but its last teacher turn
    full = sim.render_ids(tok, conv, add_generation_prompt=False)
    scorer = chat_env.HFRewardModel(rm, tok, max_length=16)
    a, b = scorer([conv, other])
    assert scorer.n_truncated == 2 and a != b  # the end is kept: the pair's difference is scored
    kept = full[:1] + full[-15:]  # <|begin_of_text|> kept in front of the last 15 tokens
    assert kept[0] == tok.bos_token_id and kept[-1] == sim.end_of_turn_id(tok)
    assert a.item() == pytest.approx(score_at_last_token(rm, kept), abs=1e-5)
    chatml = chatml_tokenizer()  # no BOS in the template: simply the last max_length tokens
    rm2 = tiny_reward_model(chatml, chatml.pad_token_id)
    tail = sim.render_ids(chatml, conv, add_generation_prompt=False)[-16:]
    assert chat_env.HFRewardModel(rm2, chatml, max_length=16)([conv]).item() == \
        pytest.approx(score_at_last_token(rm2, tail), abs=1e-5)


@pytest.mark.parametrize("pad", ["synced", "missing_in_config", "unsynced", "end_of_turn"])
def test_a_rows_reward_does_not_depend_on_its_place_in_a_padded_batch(pad):
    """Alone, or padded beside longer and shorter rows, at any position: the same score, read at the row's last
    real token, whatever the reward model's pad id (missing, different from the tokenizer's, equal to <|eot_id|>
    as in Llama-3 reward models, which ends every turn)."""
    tok = llama3_tokenizer()
    eot = sim.end_of_turn_id(tok)
    config_pad = {"synced": tok.pad_token_id, "missing_in_config": None, "unsynced": tok.unk_token_id,
                  "end_of_turn": eot}[pad]
    if pad == "end_of_turn":
        tok.pad_token = "<|eot_id|>"
    rm = tiny_reward_model(tok, config_pad)
    convs = [dialogue(1), dialogue(3), dialogue(2)[:3] + [{"role": "assistant", "content": "ok"}], dialogue(2)]
    scorer = chat_env.HFRewardModel(rm, tok, max_length=4096)
    batched = scorer(convs)
    alone = torch.cat([scorer([c]) for c in convs])
    by_hand = torch.tensor([score_at_last_token(rm, sim.render_ids(tok, c, False)) for c in convs])
    torch.testing.assert_close(batched, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(batched, by_hand, atol=1e-5, rtol=0)
    torch.testing.assert_close(scorer(convs[::-1]), batched.flip(0), atol=1e-5, rtol=0)
    # the model's pad id is synced (set from the tokenizer when missing); a substitute is set for one forward only
    assert rm.config.pad_token_id == scorer.pad_id == (tok.pad_token_id if config_pad is None else config_pad)


def test_the_tutors_offline_dialogues_carry_their_own_length():
    """D_off on the tutor: dialogues of H ~ U{1..H_max} turns, each ending with the student's reply to y_H, whose
    contexts say H (so LT-OFFLINE / LT-MIXED train each dialogue's own last turn, as on the chat path)."""
    env = tutor_task.TutorEnv(offline_size=2000)
    ctx, convs = env.offline_pool()
    lengths = [sim.assistant_turns(c) for c in convs]
    assert [c.max_turns for c in ctx] == lengths
    assert all(c[-1]["role"] == "user" and len(c) == 1 + 2 * H for c, H in zip(convs, lengths))
    assert set(lengths) == {1, 2, 3, 4, 5} and all(abs(lengths.count(k) / 2000 - 0.2) < 0.04 for k in range(1, 6))
