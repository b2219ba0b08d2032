"""The papers' chat settings on data as it comes: Anthropic-HH-format records of 1 to 5 turns (some with roles out
of order), D_off dialogues of varied length. Setting two's H is each record's own number of turns (REFUEL paper
Sec. 4.2, App. C), D_off's is each dialogue's own last turn, and no record with fewer turns than H_max crashes a
roll-in or a reset-and-roll-out that keeps H <= Context.max_turns."""
import json
from collections import Counter

import numpy as np
import pytest
import torch

import simulator as sim
from envs import chat_datasets
from envs import chat_env
from envs import tutor_task
from test_simulator import llama3_tokenizer, tiny_llama


def hh_record(n_turns: int, tag: str) -> dict:
    """An Anthropic/hh-rlhf record: chosen/rejected transcripts of n_turns Human/Assistant exchanges."""
    def transcript(last):
        return "".join(f"\n\nHuman: {tag} question {k} ?\n\nAssistant: " + (last if k == n_turns - 1 else f"answer {k}")
                       for k in range(n_turns))
    return {"chosen": transcript("a good answer ."), "rejected": transcript("a bad answer .")}


OUT_OF_ORDER = [{"chosen": "\n\nHuman: a\n\nHuman: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"},
                {"chosen": "\n\nAssistant: hi\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nAssistant: no"},
                {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nAssistant: c", "rejected": "\n\nHuman: a\n\nAssistant: d"}]


def write_hh(path, copies=4):
    """HH-format records of 1-5 turns (tagged with their number of turns), and three with roles out of order."""
    recs = [hh_record(n, f"t{n}x{c}") for c in range(copies) for n in (1, 2, 3, 4, 5)]
    lines = [json.dumps(r) for r in recs]
    for k, bad in enumerate(OUT_OF_ORDER):  # spread among the good ones
        lines.insert(3 + 5 * k, json.dumps(bad))
    path.write_text("\n".join(lines) + "\n")
    return len(recs)


def turns_of(conv) -> int:
    """The number of turns written into an hh_record's tag (t<n>x<copy>)."""
    first = next(m for m in conv if m["role"] == "user")["content"]
    return int(first.split()[0][1:].split("x")[0])


def test_setting_two_contexts_have_each_records_own_number_of_turns(tmp_path, capsys):
    path = tmp_path / "hh.jsonl"
    n_good = write_hh(path)
    records = chat_datasets.load_prompts(str(path), max_turns=5)
    assert len(records) == n_good
    assert "skipped 3 malformed" in capsys.readouterr().out  # roles out of order: skipped and counted
    env = chat_env.ChatEnv(records, reward_model=None, max_turns=5)
    ctx = env.contexts(300, "train", np.random.default_rng(0))
    assert all(c.max_turns == turns_of(c.messages) for c in ctx)
    assert set(Counter(c.max_turns for c in ctx)) == {1, 2, 3, 4, 5}
    assert all(c.max_turns == len(c.user["questions"] or []) + 1 for c in ctx)
    # H_max below a record's turns caps it; a user model (or an endpoint) makes any H possible: None
    capped = chat_env.ChatEnv(records, reward_model=None, max_turns=3).contexts(100, "train", np.random.default_rng(0))
    assert all(c.max_turns == min(3, turns_of(c.messages)) for c in capped)
    with_user = chat_env.ChatEnv(records, reward_model=None, user=object(), max_turns=5)
    assert all(c.max_turns is None for c in with_user.contexts(20, "train", np.random.default_rng(0)))
    assert all(c.max_turns is None for c in tutor_task.TutorEnv().contexts(5, "train", np.random.default_rng(0)))
    # a prompt record without later questions supports one turn
    one = chat_env.ChatEnv([{"messages": [{"role": "user", "content": "hi"}], "user": {"questions": None}}], None)
    assert [c.max_turns for c in one.contexts(2, "train", np.random.default_rng(0))] == [1, 1]


def test_offline_dialogues_have_their_own_last_turn(tmp_path):
    path = tmp_path / "hh.jsonl"
    write_hh(path)
    rows = chat_datasets.load_offline(str(path), max_turns=5)
    env = chat_env.ChatEnv([{"messages": [{"role": "user", "content": "hi"}], "user": None}], reward_model=None,
                      max_turns=5, offline_records=rows)
    ctx, dialogues = env.offline(200, np.random.default_rng(1))
    assert all(c.max_turns == sum(m["role"] == "assistant" for m in d) == turns_of(d) for c, d in zip(ctx, dialogues))
    assert set(c.max_turns for c in ctx) == {1, 2, 3, 4, 5}
    # LT-OFFLINE: the state at each dialogue's own last turn has the record's rejected reply as the alternative
    s_H = [sim.prefix_to_turn(d, c.max_turns) for c, d in zip(ctx, dialogues)]
    assert env.offline_alternative(ctx, s_H, None) == ["a bad answer ."] * len(ctx)
    # Education Dialogue's longer lessons are cut to H_max teacher turns: their own last turn is then H_max
    lesson = {"background_info": {"topic": "Rivers"},
              "conversation": [{"role": "Teacher" if k % 2 == 0 else "Student", "text": f"turn {k}"}
                               for k in range(25)]}
    edu = tmp_path / "edu.json"
    edu.write_text(json.dumps([lesson]))
    env = chat_env.ChatEnv([{"messages": [{"role": "user", "content": "hi"}], "user": None}], reward_model=None,
                      max_turns=5, offline_records=chat_datasets.load_offline(str(edu), max_turns=5))
    assert [c.max_turns for c in env.offline(3, np.random.default_rng(0))[0]] == [5, 5, 5]


@pytest.fixture(scope="module")
def policy():
    tok = llama3_tokenizer()
    return tiny_llama(tok), tok


def test_short_records_roll_in_and_reset_without_error_and_refuse_more_turns(tmp_path, policy, monkeypatch):
    """Setting two as the scripts play it: H = Context.max_turns, h ~ U{1..H}, roll in to H, reset to s_h and roll
    out to H: no record of 1-5 turns raises, and the user turns are the record's own, in order. More turns than a
    record has is a clear ValueError before anything is sampled."""
    model, tok = policy
    path = tmp_path / "hh.jsonl"
    write_hh(path, copies=2)
    env = chat_env.ChatEnv(chat_datasets.load_prompts(str(path), max_turns=5), reward_model=None, max_turns=5)
    rng = np.random.default_rng(0)
    ctx = env.contexts(40, "train", rng)
    H = [c.max_turns for c in ctx]
    h = [int(rng.integers(1, k + 1)) for k in H]
    users = [c.user for c in ctx]
    torch.manual_seed(0)
    rolled, _ = sim.continue_dialogues(model, tok, env, [c.messages for c in ctx], users, H, rng, max_new_tokens=3)
    branch, info = sim.continue_dialogues(model, tok, env, [sim.prefix_to_turn(c, k) for c, k in zip(rolled, h)],
                                          users, H, rng, max_new_tokens=3)
    for c, conv, k, hk, inf in zip(ctx, branch, H, h, info):
        assert sum(m["role"] == "assistant" for m in conv) == k and conv[-1]["role"] == "assistant"
        assert [m["content"] for m in conv if m["role"] == "user"][1:] == (c.user["questions"] or [])[:k - 1]
        assert sorted(inf) == list(range(hk, k + 1))
    sim.turn_logprob(model, tok, branch, h)  # every trained turn exists
    # a 3-turn record: H = 1, 2, 3 all run; 4 is refused, naming what the record supports, before sampling
    three = next(c for c in ctx if c.max_turns == 3)
    for k in (1, 2, 3):
        sim.continue_dialogues(model, tok, env, [three.messages], [three.user], [k], rng, max_new_tokens=2)
    calls = []
    monkeypatch.setattr(sim, "sample_turns", lambda *a, **k: calls.append(1))
    with pytest.raises(ValueError, match="4 assistant turns requested, but its record's pre-sampled user turns "
                                         "support 3 .draw H <= Context.max_turns"):
        sim.continue_dialogues(model, tok, env, [three.messages], [three.user], [4], rng, max_new_tokens=2)
    with pytest.raises(ValueError, match="3 assistant turns and a user reply after the last requested"):
        sim.continue_dialogues(model, tok, env, [three.messages], [three.user], [3], rng, max_new_tokens=2,
                               reply_after_last=True)
    assert not calls
    with pytest.raises(ValueError, match="this record has 2 later user turns, so it supports 3 assistant turns"):
        conv = three.messages + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}] * 2 + \
            [{"role": "assistant", "content": "z"}]
        env.user_turn([conv], [three.user], rng)


def test_a_roll_in_to_s_h_ends_with_the_users_turn(policy):
    """LT-ONLINE's states: rolled in for h - 1 turns with reply_after_last, s_h ends with the user's x_h (on chat
    the user does not otherwise speak after the last rolled-in turn)."""
    model, tok = policy
    questions = ["second question ?", "third question ?"]
    env = chat_env.ChatEnv([{"messages": [{"role": "user", "content": "first ?"}], "user": {"questions": questions}}],
                      reward_model=None, max_turns=3)
    ctx = env.contexts(6, "train", np.random.default_rng(0))
    for k in (0, 1, 2):  # h - 1 rolled-in turns
        torch.manual_seed(0)
        plain, _ = sim.continue_dialogues(model, tok, env, [c.messages for c in ctx], [c.user for c in ctx],
                                          [k] * 6, np.random.default_rng(0), max_new_tokens=2)
        s_h, _ = sim.continue_dialogues(model, tok, env, [c.messages for c in ctx], [c.user for c in ctx], [k] * 6,
                                        np.random.default_rng(0), max_new_tokens=2, reply_after_last=True)
        assert all(c[-1]["role"] == "user" for c in s_h) and all(len(c) == 2 * k + 1 for c in s_h)
        assert all(c[-1]["content"] == (["first ?"] + questions)[k] for c in s_h)
        assert all(c[-1]["role"] == ("user" if k == 0 else "assistant") for c in plain)


def test_evaluation_plays_each_records_own_turns(tmp_path, policy):
    model, tok = policy
    path = tmp_path / "hh.jsonl"
    write_hh(path, copies=1)
    seen = []
    env = chat_env.ChatEnv(chat_datasets.load_prompts(str(path), max_turns=5),
                      reward_model=lambda convs: seen.extend(convs) or torch.zeros(len(convs)), max_turns=5,
                      eval_fraction=1.0)
    torch.manual_seed(0)
    out = sim.evaluate_policy(model, tok, env, 12, seed=0, max_new_tokens=2)
    assert out["eval/mean_reward"] == 0.0 and len(seen) == 12
    assert all(sum(m["role"] == "assistant" for m in c) == turns_of(c) for c in seen)


def test_dialogue_token_count_is_the_chat_templated_length():
    tok = llama3_tokenizer()
    conv = [{"role": "user", "content": "i like songs"}, {"role": "assistant", "content": "ok", "truncated": True}]
    assert sim.dialogue_token_count(tok, conv) == len(sim.render_ids(tok, conv, add_generation_prompt=False))
    longer = conv + [{"role": "user", "content": "why ?"}, {"role": "assistant", "content": "because"}]
    # two messages more: header (3 tokens) + content + <|eot_id|> each, (3 + 2 + 1) + (3 + 1 + 1)
    assert sim.dialogue_token_count(tok, longer) == sim.dialogue_token_count(tok, conv) + 11
