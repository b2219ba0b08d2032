import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from envs import learned_reward
import mtpo
import simulator as sim
from envs import chat_env
from envs import loading
from envs import tutor_task
from conftest import ROOT, TWO_CPU_PROCESSES, logged_steps, run_script, subprocess_env, summary

TINY = ["--prompts_per_iteration", "16", "--num_eval", "32", "--threads", "1", "--value_warmup_iterations", "1"]


def run(args, tmp_path, launcher=(sys.executable,), timeout=600):
    return run_script("mtpo.py", args, tmp_path, launcher, timeout)


# ---------------------------------------------------------------- GAE, rewards, losses by hand
def test_gae_against_hand_computation():
    r = torch.tensor([[0.0, 0.0, 1.0], [-0.1, 2.0, 0.0]])
    v = torch.tensor([[0.5, 0.6, 0.7], [1.0, 0.5, 9.0]])
    m = torch.tensor([[True, True, True], [True, True, False]])  # row 2 ends after two agent turns
    adv, ret = mtpo.gae(r, v, m, gamma=1.0, lam=0.5)
    # row 1: deltas 0.1, 0.1, 0.3 -> A3 = 0.3, A2 = 0.1 + 0.5 * 0.3 = 0.25, A1 = 0.1 + 0.5 * 0.25 = 0.225
    # row 2: V = 0 after its last turn: deltas -0.6, 1.5 -> A2 = 1.5, A1 = -0.6 + 0.5 * 1.5 = 0.15; turn 3 masked
    torch.testing.assert_close(adv, torch.tensor([[0.225, 0.25, 0.3], [0.15, 1.5, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.725, 0.85, 1.0], [1.15, 2.0, 0.0]]))
    adv, _ = mtpo.gae(r, v, m)  # the paper's lambda 0.95, gamma 1
    assert adv[0, 0].item() == pytest.approx(0.1 + 0.95 * (0.1 + 0.95 * 0.3))
    adv, ret = mtpo.gae(r, v, m, lam=1.0)  # lambda = 1: Monte Carlo return minus the value
    torch.testing.assert_close(ret, torch.tensor([[1.0, 1.0, 1.0], [1.9, 2.0, 0.0]]))
    adv, _ = mtpo.gae(r, v, m, gamma=0.5, lam=0.0)  # one-step TD: r + gamma V' - V
    torch.testing.assert_close(adv, torch.tensor([[0.0 + 0.5 * 0.6 - 0.5, 0.5 * 0.7 - 0.6, 0.3],
                                                  [-0.1 + 0.5 * 0.5 - 1.0, 1.5, 0.0]]))


def test_turn_rewards_pay_next_states_kl_once():
    R = torch.tensor([0.8, 0.3])
    lr = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # sampled log pi_t/mu of each turn
    m = torch.tensor([[True, True, True], [True, True, False]])
    r = mtpo.turn_rewards(R, lr, m, alpha=0.1)
    # r_h = -a KLhat[x_{h+1}] for h < H_k, r_{H_k} = R; the first state's KL is never in the rewards
    torch.testing.assert_close(r, torch.tensor([[-0.2, -0.3, 0.8], [-0.5, 0.3, 0.0]]))


def test_policy_loss_value_and_gradient_signs():
    # one conversation, targets: [header, y1 tok, y1 tok, user, y2 tok]
    token_turn = torch.tensor([[0, 1, 1, 0, 2]])
    lp = torch.tensor([[-0.3, -1.0, -0.5, -2.0, -0.2]], requires_grad=True)
    ref = torch.tensor([[-0.3, -1.5, -0.4, -9.0, -0.7]])
    adv, m = torch.tensor([[2.0, -1.0]]), torch.tensor([[True, True]])
    loss = mtpo.policy_loss(lp, ref, token_turn, adv, m, alpha=0.1)
    # -A1 (lp1 + lp2) - A2 lp4; KL part: in-turn reward-to-go of log pi/mu: turn 1: lr = 0.5, -0.1 -> rtg 0.4, -0.1;
    # turn 2: lr 0.5 -> 0.5. Mean over the two turns.
    pg = -(2.0 * (-1.0 - 0.5) + -1.0 * -0.2)
    kl = 0.4 * -1.0 + -0.1 * -0.5 + 0.5 * -0.2
    assert loss.item() == pytest.approx((pg + 0.1 * kl) / 2)
    loss.backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[0.0, (-2.0 + 0.04) / 2, (-2.0 - 0.01) / 2, 0.0,
                                                       (1.0 + 0.05) / 2]]))
    # signs: a positive advantage raises the turn's log-prob (gradient descent), a negative one lowers it
    assert lp.grad[0, 1] < 0 and lp.grad[0, 2] < 0 and lp.grad[0, 4] > 0
    # the KL term alone pushes down tokens more likely under pi than under mu
    lp.grad = None
    mtpo.policy_loss(lp, ref, token_turn, torch.zeros(1, 2), m, alpha=1.0).backward()
    assert lp.grad[0, 1] > 0 and lp.grad[0, 4] > 0 and lp.grad[0, 0] == 0 and lp.grad[0, 3] == 0


def test_kl_term_gradient_is_unbiased_for_turn_kl():
    """Exact expectation over a two-token turn: E_y[grad of the KL term] = grad KL(pi(.|x)||mu(.|x)) of the turn."""
    torch.manual_seed(0)
    theta = torch.randn(3, requires_grad=True)  # token 1 logits; token 2's logits depend on token 1 via W
    W = torch.randn(3, 3)
    mu1, mu2 = torch.randn(3).log_softmax(0), torch.randn(3, 3).log_softmax(1)
    p1 = theta.log_softmax(0)
    p2 = (W + theta[None]).log_softmax(1)  # row = token 1
    exact = sum((p1[a] + p2[a, b]).exp() * (p1[a] + p2[a, b] - mu1[a] - mu2[a, b]) for a in range(3) for b in range(3))
    g_exact, = torch.autograd.grad(exact, theta, retain_graph=True)
    g_est = torch.zeros(3)
    for a in range(3):
        for b in range(3):
            lp = torch.stack([p1[a], p2[a, b]])[None]
            loss = mtpo.policy_loss(lp, torch.stack([mu1[a], mu2[a, b]])[None], torch.tensor([[1, 1]]),
                                    torch.zeros(1, 1), torch.tensor([[True]]), alpha=1.0)
            g, = torch.autograd.grad(loss, theta, retain_graph=True)
            g_est += (p1[a] + p2[a, b]).exp().detach() * g
    torch.testing.assert_close(g_est, g_exact, atol=1e-5, rtol=1e-4)


def test_value_loss_and_normalize():
    v = torch.tensor([[0.2, 0.9], [0.5, 7.0]], requires_grad=True)
    ret, m = torch.tensor([[1.0, 0.4], [0.5, 0.0]]), torch.tensor([[True, True], [True, False]])
    loss = mtpo.value_loss(v, ret, m)
    assert loss.item() == pytest.approx((0.64 + 0.25 + 0.0) / 3)
    loss.backward()
    assert v.grad[0, 0] < 0 and v.grad[0, 1] > 0 and v.grad[1, 1] == 0  # V moves toward its target; masked: nothing
    a = mtpo.normalize(torch.tensor([[1.0, 2.0], [3.0, 100.0]]), m)
    assert a[m].mean().abs() < 1e-6 and a[m].std().item() == pytest.approx(1.0) and a[1, 1] == 0


def test_bradley_terry_loss_by_hand():
    r_a = torch.tensor([1.0, 0.0], requires_grad=True)
    r_b = torch.tensor([0.0, 2.0], requires_grad=True)
    t = torch.tensor([1.0, 0.25])  # pair 1: a sampled label (a preferred); pair 2: a soft target p = 0.25
    loss = learned_reward.bradley_terry_loss(r_a, r_b, t)
    # d = r_a - r_b = (1, -2). Pair 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262.
    # Pair 2: -(0.25 log sigmoid(-2) + 0.75 log sigmoid(2)) = 0.25 * 2.126928 + 0.75 * 0.126928 = 0.626928.
    assert loss.item() == pytest.approx((0.313262 + 0.626928) / 2, abs=1e-6)
    assert loss.item() == pytest.approx((math.log1p(math.exp(-1)) + 0.25 * math.log1p(math.exp(2))
                                         + 0.75 * math.log1p(math.exp(-2))) / 2, rel=1e-6)
    loss.backward()
    # d loss / d r_a = (sigmoid(d) - t) / n: (0.731059 - 1) / 2, (0.119203 - 0.25) / 2; r_b gets the opposite
    torch.testing.assert_close(r_a.grad, torch.tensor([-0.134471, -0.065399]), atol=1e-6, rtol=0)
    torch.testing.assert_close(r_b.grad, -r_a.grad)
    # a binary label is -log sigmoid(r_chosen - r_rejected), whichever side the chosen one is on
    chosen_b = learned_reward.bradley_terry_loss(torch.tensor([0.3]), torch.tensor([1.1]), torch.tensor([0.0]))
    assert chosen_b.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.8))), rel=1e-6)


def test_learned_reward_flags_are_checked():
    with pytest.raises(ValueError, match="needs --variant rlhf"):
        mtpo.check_args(mtpo.Args(variant="mtpo", reward="learned"))
    with pytest.raises(ValueError, match="rm_heldout_fraction"):
        mtpo.check_args(mtpo.Args(variant="rlhf", reward="learned", rm_heldout_fraction=1.0))
    mtpo.check_args(mtpo.Args(variant="rlhf", reward="learned"))


def test_a_judge_endpoint_without_the_judge_model_is_an_error():
    """--judge_api_base alone used to be ignored: the run trained on the Bradley-Terry reward model instead."""
    with pytest.raises(ValueError, match="--judge_api_base needs --judge_model"):
        mtpo.check_args(mtpo.Args(variant="mtpo", judge_api_base="http://127.0.0.1:8000/v1"))
    mtpo.check_args(mtpo.Args(variant="mtpo", judge_api_base="http://127.0.0.1:8000/v1", judge_model="judge"))


def test_fitted_reward_model_beats_chance_on_the_tutor_task(base_policy, tmp_path):
    """r_phi fitted by the script's own path (mu's pairs, sampled oracle labels) ranks held-out pairs well above
    chance (1/2), and tracks the task's reward on fresh conversations of mu (it is never shown that reward): labels
    flipped anywhere on that path make it anti-correlated."""
    from accelerate import Accelerator

    ref, tok = base_policy
    args = mtpo.Args(variant="rlhf", reward="learned", rm_pairs=256, rm_epochs=4, rm_lr=3e-3, gen_batch_size=512,
                     lr=3e-4)
    accelerator, env = Accelerator(cpu=True), tutor_task.TutorEnv()
    rm, m = learned_reward.learned_reward_model(args, accelerator, ref, tok, env, tmp_path, mtpo.preference)
    a, b, p, rng = learned_reward.preference_pairs(ref, tok, env, args, accelerator, 3, mtpo.preference)
    assert len(a) == len(b) == 256 and all(x[0] == y[0] for x, y in zip(a, b))  # same context, two samples
    assert m["reward_model/heldout_pairs"] == 51 and m["reward_model/train_pairs"] == 205
    assert m["reward_model/heldout_accuracy"] > 0.6, m  # chance 0.5; the oracle's own ceiling about 0.73
    assert m["reward_model/heldout_untied_accuracy"] > 0.75, m
    assert m["reward_model/heldout_accuracy"] <= m["reward_model/heldout_accuracy_ceiling"] + 1e-6
    scores = rm.score(a + b)
    assert abs(scores.mean().item()) < 0.15 * scores.std().item()  # centred on mu's training conversations
    assert np.corrcoef(scores.numpy(), env.reward(a + b).numpy())[0, 1] > 0.6


# ---------------------------------------------------------------- the mixture sampler
def tiny_pair():
    from test_simulator import chatml_tokenizer, tiny_llama

    tok = chatml_tokenizer()
    pi, mu = tiny_llama(tok, seed=0), tiny_llama(tok, seed=1)
    with torch.no_grad():  # random tiny models are near uniform: sharpen them so that pi, mu and the mixture differ
        for m in (pi, mu):
            m.lm_head.weight.mul_(60.0)
    return pi, mu, tok


def mixture_logprobs(policy, ref, tok, conv, tokens, tau, temperature):
    """Teacher-forced, cache-less: log softmax(((1 - tau) logits_pi + tau logits_mu) / T) of each sampled token."""
    prompt = sim.render_ids(tok, conv, add_generation_prompt=True)
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        lp, lm = policy(input_ids=ids).logits[0], ref(input_ids=ids).logits[0]
    mixed = (((1 - tau) * lp + tau * lm) / temperature).log_softmax(-1)[len(prompt) - 1: -1]
    return mixed.gather(1, torch.tensor(tokens)[:, None]).squeeze(1), mixed[0]


def test_mixture_sampler_next_token_distribution_is_the_geometric_mixture():
    policy, ref, tok = tiny_pair()
    conv = [{"role": "user", "content": "hello teacher , please teach me planets ."}]
    tau, T, n = 0.4, 0.8, 20000
    torch.manual_seed(0)
    out = mtpo.mixture_sample_turns(policy, ref, tok, [conv] * n, max_new_tokens=1, temperature=T, tau=tau,
                                    max_batch_size=n)
    _, logp = mixture_logprobs(policy, ref, tok, conv, [0], tau, T)
    want = logp.exp()
    # the same distribution from the two models' normalised log-probs: pi^(1-tau) mu^tau / Z
    with torch.no_grad():
        ids = torch.tensor([sim.render_ids(tok, conv, add_generation_prompt=True)])
        a = (policy(input_ids=ids).logits[0, -1] / T).log_softmax(-1)
        b = (ref(input_ids=ids).logits[0, -1] / T).log_softmax(-1)
    torch.testing.assert_close(want, ((1 - tau) * a + tau * b).softmax(-1), atol=1e-6, rtol=1e-5)
    counts = torch.bincount(torch.tensor([t[0] for t in out.token_ids]), minlength=len(want)).float() / n
    assert 0.5 * (counts - want).abs().sum() < 0.03  # total variation; sampling noise is about 0.015 here
    assert (want - a.exp()).abs().max() > 0.05 and (want - b.exp()).abs().max() > 0.05  # a real mixture


@pytest.mark.parametrize("tau", [0.0, 0.3, 1.0])
def test_mixture_sampler_logprobs_match_teacher_forcing(tau):
    """The two-cache decode loop's log-probs equal a cache-less recomputation of the mixture on every sampled token,
    with conversations of different lengths in one batch (left padding); tau = 0 is pi, tau = 1 is mu."""
    policy, ref, tok = tiny_pair()
    convs = [[{"role": "user", "content": "hello teacher , please teach me planets ."}],
             [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "let us learn with songs ."},
              {"role": "user", "content": "i am not sure ."}]] * 3
    torch.manual_seed(1)
    out = mtpo.mixture_sample_turns(policy, ref, tok, convs, max_new_tokens=6, temperature=0.7, tau=tau)
    for c, toks, lps in zip(convs, out.token_ids, out.logprobs):
        want, _ = mixture_logprobs(policy, ref, tok, c, toks, tau, 0.7)
        torch.testing.assert_close(lps, want, atol=1e-5, rtol=1e-4)
        only = policy if tau == 0 else ref if tau == 1 else None
        if only is not None:
            want_single, _ = mixture_logprobs(only, only, tok, c, toks, 0.0, 0.7)
            torch.testing.assert_close(lps, want_single, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- rollouts, batches, the oracle
def test_rollout_is_batched_and_starts_from_the_beginning(base_policy, monkeypatch):
    model, tok = base_policy
    calls = []
    real = mtpo.mixture_sample_turns
    monkeypatch.setattr(mtpo, "mixture_sample_turns", lambda *a, **k: calls.append(len(a[3])) or real(*a, **k))
    env, rng, args = tutor_task.TutorEnv(), np.random.default_rng(0), mtpo.Args(lr=3e-4)
    ctx = env.contexts(32, "train", rng)
    convs, hit = mtpo.rollout(model, model, tok, env, [c.messages for c in ctx] * 2, [c.user for c in ctx] * 2, rng,
                              args, tau=0.5)
    assert calls == [64] * 5 and hit.shape == (64, 5)  # one sampler call per turn over every conversation
    assert all(len(c) == 11 and c[0] == convs[i % 32][0] for i, c in enumerate(convs))  # same context, 5 turns
    assert any(convs[i][1] != convs[i + 32][1] for i in range(32))  # the two conversations are independent


def test_conversation_batch_matches_turn_logprob(base_policy):
    """One forward per whole conversation gives the same log pi(y_h|s_h) as the per-turn computation."""
    model, tok = base_policy
    convs = tutor_task.TutorEnv().reference_dialogues(6, np.random.default_rng(2))
    ids, attn, token_turn, state_pos, m = mtpo.conversation_batch(tok, convs, 5)
    with torch.no_grad():
        lp = mtpo.per_turn(sim.token_logprobs(model, ids, attn), token_turn, 5)
        want = sim.turn_logprob(model, tok, [c for c in convs for _ in range(5)], [h for _ in convs for h in range(1, 6)])
    torch.testing.assert_close(lp.flatten(), want, atol=1e-4, rtol=1e-5)
    assert m.all() and (token_turn[torch.arange(6)[:, None], state_pos] > 0).all()  # x_h's last token precedes y_h
    ac = mtpo.ActorCritic(model, tutor_task.load_tutor_base_policy()[0].get_decoder())
    tok_lp, v = ac(ids, attn, state_pos)
    assert v.shape == (6, 5) and torch.allclose(v, torch.full_like(v, 0.5))  # head starts at 0.5


@pytest.mark.parametrize("value_backbone", ["separate", "shared"])
def test_policy_and_value_gradients_are_clipped_apart(base_policy, value_backbone):
    """A large value gradient leaves the policy's step alone: each part clipped to --max_grad_norm by itself (one
    group when the value head reads the policy's own backbone)."""
    from accelerate import Accelerator

    policy = tutor_task.load_tutor_base_policy()[0]  # mu, built once by the base_policy fixture
    ac = mtpo.ActorCritic(policy, policy.get_decoder().__class__(policy.config) if value_backbone == "separate"
                          else None)
    for name, p in ac.named_parameters():
        p.grad = torch.full_like(p, 1e-5 if name.startswith("policy.") else 10.0)
    policy_before = [p.grad.clone() for p in ac.policy.parameters()]
    norms = mtpo.clip_gradients(ac, Accelerator(cpu=True), max_norm=1.0)
    value_grads = [p.grad for n, p in ac.named_parameters() if not n.startswith("policy.")]
    if value_backbone == "separate":
        assert len(norms) == 2 and norms[0] < 1.0 < norms[1]
        assert all(torch.equal(p.grad, g) for p, g in zip(ac.policy.parameters(), policy_before))  # untouched
        assert torch.linalg.vector_norm(torch.cat([g.flatten() for g in value_grads])).item() == pytest.approx(1.0, rel=1e-4)
    else:
        assert len(norms) == 1 and all((p.grad < 1e-5).all() for p in ac.policy.parameters())


def test_preference_oracle_checks_and_judge_averages_orders():
    env = tutor_task.TutorEnv()
    a = env.reference_dialogues(4, np.random.default_rng(0))
    b = env.reference_dialogues(4, np.random.default_rng(1))
    p = mtpo.preference(env, a, b)
    torch.testing.assert_close(p, torch.sigmoid(4 * (env.reward(a) - env.reward(b))))
    env.preference = lambda x, y: torch.full((len(x),), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        mtpo.preference(env, a, b)
    env = tutor_task.TutorEnv()
    env.judge = chat_env.JudgePreference(lambda prompts: ["Comparison: x\nPreferred: A"] * len(prompts))  # position bias
    torch.testing.assert_close(mtpo.preference(env, a, b), torch.full((4,), 0.5))  # both orders cancel it


def test_chat_env_with_hf_models_and_a_prompted_judge(tmp_path):
    """The papers' path by flags only: a local HF policy, an HF reward model, pre-sampled user turns, and a prompted
    judge model as the preference oracle (--judge_model). Tiny random-init models; nothing reaches the network."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello teacher , teach me {t} ."}],
                                           "questions": ["i am not sure .", "this is boring ."]}) + "\n"
                               for t in tutor_task.TOPICS))
    chat = ["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
            "--prompts_path", str(prompts), "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "1",
            *TINY, "--num_eval", "4", "--prompts_per_iteration", "4"]
    run([*chat, "--variant", "rlhf", "--run_name", "chat_rlhf"], tmp_path)
    judge = [*chat, "--variant", "mtpo", "--run_name", "chat_judge", "--judge_model", str(tmp_path / "policy")]
    # a random judge's replies do not parse: the run stops, naming the problem, instead of training on ties
    failed = subprocess.run([sys.executable, "mtpo.py", "--output_dir", str(tmp_path), *judge], cwd=ROOT,
                            capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert failed.returncode != 0 and "the judge's verdicts did not parse" in failed.stderr
    run([*judge, "--judge_max_unparsed", "1.0"], tmp_path)
    for name in ("chat_rlhf", "chat_judge"):
        assert summary(tmp_path, name)["iterations"] == 1
    logged = [json.loads(line) for line in (tmp_path / "chat_judge" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in logged if "charts/judge_unparsed_rate" in r]
    assert trained and trained[-1]["charts/judge_unparsed_rate"] == 1.0  # counted, not silent
    assert trained[-1]["charts/judge_unparsed_rate_eval"] == 1.0  # the evaluation's verdicts, apart
    # allowed to, every verdict is a tie, so p = 1/2 exactly
    rows = [json.loads(line) for line in (tmp_path / "chat_judge" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/win_rate_vs_mu"] == 0.5 and rows[1]["charts/abs_pref_margin"] == 0.0


def test_education_dialogue_with_an_hf_student_and_a_prompted_judge(tmp_path):
    """MTPO on Education Dialogue by flags only: the dataset's JSON list, a local HF model prompted as the student
    (--user_model, who sees the record's hidden learning preferences), an HF reward model and a prompted judge."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    data = tmp_path / "conversations_train1.json"
    data.write_text(json.dumps([{"background_info": {"topic": t, "student_prefrences": "story telling",
                                                     "student_reactions": "and gets anxious otherwise"},
                                 "conversation": [{"role": "Teacher", "text": "hello ."},
                                                  {"role": "Student", "text": "hi ."}]} for t in tutor_task.TOPICS]))
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--user_model", str(tmp_path / "policy"), "--judge_model", str(tmp_path / "policy"), "--prompts_path",
         str(data), "--max_turns", "2", "--max_new_tokens", "4", "--num_iterations", "1", *TINY, "--num_eval", "4",
         "--prompts_per_iteration", "4", "--variant", "mtpo", "--run_name", "edu", "--judge_max_unparsed", "1.0"],
        tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "edu" / "metrics.jsonl").read_text().splitlines()]
    assert any("charts/user_parse_fallback_rate" in m for m in metrics)
    assert summary(tmp_path, "edu")["iterations"] == 1


# ---------------------------------------------------------------- the loop: processes, resume, learning
def test_two_process_cpu_run_is_synced(tmp_path, base_policy):
    launcher = TWO_CPU_PROCESSES
    run(["--variant", "mtpo-tau", "--num_iterations", "2", "--run_name", "ddp", *TINY], tmp_path, launcher)
    s = summary(tmp_path, "ddp")
    assert s["num_processes"] == 2 and s["ranks_in_sync"] and s["iterations"] == 2


def test_two_process_learned_reward_model_is_the_same_on_every_rank(tmp_path, base_policy):
    """Each rank samples and fits on its own pairs, gradients averaged: every rank ends with one r_phi, and the
    held-out accuracy counts both ranks' held-out pairs."""
    run(["--variant", "rlhf", "--reward", "learned", "--rm_pairs", "64", "--rm_epochs", "1", "--num_iterations", "1",
         "--run_name", "ddp_rm", *TINY], tmp_path, TWO_CPU_PROCESSES)
    s = summary(tmp_path, "ddp_rm")
    assert s["num_processes"] == 2 and s["ranks_in_sync"] and s["reward_model_ranks_in_sync"]
    row = json.loads((tmp_path / "ddp_rm" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["reward_model/heldout_pairs"] == 2 * 6 and row["reward_model/train_pairs"] == 2 * 26


def test_checkpoint_resume_and_loadable_policy(tmp_path, base_policy):
    run(["--variant", "rlhf", "--num_iterations", "2", "--save_every", "1", "--run_name", "res", *TINY], tmp_path)
    ckpt = tmp_path / "res" / "checkpoint"
    assert json.loads((ckpt / "meta.json").read_text())["iteration"] == 2
    out = run(["--variant", "rlhf", "--num_iterations", "3", "--run_name", "res", "--resume", *TINY], tmp_path)
    assert "resumed" in out.stdout + out.stderr
    steps = [m["step"] for m in logged_steps(tmp_path / "res")]  # no step logged twice (logged_steps checks)
    assert steps == [0, 1, 2, 3]
    s = summary(tmp_path, "res")
    assert s["iterations"] == 3 and {"initial_reward", "final_reward", "minutes", "ranks_in_sync"} <= set(s)
    run(["--variant", "rlhf", "--num_iterations", "3", "--run_name", "res", "--resume", *TINY], tmp_path)
    again = summary(tmp_path, "res")  # resumed when finished: nothing trained or logged, the same counts
    assert again["iterations"] == 3 and again["initial_reward"] == s["initial_reward"]
    assert [m["step"] for m in logged_steps(tmp_path / "res")] == steps
    trained, _ = loading.load_policy(str(ckpt / "policy"))  # what evaluate.py loads
    mu, _ = base_policy
    assert any(not torch.equal(p, q) for p, q in zip(trained.parameters(), mu.parameters()))


def test_rlhf_with_a_learned_reward_runs_end_to_end(tmp_path, base_policy):
    """--variant rlhf --reward learned: r_phi is fitted on mu's pairs, logged at step 0, optimised in place of the
    environment's reward (whose value is still logged), saved with the run, and reloaded, not refitted, on resume.
    Here on the tutor judged by the panel (--tutor_judge majority), whose preference no reward represents: r_phi's
    accuracy on it is measured and logged."""
    learned = ["--variant", "rlhf", "--reward", "learned", "--rm_pairs", "64", "--rm_epochs", "1",
               "--run_name", "rmrl", "--save_every", "1", "--tutor_judge", "majority", *TINY]
    out = run([*learned, "--num_iterations", "2"], tmp_path)
    assert "reward model:" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (tmp_path / "rmrl" / "metrics.jsonl").read_text().splitlines()]
    assert 0 <= rows[0]["reward_model/heldout_accuracy"] <= rows[0]["reward_model/heldout_accuracy_ceiling"] <= 1
    assert rows[0]["reward_model/train_pairs"] == 51 and "eval/asks" in rows[-1]  # the panel's criteria logged
    assert "charts/true_reward" in rows[1] and "eval/rm_reward" in rows[-1]
    s = summary(tmp_path, "rmrl")
    assert s["reward"] == "learned" and s["iterations"] == 2 and s["reward_model_ranks_in_sync"]
    assert s["reward_model_heldout_accuracy"] == rows[0]["reward_model/heldout_accuracy"]
    saved = (tmp_path / "rmrl" / "reward_model" / "model.pt").read_bytes()
    out = run([*learned, "--num_iterations", "3", "--resume"], tmp_path)
    assert "resumed" in out.stdout + out.stderr and "reward model:" not in out.stdout + out.stderr
    assert (tmp_path / "rmrl" / "reward_model" / "model.pt").read_bytes() == saved
    assert summary(tmp_path, "rmrl")["reward_model_heldout_accuracy"] == s["reward_model_heldout_accuracy"]


def test_short_mtpo_run_beats_mu(tmp_path, base_policy):
    """CI's short learning check (fixed seed, about 45 s): 15 iterations of MTPO, learning from preferences only,
    beat mu head to head under the oracle on 512 held-out contexts (measured 0.62 +- 0.014 and 0.61 on seed 2)."""
    run(["--variant", "mtpo", "--num_iterations", "15", "--eval_every", "15", "--prompts_per_iteration", "64",
         "--num_eval", "512", "--threads", "1", "--run_name", "learn", "--seed", "1"], tmp_path)
    s = summary(tmp_path, "learn")
    assert s["final_win_rate_vs_mu"] - 0.5 > 3 * s["final_win_rate_stderr"], s
    assert s["final_reward"] > s["mu_reward"], s


@pytest.mark.long
@pytest.mark.parametrize("variant", ["mtpo-tau", "mtpo", "rlhf"])
def test_default_run_beats_mu(tmp_path, variant, base_policy):
    """The README's claim per variant: the default CPU run beats mu head to head under the preference oracle on
    held-out contexts, outside noise (3 standard errors above 0.5)."""
    run(["--variant", variant, "--run_name", variant, "--seed", "1", "--threads", "1"], tmp_path, timeout=1500)
    s = summary(tmp_path, variant)
    assert s["final_win_rate_vs_mu"] - 0.5 > 3 * s["final_win_rate_stderr"], s
    assert s["final_reward"] > s["mu_reward"], s


def test_actor_critic_over_the_agent_turns_equals_the_dense_pass(base_policy):
    """The LM head runs over the agent turns' span only; their log-probs are those of a full forward."""
    _, tok = base_policy
    load = lambda: loading.load_policy(str(tutor_task.DEFAULT_BASE_POLICY))[0]
    model = mtpo.ActorCritic(load(), load().get_decoder()).eval()
    convs = tutor_task.TutorEnv().reference_dialogues(3, np.random.default_rng(1), 3)
    ids, attn, token_turn, state_pos, turn_mask = mtpo.conversation_batch(tok, convs, 3)
    with torch.no_grad():
        dense, v_dense = model(ids, attn, state_pos)
        spanned, v = model(ids, attn, state_pos, 1.0, token_turn > 0)
    agent = token_turn > 0
    torch.testing.assert_close(spanned[agent], dense[agent], atol=1e-5, rtol=0)
    torch.testing.assert_close(v, v_dense)


def test_row_chunks_keep_the_token_budget():
    class OneRank:  # accelerator.gather on a single process
        gather = staticmethod(lambda t: t)

    attn = torch.ones(10, 30, dtype=torch.long)
    chunks = mtpo.row_chunks(attn, mtpo.Args(num_minibatches=1, max_tokens_per_batch=100), OneRank())
    assert sorted(torch.cat(chunks).tolist()) == list(range(10))
    assert all(len(c) * 30 <= 100 for c in chunks) and len(chunks) == 4
    assert len(mtpo.row_chunks(attn, mtpo.Args(num_minibatches=2), OneRank())) == 2


def test_a_value_head_on_the_policys_backbone(base_policy):
    """--value_backbone shared: one trained backbone fewer; the value loss's gradient reaches the policy's layers."""
    _, tok = base_policy
    load = lambda: loading.load_policy(str(tutor_task.DEFAULT_BASE_POLICY))[0]
    separate, shared = mtpo.ActorCritic(load(), load().get_decoder()), mtpo.ActorCritic(load())
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(shared) == count(separate) - count(separate.value_backbone)
    convs = tutor_task.TutorEnv().reference_dialogues(2, np.random.default_rng(1), 2)
    ids, attn, token_turn, state_pos, turn_mask = mtpo.conversation_batch(tok, convs, 2)
    torch.nn.init.normal_(shared.value_head.weight)  # zero at initialisation, so no gradient would pass yet
    _, v = shared(ids, attn, state_pos)
    v.sum().backward()
    assert shared.policy.get_decoder().layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


def test_setting_two_records_of_few_turns_play_their_own_number_of_turns(tmp_path):
    """With pre-sampled questions a record of k user turns supports k assistant turns: MTPO's whole-conversation
    rollouts (training and evaluation) play each record's own H instead of running out of questions."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"teach me {t} ."}],
                                           "questions": ["why ?", "go on ."][:k]}) + "\n"
                               for k, t in zip([0, 1, 2] * 3, tutor_task.TOPICS)))
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--prompts_path", str(prompts), "--variant", "mtpo", "--max_turns", "3", "--max_new_tokens", "4",
         "--num_iterations", "1", "--prompts_per_iteration", "8", "--num_eval", "6", "--run_name", "s2",
         "--value_warmup_iterations", "0", "--threads", "1"], tmp_path)
    assert summary(tmp_path, "s2")["iterations"] == 1
