import json
import math
import sys

import numpy as np
import pytest
import torch

import baselines_dpo_rebel as bl
import refuel
import simulator as sim
from envs import tutor_task
from conftest import TWO_CPU_PROCESSES, logged_steps, run_script, summary

TINY = ["--prompts_per_iteration", "32", "--minibatch_size", "16", "--num_eval", "32", "--threads", "1"]


def run(args, tmp_path, launcher=(sys.executable,), timeout=600):
    return run_script("refuel.py", args, tmp_path, launcher, timeout)


# ---------------------------------------------------------------- Eq. (1) by hand
def test_refuel_loss_value_and_gradient():
    logp_a = torch.tensor([-1.0, -2.0], requires_grad=True)
    logp_b = torch.tensor([-1.5, -0.5], requires_grad=True)
    old_a, old_b = torch.tensor([-1.2, -1.0]), torch.tensor([-1.0, -1.0])
    r_a, r_b, eta = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.25]), 2.0
    loss = refuel.refuel_loss(logp_a, logp_b, old_a, old_b, r_a, r_b, eta)
    # Eq. (1), pair 1: ((0.2 - (-0.5)) / 2 - 0.5)^2 = (0.35 - 0.5)^2 = 0.0225
    # Eq. (1), pair 2: ((-1.0 - 0.5) / 2 - (-0.25))^2 = (-0.75 + 0.25)^2 = 0.25
    # minimised: Eq. (1) x eta, i.e. (0.7 - 2 x 0.5)^2 / 2 = 0.045 and (-1.5 - 2 x -0.25)^2 / 2 = 0.5
    assert loss.item() == pytest.approx(eta * (0.0225 + 0.25) / 2) == pytest.approx((0.045 + 0.5) / 2)
    loss.backward()
    # d/dlogp_a = 2 * (Eq. (1)'s residual) / N, whatever eta; d/dlogp_b is its negative
    assert logp_a.grad.tolist() == pytest.approx([2 * -0.15 / 2, 2 * -0.5 / 2])
    assert logp_b.grad.tolist() == pytest.approx([0.15, 0.5])
    # at pi = pi_t the gradient is -2 (r - r') / N for any eta (Eq. (1) as written gave 1/eta of it)
    for eta in (1.0, 1e3):
        at = torch.zeros(1, requires_grad=True)
        refuel.refuel_loss(at, torch.zeros(1), torch.zeros(1), torch.zeros(1), torch.tensor([0.3]),
                           torch.tensor([0.1]), eta).backward()
        assert at.grad.item() == pytest.approx(-2 * 0.2)


def test_training_rewards_shaping_and_length_penalty():
    p = dict(reward_a=1.0, reward_b=0.5, logprob_a=-1.0, logprob_b=-3.0, ref_logprob_a=-2.0, ref_logprob_b=-2.0,
             hit_budget_a=False, hit_budget_b=True)
    assert refuel.training_rewards(p) == [1.0, 0.5]
    assert refuel.training_rewards(p, gamma=0.1) == pytest.approx([1.0 - 0.1 * 1.0, 0.5 + 0.1 * 1.0])  # Eq. (11)
    assert refuel.training_rewards(p, length_penalty=-4.0) == [1.0, -4.0]
    # both: Gamma replaces side b's score, and Eq. (11) still applies to it (the authors' code)
    assert refuel.training_rewards(p, gamma=0.1, length_penalty=-4.0) == pytest.approx([0.9, -4.0 + 0.1 * 1.0])


def test_only_turn_h_carries_gradient(base_policy):
    model, tok = base_policy
    conv = tutor_task.TutorEnv().reference_dialogues(1, np.random.default_rng(0), 3)[0]
    ids, attn, mask = sim.turn_batch(tok, [conv], [2], tok.pad_token_id)
    emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=emb, attention_mask=attn).logits[:, :-1]
    lp = torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(2)
    (lp * mask[:, 1:]).sum().backward()
    # the objective is log pi(y_2|s_2): tokens after turn 2 (and padding) cannot influence it
    last = int(mask[0].nonzero().max())
    assert emb.grad[0, last + 1:].abs().sum() == 0
    assert emb.grad[0, : last].abs().sum() > 0
    assert int(mask.sum()) == len(sim.split_turn(tok, conv, 2)[1])


# ---------------------------------------------------------------- pairing invariants on a saved run
def test_saved_pairs_obey_algorithm_1(tmp_path, base_policy):
    path = tmp_path / "pairs.jsonl"
    run(["--num_iterations", "1", "--run_name", "pairs", "--save_rollouts", str(path), "--max_turns", "4", *TINY],
        tmp_path)
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    stats = [json.loads(line) for line in (tmp_path / "pairs" / "metrics.jsonl").read_text().splitlines()]
    dropped = stats[1]["charts/dropped_identical_frac"]
    assert len(pairs) == round(32 * (1 - dropped)) and len(pairs) > 5
    model, tok = base_policy
    hs = []
    for p in pairs:
        a, b, h, H = p["conv_a"], p["conv_b"], p["h"], p["H"]
        assert 1 <= h <= H <= 4
        hs.append((h, H))
        i = sim.assistant_turn_index(a, h)
        assert a[:i] == b[:i] and a[i - 1]["role"] == "user"  # identical up to and including x_h
        assert a[i]["content"] != b[i]["content"]  # y_h != y'_h
        for c in (a, b):  # both rolled out to turn H (and the student's reply to y_H, which the reward reads)
            assert sum(m["role"] == "assistant" for m in c) == H and c[-1]["role"] == "user"
        env = tutor_task.TutorEnv(tutor_task.TutorRules(max_turns=4))  # reward = lessons / (H_max - 1)
        assert env.reward([a]).item() == p["reward_a"] and env.reward([b]).item() == p["reward_b"]
    assert len({h for h, _ in hs}) > 1 and len({H for _, H in hs}) > 1 and any(h < H for h, H in hs)
    # stored log pi_t(y_h|s_h) equals a fresh forward pass of pi_t (= mu at iteration 0)
    with torch.no_grad():
        fresh = sim.turn_logprob(model, tok, [p["conv_a"] for p in pairs] + [p["conv_b"] for p in pairs],
                                 [p["h"] for p in pairs] * 2)
    stored = torch.tensor([p["logprob_a"] for p in pairs] + [p["logprob_b"] for p in pairs])
    torch.testing.assert_close(fresh, stored, atol=1e-4, rtol=0)


def test_turns_are_drawn_uniformly_and_records_keep_their_own():
    """Algorithm 1: H ~ U{1..H_max}, then h ~ U{1..H} (not h = H); setting two's contexts carry their record's own
    number of turns, which H takes (not a draw)."""
    rng = np.random.default_rng(0)
    free = [sim.Context(0, [], None, None)] * 20000
    H, h = refuel.draw_turns(free, rng, refuel.Args(max_turns=4))
    for k in (1, 2, 3, 4):
        assert abs(np.mean(H == k) - 1 / 4) < 0.02
        assert abs(np.mean(h[H == 4] == k) - 1 / 4) < 0.03  # uniform over the turns of H = 4
    assert (h <= H).all() and (h >= 1).all()
    own = [sim.Context(0, [], None, m) for m in (1, 2, 3) * 2000]
    H, h = refuel.draw_turns(own, rng, refuel.Args(max_turns=5))
    assert H.tolist() == [c.max_turns for c in own]
    assert abs(np.mean(h[H == 3] == 1) - 1 / 3) < 0.04 and (h <= H).all()
    # the baselines: the record's own H; h = H in the LT modes, h ~ U{1..H} in MT-MIXED
    H0 = np.array([5] * 6000)
    H, h = bl.turns_of(own, H0, None, bl.Args(mode="lt-offline"))
    assert H.tolist() == [c.max_turns for c in own] and (h == H).all()
    H, h = bl.turns_of(own, H0, rng.random(6000), bl.Args(mode="mt-mixed"))
    assert H.tolist() == [c.max_turns for c in own] and abs(np.mean(h[H == 3] == 2) - 1 / 3) < 0.04


def test_collect_pairs_batches_every_turn(base_policy, monkeypatch):
    """Sampler calls per collection are bounded by the number of turns, not the number of prompts."""
    model, tok = base_policy
    calls = []
    real = sim.sample_turns
    monkeypatch.setattr(sim, "sample_turns", lambda *a, **k: calls.append(len(a[2])) or real(*a, **k))
    args = refuel.Args(max_turns=5)
    env = tutor_task.TutorEnv()
    rng = np.random.default_rng(0)
    torch.manual_seed(0)
    pairs, stats = refuel.collect_pairs(model, tok, env, env.contexts(64, "train", rng), rng, args)
    assert len(calls) <= 2 * 5 and sum(calls) > 64
    assert len(pairs) == round(64 * (1 - stats["charts/dropped_identical_frac"]))


def test_paper_options_run_end_to_end(tmp_path, base_policy):
    """Eq. (11) shaping, Gamma, top-layer training, gradient checkpointing/accumulation, cosine schedule."""
    path = tmp_path / "pairs.jsonl"
    run(["--num_iterations", "1", "--run_name", "opts", "--gamma", "0.05", "--length_penalty", "-1",
         "--max_new_tokens", "7", "--train_top_layers", "1", "--gradient_checkpointing",
         "--gradient_accumulation_steps", "2", "--lr_schedule", "cosine", "--warmup_ratio", "0.1",
         "--save_rollouts", str(path), *TINY, "--prompts_per_iteration", "64"], tmp_path)
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    assert all("ref_logprob_a" in p for p in pairs)
    # pi_t = pi_0 at the first iteration, so the Eq. (11) log-ratio is zero up to numerics
    assert max(abs(p["logprob_a"] - p["ref_logprob_a"]) for p in pairs) < 1e-4
    # 7 tokens fit a lesson (6 words + end-of-turn) but not the 7-word question: those turns get Gamma
    hit = [p for p in pairs if p["hit_budget_a"] != p["hit_budget_b"]]
    assert hit and all(refuel.training_rewards(p, 0.0, -1.0)[p["hit_budget_b"]] == -1.0 for p in hit)
    from transformers import AutoModelForCausalLM

    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "opts" / "checkpoint" / "policy")
    mu, _ = base_policy
    before, after = dict(mu.named_parameters()), dict(trained.named_parameters())
    top = (".layers.1.", "model.norm.", "lm_head.", "embed_tokens.")  # the top layer, final norm, head (tied)
    assert all(torch.equal(before[k], after[k]) for k in before if not any(t in k for t in top))  # frozen below
    for part in (".layers.1.", "model.norm."):
        assert any(not torch.equal(before[k], after[k]) for k in before if part in k)


def test_generated_dialogues_over_the_token_limit_are_dropped(tmp_path, base_policy):
    """REFUEL Sec. 4.1 drops generated trajectories longer than 2,048 tokens, not only dataset records."""
    path = tmp_path / "pairs.jsonl"
    limit = 60  # tutor dialogues run 30-100 tokens
    run(["--num_iterations", "1", "--run_name", "long", "--save_rollouts", str(path), "--max_dialogue_tokens",
         str(limit), *TINY], tmp_path)
    _, tok = base_policy
    pairs = [json.loads(line) for line in path.read_text().splitlines()]
    length = lambda c: len(sim.render_ids(tok, c, add_generation_prompt=False))
    assert pairs and all(max(length(p["conv_a"]), length(p["conv_b"])) <= limit for p in pairs)
    metrics = [json.loads(line) for line in (tmp_path / "long" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[1]["charts/dropped_too_long_frac"] > 0


def test_chat_env_with_hf_models_and_presampled_questions(tmp_path):
    """The papers' path by flags only: a local HF policy, an HF reward model, a JSONL of prompts with pre-sampled
    user turns (setting two). Tiny random-init models built here; nothing reaches the network."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"hello teacher , teach me {t} ."}],
                                           "questions": ["i am not sure .", "this is boring .", "i like songs best ."]})
                               + "\n" for t in tutor_task.TOPICS))
    pairs = tmp_path / "pairs.jsonl"
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--prompts_path", str(prompts), "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "1",
         "--run_name", "chat", "--save_rollouts", str(pairs), *TINY, "--num_eval", "4"], tmp_path)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(len(p["conv_a"]) == 2 * p["H"] for p in rows)  # no user reply after y_H here
    for p in rows:  # later user turns are the pre-sampled questions, in order
        assert [m["content"] for m in p["conv_b"][2::2]] == ["i am not sure .", "this is boring ."][: p["H"] - 1]
    assert summary(tmp_path, "chat")["iterations"] == 1


def test_prompts_per_iteration_zero_passes_over_the_whole_prompt_set(tmp_path):
    """--prompts_per_iteration 0 (setting one: iterations over the whole prompt set): each iteration plays every
    training prompt once, in a new order, on 2 processes each rank its share."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"  # 20 records: ChatEnv holds out the first 2 for evaluation
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"teach me {t} number {k} ."}],
                                           "questions": ["i am not sure ."]}) + "\n"
                               for k in range(4) for t in tutor_task.TOPICS[:5]))
    pairs = tmp_path / "pairs.jsonl"
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--prompts_path", str(prompts), "--max_turns", "2", "--max_new_tokens", "4", "--num_iterations", "2",
         "--run_name", "pass", "--save_rollouts", str(pairs), "--prompts_per_iteration", "0", "--minibatch_size",
         "4", "--num_eval", "4", "--threads", "1", "--no-drop_identical"], tmp_path, TWO_CPU_PROCESSES)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    seen = {it: sorted(r["prompt_index"] for r in rows if r["iteration"] == it) for it in (0, 1)}
    assert seen[0] == seen[1] == list(range(2, 20))  # each training prompt once: the whole set, 9 per rank
    order = lambda it: [r["prompt_index"] for r in rows if r["iteration"] == it]
    assert order(0) != order(1)  # a new order each iteration


def test_setting_one_with_an_hf_user_model_on_ultrainteract_records(tmp_path):
    """REFUEL setting one by flags only: UltraInteract-format records, a local HF model prompted as the user
    (--user_model), an HF sequence-classification reward model. The user's replies come from the model, not the
    data: its reply parser is called and its fallback rate logged."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    data = tmp_path / "ultrainteract.jsonl"
    data.write_text("".join(json.dumps({"trajectory": [{"from": "user", "value": f"teach me {t} ."}],
                                        "chosen": "ok .", "rejected": "no ."}) + "\n" for t in tutor_task.TOPICS))
    pairs = tmp_path / "pairs.jsonl"
    run(["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model", str(tmp_path / "rm"),
         "--user_model", str(tmp_path / "policy"), "--prompts_path", str(data), "--dataset_format", "ultrainteract",
         "--max_dialogue_tokens", "2048", "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "1",
         "--run_name", "s1", "--save_rollouts", str(pairs), *TINY, "--num_eval", "4"], tmp_path)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows and all(len(p["conv_a"]) == 2 * p["H"] for p in rows)
    metrics = [json.loads(line) for line in (tmp_path / "s1" / "metrics.jsonl").read_text().splitlines()]
    assert any("charts/user_parse_fallback_rate" in m for m in metrics)
    assert summary(tmp_path, "s1")["iterations"] == 1


# ---------------------------------------------------------------- the loop: processes, resume, learning
def test_two_process_cpu_run_is_synced(tmp_path, base_policy):
    launcher = TWO_CPU_PROCESSES
    run(["--num_iterations", "2", "--run_name", "ddp", *TINY], tmp_path, launcher)
    s = summary(tmp_path, "ddp")
    assert s["num_processes"] == 2 and s["ranks_in_sync"] and s["iterations"] == 2


def test_checkpoint_and_resume(tmp_path, base_policy):
    run(["--num_iterations", "2", "--save_every", "1", "--run_name", "res", *TINY], tmp_path)
    ckpt = tmp_path / "res" / "checkpoint"
    assert json.loads((ckpt / "meta.json").read_text())["iteration"] == 2
    assert (ckpt / "policy" / "config.json").exists() and not (tmp_path / "res" / "checkpoint.tmp").exists()
    out = run(["--num_iterations", "3", "--run_name", "res", "--resume", *TINY], tmp_path)
    assert "resumed" in out.stdout + out.stderr
    steps = [m["step"] for m in logged_steps(tmp_path / "res")]  # no step logged twice (logged_steps checks)
    assert steps == [0, 1, 2, 3]  # the resumed run starts at iteration 2, not 0
    assert summary(tmp_path, "res")["iterations"] == 3


def test_short_run_improves_over_mu(tmp_path, base_policy):
    """CI's short learning check (fixed seed): about a minute of REFUEL lifts the mean reward clearly above mu."""
    run(["--num_iterations", "20", "--eval_every", "20", "--num_eval", "1024", "--run_name", "learn", "--seed", "1"],
        tmp_path)
    s = summary(tmp_path, "learn")
    noise = math.sqrt(2) * 0.4 / math.sqrt(1024)  # reward sd is at most ~0.4 on this task
    assert s["final_reward"] - s["initial_reward"] > 3 * noise, s


@pytest.mark.long
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_default_run_reaches_0_6(tmp_path, seed, base_policy):
    """The README's claim, per seed: the default run passes 0.6 (V* = 0.805) within its time budget."""
    run(["--run_name", f"long{seed}", "--seed", str(seed)], tmp_path, timeout=1200)
    assert summary(tmp_path, f"long{seed}")["final_reward"] >= 0.6
