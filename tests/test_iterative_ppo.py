import copy
import json
import math
import sys
from collections import Counter

import numpy as np
import pytest
import torch

import iterative_ppo as ippo
import simulator as sim
from envs import tutor_task
import single_turn_ppo as stp
from conftest import TWO_CPU_PROCESSES, logged_steps, run_script, summary

TINY = ["--prompts_per_iteration", "16", "--ppo_minibatch_size", "16", "--q_minibatch_size", "16", "--num_eval", "16",
        "--q_epochs", "2", "--time_budget_minutes", "0", "--threads", "1"]


def run(args, tmp_path, launcher=(sys.executable,), timeout=600):
    return run_script("iterative_ppo.py", args, tmp_path, launcher, timeout)


@pytest.fixture
def one_thread():
    """In-process training on a shared 2-core machine: one torch thread (oversubscription is 10x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------- Observation 2: Monte Carlo returns
def test_monte_carlo_returns_by_hand():
    got = ippo.monte_carlo_returns([[0.0, 0.0, 1.0], [0.5, 0.0, 2.0], [3.0]], gamma=0.9)
    assert got[0] == pytest.approx([0.81, 0.9, 1.0])
    assert got[1] == pytest.approx([0.5 + 0.9 * 1.8, 1.8, 2.0])  # G_3 = 2, G_2 = 0 + 0.9 * 2, G_1 = 0.5 + 0.9 G_2
    assert got[2] == [3.0]
    assert ippo.monte_carlo_returns([[0.0, 1.0]], gamma=1.0) == [[1.0, 1.0]]
    with pytest.raises(FloatingPointError):
        ippo.monte_carlo_returns([[0.0, float("nan")]])


def test_q_examples_are_states_plus_responses_with_returns():
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(4, np.random.default_rng(0))
    rewards = env.reward(convs)
    ex = ippo.q_examples(convs, rewards, gamma=0.5)
    assert len(ex) == 4 * 5
    for e in ex:
        c, h = convs[e["group"]], e["h"]
        assert e["messages"][:-1] == sim.prefix_to_turn(c, h)  # s_h, as pi_i's prompt
        assert e["messages"][-1] == c[sim.assistant_turn_index(c, h)]  # y_h
        assert e["G"] == pytest.approx(0.5 ** (5 - h) * float(rewards[e["group"]]))  # reward only after turn H
    with pytest.raises(ValueError):
        ippo.q_examples([], [], 1.0)


# ---------------------------------------------------------------- step 5: the Q-model's regression
def test_fit_q_model_improves_heldout_error(base_policy, one_thread):
    _, tok = base_policy
    torch.manual_seed(0)
    q = ippo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok)
    rng = np.random.default_rng(0)
    target = {"pictures": 0.0, "stories": 0.25, "songs": 1.0, "puzzles": 0.5}
    ex = []
    for g in range(240):  # a tiny synthetic set: Q depends on the response only
        style = tutor_task.STYLES[rng.integers(4)]
        msgs = [{"role": "user", "content": tutor_task.GREETING.format(tutor_task.TOPICS[rng.integers(8)])},
                {"role": "assistant", "content": tutor_task.TEACH.format(style)}]
        ex.append(dict(messages=msgs, h=1, group=g, G=target[style]))
    stats = ippo.fit_q_model(q, tok, ex, np.random.default_rng(1), epochs=15, lr=3e-3, minibatch_size=32,
                             heldout_fraction=0.25, patience=3)
    assert stats["q/heldout_examples"] == 60 and stats["q/examples"] == 180
    assert stats["q/heldout_mse"] < 0.2 * stats["q/heldout_mse_before"] and stats["q/heldout_mse"] < 0.02, stats
    assert stats["q/reverted"] == 0.0 and stats["q/optimizer_steps"] == stats["q/epochs"] * math.ceil(180 / 32)
    pred = ippo.q_predict(q, tok, [[ex[0]["messages"][0], {"role": "assistant", "content": tutor_task.TEACH.format(s)}]
                                   for s in tutor_task.STYLES])
    assert pred.argsort().tolist() == [0, 1, 3, 2]  # pictures < stories < puzzles < songs
    with pytest.raises(ValueError):
        ippo.fit_q_model(q, tok, [], rng)
    with torch.no_grad():
        q.score.weight.fill_(float("nan"))
    with pytest.raises(FloatingPointError):
        ippo.q_predict(q, tok, [ex[0]["messages"]])


def test_fit_q_model_reports_a_revert(base_policy, one_thread):
    """--q_revert: no epoch beats the starting weights (lr 0: the held-out MSE never moves): Q comes out unchanged,
    and says so."""
    _, tok = base_policy
    torch.manual_seed(0)
    q = ippo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok)
    start = copy.deepcopy(q.state_dict())
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(8, np.random.default_rng(0), 2)
    ex = ippo.q_examples(convs, env.reward(convs), 1.0)
    stats = ippo.fit_q_model(q, tok, ex, np.random.default_rng(0), epochs=3, lr=0.0, minibatch_size=4,
                             heldout_fraction=0.25, patience=2, revert=True)
    assert stats["q/reverted"] == 1.0 and stats["q/heldout_mse"] == stats["q/heldout_mse_before"]
    assert stats["q/worse_than_before"] == 1.0
    assert stats["q/epochs"] == 2 and stats["q/optimizer_steps"] == 2 * math.ceil(12 / 4)  # 6 fitted convs x 2 turns
    for k, v in q.state_dict().items():
        torch.testing.assert_close(v, start[k], atol=0, rtol=0)


def test_fit_q_model_keeps_a_trained_epoch_by_default(base_policy, one_thread):
    """By default Q_i always comes out fitted on pi_i's data: the best trained epoch, even when the held-out
    conversations score the starting weights better (said by q/worse_than_before, not acted on)."""
    _, tok = base_policy
    torch.manual_seed(0)
    q = ippo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok)
    start = copy.deepcopy(q.state_dict())
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(8, np.random.default_rng(0), 2)
    ex = ippo.q_examples(convs, env.reward(convs), 1.0)
    # a huge step ruins the fit: every epoch is worse than the start on the held-out conversations
    stats = ippo.fit_q_model(q, tok, ex, np.random.default_rng(0), epochs=2, lr=10.0, minibatch_size=4,
                             heldout_fraction=0.25, patience=2)
    assert stats["q/worse_than_before"] == 1.0 and stats["q/reverted"] == 0.0
    assert stats["q/heldout_mse"] > stats["q/heldout_mse_before"]
    assert any(not torch.equal(v, start[k]) for k, v in q.state_dict().items())  # fitted, not reverted


def test_q_of_every_turn_from_one_forward_equals_a_forward_per_prefix(base_policy, one_thread):
    """fit_q_model reads Q(s_h, y_h) of all of a conversation's turns at their ends in one forward of the whole of
    it: the same values (and gradients' loss) as one forward per prefix s_h + y_h, in turn order."""
    _, tok = base_policy
    torch.manual_seed(0)
    q = ippo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok).eval()
    env = tutor_task.TutorEnv()
    rng = np.random.default_rng(0)
    convs = env.reference_dialogues(3, rng, 3) + env.reference_dialogues(2, rng, 5)  # conversations of 3 and 5 turns
    ex = ippo.q_examples(convs, env.reward(convs), 1.0)
    for e in ex:
        e["ids"] = sim.render_ids(tok, e["messages"], add_generation_prompt=False)
    fit, held = ippo.split_heldout(ex, 0.4, np.random.default_rng(0))
    convs_ex = fit + held
    assert len(held) == 2 and all([e["h"] for e in c] == list(range(1, len(c) + 1)) for c in convs_ex)
    rows, ends = ippo.conversation_rows(convs_ex)
    assert [len(e) for e in ends] == [len(c) for c in convs_ex]
    with torch.no_grad():
        one_forward = ippo.q_forward(q, tok, None, rows, ends)
        per_prefix = ippo.q_forward(q, tok, [e["messages"] for c in convs_ex for e in c])
    torch.testing.assert_close(one_forward, per_prefix, atol=1e-5, rtol=1e-5)
    assert one_forward.std() > 0  # a random head still separates the prefixes
    bad = [dict(convs_ex[0][0]), dict(convs_ex[0][1])]
    bad[1]["ids"] = bad[1]["ids"][:3] + [bad[1]["ids"][3] + 1] + bad[1]["ids"][4:]  # a template that rewrote turn 1
    with pytest.raises(sim.ChatTemplateError, match="prefix-consistent"):
        ippo.conversation_rows([bad])
    q.train()
    for unit, steps in (("conversation", 3), ("turn", math.ceil(sum(map(len, fit)) / 2))):  # 3 fitted conversations
        stats = ippo.fit_q_model(q, tok, ex, np.random.default_rng(0), epochs=1, minibatch_size=2,
                                 heldout_fraction=0.4, minibatch_unit=unit)
        assert stats["q/optimizer_steps"] == steps and stats["q/examples"] == sum(map(len, fit)), (unit, stats)


# ---------------------------------------------------------------- step 7: the solver (single_turn_ppo.py) by hand
def test_token_kl_and_entropy_by_hand():
    p = torch.tensor([[[0.5, 0.5, 0.0 + 1e-30], [0.9, 0.05, 0.05]]]).log()
    q = torch.tensor([[[0.25, 0.75, 1e-30], [1 / 3, 1 / 3, 1 / 3]]]).log()
    mask = torch.tensor([[1.0, 0.0]])  # the second position is padding
    kl, ent = stp.token_kl_entropy(p, q, mask)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75))
    assert ent[0, 0].item() == pytest.approx(math.log(2))
    assert kl[0, 1] == 0 and ent[0, 1] == 0
    kl, ent = stp.token_kl_entropy(q[:, 1:], q[:, 1:], torch.ones(1, 1))
    assert kl.item() == 0 and ent.item() == pytest.approx(math.log(3))



def test_ppo_clipped_loss_by_hand():
    lp = torch.tensor([[math.log(1.5), math.log(0.5), 0.0]])
    old = torch.zeros(1, 3)
    adv = torch.tensor([[1.0, 1.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    loss, clipfrac = stp.ppo_clipped_loss(lp, old, adv, mask, cliprange=0.2)
    # token 1: ratio 1.5, A = 1: max(-1.5, -1.2) = -1.2; token 2: ratio 0.5, A = 1: max(-0.5, -0.8) = -0.5
    assert loss.item() == pytest.approx((-1.2 - 0.5) / 2)
    # both ratios lie outside 1 +- 0.2, but only token 1's clipped term is in force (TRL's pg_clipfrac)
    assert clipfrac.item() == pytest.approx(0.5)
    adv_neg = torch.tensor([[-1.0, -1.0, 0.0]])
    loss, clipfrac = stp.ppo_clipped_loss(lp, old, adv_neg, mask, cliprange=0.2)
    # A = -1: token 1: max(1.5, 1.2) = 1.5; token 2: max(0.5, 0.8) = 0.8 (clipped: in force)
    assert loss.item() == pytest.approx((1.5 + 0.8) / 2) and clipfrac.item() == pytest.approx(0.5)
    v = stp.value_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]]),
                        torch.ones(1, 2), 0.2)
    # token 1: max((1-2)^2, (0.2-2)^2) = 3.24; token 2: max(1, 1) = 1
    assert v.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)


def test_token_gae_by_hand():
    r = torch.tensor([[0.1, 0.2, 1.0], [0.5, 2.0, 9.0]])
    v = torch.tensor([[0.3, 0.4, 0.6], [1.0, 0.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # row 2 has 2 tokens, then padding
    g, lam = 0.9, 0.5
    adv, ret = stp.token_gae(r, v, mask, gamma=g, lam=lam)
    d2 = 1.0 - 0.6
    d1 = 0.2 + g * 0.6 - 0.4
    d0 = 0.1 + g * 0.4 - 0.3
    a2, a1 = d2, d1 + g * lam * d2
    a0 = d0 + g * lam * a1
    assert adv[0].tolist() == pytest.approx([a0, a1, a2])
    e1 = 2.0 - 0.5  # the last real token: no bootstrap from the padding
    e0 = 0.5 + g * 0.5 - 1.0
    assert adv[1].tolist() == pytest.approx([e0 + g * lam * e1, e1, 0.0])
    torch.testing.assert_close(ret, (adv + v) * mask)


def test_ppo_rewards_and_whiten():
    q = torch.tensor([0.7, -0.2])
    lp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.1, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.2, -0.4, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    rew, kl = stp.ppo_rewards(q, lp, ref, mask, kl_coef=0.1)
    # -beta (ln pi_old - ln pi_i) per token, Q at the last real token only
    assert rew[0].tolist() == pytest.approx([-0.05, 0.0, 0.7])
    assert rew[1].tolist() == pytest.approx([0.01, -0.03 - 0.2, 0.0])
    assert kl.sum(1).tolist() == pytest.approx([0.5, 0.2])
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, 5.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    w = stp.whiten(x, m)
    vals = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert w[m.bool()].tolist() == pytest.approx(((vals - 3) / vals.var(unbiased=False).sqrt()).tolist(), abs=1e-5)
    assert w[0, 2] == 0


def test_rollout_is_batched_per_turn(base_policy, monkeypatch, one_thread):
    model, tok = base_policy
    calls = []
    real = sim.sample_turns
    monkeypatch.setattr(sim, "sample_turns", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    env, rng = tutor_task.TutorEnv(), np.random.default_rng(0)
    convs, rewards = ippo.rollout(model, tok, env, env.contexts(64, "train", rng), rng, ippo.Args())
    assert calls == [64] * 5 and len(convs) == 64 and rewards.shape == (64,)
    assert all(sum(m["role"] == "assistant" for m in c) == 5 and c[-1]["role"] == "user" for c in convs)


def test_response_logprobs_over_the_responses_span_equal_the_dense_pass(base_policy):
    """The LM head runs over the responses only; the values are those of a full forward."""
    mu, tok = base_policy
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(3, np.random.default_rng(0), 3)
    prompts = [c[:2 * k + 1] for k, c in enumerate(convs)]
    responses = [tok(c[2 * k + 1]["content"], add_special_tokens=False)["input_ids"] for k, c in enumerate(convs)]
    ids, attn, idx, mask = stp.response_batch(tok, prompts, responses)
    with torch.no_grad():
        dense = sim.token_logprobs(mu, ids, attn).gather(1, idx)
        torch.testing.assert_close(stp.response_logprobs(mu, ids, attn, idx, mask, 1.0) * mask, dense * mask,
                                   atol=1e-5, rtol=0)


def test_response_log_dists_match_the_sampled_tokens_log_probs(base_policy):
    mu, tok = base_policy
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(3, np.random.default_rng(1), 3)
    prompts = [c[:2 * k + 1] for k, c in enumerate(convs)]
    responses = [tok(c[2 * k + 1]["content"], add_special_tokens=False)["input_ids"][:2 + 2 * k]
                 for k, c in enumerate(convs)]  # lengths 2, 4, 6: padding inside the batch
    ids, attn, idx, mask = stp.response_batch(tok, prompts, responses)
    with torch.no_grad():
        logp = stp.response_log_dists(mu, ids, attn, idx, mask, 1.3)
        lp = stp.response_logprobs(mu, ids, attn, idx, mask, 1.3) * mask
    assert stp.response_tokens(ids, idx, mask)[2].tolist() == responses[2]
    got = logp.gather(2, stp.response_tokens(ids, idx, mask)[:, :, None]).squeeze(-1)
    torch.testing.assert_close(got, lp, atol=1e-5, rtol=0)
    assert logp[mask.bool()].exp().sum(-1).tolist() == pytest.approx([1.0] * int(mask.sum()), abs=1e-5)


def ppo_setup(base_policy, **kw):
    """A fresh copy of mu as both the policy and pi_i, a random-head Q and critic, and 8 first-turn prompts."""
    mu, tok = base_policy
    args = ippo.Args(**{**dict(world_size=1, ppo_minibatch_size=4, ppo_epochs=2, target_kl=0.0, lr=3e-3), **kw})
    acc = ippo.make_accelerator(args.bf16)
    torch.manual_seed(0)
    policy, ref = copy.deepcopy(mu), copy.deepcopy(mu).eval().requires_grad_(False)
    q = ippo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok)
    critic = copy.deepcopy(q)
    ippo.prepare_for_training([policy, q, critic], args)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr)
    critic_opt = torch.optim.AdamW(critic.parameters(), lr=args.q_lr)
    env = tutor_task.TutorEnv()
    prompts = [c.messages for c in env.contexts(8, "train", np.random.default_rng(0))]
    return args, acc, policy, ref, q, critic, opt, critic_opt, tok, prompts


def ppo_batch(base_policy, **kw):
    args, acc, policy, ref, q, critic, opt, critic_opt, tok, prompts = ppo_setup(base_policy, **kw)
    torch.manual_seed(1)
    score = lambda ps, texts: ippo.q_predict(q, tok, [p + [{"role": "assistant", "content": t}]
                                                      for p, t in zip(ps, texts)])  # Q as the reward model
    out = stp.ppo_step_batch(policy, ref, score, critic, critic_opt, tok, prompts, opt, acc, np.random.default_rng(0),
                             args)
    return out, policy


def test_kl_penalty_acts_in_the_first_ppo_batch(base_policy, one_thread):
    """pi_old = pi_i in the first PPO batch of an outer iteration: a KL fixed at sampling time is zero there. The KL
    to pi_i is in the loss: zero at the first minibatch, nonzero once an optimizer step has moved the policy, and it
    changes the update (the same batch with beta = 0 and beta = 1 ends at different weights)."""
    out, with_kl = ppo_batch(base_policy, kl_coef=1.0)
    assert out["ppo/kl_to_pi_i"] == 0.0  # sampling-time log-ratio: pi_old = pi_i
    assert out["ppo/kl_term_first_minibatch"] == 0.0 and out["ppo/kl_term_last_minibatch"] > 1e-6, out
    assert out["charts/optimizer_steps"] == 2 * (8 // 4)  # 2 epochs x 2 minibatches, no target-KL stop
    _, without = ppo_batch(base_policy, kl_coef=0.0)
    diff = max((a - b).abs().max().item() for a, b in zip(with_kl.parameters(), without.parameters()))
    assert diff > 1e-6
    # --kl_penalty reward: the KL is fixed at sampling time, so beta does nothing in the first batch (the old way)
    out, shaped = ppo_batch(base_policy, kl_coef=1.0, kl_penalty="reward")
    assert out["ppo/kl_term"] == 0.0
    assert all(torch.equal(a, b) for a, b in zip(shaped.parameters(), without.parameters()))
    # target-KL reads each minibatch's log-probs before its step: 0 at the first, > 0 at the second, stop after it
    out, _ = ppo_batch(base_policy, kl_coef=1.0, target_kl=1e-12)
    assert out["charts/optimizer_steps"] == 2


def test_ppo_whitens_advantages_and_adds_the_kl_term(base_policy, one_thread, monkeypatch):
    """Each minibatch's loss is the clipped surrogate on advantages whitened over the batch, plus beta x the KL to
    pi_i (a penalty: its sign pulls pi toward pi_i)."""
    args, acc, policy, ref, q, critic, opt, critic_opt, tok, prompts = ppo_setup(base_policy, kl_coef=0.7,
                                                                                ppo_minibatch_size=8, ppo_epochs=1)
    seen, losses, real_clipped, real_kl = {}, [], stp.ppo_clipped_loss, stp.token_kl_entropy

    def clipped(lp, old, adv, mask, cliprange):
        seen["adv"], seen["mask"] = adv, mask
        out = real_clipped(lp, old, adv, mask, cliprange)
        seen["pg"] = out[0]
        return out

    def kl_entropy(logp, ref_logp, mask):
        out = real_kl(logp, ref_logp, mask)
        seen["kl"] = stp.masked_mean(out[0], mask)
        return out

    monkeypatch.setattr(stp, "ppo_clipped_loss", clipped)
    monkeypatch.setattr(stp, "token_kl_entropy", kl_entropy)
    monkeypatch.setattr(acc, "backward", lambda loss: losses.append(loss) or loss.backward())
    with torch.no_grad():  # move pi off pi_i so that the KL term is not zero
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    score = lambda ps, texts: torch.arange(len(ps), dtype=torch.float32) * 10.0 + 3.0  # far from whitened
    out = stp.ppo_step_batch(policy, ref, score, critic, critic_opt, tok, prompts, opt, acc,
                             np.random.default_rng(0), args)
    adv, mask = seen["adv"], seen["mask"]
    assert stp.masked_mean(adv, mask).abs().item() < 1e-5  # whitened: mean 0, variance 1 over the batch
    assert stp.masked_mean(adv ** 2, mask).item() == pytest.approx(1.0, abs=1e-3)
    assert len(losses) == 1 and seen["kl"].item() > 1e-4
    # the surrogate reads A / sigma, so Theorem 2's beta weighs the KL as beta / sigma: (E[A] - beta KL) / sigma
    assert out["ppo/adv_std"] > 1.0 and out["ppo/kl_weight"] == pytest.approx(0.7 / out["ppo/adv_std"])
    torch.testing.assert_close(losses[0], seen["pg"] + out["ppo/kl_weight"] * seen["kl"])


def test_d_single_is_a_uniform_sample_of_the_visited_states():
    examples = [dict(messages=[{"role": "user", "content": f"{g}-{h}"}], h=h, group=g) for g in range(8)
                for h in (1, 2, 3)]  # 8 conversations x 3 turns = 24 states
    rng = np.random.default_rng(0)
    assert ippo.sample_d_single(examples, 0, rng) == examples  # 0 = every state
    assert ippo.sample_d_single(examples, 30, rng) == examples
    counts = np.zeros(len(examples))
    for _ in range(3000):
        picks = ippo.sample_d_single(examples, 8, rng)
        index = [examples.index(e) for e in picks]
        assert len(set(index)) == 8  # without replacement
        counts[index] += 1
    assert counts / 3000 == pytest.approx(np.full(24, 8 / 24), abs=0.04)  # every state drawn 1/3 of the time


def test_policy_shift_measures_kl_new_to_pi_i(base_policy, one_thread):
    args, acc, policy, ref, *_, tok, prompts = ppo_setup(base_policy)
    env = tutor_task.TutorEnv()
    convs = env.reference_dialogues(6, np.random.default_rng(2), 2)
    prompts = prompts[:4] + [sim.prefix_to_turn(c, 2) for c in convs]  # 4 first-turn and 6 second-turn states
    turns = [1] * 4 + [2] * 6
    same = stp.policy_shift(policy, ref, tok, prompts, turns, acc, args)
    assert same["ppo/kl_new_to_pi_i"] == 0.0  # pi_{i+1} = pi_i
    assert set(same) == {"ppo/kl_new_to_pi_i", "charts/entropy", "charts/entropy_turn1", "charts/entropy_turn2"}
    assert same["charts/entropy"] == pytest.approx((4 * same["charts/entropy_turn1"] + 6 * same["charts/entropy_turn2"])
                                                   / 10)
    assert 0 < same["charts/entropy_turn1"]
    with torch.no_grad():
        policy.lm_head.weight.add_(0.5 * torch.randn_like(policy.lm_head.weight))
    moved = stp.policy_shift(policy, ref, tok, prompts, turns, acc, args)
    assert moved["ppo/kl_new_to_pi_i"] > 0.01


# ---------------------------------------------------------------- the loop: the KL anchor, processes, resume
def test_kl_anchor_is_pi_i_not_mu(tmp_path, base_policy):
    """The reference log-probs of iteration i are pi_i's: at the start of each iteration's PPO they equal the sampling
    policy's own log-probs; at i = 1 they differ from mu's. Anchoring to mu would fail both checks at i = 1."""
    path = tmp_path / "ppo.jsonl"
    run(["--num_iterations", "2", "--run_name", "anchor", "--save_rollouts", str(path), "--lr", "3e-3",
         "--d_single_size", "0", "--ppo_batches", "2", "--ppo_epochs", "2", *TINY], tmp_path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert {r["iteration"] for r in rows} == {0, 1} and len(rows) == 2 * 16 * 5  # every visited state is a prompt
    mu, tok = base_policy
    for it in (0, 1):
        first = [r for r in rows if r["iteration"] == it and r["ppo_batch"] == 0]
        ids, attn, idx, mask = stp.response_batch(tok, [r["prompt"] for r in first], [r["token_ids"] for r in first])
        with torch.no_grad():
            mu_lp = (stp.response_logprobs(mu, ids, attn, idx, mask, 1.0) * mask).sum(1)
        ref = torch.tensor([r["ref_logprob"] for r in first])
        old = torch.tensor([r["old_logprob"] for r in first])
        torch.testing.assert_close(ref, old, atol=1e-4, rtol=0)  # the anchor is the policy PPO starts from
        if it == 0:
            torch.testing.assert_close(ref, mu_lp, atol=1e-4, rtol=0)  # pi_0 = mu
        else:
            assert (ref - mu_lp).abs().mean() > 1e-2  # pi_1 != mu, and the anchor follows pi_1
    later = [r for r in rows if r["iteration"] == 1 and r["ppo_batch"] == 1]
    assert np.mean([abs(r["ref_logprob"] - r["old_logprob"]) for r in later]) > 1e-3  # the policy moved from pi_1
    metrics = logged_steps(tmp_path / "anchor")
    for m in metrics[1:]:  # each outer iteration reports the real reward with the user and Q's held-out error
        assert {"eval/mean_reward", "charts/rollout_reward", "q/heldout_mse", "q/heldout_mse_before",
                "charts/outer_iterations_per_sec", "q/reverted", "q/reverted_total"} <= set(m)
        # KL(pi_{i+1} || pi_i) after the iteration's PPO, and the policy's entropy at every turn
        assert m["ppo/kl_new_to_pi_i"] > 0 and all(m[f"charts/entropy_turn{h}"] > 0 for h in range(1, 6))
        # 80 prompts in 2 PPO batches of 40: at most 2 epochs x ceil(40 / 16) steps each, at least one each
        assert 2 <= m["charts/optimizer_steps"] <= 2 * 2 * 3
    assert metrics[2]["charts/optimizer_steps_total"] == metrics[1]["charts/optimizer_steps"] + \
        metrics[2]["charts/optimizer_steps"]


def test_the_anchor_runs_in_the_policys_precision(tmp_path, base_policy):
    """With --bf16 the prepared policy runs under autocast: pi_i (a replica outside prepare) is read under the same
    autocast, so at PPO's first batch log pi_i equals log pi_old (in fp32 beside a bf16 policy they differed by
    0.024 nats per response)."""
    path = tmp_path / "rows.jsonl"
    run(["--num_iterations", "1", "--bf16", "True", "--run_name", "bf16", "--save_rollouts", str(path), *TINY],
        tmp_path)
    first = [json.loads(line) for line in path.read_text().splitlines() if json.loads(line)["ppo_batch"] == 0]
    assert first and max(abs(r["ref_logprob"] - r["old_logprob"]) for r in first) < 1e-5


def test_two_process_cpu_run_is_synced(tmp_path, base_policy):
    path = tmp_path / "ppo.jsonl"
    run(["--num_iterations", "2", "--run_name", "ddp", "--save_rollouts", str(path), *TINY], tmp_path,
        TWO_CPU_PROCESSES)
    s = summary(tmp_path, "ddp")
    assert s["num_processes"] == 2 and s["ranks_in_sync"] and s["iterations"] == 2
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    # D_single by default: as many states as conversations (16 of the 80 visited), half on each rank
    assert sorted((r["iteration"], r["rank"]) for r in rows) == sorted([(i, k) for i in (0, 1) for k in (0, 1)] * 8)


def test_checkpoint_and_resume(tmp_path, base_policy):
    run(["--num_iterations", "2", "--save_every", "1", "--run_name", "res", *TINY], tmp_path)
    ckpt = tmp_path / "res" / "checkpoint"
    assert json.loads((ckpt / "meta.json").read_text())["iteration"] == 2
    assert (ckpt / "q_model.pt").exists() and not (tmp_path / "res" / "checkpoint.tmp").exists()
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(ckpt / "policy") is not None  # what evaluate.py loads
    out = run(["--num_iterations", "3", "--run_name", "res", "--resume", *TINY], tmp_path)
    assert "resumed" in out.stdout + out.stderr
    # the checkpoint of step 2 carries its evaluation: the resumed run logs no step twice (logged_steps checks)
    assert [m["step"] for m in logged_steps(tmp_path / "res")] == [0, 1, 2, 3]
    s = summary(tmp_path, "res")
    assert s["iterations"] == 3
    run(["--num_iterations", "3", "--run_name", "res", "--resume", *TINY], tmp_path)
    again = summary(tmp_path, "res")  # resumed when finished: nothing trained or logged, the same counts
    assert again["iterations"] == 3 and again["initial_reward"] == s["initial_reward"]
    assert [m["step"] for m in logged_steps(tmp_path / "res")] == [0, 1, 2, 3]
    # the token critic and its AdamW state survive outer iterations and the resume: one critic step per policy step,
    # counted over all three iterations (a critic rebuilt from Q_i each iteration would hold only the last one's)
    metrics = [json.loads(line) for line in (tmp_path / "res" / "metrics.jsonl").read_text().splitlines()]
    per_iteration = [m["charts/optimizer_steps"] for m in metrics if "charts/optimizer_steps" in m]
    assert len(per_iteration) == 3 and s["optimizer_steps"] == sum(per_iteration)
    state = torch.load(ckpt / "q_model.pt")
    assert int(state["critic_opt"]["state"][0]["step"]) == sum(per_iteration) > per_iteration[-1]
    assert any((state["critic"][k] - v).abs().max() > 0 for k, v in state["model"].items())  # critic != Q_3


def test_chat_env_with_hf_models(tmp_path):
    """The papers' path by flags only: a local HF policy (its backbone also gives Q and the critic), an HF reward
    model, pre-sampled user turns. Tiny random-init models built here; nothing reaches the network."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello teacher , teach me {t} ."}],
                                           "questions": ["i am not sure .", "this is boring ."]}) + "\n"
                               for t in tutor_task.TOPICS))
    rows = tmp_path / "ppo.jsonl"
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--prompts_path", str(prompts), "--max_turns", "2", "--max_new_tokens", "4", "--num_iterations", "1",
         "--run_name", "chat", "--save_rollouts", str(rows), "--d_single_size", "0", *TINY, "--num_eval", "4"],
        tmp_path)
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    assert len(got) == 16 * 2 and {len(r["prompt"]) for r in got} == {1, 3}  # s_1 and s_2 as PPO prompts
    assert summary(tmp_path, "chat")["iterations"] == 1


def test_every_state_on_two_ranks_with_records_of_different_lengths(tmp_path):
    """--d_single_size 0 on 2 processes where records support 1 to 3 turns: the ranks visit different numbers of
    states, and each takes as many as the rank with fewest, so both run the same PPO minibatches (with their own
    counts the gradient all-reduces did not pair up: a hang on GPUs)."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    questions = [[], ["i am not sure ."], ["i am not sure .", "this is boring ."]]
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello teacher , teach me {t} ."}],
                                           "questions": questions[k % 3]}) + "\n"
                               for k, t in enumerate(tutor_task.TOPICS * 3)))
    rows = tmp_path / "ppo.jsonl"
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--prompts_path", str(prompts), "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "2",
         "--run_name", "uneven", "--save_rollouts", str(rows), "--d_single_size", "0", "--seed", "3", *TINY,
         "--num_eval", "4"], tmp_path, TWO_CPU_PROCESSES)
    got = Counter((r["iteration"], r["rank"]) for r in map(json.loads, rows.read_text().splitlines()))
    assert got[(0, 0)] == got[(0, 1)] and got[(1, 0)] == got[(1, 1)] and got[(0, 0)] >= 8, got
    assert summary(tmp_path, "uneven")["ranks_in_sync"]


@pytest.mark.long
@pytest.mark.parametrize("seed", [1, 2])
def test_default_run_beats_mu(tmp_path, seed, base_policy):
    """The README's claim, per seed: the default run (30 outer iterations or 10 minutes) ends above mu (0.28) by a
    margin outside noise (in-run at 512 contexts, stderr about 0.019; this code on seed 7: 0.319 -> 0.562 in 7.7
    minutes)."""
    run(["--run_name", f"long{seed}", "--seed", str(seed), "--num_eval", "1024"], tmp_path, timeout=1500)
    s = summary(tmp_path, f"long{seed}")
    assert s["final_reward"] - s["initial_reward"] > 5 * 0.015 * 2 ** 0.5, s
