import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

import evaluate as ev
import simulator as sim
from envs import chat_env
from envs import tutor_task
from conftest import ROOT, subprocess_env
from test_simulator import chatml_tokenizer, teach, tiny_llama


class TwoTurnEnv(sim.Environment):
    """Dialogues whose assistant turns are labels; only the bookkeeping is under test."""
    max_turns = 2

    def contexts(self, n, split, rng):
        return [sim.Context(i, [{"role": "user", "content": "hi"}]) for i in range(n)]

    def user_turn(self, convs, users, rng):
        return ["ok"] * len(convs)

    def reward(self, convs):
        return torch.tensor([sum(m["content"] == "good" for m in c) for c in convs], dtype=torch.float32)


def dialogues(*turn_lists):
    out = []
    for turns in turn_lists:
        c = [{"role": "user", "content": "hi"}]
        for t in turns:
            c += [{"role": "assistant", "content": t}, {"role": "user", "content": "ok"}]
        out.append(c[:-1])
    return out


def test_win_rate_bookkeeping_undoes_the_order_and_counts_ties_half():
    env = TwoTurnEnv()
    pi = dialogues(["good", "bad"], ["bad", "good"], ["good", "good"])
    ref = dialogues(["bad", "bad"], ["good", "bad"], ["good", "good"])
    wins = ev.judge_turns(ev.ScoreJudge(env.reward), pi, ref, env, np.random.default_rng(0))
    # h=1: win, loss, tie; h=2 (cumulative rewards 1 vs 0, 1 vs 1, 2 vs 2): win, tie, tie
    assert wins.tolist() == [[1.0, 1.0], [0.0, 0.5], [0.5, 0.5]]
    w = ev.win_rates(wins)
    assert w["per_turn"] == pytest.approx([0.5, 2 / 3]) and w["average"] == pytest.approx(7 / 12)
    assert w["per_turn_ci"][0] == pytest.approx(1.96 * 0.5 / math.sqrt(3))
    assert w["average_ci"] == pytest.approx(1.96 * np.std([1.0, 0.25, 0.5], ddof=1) / math.sqrt(3))


def test_a_position_biased_judge_gives_one_half_and_a_fair_judge_is_order_free():
    env = TwoTurnEnv()
    pi, ref = dialogues(*[["good", "good"]] * 4000), dialogues(*[["bad", "bad"]] * 4000)
    always_a = lambda a, b: np.ones(len(a))
    wins = ev.judge_turns(always_a, pi, ref, env, np.random.default_rng(1))
    assert abs(wins.mean() - 0.5) < 0.02  # the order is drawn at random, so position bias washes out
    assert set(np.unique(wins)) == {0.0, 1.0}
    fair = ev.judge_turns(ev.ScoreJudge(env.reward), pi, ref, env, np.random.default_rng(1))
    assert fair.min() == 1.0  # the better dialogue wins whichever side it was shown on


def test_tutor_prefix_includes_the_students_reaction():
    env = tutor_task.TutorEnv()
    conv = [{"role": "user", "content": tutor_task.GREETING.format("planets")},
            {"role": "assistant", "content": teach(0)}, {"role": "user", "content": tutor_task.LEARNED},
            {"role": "assistant", "content": tutor_task.ASK}, {"role": "user", "content": tutor_task.NAMED.format("songs")}]
    assert ev.dialogue_to_turn(conv, 1, env) == conv[:3]
    assert ev.dialogue_to_turn(conv, 2, env) == conv
    assert float(env.reward([ev.dialogue_to_turn(conv, 1, env)])[0]) == 0.25


def test_kl_estimator_matches_the_exact_kl():
    p, q = np.array([0.6, 0.3, 0.1]), np.array([0.2, 0.3, 0.5])
    exact = float((p * np.log(p / q)).sum())
    x = np.random.default_rng(0).choice(3, size=200000, p=p)
    mean, se = ev.kl_estimate(np.log(p[x]), np.log(q[x]))
    assert abs(mean - exact) < 4 * se and se < 0.01
    # per-turn terms add up over a dialogue: two independent turns give twice the KL
    x2 = np.random.default_rng(1).choice(3, size=(200000, 2), p=p)
    mean2, se2 = ev.kl_estimate(np.log(p[x2]), np.log(q[x2]))
    assert abs(mean2 - 2 * exact) < 4 * se2


def test_kl_of_the_reference_to_itself_is_zero_and_to_another_policy_is_positive(base_policy):
    model, tok = base_policy
    env = tutor_task.TutorEnv()
    torch.manual_seed(0)
    convs = ev.play(model, tok, env, env.contexts(64, "eval", np.random.default_rng(0)), np.random.default_rng(1), 12)
    lp = ev.dialogue_logprobs(model, tok, convs, 5)
    assert lp.shape == (64, 5) and (lp < 0).all()
    assert abs(ev.kl_estimate(lp, lp)[0]) < 1e-6
    hot = ev.dialogue_logprobs(model, tok, convs, 5, temperature=2.0)  # pi_ref = mu at T=2, a different policy
    assert ev.kl_estimate(lp, hot)[0] > 0


@pytest.mark.parametrize("reply,choice,how", [
    ("Comparison: A teaches in the right style.\nPreferred: A", "A", "format"),
    ("Comparison: B is clearer.\npreferred: \"B\"", "B", "format"),
    ("Comparison: both fine\nPreferred: (B)", "B", "format"),
    ("Comparison: A is better.\nB", "B", "fallback"),
    ("I think the better one is Dialogue A.", "A", "fallback"),
    ("Dialogue A and Dialogue B are equally good.", None, "failed"),
    ("", None, "failed"),
])
def test_judge_reply_parser(reply, choice, how):
    assert chat_env.parse_judge_reply(reply) == (choice, how)


def test_llm_judge_uses_the_papers_format_and_counts_parses():
    seen = []

    def generate(prompts):
        seen.extend(prompts)
        return ["Comparison: x\nPreferred: B", "A", "no idea"]

    judge = ev.LLMJudge(generate)
    a, b = dialogues(["good"], ["bad"], ["x"]), dialogues(["bad"], ["good"], ["y"])
    assert judge(a, b).tolist() == [0.0, 1.0, 0.5]
    assert dict(judge.counts) == {"format": 1, "fallback": 1, "failed": 1}
    assert "Dialogue A:\n\nUser: hi\n\nChatbot: good" in seen[0] and 'state only "A" or "B"' in seen[0]


def test_hf_llm_judge_runs_batched_and_greedy():
    tok = chatml_tokenizer()
    judge = ev.LLMJudge(chat_env.hf_greedy_generate(tiny_llama(tok), tok, max_new_tokens=6, max_batch_size=2))
    a, b = dialogues(*[["good"]] * 3), dialogues(*[["bad"]] * 3)
    first, second = judge(a, b), judge(a, b)
    assert first.tolist() == second.tolist()  # greedy: the same verdicts twice
    assert sum(judge.counts.values()) == 6


def test_preference_matrix_is_antisymmetric():
    env = TwoTurnEnv()
    d = [dialogues(*[["good", "good"]] * 50), dialogues(*[["bad", "good"]] * 50), dialogues(*[["bad", "bad"]] * 50)]
    M = ev.preference_matrix(d, ev.ScoreJudge(env.reward), np.random.default_rng(0))
    assert M[0, 1] == 1.0 and M[1, 2] == 1.0 and M[2, 0] == 0.0
    assert np.allclose(M + M.T, 1.0)
    assert "| row beats column | a | b | c |" in ev.matrix_table(["a", "b", "c"], M)


def test_tables_have_as_many_columns_in_every_line():
    row = dict(name="pi", win_rate=dict(per_turn=[0.25, 0.5], average=0.375, average_ci=0.05), reward=0.5,
               fraction_of_v_star=None, kl=1.25)
    table = ev.results_table([row], H=2)
    assert table.splitlines()[2] == "| pi | 25.0 | 50.0 | 37.5 ± 5.0 | 0.500 | - | 1.25 |"
    for t in (table, ev.matrix_table(["a", "b"], np.array([[0.5, 0.75], [0.25, 0.5]]))):
        assert len({line.count("|") for line in t.splitlines()}) == 1, t


def test_cli_on_the_tutor_task(tmp_path, base_policy):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "evaluate.py", "--policies", "tutor", "--names", "mu", "--num_contexts", "128",
           "--matrix", "--output", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| mu |" in p.stdout and "row beats column" in p.stdout
    r = json.loads(out.read_text())
    row = r["rows"][0]
    assert abs(row["kl"]) < 1e-4  # mu against itself
    assert row["fraction_of_v_star"] == pytest.approx(row["reward"] / 0.8050, rel=1e-3)
    assert 0.25 < row["win_rate"]["average"] < 0.75 and len(row["win_rate"]["per_turn"]) == 5
    bad = subprocess.run([sys.executable, "evaluate.py", "--judge", "llm"], cwd=ROOT, capture_output=True,
                         text=True, env=subprocess_env(), timeout=600)
    assert bad.returncode != 0 and "--judge_model" in bad.stderr


def test_a_policys_row_does_not_depend_on_the_other_policies_evaluated(base_policy):
    """Its sampling seeds follow its name: evaluated alone or after another policy, the same row (they used to
    follow its place in the list, so adding a run to a study moved every later run's numbers)."""
    import evaluate as ev

    alone = ev.evaluate(ev.Args(policies=["tutor"], names=["b"], num_contexts=16))["rows"][0]
    second = ev.evaluate(ev.Args(policies=["tutor", "tutor"], names=["a", "b"], num_contexts=16))["rows"]
    assert second[1]["reward"] == alone["reward"] and second[1]["win_rate"] == alone["win_rate"]
    assert second[0]["win_rate"] != alone["win_rate"]  # another name, another draw


def test_judge_preference_averages_both_orders():
    calls = []

    def always_a(prompts):  # a judge with total position bias
        calls.append(len(prompts))
        return ["Comparison: first.\nPreferred: A"] * len(prompts)

    pref = chat_env.JudgePreference(always_a)
    a, b = dialogues(["good"], ["bad"]), dialogues(["bad"], ["good"])
    assert pref(a, b).tolist() == [0.5, 0.5] and calls == [4]  # both orders, in one batched call

    def knows_good(prompts):
        return ["Preferred: A" if p.split("Dialogue B:")[0].count("good") > p.split("Dialogue B:")[1].count("good")
                else "Preferred: B" for p in prompts]

    env = TwoTurnEnv()
    env.judge = chat_env.JudgePreference(knows_good)
    assert env.preference(a, b).tolist() == [1.0, 0.0]


def test_cli_with_a_reward_model_judge(tmp_path, base_policy):
    """--judge reward_model: an HF sequence-classification model (tiny, random init, saved here) judges each turn."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "evaluate.py", "--policies", "tutor", "--names", "mu", "--num_contexts", "32",
           "--judge", "reward_model", "--judge_model", str(tmp_path / "rm"), "--output", str(out)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["judge"] == "reward_model"
    per_turn = r["rows"][0]["win_rate"]["per_turn"]
    assert len(per_turn) == 5 and all(0.0 <= w <= 1.0 for w in per_turn)
    cmd[cmd.index(str(tmp_path / "rm"))] = str(tmp_path / "no_such_rm")
    bad = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert bad.returncode != 0 and "could not load reward model" in bad.stderr and "no local folder" in bad.stderr


def test_dialogues_shorter_than_h_max_are_judged_on_their_own_turns(base_policy):
    """Setting two: a record's dialogue has its own number of turns; turns past it are not compared (NaN), the
    per-turn rates and the average read only the turns played, and the KL sums only the turns that exist."""
    env = TwoTurnEnv()
    pi, ref = dialogues(["good"], ["good", "bad"]), dialogues(["bad"], ["bad", "bad"])
    wins = ev.judge_turns(ev.ScoreJudge(env.reward), pi, ref, env, np.random.default_rng(0))
    assert wins[0, 0] == 1.0 and np.isnan(wins[0, 1]) and wins[1].tolist() == [1.0, 1.0]
    w = ev.win_rates(wins)
    assert w["per_turn"] == [1.0, 1.0] and w["average"] == 1.0
    mu, tok = base_policy
    convs = [tutor_task.TutorEnv().reference_dialogues(1, np.random.default_rng(s), n)[0] for s, n in ((0, 2), (1, 3))]
    lp = ev.dialogue_logprobs(mu, tok, convs, 3)
    assert lp.shape == (2, 3) and lp[0, 2] == 0.0 and (lp[0, :2] < 0).all() and (lp[1] < 0).all()
    full = sim.turn_logprob(mu, tok, [convs[1]] * 3, [1, 2, 3]).detach().numpy()
    np.testing.assert_allclose(lp[1], full, atol=1e-5)
