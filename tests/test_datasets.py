"""The papers' datasets, read from small fixture files written here: UltraInteract (setting one and two), Anthropic
HH, Education Dialogue, a hub dataset through a stand-in `datasets` module; the papers' filters; bad records."""
import json
import sys
import types

import numpy as np
import pytest
import torch

import simulator as sim
from envs import chat_datasets
from envs import chat_env
from envs import flags
from envs import loading
from test_simulator import chatml_tokenizer, save_tiny_policy_and_reward_model


def U(text):
    return {"role": "user", "content": text}


def A(text):
    return {"role": "assistant", "content": text}


def ultrainteract_record(n_turns, chosen="x = 2", rejected="x = 3"):
    traj = []
    for k in range(n_turns):
        traj.append({"from": "user", "value": f"question {k}"})
        if k < n_turns - 1:
            traj.append({"from": "assistant", "value": f"answer {k}"})
    return {"task": "Math_CoT", "dataset": "gsm8k", "id": "q1", "trajectory": traj, "chosen": chosen,
            "rejected": rejected}


def test_ultrainteract_pairs_and_the_five_turn_filter(tmp_path, capsys):
    path = tmp_path / "ultrainteract.jsonl"
    path.write_text("\n".join(json.dumps(ultrainteract_record(n)) for n in (2, 6)) + "\n")
    rows = chat_datasets.load_offline(str(path), max_turns=5)
    assert len(rows) == 1  # the 6-turn dialogue is filtered out (REFUEL paper: at most 5 turns), and counted
    assert "kept 1 dialogues, skipped 1 more than 5 turns" in capsys.readouterr().out
    assert rows[0]["messages"] == [U("question 0"), A("answer 0"), U("question 1"), A("x = 2")]
    assert rows[0]["alternative"] == "x = 3"
    prompts = chat_datasets.load_prompts(str(path), max_turns=5)
    # setting one starts from the dataset's first prompt; setting two replays its later user turns
    assert prompts == [{"messages": [U("question 0")], "user": {"questions": ["question 1"]}}]
    env = chat_env.ChatEnv(prompts, reward_model=None)
    (ctx,) = env.contexts(1, "train", np.random.default_rng(0))
    assert env.user_turn([ctx.messages + [A("hi")]], [ctx.user], None) == ["question 1"]
    with pytest.raises(ValueError, match="pre-sampled user turns ran out"):
        env.user_turn([ctx.messages + [A("hi"), U("question 1"), A("ok")]], [ctx.user], None)


def test_anthropic_hh_transcripts_and_roles_out_of_order(tmp_path, capsys):
    good = {"chosen": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: why is the sky blue?\n\nAssistant: "
                      "Rayleigh scattering.",
            "rejected": "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: why is the sky blue?\n\nAssistant: no."}
    out_of_order = {"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}
    path = tmp_path / "hh.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(out_of_order) + "\n")
    rows = chat_datasets.load_offline(str(path))
    assert rows[0]["messages"] == [U("hi there"), A("hello"), U("why is the sky blue?"), A("Rayleigh scattering.")]
    assert rows[0]["alternative"] == "no." and len(rows) == 1
    assert "skipped 1 malformed (first: " in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"hh.jsonl:2: .*roles must alternate.*--bad_records skip"):
        chat_datasets.load_offline(str(path), bad_records="error")
    with pytest.raises(ValueError, match="unknown dataset format"):
        chat_datasets.load_offline(str(path), "sharegpt")


def test_token_limit_filter_uses_the_policy_chat_template(tmp_path, capsys):
    tok = chatml_tokenizer()
    path = tmp_path / "d.jsonl"
    short, long = [U("i like songs"), A("ok")], [U("i like songs " * 40), A("ok")]
    path.write_text(json.dumps(short) + "\n" + json.dumps(long) + "\n")
    limit = len(sim.render_ids(tok, short, add_generation_prompt=False))
    rows = chat_datasets.load_offline(str(path), max_tokens=limit, tokenizer=tok)
    assert [r["messages"] for r in rows] == [short]
    assert f"skipped 1 over {limit} tokens" in capsys.readouterr().out
    with pytest.raises(ValueError, match="needs the policy's tokenizer"):
        chat_datasets.load_offline(str(path), max_tokens=limit)


EDUCATION = [
    {"background_info": {"topic": "Photosynthesis", "student_prefrences": "hands-on activities/real-world applications",
                         "teacher_prefrences": "direct instruction/lecture-based learning",
                         "student_reactions": "and gets frustrated otherwise",
                         "teacher_reactions": "but might adapt to the student"},
     "conversation": [{"role": "Teacher", "text": "Today: photosynthesis."}, {"role": "Student", "text": "Okay."},
                      {"role": "Teacher", "text": "Plants make sugar from light."},
                      {"role": "Student", "text": "Can we try it?"}, {"role": "Teacher", "text": "Sure."}]},
    {"background_info": {"topic": "Zeus"}, "conversation": [{"role": "Narrator", "text": "?"}]},
]


def test_education_dialogue_seeds_a_teacher_student_environment(tmp_path, capsys):
    path = tmp_path / "conversations_eval.json"  # the dataset's own layout: one JSON list per file
    path.write_text(json.dumps(EDUCATION))
    prompts = chat_datasets.load_prompts(str(path), max_turns=2)
    assert "skipped 1 malformed" in capsys.readouterr().out  # the record with an unknown role
    (p,) = prompts
    assert p["messages"][0]["role"] == "system" and "Photosynthesis" in p["messages"][0]["content"]
    assert p["messages"][1] == U(chat_datasets.EDUCATION_OPENING.format(topic="Photosynthesis"))
    assert p["user"]["student_prefrences"].startswith("hands-on")  # hidden from the teacher, given to the student
    (row,) = chat_datasets.load_offline(str(path), max_turns=2)  # a 3-turn lesson is cut to 2 teacher turns, not dropped
    assert [m["content"] for m in row["messages"][2:]] == ["Today: photosynthesis.", "Okay.",
                                                            "Plants make sugar from light."]
    user = chat_env.PromptedUser(client=object(), prompt_template=chat_env.STUDENT_PROMPT, reply_key="Student",
                            role_names={"user": "Student", "assistant": "Teacher"})
    ask = user.prompt(row["messages"], p["user"])
    assert "You like hands-on activities/real-world applications" in ask and "and gets frustrated otherwise" in ask
    assert "Teacher: Today: photosynthesis.\n\nStudent: Okay." in ask
    with pytest.raises(ValueError, match=r"asks for \{topic\}"):
        user.prompt(row["messages"], {"questions": None})
    assert chat_env.parse_user_question("Justification: bored.\nStudent: Can we do an experiment?", "Student") == \
        ("Can we do an experiment?", True)


def test_education_env_through_make_env_with_hf_student_and_reward_model(tmp_path):
    save_tiny_policy_and_reward_model(tmp_path)
    path = tmp_path / "conversations_train1.json"
    path.write_text(json.dumps(EDUCATION[:1] * 3))
    env = flags.make_env("chat", str(path), user_model=str(tmp_path / "policy"), reward_model=str(tmp_path / "rm"),
                       max_turns=2, offline_path=str(path), reward_device="cpu", user_device="cpu")
    assert env.user.reply_key == "Student" and env.user.template == chat_env.STUDENT_PROMPT
    policy, tok = loading.load_policy(str(tmp_path / "policy"))
    rng = np.random.default_rng(0)
    ctx = env.contexts(2, "train", rng)
    torch.manual_seed(0)
    convs, _ = sim.continue_dialogues(policy, tok, env, [c.messages for c in ctx], [c.user for c in ctx], [2, 2],
                                      rng, max_new_tokens=4)
    assert all([m["role"] for m in c] == ["system", "user", "assistant", "user", "assistant"] for c in convs)
    assert env.user.n_calls == 2 and torch.isfinite(env.reward(convs)).all()
    ctx, rows = env.offline(2, rng)
    assert all(len(r) == 5 for r in rows)  # system, opening, teacher, student, teacher
    # the preference oracle defaults to the MTPO paper's teacher-assessment prompt on this data
    assert chat_env.judge_prompt(env) == chat_env.EDUCATION_JUDGE_PROMPT
    assert chat_env.judge_prompt(chat_env.ChatEnv([{"messages": [U("hi")], "user": None}], None)) == chat_env.JUDGE_PROMPT
    (tmp_path / "judge.txt").write_text("Which is better, {dialogue_a} or {dialogue_b}? Preferred: A or B")
    assert chat_env.judge_prompt(env, str(tmp_path / "judge.txt")).startswith("Which is better")
    (tmp_path / "bad_judge.txt").write_text("Which is better, {dialogue_a}?")
    with pytest.raises(ValueError, match="must contain {dialogue_a} and {dialogue_b}"):
        chat_env.judge_prompt(env, str(tmp_path / "bad_judge.txt"))
    verdicts = chat_env.JudgePreference(lambda prompts: ["Preferred: A"] * len(prompts), chat_env.judge_prompt(env))
    assert verdicts(convs[:1], convs[1:]).tolist() == [0.5]  # A in both orders: position bias cancels to a tie


def test_hub_datasets_are_loaded_lazily(monkeypatch):
    calls = []

    def load_dataset(name, split):
        calls.append((name, split))
        return [{"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    rows = chat_datasets.load_offline("hf:Anthropic/hh-rlhf:test")
    assert calls == [("Anthropic/hh-rlhf", "test")] and rows[0]["alternative"] == "go"
    chat_datasets.load_prompts("hf:Anthropic/hh-rlhf")
    assert calls[-1] == ("Anthropic/hh-rlhf", "train")
    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    with pytest.raises(ImportError, match="pip install datasets"):
        chat_datasets.load_prompts("hf:Anthropic/hh-rlhf")


def test_frozen_model_devices_and_reward_output_shapes(tmp_path):
    assert chat_env.resolve_device(None, "cuda:1") == "cuda:1"
    assert chat_env.resolve_device("cuda:+4", "cuda:1") == "cuda:5"
    assert chat_env.resolve_device("cuda:+4", "cuda") == "cuda:4"
    assert chat_env.resolve_device("cpu", "cuda:0") == "cpu"
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = chatml_tokenizer()
    two_heads = LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                                                           num_hidden_layers=1, num_attention_heads=2, num_labels=2,
                                                           pad_token_id=tok.pad_token_id))
    rm = chat_env.HFRewardModel(two_heads, tok)
    with pytest.raises(ValueError, match=r"logits of shape \(2, 2\); expected one score per conversation"):
        rm([[U("i like songs"), A("ok")]] * 2)


def test_models_that_cannot_be_found_offline_are_named(tmp_path):
    with pytest.raises(ValueError, match="could not load policy model 'no-such-org/no-such-model'"):
        loading.load_policy("no-such-org/no-such-model")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps([U("hi")]) + "\n")
    with pytest.raises(ValueError, match="could not load reward model 'no-such-org/no-such-rm'"):
        flags.make_env("chat", str(prompts), reward_model="no-such-org/no-such-rm")
    missing = str(tmp_path / "runs" / "mistyped_run")  # a local path that is not there: said so, not a hub error
    with pytest.raises(ValueError, match="no local folder .*mistyped_run.* either; check the path"):
        loading.load_policy(missing)
    with pytest.raises(ValueError, match="could not load reward model .*no local folder"):
        flags.make_env("chat", str(prompts), reward_model=missing)
    with pytest.raises(ValueError, match="unknown env 'chats'"):
        flags.make_env("chats")


@pytest.mark.parametrize("broken, missing", [
    ("from transformers import LlamaPreTrainedModelThatV5Removed\n",  # an ImportError
     "LlamaPreTrainedModelThatV5Removed"),
    ("import transformers\n\nDOCS = LLAMA_INPUTS_DOCSTRING_THAT_V5_REMOVED\n",
     "LLAMA_INPUTS_DOCSTRING_THAT_V5_REMOVED")])  # NameError
def test_remote_code_reward_model_that_fails_to_import_names_the_model_and_the_name(tmp_path, broken, missing):
    """An ArmoRM-like model directory whose own modeling file imports (or uses) a name this transformers lacks:
    a ValueError naming the model and the missing name, from load_reward_model and through make_env."""
    save_tiny_policy_and_reward_model(tmp_path)
    rm = tmp_path / "rm"
    config = json.loads((rm / "config.json").read_text())
    config["auto_map"] = {"AutoModelForSequenceClassification": "modeling_custom_rm.CustomRewardModel"}
    (rm / "config.json").write_text(json.dumps(config))
    (rm / "modeling_custom_rm.py").write_text(broken + "\n\nclass CustomRewardModel:\n    pass\n")
    with pytest.raises(ValueError, match=rf"could not load reward model '{rm}': its own code \(trust_remote_code\) "
                                         rf"failed to import '{missing}'"):
        chat_env.load_reward_model(str(rm), trust_remote_code=True)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps([U("hi")]) + "\n")
    with pytest.raises(ValueError, match=rf"reward model '{rm}'.*{missing}"):
        flags.make_env("chat", str(prompts), reward_model=str(rm), trust_remote_code=True)
