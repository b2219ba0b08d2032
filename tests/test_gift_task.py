"""The gift task (envs/gift_task.py): the customer's rules and the reward on hand-written conversations, the exact
values (asking first always wins against the scripted customer, guessing wins at most 1/3), the LM customer's
prompt rows and what the real SmolLM2-135M-Instruct answers in that role, and every command of docs/gift_task.md,
run as a user would with a 2-layer model carrying SmolLM2's tokenizer and template in place of the hub model."""
import json
import shlex
import subprocess
import sys

import numpy as np
import pytest

from conftest import (ROOT, SMOLLM2_HUB_NAME, TINY_FLAGS, fenced_blocks, subprocess_env, tiny_chat_model,
                      tiny_sizes)
from real_models import smollm2_dir

sys.path.insert(0, str(ROOT))
from envs import gift_task  # noqa: E402
from envs.gift_task import COLOURS, DELIGHTED, GiftEnv, LMUser  # noqa: E402

PAGE = ROOT / "docs" / "gift_task.md"


def customer(colour="green", their="her"):
    return {"gift": "mug", "who": "sister", "their": their, "Their": their.capitalize(), "colour": colour}


def said(*turns):
    """A conversation: the system prompt, the opening, then the given turns (assistant first, alternating)."""
    conv = [{"role": "system", "content": gift_task.SYSTEM}, {"role": "user", "content": "Which colour?"}]
    return conv + [{"role": ("assistant", "user")[i % 2], "content": t} for i, t in enumerate(turns)]


def test_the_scripted_customer_and_the_reward():
    env, u = GiftEnv(None, max_turns=2), customer("green")
    turns = ["What colour does she like?", "A GREEN mug, surely.", "A red one.", "Green or red?", "A nice mug."]
    assert env.user_turn([said(t) for t in turns], [u] * 5, None) == [
        "Her favourite colour is green.", DELIGHTED, "Hmm, that is not her favourite colour.",
        "Hmm, that is not her favourite colour.", "Could you suggest a colour?"]
    # "greenish" and "redo" are not colours named as words
    assert gift_task.colours_named("a greenish mug, redo it") == set()
    finished = [said("A green one.", DELIGHTED), said("A red one.", "Hmm, no.", "A green one.", DELIGHTED),
                said("A green one.", DELIGHTED, "Or red.", "Hmm, no."), said("What colour?", "Green, I said.")]
    assert env.reward(finished).tolist() == [1.0, 1.0, 1.0, 0.0]  # delighted by some turn: a present they love
    assert env.scores_final_user_reply


def play(env, policy, colour, turns):
    conv, u = said(), customer(colour)
    for _ in range(turns):
        conv.append({"role": "assistant", "content": policy(conv)})
        conv.append({"role": "user", "content": env.user_turn([conv], [u], None)[0]})
    return float(env.reward([conv])[0])


def test_asking_first_always_wins_and_guessing_at_most_a_third():
    """Against the scripted customer, over every colour: ask-then-name reaches V* = 1 with two turns; a guesser
    that names red, then blue when told red is wrong, wins only for red and blue (2/6), the most two guesses get;
    with one turn the best is a guess (1/6 = V*), which the guesser gets."""
    env = GiftEnv(None, max_turns=2)

    def ask_then_name(conv):
        if len(conv) == 2:
            return "What is her favourite colour?"
        return f"Then a {gift_task.colours_named(conv[-1]['content']).pop()} one."

    def guess(conv):
        return "A blue one." if conv[-1]["content"].startswith("Hmm") else "A red one."

    assert [play(env, ask_then_name, c, 2) for c in COLOURS] == [1.0] * 6 and env.optimal_value() == 1.0
    assert np.mean([play(env, guess, c, 2) for c in COLOURS]) == pytest.approx(1 / 3)
    assert np.mean([play(env, guess, c, 1) for c in COLOURS]) == pytest.approx(1 / 6)
    assert GiftEnv(None, max_turns=1).optimal_value() == pytest.approx(1 / 6)
    assert GiftEnv(user=object(), max_turns=2).optimal_value() is None  # an LM customer: V* unknown


def test_contexts_carry_the_hidden_colour_and_metrics_count_asking():
    env = GiftEnv(None, max_turns=2)
    ctxs = env.contexts(200, "train", np.random.default_rng(0))
    assert {c.user["colour"] for c in ctxs} == set(COLOURS)
    assert all(c.messages[0]["role"] == "system" and c.messages[1]["role"] == "user" for c in ctxs)
    assert all(c.user["colour"] not in " ".join(m["content"] for m in c.messages) for c in ctxs)  # hidden
    m = env.dialogue_metrics([said("What colour does she like?", "Green.", "A green one."),
                              said("A red one.", "Hmm.", "A blue one.")])
    assert m == {"eval/asked_rate": 0.5, "eval/first_turn_guess_rate": 0.5}


def test_the_lm_customer_sees_the_dialogue_with_roles_swapped():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    rows = LMUser(None, tok).prompt_rows([said("What colour does she like?")], [customer("blue")])
    assert [m["role"] for m in rows[0]] == ["system", "user", "assistant", "user"]
    assert "favourite colour is blue" in rows[0][0]["content"] and rows[0][1]["content"] == gift_task.GREETING
    assert rows[0][2]["content"] == "Which colour?" and rows[0][3]["content"] == "What colour does she like?"


@pytest.fixture(scope="module")
def smollm2_customer():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir(), local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir(), local_files_only=True).eval()
    return GiftEnv(LMUser(model, tok), max_turns=2)


def test_the_real_lm_customer_names_the_colour_when_asked_and_rarely_otherwise(smollm2_customer):
    """SmolLM2-135M-Instruct as the customer (greedy): asked about colour, it names the hidden one for most
    colours; offered a colourless suggestion, it does not; a named colour still gets the rule's reaction."""
    env = smollm2_customer
    asked = env.user_turn([said("What colour does she like?")] * 6, [customer(c) for c in COLOURS], None)
    told = sum(c in gift_task.colours_named(r) for c, r in zip(COLOURS, asked))
    other = env.user_turn([said("I'd suggest a nice mug with a photo on it.")] * 6, [customer(c) for c in COLOURS],
                          None)
    leaked = sum(c in gift_task.colours_named(r) for c, r in zip(COLOURS, other))
    assert told >= 5 and leaked <= 1, (asked, other)
    assert env.user_turn([said("A purple mug.")], [customer("purple")], None) == [DELIGHTED]


def test_gift_needs_a_chat_model_and_reads_no_chat_flags():
    from envs.flags import EnvArgs, make_env_from_args

    class Args(EnvArgs):  # what the scripts' Args add that GiftEnv.from_flags reads
        model_name_or_path: str = "tutor"

    with pytest.raises(ValueError, match="--env gift is played by a chat model"):
        make_env_from_args(Args(env="gift"), 2, "cpu")
    with pytest.raises(ValueError, match="--reward_model would be ignored"):
        make_env_from_args(Args(env="gift", user_model="scripted", reward_model="rm"), 2, "cpu")
    env = make_env_from_args(Args(env="gift", user_model="scripted"), 3, "cpu")
    assert isinstance(env, GiftEnv) and env.user is None and env.max_turns == 3 and env.optimal_value() == 1.0


# ---- the page's commands -------------------------------------------------------------------------------------
def page_commands() -> list[list[str]]:
    return [shlex.split(line) for block in fenced_blocks(PAGE.read_text(), "bash") for line in block.splitlines()
            if line.strip() and not line.startswith("#") and ".py" in line]


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    return tiny_chat_model(tmp_path_factory.mktemp("policy"))


def test_every_command_on_the_page_runs(policy, tmp_path):
    """Each `python SCRIPT ...` line of docs/gift_task.md, with the hub name -> a 2-layer model carrying SmolLM2's
    tokenizer and template (it also plays the customer: the default user is the policy's starting checkpoint),
    runs/RUN_A -> the REFUEL run made first, tiny sizes; benchmark lines get --dry_run."""
    commands = page_commands()
    scripts = {c[1] for c in commands}
    assert {"refuel.py", "mtpo.py", "iterative_ppo.py", "baselines_dpo_rebel.py", "evaluate.py"} <= scripts, scripts
    runs = tmp_path / "runs"
    for argv in sorted(commands, key=lambda c: ("evaluate.py" in c[1], "benchmarks" in c[1])):
        script = argv[1]
        args = [str(policy) if a == SMOLLM2_HUB_NAME else str(runs / "RUN_A") if a == "runs/RUN_A" else a
                for a in argv[2:]]
        if script.startswith("benchmarks/"):
            args += ["--dry_run"]
        else:
            args = tiny_sizes(script, args)
            name = "RUN_A" if script == "refuel.py" else script[:-3]
            args += (["--output", str(runs / "evaluate.json"), "--device", "cpu"] if script == "evaluate.py" else
                     ["--output_dir", str(runs), "--run_name", name, "--threads", "1"])
        out = subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True,
                             env=subprocess_env(), timeout=900)
        assert out.returncode == 0, f"{shlex.join(argv)}\n" + out.stdout[-3000:] + out.stderr[-3000:]
        if script in TINY_FLAGS and script != "evaluate.py":
            evaluated = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()
                         if "eval/mean_reward" in line]
            assert evaluated and all(0 <= m["eval/asked_rate"] <= 1 for m in evaluated)
