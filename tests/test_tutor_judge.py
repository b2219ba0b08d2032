"""The tutor's panel judge (--tutor_judge majority, envs/tutor_judge.py): a preference cycle among three fixed
conversations, the exact machinery against hand-computed cases and against the real student, the game's Nash, the
flag, and evaluate.py's scripted Nash."""
import numpy as np
import pytest

import evaluate as ev
import simulator as sim
from envs import tutor_judge as tj
from envs import tutor_task as tt
from envs.flags import EnvArgs, make_env_from_args

STUDENT = [{"role": "user", "content": tt.GREETING.format("planets")}]


def dialogue(*turns):
    """A conversation from (teacher text, student reply) pairs."""
    conv = list(STUDENT)
    for teacher, student in turns:
        conv += [{"role": "assistant", "content": teacher}, {"role": "user", "content": student}]
    return conv


ASK, PICTURES = tt.ASK, tt.TEACH.format("pictures")


def test_the_panel_has_a_preference_cycle_among_three_conversations():
    a = dialogue((ASK, tt.NOT_SURE), (ASK, tt.NAMED.format("pictures")), (PICTURES, tt.LEARNED), (PICTURES, tt.LEARNED),
                 (PICTURES, tt.LEARNED))
    b = dialogue((PICTURES, tt.NEUTRAL), (PICTURES, tt.NEUTRAL), (PICTURES, tt.NEUTRAL), (PICTURES, tt.LEARNED),
                 (PICTURES, tt.LEARNED))
    c = dialogue((PICTURES, tt.LEARNED), (ASK, tt.NOT_SURE), (PICTURES, tt.NEUTRAL), (PICTURES, tt.NEUTRAL),
                 (PICTURES, tt.NEUTRAL))
    assert [tj.criteria(x, 5) for x in (a, b, c)] == list(tj.CYCLE)
    judge = tj.MajorityJudge(5)
    assert judge([a, b, c], [b, c, a]).tolist() == [1.0, 1.0, 1.0]  # a > b > c > a
    assert judge([b, c, a], [a, b, c]).tolist() == [0.0, 0.0, 0.0]
    # so any reward orders at most two of the three pairs as the panel does; the judge's own Bradley-Terry reward
    # (weights 1.99 a lesson, -4.36 a question, -3.82 a turn's delay) ranks c > b > a: only "c > a" agrees
    env = tj.MajorityTutorEnv()
    r = env.reward([a, b, c]).tolist()
    assert r[2] > r[1] > r[0]
    assert env.preference([a], [a]).item() == 0.5 and tj.vote((1, 0, 6), (1, 0, 6)) == 0.5


def test_exact_distributions_by_hand():
    """H = 1: teaching a style is learned with 1/4 x 0.9 + 3/4 x 0.1 = 0.3 and always beats asking (more or equal
    lessons, fewer questions, an earlier or equal first lesson); H = 2, never asking against asking once, by hand."""
    rules = tt.TutorRules(max_turns=1)
    teach = tj.outcome_distribution(lambda h: {0: 1.0}, rules)
    ask = tj.outcome_distribution(lambda h: {-1: 1.0}, rules)
    for p in rules.patience:
        assert teach[p] == pytest.approx({(1, 0, 1): 0.3, (0, 0, 2): 0.7})
        assert ask[p] == {(0, 1, 2): 1.0}
    assert tj.policy_preference(teach, ask) == 1.0 and tj.policy_preference(teach, teach) == 0.5
    rules = tt.TutorRules(max_turns=2)
    once = tj.outcome_distribution(tj.family_teacher(1), rules)
    for p in rules.patience:  # ask, then teach: learned at turn 2 with 0.7 x 0.9 (style named) + 0.3 x 0.3 (a guess)
        assert once[p] == pytest.approx({(1, 1, 2): 0.7 * 0.9 + 0.3 * 0.3, (0, 1, 3): 1 - 0.7 * 0.9 - 0.3 * 0.3})
    never = tj.outcome_distribution(tj.family_teacher(0), rules)
    # patience 1, nothing learned: the first guess right but unlearned, then a wrong one unlearned (1/4 x 0.1 x 0.9),
    # or the first guess wrong and unlearned, after which the student is asleep (3/4 x 0.9)
    assert never[1][(0, 0, 3)] == pytest.approx(0.25 * 0.1 * 0.9 + 0.75 * 0.9)
    assert tj.policy_preference(never, once) + tj.policy_preference(once, never) == pytest.approx(1.0)


def test_exact_distributions_match_the_students_dialogues():
    """The enumeration (from tutor_task's observation model) and the teachers played in text with the task's own
    student (envs.tutor_task.student_reply) agree: criteria means within 4 standard errors on 4000 dialogues."""
    env = tj.MajorityTutorEnv()
    rng = np.random.default_rng(0)
    bt_best = env.bradley_terry_optimum.policy
    for teacher in (tj.FAMILY["ask once"], bt_best, tj.reference_teacher(env.rules)):
        exact = tj.outcome_distribution(teacher, env.rules)
        convs = tj.play_teachers(env, env.contexts(4000, "eval", rng), [teacher], [1.0], rng)
        f = np.array([tj.criteria(c, 5) for c in convs], dtype=float)
        for k in range(3):
            mean = sum(q * x[k] for d in exact.values() for x, q in d.items()) / len(exact)
            assert abs(f[:, k].mean() - mean) < 4 * f[:, k].std() / np.sqrt(len(f)) + 1e-9, (k, f[:, k].mean(), mean)


def test_the_game_has_a_cycle_among_policies_and_a_nash_no_teacher_beats():
    rules = tt.TutorRules()
    d = {n: tj.outcome_distribution(t, rules) for n, t in tj.FAMILY.items()}
    never, once, until = d["never ask"], d["ask once"], d["ask until named (2)"]
    assert tj.policy_preference(never, once) > 0.5  # 0.512
    assert tj.policy_preference(once, until) > 0.5  # 0.526
    assert tj.policy_preference(until, never) > 0.5  # 0.558
    game = tj.solve_game(rules)
    nash = tj.mixture_distribution(game["dists"], game["weights"])
    assert game["exploitability"] <= 1e-3  # the exact best response over all teachers gains at most 0.001
    assert tj.best_response(nash, rules).value <= 0.5 + 1e-3
    bt = tj.BradleyTerryReward(rules)
    bt_best = tj.outcome_distribution(tj.Expectimax(lambda p, f: bt.of_criteria(f), rules).policy, rules)
    assert tj.policy_preference(bt_best, nash) < 0.5 - 1e-3  # the reward's maximiser loses head to head (0.491)
    assert bt.accuracy > 0.99  # ... though the reward orders mu's teacher's untied pairs as the panel does


def test_the_flag_and_evaluate_scripted_nash():
    env = make_env_from_args(EnvArgs(tutor_judge="majority"), 5, "cpu")
    assert isinstance(env, tj.MajorityTutorEnv) and env.optimal_value() > 0
    assert type(make_env_from_args(EnvArgs(), 5, "cpu")) is tt.TutorEnv  # the default judge unchanged
    with pytest.raises(ValueError, match="--tutor_judge is the tutor task's"):
        make_env_from_args(EnvArgs(env="gift", tutor_judge="majority"), 2, "cpu")
    with pytest.raises(ValueError, match="--scripted nash: env 'tutor' plays \\['reference'\\]"):
        ev.evaluate(ev.Args(policies=[], scripted=["nash"], num_contexts=8))
    out = ev.evaluate(ev.Args(policies=[], tutor_judge="majority", judge="preference", num_contexts=256,
                              scripted=["nash", "bradley_terry_optimal", "reference"], matrix=True))
    rows = {r["name"]: r for r in out["rows"]}
    assert set(rows) == {"nash", "bradley_terry_optimal", "reference"} and rows["nash"]["kl"] is None
    assert rows["bradley_terry_optimal"]["reward"] > rows["reference"]["reward"]
    assert rows["bradley_terry_optimal"]["metrics"]["eval/asks"] > 1.0  # it asks until the style is named
    M = np.array(out["matrix"])
    assert out["matrix_names"][:3] == ["nash", "bradley_terry_optimal", "reference"]
    np.testing.assert_allclose(M + M.T, 1.0)
    # the Nash beats the scripted reference by 0.557 exactly, and the reward's maximiser by 0.509: within 4 standard
    # errors of a rate over 256 contexts (0.5 / 16 each)
    rules = tt.TutorRules()
    game = tj.solve_game(rules)
    nash = tj.mixture_distribution(game["dists"], game["weights"])
    ref = tj.outcome_distribution(tj.reference_teacher(rules), rules)
    assert abs(M[0, 2] - tj.policy_preference(nash, ref)) < 4 * 0.5 / 16
