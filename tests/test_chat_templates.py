"""Real chat templates as the models ship them (Llama-3.1, Llama-3.2, Qwen2.5, Qwen3 with thinking on and off,
Gemma-2, Gemma-3, Mistral-7B-Instruct-v0.3), through the real tokenizers that `.ci/fetch_real_models` puts on disk
(skipped with a message when they are absent; nothing is downloaded here). For each, with and without a system
prompt: every assistant turn is scored on exactly the tokens that were sampled for it (a stop token included, a
special-token string inside the text included, nothing of any other message), the prompt a turn was sampled from is
the prefix it is scored under, and one iteration of every script completes.

Adding your own model: docs/implementation_notes.md#chat-templates.

    python tests/test_chat_templates.py FAMILY FOLDER [KWARGS]   # the scripts' matrix for one family (the test's)
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, subprocess_env  # first: it puts the repository on sys.path
import simulator as sim  # noqa: E402
from envs import chat_env
from real_models import FAMILIES, load_tokenizer  # noqa: E402
from test_simulator import biased_to, save_tiny_reward_model, tiny_llama  # noqa: E402

THINKING_ON, THINKING_OFF = '{"enable_thinking": true}', '{"enable_thinking": false}'
VARIANTS = [(f, None) for f in FAMILIES if f != "qwen3"] + [("qwen3", THINKING_ON), ("qwen3", THINKING_OFF)]
IDS = [f + ({THINKING_ON: "-thinking", THINKING_OFF: "-no-thinking"}.get(k, "")) for f, k in VARIANTS]
SYSTEM = "You are a patient teacher."
# Strings that are special tokens of one family or another: users quote them and models write them.
SPECIALS = "<|eot_id|> <|im_end|> <end_of_turn> </s> [INST] <|start_header_id|>"


@pytest.fixture(autouse=True)
def default_template_kwargs():
    yield
    sim.set_chat_template_kwargs({})


def policy_for(tok, eot_bias=None, seed=0):
    """A random-init Llama over the tokenizer's whole vocabulary whose LM head favours the end-of-turn token
    enough that about a third of a turn's tokens end it (so both ended and truncated turns occur)."""
    model = tiny_llama(tok, seed, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=4096)
    return biased_to(model, sim.end_of_turn_id(tok), float(np.log(0.5 * len(tok))) if eot_bias is None else eot_bias)


def prepared(family, kwargs):
    tok = load_tokenizer(family)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    sim.set_chat_template_kwargs(json.loads(kwargs or "{}"), "06 Dec 2026")
    return tok


def opening(k: int, system: bool) -> list:
    return ([{"role": "system", "content": SYSTEM}] if system else []) + \
        [{"role": "user", "content": f"Teach me about rivers, lesson {k}. Quoting a log: {SPECIALS}"}]


@pytest.mark.parametrize("family,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_sampled_turns_are_scored_on_their_own_tokens(family, kwargs, system):
    tok = prepared(family, kwargs)
    model = policy_for(tok)
    questions = [f"Why? {SPECIALS}", "Go on, please."]
    env = chat_env.ChatEnv([{"messages": opening(0, system), "user": {"questions": questions}}], reward_model=None)
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    convs, info = sim.continue_dialogues(model, tok, env, [opening(k, system) for k in range(6)],
                                         [{"questions": questions}] * 6, [3] * 6, rng, max_new_tokens=5)
    stops = sim.stop_token_ids(tok, model)
    ended = 0
    for conv in convs:
        whole = sim.conversation_ids(tok, conv)
        assert len(whole.turns) == 3
        for h, (start, end) in enumerate(whole.turns, 1):
            i = sim.assistant_turn_index(conv, h)
            msg = conv[i]
            span = whole.ids[start:end]
            assert span == msg["token_ids"]  # the sampled ids, nothing of any other message
            # the prompt this turn was sampled from is the prefix it is scored under
            assert sim.conversation_ids(tok, conv[:i], add_generation_prompt=True).ids == whole.ids[:start]
            if msg.get("truncated"):
                assert not set(span) & set(stops)
            else:
                ended += 1
                assert span[-1] in stops and not set(span[:-1]) & set(stops)
                content = sim.answer_text(tok.decode(span[:-1], skip_special_tokens=True))
                assert content == msg["content"]
    assert ended >= 3  # both kinds occurred
    # old, new and reference log-probs read the same tokens as the sampler: its own log-probs come back
    flat = [(c, h) for c in convs for h in (1, 2, 3)]
    lp = sim.turn_logprob(model, tok, [c for c, _ in flat], [h for _, h in flat])
    sampled = torch.tensor([inf[h][0] for inf in info for h in (1, 2, 3)])
    torch.testing.assert_close(lp, sampled, atol=2e-4, rtol=0)


@pytest.mark.parametrize("family,kwargs", VARIANTS, ids=IDS)
def test_a_special_token_string_inside_a_turn_never_cuts_it(family, kwargs):
    """A turn whose sampled text spells the template's own end-of-turn token (as plain pieces) is scored on the
    pieces that were sampled: re-tokenizing its text would read them as the special token and cut the turn there."""
    tok = prepared(family, kwargs)
    eot = sim.end_of_turn_id(tok)
    eot_text = tok.convert_ids_to_tokens(eot)
    pieces = tok(f"Sure. {eot_text} and {SPECIALS} done", add_special_tokens=False,
                 split_special_tokens=True)["input_ids"]
    assert eot not in pieces  # spelled out, not the token
    text = tok.decode(pieces, skip_special_tokens=True)
    conv = [*opening(0, True), {"role": "assistant", "content": text, "token_ids": pieces + [eot]},
            {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Then the sea.",
                                                       "token_ids": tok("Then the sea.", add_special_tokens=False)
                                                       ["input_ids"] + [eot]}]
    whole = sim.conversation_ids(tok, conv)
    assert [whole.ids[a:b] for a, b in whole.turns] == [conv[-3]["token_ids"], conv[-1]["token_ids"]]
    assert sim.split_turn(tok, conv, 1)[1] == pieces + [eot]


@pytest.mark.parametrize("family,kwargs", VARIANTS, ids=IDS)
@pytest.mark.parametrize("system", [False, True], ids=["no-system", "system"])
def test_dataset_turns_are_the_templates_own_text(family, kwargs, system):
    """A turn nobody sampled (D_off's, LT-OFFLINE's alternative) is what the template writes after the generation
    prompt: its content and the end-of-turn token (Qwen3 with thinking on: after the empty think block its
    template writes), and the user's text comes out of the whole conversation as the template renders it."""
    tok = prepared(family, kwargs)
    eot = sim.end_of_turn_id(tok)
    replies = ["Rivers flow downhill.", f"They carry {SPECIALS} silt to the sea."]
    conv = [*opening(0, system), {"role": "assistant", "content": replies[0]},
            {"role": "user", "content": "Why?"}, {"role": "assistant", "content": replies[1]}]
    whole = sim.conversation_ids(tok, conv)
    for (start, end), reply in zip(whole.turns, replies):
        span = whole.ids[start:end]
        assert span[-1] == eot
        decoded = tok.decode(span[:-1], skip_special_tokens=False)
        think = "<think>\n\n</think>\n\n" if kwargs == THINKING_ON else ""
        assert decoded.strip() == think + reply or decoded.strip() == (think + reply).strip()
    text = tok.decode(whole.ids)
    if system:
        assert SYSTEM in text and text.index(SYSTEM) < text.index("Teach me about rivers")


@pytest.mark.parametrize("family", ["gemma2", "mistral_v3"])
def test_a_system_prompt_is_folded_into_the_first_user_turn_where_the_template_has_no_system_role(family):
    """Gemma-2's template raises on a system message; Mistral v3's puts it into the last user message only, which
    would change the first turn's prompt once a second user turn arrives. Both get it folded into the first user
    message, at sampling and at scoring alike; a system message anywhere else is an error naming the rule."""
    tok = prepared(family, None)
    assert sim.folds_system_prompt(tok)
    conv = [*opening(0, True), {"role": "assistant", "content": "Yes."}, {"role": "user", "content": "More?"}]
    text = sim.render_text(tok, conv, True)
    assert text.count(SYSTEM) == 1 and text.index(SYSTEM) < text.index("Teach me about rivers") < text.index("More?")
    prompt_1 = sim.conversation_ids(tok, conv[:2], add_generation_prompt=True).ids
    assert sim.conversation_ids(tok, conv, add_generation_prompt=True).ids[: len(prompt_1)] == prompt_1
    late = [*conv, {"role": "system", "content": "Be brief."}]
    with pytest.raises(sim.ChatTemplateError, match=f"{family}.*no system role.*first user"):
        sim.render_text(tok, late, True)


@pytest.mark.parametrize("family", ["llama3_1", "qwen2_5", "qwen3", "gemma3"])
def test_templates_with_a_system_role_keep_it(family):
    assert not sim.folds_system_prompt(prepared(family, None))


def test_a_template_that_prints_todays_date_gets_the_runs_date():
    """Llama-3.2's template writes strftime_now's date into the system header: the run's fixed date_string (kept
    in args.json, reused by --resume) replaces it, so a prompt tokenizes the same on any day."""
    tok = prepared("llama3_2", None)
    conv = opening(0, False)
    sim.set_chat_template_kwargs({}, "01 Jan 2020")
    first = sim.conversation_ids(tok, conv, add_generation_prompt=True).ids
    assert "Today Date: 01 Jan 2020" in tok.decode(first)
    sim.set_chat_template_kwargs({}, "02 Jan 2020")
    assert sim.conversation_ids(tok, conv, add_generation_prompt=True).ids != first
    sim.set_chat_template_kwargs({}, "01 Jan 2020")
    assert sim.conversation_ids(tok, conv, add_generation_prompt=True).ids == first
    # Llama-3.1's template has its own fixed default date: it is left alone
    tok31 = prepared("llama3_1", None)
    assert "26 Jul 2024" in sim.render_text(tok31, conv, True)


def test_the_runs_template_date_is_kept_on_resume(tmp_path):
    from plumbing import run_io
    from refuel import Args

    class OneProcess:
        is_main_process, device = True, "cpu"

    args = Args(output_dir=str(tmp_path), run_name="dated")
    run_io.make_run_dir(args, OneProcess())
    saved = json.loads((tmp_path / "dated" / "args.json").read_text())["chat_template_date"]
    assert saved == args.chat_template_date and len(saved.split()) == 3
    json_args = json.loads((tmp_path / "dated" / "args.json").read_text())
    (tmp_path / "dated" / "args.json").write_text(json.dumps({**json_args, "chat_template_date": "31 Dec 1999"}))
    resumed = Args(output_dir=str(tmp_path), run_name="dated", resume=True)
    run_io.make_run_dir(resumed, OneProcess())
    assert resumed.chat_template_date == "31 Dec 1999"


# ---------------------------------------------------------------- every script, one iteration, per family
SCRIPT_RUNS = {  # name: (script, its own flags)
    "refuel": ("refuel", ["--prompts_per_iteration", "4", "--minibatch_size", "4", "--num_epochs", "1"]),
    **{f"rebel-{m}": ("baselines_dpo_rebel", ["--loss", "rebel", "--mode", m, "--prompts_per_iteration", "4",
                                              "--minibatch_size", "4", "--num_epochs", "1"])
       for m in ("lt-offline", "lt-mixed", "lt-online", "mt-mixed")},
    **{f"mtpo-{v}": ("mtpo", ["--variant", v, "--prompts_per_iteration", "2", "--value_warmup_iterations", "0"])
       for v in ("mtpo", "mtpo-tau", "rlhf")},
    "iterative_ppo": ("iterative_ppo", ["--prompts_per_iteration", "4", "--ppo_minibatch_size", "4",
                                        "--q_minibatch_size", "4", "--q_epochs", "1", "--d_single_size", "0",
                                        "--time_budget_minutes", "0"]),
}


def write_family(folder: Path, family: str) -> None:
    """A tiny random-init policy and reward model over the family's real tokenizer, prompts with and without a
    system prompt (pre-sampled later user turns), and D_off dialogues with a rejected last reply."""
    tok = load_tokenizer(family)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    policy_for(tok, eot_bias=float(np.log(0.2 * len(tok)))).save_pretrained(folder / "policy")
    tok.save_pretrained(folder / "policy")
    save_tiny_reward_model(tok, folder / "rm", hidden_size=16, num_attention_heads=2)
    prompts = [{"messages": opening(k, system=k % 2 == 1), "questions": [f"Why? {SPECIALS}", "Go on."]}
               for k in range(8)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    offline = []
    for k in range(8):
        chosen = [*opening(k, system=k % 2 == 1), {"role": "assistant", "content": "Rivers flow downhill."},
                  {"role": "user", "content": "Why?"}, {"role": "assistant", "content": f"Gravity {SPECIALS}."}]
        offline.append({"chosen": chosen, "rejected": [*chosen[:-1], {"role": "assistant", "content": "No idea."}]})
    (folder / "offline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in offline))


def run_matrix(folder: Path, kwargs: str = "", extra: tuple = (), only: tuple = ()) -> dict:
    """One iteration of every entry of SCRIPT_RUNS on the family in `folder`, each parsed by tyro as on the
    command line, in this one process (what the CLI adds is the interpreter's start, 5 s a run)."""
    import importlib

    import tyro

    out = {}
    for name, (script, flags) in SCRIPT_RUNS.items():
        if only and name not in only:
            continue
        module = importlib.import_module(script)
        argv = ["--env", "chat", "--model_name_or_path", str(folder / "policy"), "--reward_model", str(folder / "rm"),
                "--prompts_path", str(folder / "prompts.jsonl"), "--max_turns", "2", "--max_new_tokens", "4",
                "--num_iterations", "1", "--num_eval", "2", "--threads", "1", "--output_dir", str(folder / "runs"),
                "--run_name", name, *flags]
        if script == "baselines_dpo_rebel":
            argv += ["--offline_path", str(folder / "offline.jsonl")]
        if script == "refuel" or script == "baselines_dpo_rebel":
            argv += ["--save_rollouts", str(folder / f"{name}.jsonl")]
        if kwargs:
            argv += ["--chat_template_kwargs", kwargs]
        argv += list(extra)
        out[name] = module.main(tyro.cli(module.Args, args=argv))["iterations"]
        shutil.rmtree(folder / "runs" / name / "checkpoint")  # 1.3 GB at SmolLM2's size (weights and Adam)
        print(name, "ok", flush=True)
    return out


# What a template changes: how sampled turns and D_off's own turns become ids. Every family runs the scripts and
# the modes that render D_off; the modes that differ only in pairing (LT-MIXED, LT-ONLINE, MTPO-tau, RLHF) run on
# llama3_1 alone in CI, on every family with --long.
TEMPLATE_RUNS = ("refuel", "rebel-lt-offline", "rebel-mt-mixed", "mtpo-mtpo", "iterative_ppo")


@pytest.mark.parametrize("family,kwargs", VARIANTS, ids=IDS)
def test_one_iteration_of_every_script(request, tmp_path, family, kwargs):
    load_tokenizer(family)  # skips when absent
    write_family(tmp_path, family)
    runs = tuple(SCRIPT_RUNS) if family == "llama3_1" or request.config.getoption("--long") else TEMPLATE_RUNS
    cmd = [sys.executable, str(Path(__file__)), family, str(tmp_path), kwargs or ""]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(subprocess_env(),
                         ONLY_RUNS=" ".join(runs)), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {name: 1 for name in runs}
    # the pairs REFUEL and the baselines trained on: each side's turn h is its sampled ids (or D_off's own turn)
    tok = load_tokenizer(family)
    sim.set_chat_template_kwargs(json.loads(kwargs or "{}"))
    for name in ("refuel", "rebel-lt-offline", "rebel-mt-mixed"):
        for row in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines()):
            for side in ("conv_a", "conv_b"):
                msg = row[side][sim.assistant_turn_index(row[side], row["h"])]
                if "token_ids" in msg:
                    assert sim.split_turn(tok, row[side], row["h"])[1] == msg["token_ids"]


# ---------------------------------------------------------------- a real pretrained chat model: SmolLM2-135M-Instruct
QUESTIONS = ["What is the capital of France?", "How do plants make their food?", "Why is the sky blue?",
             "How many legs does a spider have?", "What is 12 times 3?", "Can you name a famous painter?",
             "What do bees make?", "Where does rain come from?"]


def write_smollm2(folder: Path) -> None:
    """SmolLM2 as the policy (and, with --user_model, the in-process user), its backbone with a fresh scalar head
    as the reward model, real questions (half with a system prompt), and D_off dialogues with a rejected reply."""
    from transformers import LlamaForSequenceClassification

    from real_models import smollm2_dir

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy").symlink_to(smollm2_dir())
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification.from_pretrained(smollm2_dir(), num_labels=1, dtype=torch.bfloat16)
    rm.config.pad_token_id = 2
    rm.save_pretrained(folder / "rm")
    load_tokenizer_at(smollm2_dir()).save_pretrained(folder / "rm")
    system = [{"role": "system", "content": "You are a friendly teacher. Answer in one sentence."}]
    first = [(system if k % 2 else []) + [{"role": "user", "content": q}] for k, q in enumerate(QUESTIONS)]
    (folder / "prompts.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in first))
    offline = []
    for m in first:
        chosen = [*m, {"role": "assistant", "content": "Good question! Let me explain."},
                  {"role": "user", "content": "Can you say more?"},
                  {"role": "assistant", "content": "Sure, here is a short explanation."}]
        offline.append({"chosen": chosen, "rejected": [*chosen[:-1], {"role": "assistant", "content": "No."}]})
    (folder / "offline.jsonl").write_text("".join(json.dumps(r) + "\n" for r in offline))


def load_tokenizer_at(path):
    from envs import loading

    return loading.load_tokenizer(str(path))


def smollm2():
    from transformers import AutoModelForCausalLM

    from real_models import smollm2_dir

    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(smollm2_dir()).eval(), load_tokenizer_at(smollm2_dir())


def test_smollm2_greedy_reply_through_the_sampler_equals_generate():
    model, tok = smollm2()
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS[:3]]
    out = sim.sample_turns(model, tok, convs, max_new_tokens=24, temperature=0.0)
    assert "Paris" in out.texts[0]
    for conv, ids in zip(convs, out.token_ids):
        prompt = torch.tensor([sim.conversation_ids(tok, conv, add_generation_prompt=True).ids])
        ref = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=24,
                             eos_token_id=sim.stop_token_ids(tok, model), pad_token_id=tok.pad_token_id)
        assert ids == ref[0, prompt.shape[1]:].tolist()[: len(ids)] and len(ids) == ref.shape[1] - prompt.shape[1]


# CI: REFUEL on the real weights (a minute); every script and mode with --long. The 2-layer stand-ins run every
# script on SmolLM2's tokenizer in test_your_environment.py and test_gift_task.py.
REAL_MODEL_RUNS = ("refuel",)


@pytest.mark.parametrize("user,runs", [("in-process", REAL_MODEL_RUNS),
                                       pytest.param("in-process", tuple(SCRIPT_RUNS), marks=pytest.mark.long),
                                       pytest.param("presampled", tuple(SCRIPT_RUNS), marks=pytest.mark.long)],
                         ids=["in-process-refuel", "in-process-every-mode", "presampled-every-mode"])
def test_smollm2_runs_every_script(tmp_path, user, runs):
    """Scripts for one iteration with SmolLM2-135M-Instruct as the policy and as the in-process user (or the
    records' own later questions), one thread: REFUEL in CI, every script and mode under --long. REFUEL's
    first step starts at pi = pi_t: its log-ratio is ~0."""
    write_smollm2(tmp_path)
    if user == "presampled":  # setting two: each prompt's later user turn comes with the record
        rows = [json.loads(line) for line in (tmp_path / "prompts.jsonl").read_text().splitlines()]
        (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({**r, "questions": ["Tell me more."]}) + "\n"
                                                        for r in rows))
    extra = ["--user_model", str(tmp_path / "policy"), "--user_max_new_tokens", "32"] if user == "in-process" else []
    cmd = [sys.executable, str(Path(__file__)), "smollm2", str(tmp_path), "", *extra]
    env = dict(subprocess_env(), ONLY_RUNS=" ".join(runs))
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {name: 1 for name in runs}
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "refuel" / "metrics.jsonl").read_text().splitlines()]
    trained = next(m for m in metrics if "losses/refuel_loss" in m)
    assert trained["charts/lr"] == 1e-6  # the default for a pretrained model
    assert abs(trained["losses/mean_logratio_a"]) < 1e-3, trained  # one minibatch, one epoch: the first step
    if user == "in-process":
        assert 0 <= trained["charts/user_parse_fallback_rate"] <= 1


if __name__ == "__main__":  # the scripts' matrix for one family, in one process: see test_one_iteration_of_every_script
    sys.path.insert(0, str(ROOT))
    folder, kwargs = Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else ""
    only = tuple(os.environ.get("ONLY_RUNS", "").split())  # a subset of SCRIPT_RUNS' names
    print(json.dumps(run_matrix(folder, kwargs, tuple(sys.argv[4:]), only)))
