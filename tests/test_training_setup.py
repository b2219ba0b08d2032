"""What every script sets up before its first step: the learning-rate schedule (the same function of optimizer steps
on 1 and N processes), gradient checkpointing that recomputes, and launches that do what their config says."""
import json
import math
import os

import numpy as np
import pytest
import torch

import baselines_dpo_rebel
import iterative_ppo
import mtpo
import refuel
import simulator as sim
from envs import flags
from envs import loading
from envs import tutor_task
from conftest import TWO_CPU_PROCESSES, run_script

SCRIPTS = [refuel, baselines_dpo_rebel, mtpo, iterative_ppo]


# ---------------------------------------------------------------- the learning-rate schedule
def test_get_lr_by_hand():
    args = refuel.Args(num_iterations=2, lr=1.0, lr_schedule="cosine", warmup_ratio=0.25)
    args.steps_per_iteration = 4  # 8 steps in all, 2 of them warm-up
    lrs = [refuel.get_lr(s, args) for s in range(9)]
    assert lrs[:2] == pytest.approx([0.5, 1.0])  # linear warm-up
    assert lrs[2:] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 6)) for k in range(7)])  # cosine to 0
    assert refuel.get_lr(100, args) == pytest.approx(0.0)  # stays at 0 past the nominal end
    args.lr_schedule = "constant"
    assert [refuel.get_lr(s, args) for s in (0, 1, 2, 7)] == pytest.approx([0.5, 1.0, 1.0, 1.0])
    assert baselines_dpo_rebel.get_lr(3, args) == refuel.get_lr(3, args)


@pytest.mark.parametrize("processes", [1, 2])
def test_logged_lr_follows_the_optimizer_steps_on_1_and_2_processes(tmp_path, processes, base_policy):
    """accelerate's prepared scheduler steps once per process per optimizer step: on N processes the cosine ran N
    times too fast. The logged lr must be get_lr of the optimizer steps taken, whatever the number of processes."""
    launcher = TWO_CPU_PROCESSES if processes == 2 else None
    args = ["--num_iterations", "3", "--run_name", "lr", "--lr_schedule", "cosine", "--warmup_ratio", "0.25",
            "--prompts_per_iteration", "32", "--minibatch_size", "16", "--num_eval", "16", "--threads", "1"]
    run_script("refuel.py", args, tmp_path, *([launcher] if launcher else []))
    rows = [json.loads(line) for line in (tmp_path / "lr" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "charts/optimizer_steps" in r]
    assert len(trained) == 3
    schedule = refuel.Args(num_iterations=3, lr_schedule="cosine", warmup_ratio=0.25, lr=3e-4)
    schedule.steps_per_iteration = 4  # 2 epochs x ceil(32 / 16), the same per rank on 1 and 2 processes
    for r in trained:
        assert 0 < r["charts/optimizer_steps"] <= 4 * r["step"]
        assert r["charts/lr"] == pytest.approx(refuel.get_lr(r["charts/optimizer_steps"] - 1, schedule), rel=1e-9)


# ---------------------------------------------------------------- gradient accumulation
@pytest.mark.parametrize("script", [refuel, baselines_dpo_rebel])
def test_every_minibatch_ends_on_an_accumulation_boundary(script):
    """Each minibatch, a short last one included, is cut into exactly --gradient_accumulation_steps micro-batches
    whose weights make the minibatch's mean; accelerate's step counter then never carries micro-batches into the
    next epoch or iteration."""
    args = script.Args(minibatch_size=4, gradient_accumulation_steps=2)
    args.local_minibatch = 4
    for n in range(1, 12):
        parts = list(script.micro_batches(np.arange(n), args))
        assert len(parts) == 2 * math.ceil(n / 4)
        for k in range(0, len(parts), 2):  # one minibatch
            rows = [i for part, w in parts[k:k + 2] if w for i in part]
            size = len(rows)
            assert rows == list(range(2 * k, 2 * k + size)) and sum(w for _, w in parts[k:k + 2]) == 2
            assert all(w == len(part) * 2 / size for part, w in parts[k:k + 2] if w)


@pytest.mark.parametrize("script", [refuel, baselines_dpo_rebel])
def test_accumulated_micro_batches_take_the_step_of_the_whole_minibatch(script, base_policy):
    """One minibatch of 6 pairs as 1 or as 2 (or 4: a 1-pair part among them) accumulated micro-batches: the same
    gradient, so plain SGD takes the same step (a loss scaled twice, or micro-batch means averaged with equal weights,
    would not)."""
    import copy

    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    model, tok = base_policy
    rng = np.random.default_rng(0)
    args = script.Args(max_turns=3, prompts_per_iteration=16, num_epochs=1, lr=1.0, lr_schedule="constant",
                       warmup_ratio=0.0, max_grad_norm=0.0, **({"loss": "rebel"} if script is baselines_dpo_rebel
                                                               else {}))
    args.local_prompts = 16
    env = tutor_task.TutorEnv(tutor_task.TutorRules(max_turns=3))
    torch.manual_seed(0)
    if script is refuel:
        pairs = script.collect_pairs(model, tok, env, env.contexts(16, "train", rng), rng, args)[0][:6]
    else:
        pairs = script.collect_pairs(model, tok, env, rng, args, ref_policy=model)[0][:6]
    assert len(pairs) == 6
    steps = {}
    for accumulation in (1, 2, 4):
        AcceleratorState._reset_state(True)
        GradientState._reset_state()
        accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
        args.gradient_accumulation_steps, args.minibatch_size = accumulation, 6
        args.local_minibatch, args.steps_per_iteration = 6, 1
        policy = copy.deepcopy(model).train()
        optimizer = torch.optim.SGD(policy.parameters(), lr=1.0)
        policy, optimizer = accelerator.prepare(policy, optimizer)
        before = [p.detach().clone() for p in policy.parameters()]
        _, taken = script.train_on_pairs(policy, tok, pairs, optimizer, accelerator, np.random.default_rng(1), args, 0)
        assert taken == 1
        steps[accumulation] = torch.cat([(p.detach() - b).flatten() for p, b in zip(policy.parameters(), before)])
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    assert steps[1].abs().max() > 0
    torch.testing.assert_close(steps[2], steps[1], atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(steps[4], steps[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("script", ["refuel.py", "baselines_dpo_rebel.py"])
def test_optimizer_steps_are_whole_minibatches_with_accumulation(tmp_path, script, base_policy):
    """With --gradient_accumulation_steps 2 every iteration takes epochs x ceil(pairs / minibatch) optimizer steps
    on its own pairs: none of its micro-batches joins the next iteration's first step, none is left unapplied."""
    path = tmp_path / "pairs.jsonl"
    run_script(script, ["--num_iterations", "4", "--run_name", "ga", "--prompts_per_iteration", "12",
                        "--minibatch_size", "4", "--gradient_accumulation_steps", "2", "--num_epochs", "1",
                        "--num_eval", "8", "--threads", "1", "--save_rollouts", str(path), "--seed", "2"], tmp_path)
    pairs = [json.loads(line)["iteration"] for line in path.read_text().splitlines()]
    expected = np.cumsum([math.ceil(pairs.count(it) / 4) for it in range(4)]).tolist()
    rows = [json.loads(line) for line in (tmp_path / "ga" / "metrics.jsonl").read_text().splitlines()]
    assert [r["charts/optimizer_steps"] for r in rows if "charts/optimizer_steps" in r] == expected, \
        [pairs.count(it) for it in range(4)]


# ---------------------------------------------------------------- gradient checkpointing
def forwards_per_backward(layer, run) -> int:
    """How many times `layer`'s MLP computes in one forward + backward of `run()`. (Counted by wrapping its forward:
    torch runs a checkpointed recomputation without module hooks.)"""
    calls, forward = [], layer.mlp.forward
    layer.mlp.forward = lambda *a, **k: calls.append(1) or forward(*a, **k)
    try:
        run().backward()
    finally:
        del layer.mlp.forward
    return len(calls)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_gradient_checkpointing_recomputes_in_every_script(script, checkpointing, base_policy):
    """--gradient_checkpointing must recompute each layer in the backward pass (transformers does so only in
    training mode, and from_pretrained returns eval mode)."""
    tok = base_policy[1]
    args = script.Args(gradient_checkpointing=checkpointing)
    conv = tutor_task.TutorEnv().reference_dialogues(1, np.random.default_rng(0), 2)[0]
    load = lambda: loading.load_policy(str(tutor_task.DEFAULT_BASE_POLICY))[0]
    if script is mtpo:
        model = mtpo.prepare_for_training(mtpo.ActorCritic(load(), load().get_decoder()), args)
        ids, attn, token_turn, state_pos, turn_mask = mtpo.conversation_batch(tok, [conv], 2)
        parts = [(model.policy.get_decoder().layers[0], lambda: model(ids, attn, state_pos)[0].sum()),
                 (model.value_backbone.layers[0], lambda: model(ids, attn, state_pos)[1].sum())]
    elif script is iterative_ppo:
        policy, q = load(), iterative_ppo.build_q_model(str(tutor_task.DEFAULT_BASE_POLICY), tok)
        iterative_ppo.prepare_for_training([policy, q], args)
        parts = [(policy.get_decoder().layers[0], lambda: sim.turn_logprob(policy, tok, [conv], [1]).sum()),
                 (q.base_model.layers[0], lambda: iterative_ppo.q_forward(q, tok, [conv[:2]]).sum())]
    else:
        policy = script.prepare_for_training(load(), args)
        parts = [(policy.get_decoder().layers[0], lambda: sim.turn_logprob(policy, tok, [conv], [1]).sum())]
    for layer, run in parts:
        assert forwards_per_backward(layer, run) == (2 if checkpointing else 1)


def test_dropout_is_off_after_prepare_for_training(base_policy):
    """Training mode must not turn dropout on: old and new log-probs are the same function of the weights."""
    policy = loading.load_policy(str(tutor_task.DEFAULT_BASE_POLICY))[0]
    policy.config.attention_dropout = 0.5
    for layer in policy.get_decoder().layers:
        layer.self_attn.attention_dropout = 0.5
    refuel.prepare_for_training(policy, refuel.Args())
    assert policy.training
    tok = base_policy[1]
    conv = tutor_task.TutorEnv().reference_dialogues(1, np.random.default_rng(0), 2)[0]
    a, b = (sim.turn_logprob(policy, tok, [conv], [2]) for _ in range(2))
    assert torch.equal(a, b)


# ---------------------------------------------------------------- launches that do what their config says
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_an_fsdp_config_without_a_gpu_is_refused(script, monkeypatch, tmp_path):
    """On CPU, accelerate would run an FSDP config as plain DDP without a word. (setup makes the accelerator first,
    through distributed.make_accelerator or the script's own.)"""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP config was given but no GPU"):
        script.setup(script.Args(output_dir=str(tmp_path)))


# ---------------------------------------------------------------- flags checked after parsing
def test_chat_flags_with_the_tutor_task_are_an_error():
    """--env tutor (the default) has its own prompts, user and reward: a chat flag given with it would be ignored
    and the run would train on the tutor without a word."""
    for flag in ("user_api_base", "user_model", "reward_model", "prompts_path"):
        with pytest.raises(ValueError, match=f"--{flag} would be ignored.*--env chat"):
            flags.make_env("tutor", **{flag: "x"})
    assert flags.make_env("tutor").name == "tutor"


@pytest.mark.parametrize("script,flags,named", [
    (refuel, dict(eta=0), "--eta"), (refuel, dict(max_new_tokens=0), "--max_new_tokens"),
    (refuel, dict(max_turns=0), "--max_turns"), (refuel, dict(minibatch_size=0), "--minibatch_size"),
    (refuel, dict(gen_batch_size=0), "--gen_batch_size"), (refuel, dict(temperature=0), "--temperature"),
    (refuel, dict(num_epochs=0), "--num_epochs"), (refuel, dict(prompts_per_iteration=-1), "--prompts_per_iteration"),
    (refuel, dict(warmup_ratio=1.5), "--warmup_ratio"), (refuel, dict(max_tokens_per_batch=0), "--max_tokens_per_batch"),
    (baselines_dpo_rebel, dict(loss="dpo", beta=0), "--beta"), (baselines_dpo_rebel, dict(eta=-1), "--eta"),
    (baselines_dpo_rebel, dict(loss="dpo", gamma=0.1), "--gamma"),
    (mtpo, dict(tau=1.5), "--tau"), (mtpo, dict(variant="mtpo-tau", vllm=True), "--vllm"), (mtpo, dict(alpha=-1), "--alpha"), (mtpo, dict(num_minibatches=0), "--num_minibatches"),
    (iterative_ppo, dict(ppo_epochs=0), "--ppo_epochs"), (iterative_ppo, dict(q_heldout_fraction=0), "--q_heldout_fraction"),
    (iterative_ppo, dict(lam=1.5), "--lam"), (iterative_ppo, dict(d_single_size=257), "--d_single_size"),
    (iterative_ppo, dict(d_single_size=-1), "--d_single_size"),
    (refuel, dict(adam_eps=0), "--adam_eps"), (baselines_dpo_rebel, dict(adam_eps=-1), "--adam_eps"),
    (mtpo, dict(adam_eps=0), "--adam_eps"), (iterative_ppo, dict(adam_eps=0), "--adam_eps"),
])
def test_flags_out_of_range_are_named(script, flags, named):
    with pytest.raises(ValueError, match=named):
        script.check_args(script.Args(**flags))
    script.check_args(script.Args())  # the defaults pass


def test_a_bad_flag_stops_the_cli_before_anything_runs(tmp_path):
    import subprocess
    import sys

    from conftest import ROOT, subprocess_env

    out = subprocess.run([sys.executable, "refuel.py", "--eta", "0", "--output_dir", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, env=subprocess_env(), timeout=120)
    assert out.returncode != 0 and "--eta must be > 0" in out.stderr
    assert not any(tmp_path.iterdir())  # no run directory was made


# ---------------------------------------------------------------- the turn draws, by frequency
def test_refuel_draws_h_max_uniformly_then_h_uniformly_and_setting_two_takes_the_records_h():
    n, H_max = 40000, 5
    rng = np.random.default_rng(0)
    contexts = [sim.Context(i, [], None) for i in range(n)]
    H, h = refuel.draw_turns(contexts, rng, refuel.Args(max_turns=H_max))
    sd = math.sqrt(0.2 * 0.8 / n)
    for k in range(1, H_max + 1):
        assert abs(np.mean(H == k) - 1 / H_max) < 4 * sd  # H ~ U{1..H_max}
        hk = h[H == k]
        for j in range(1, k + 1):  # h | H ~ U{1..H}
            p = 1 / k
            assert abs(np.mean(hk == j) - p) <= 4 * math.sqrt(p * (1 - p) / len(hk))
        assert hk.max() <= k
    own = [sim.Context(i, [], None, max_turns=1 + i % 3) for i in range(3000)]  # setting two: the record's turns
    H2, h2 = refuel.draw_turns(own, rng, refuel.Args(max_turns=H_max))
    assert (H2 == [c.max_turns for c in own]).all() and ((1 <= h2) & (h2 <= H2)).all()
    for k in (2, 3):
        assert abs(np.mean(h2[H2 == k] == 1) - 1 / k) < 4 * math.sqrt((1 / k) * (1 - 1 / k) / 1000)


@pytest.mark.parametrize("mode", ["lt-offline", "lt-mixed", "lt-online", "mt-mixed"])
def test_baselines_train_the_turn_their_scheme_names(mode):
    n, rng = 30000, np.random.default_rng(1)
    args = baselines_dpo_rebel.Args(mode=mode, max_turns=5)
    drawn, u = rng.integers(1, 6, size=n), rng.random(n)
    own = [sim.Context(i, [], None, max_turns=(None if i % 2 else 1 + i % 4)) for i in range(n)]
    H, h = baselines_dpo_rebel.turns_of(own, drawn, u, args)
    assert (H == [c.max_turns or d for c, d in zip(own, drawn)]).all()  # a record's own H where it has one
    if mode != "mt-mixed":
        assert (h == H).all()  # the LT modes train the last turn
    else:
        for k in range(1, 6):
            hk = h[H == k]
            assert hk.min() >= 1 and hk.max() <= k
            assert abs(np.mean(hk == 1) - 1 / k) <= 4 * math.sqrt((1 / k) * (1 - 1 / k) / len(hk))


# ---------------------------------------------------------------- the test harness's one tolerated failure
def test_only_a_teardown_abort_after_summary_is_tolerated(tmp_path):
    import subprocess

    from conftest import GLOO_TEARDOWN_ABORT, aborted_in_teardown

    args = ["--run_name", "r", "--threads", "1"]
    crashed = subprocess.CompletedProcess([], -6, "", f"...\n{GLOO_TEARDOWN_ABORT}\nSignal 6 (SIGABRT)")
    assert not aborted_in_teardown(crashed, tmp_path, args, TWO_CPU_PROCESSES)  # no summary.json: the run failed
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "summary.json").write_text("{}")
    assert aborted_in_teardown(crashed, tmp_path, args, TWO_CPU_PROCESSES)
    assert not aborted_in_teardown(crashed, tmp_path, args, ("python",))  # one process: no gloo teardown
    other = subprocess.CompletedProcess([], 1, "", "Traceback ...\nValueError: bad")
    assert not aborted_in_teardown(other, tmp_path, args, TWO_CPU_PROCESSES)
    assert not aborted_in_teardown(crashed, tmp_path, ["--threads", "1"], TWO_CPU_PROCESSES)  # run dir unknown


def _normalise_worker(rank, port, out):
    """One rank of 2: whiten (PPO) and normalize (MTPO) on its half of a batch, through a real Accelerator."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    from accelerate import Accelerator

    import mtpo
    import single_turn_ppo as stp

    accelerator = Accelerator(cpu=True)
    halves = (torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([[3.0, 100.0, 7.0]]))
    masks = (torch.tensor([[1.0, 1.0, 0.0]]), torch.tensor([[1.0, 1.0, 1.0]]))
    x, m = halves[rank], masks[rank]
    import baselines_dpo_rebel
    import refuel

    mine = [{"rank": rank, "k": k} for k in range((5, 3)[rank])]  # 8 pairs in all, unevenly collected
    out.put((rank, stp.whiten(x, m, accelerator=accelerator).tolist(),
             mtpo.normalize(x, m.bool(), accelerator=accelerator).tolist(),
             refuel.balance_pairs(mine, accelerator), baselines_dpo_rebel.balance_pairs(mine, accelerator)))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    os._exit(0)  # skip finalisation: gloo's threads (tests/test_memory.py)


def test_two_ranks_normalise_over_the_whole_batch_and_share_the_pairs():
    """PPO's whitening and MTPO's advantage normalisation use the whole batch's mean and spread, not each rank's:
    two ranks with halves of a batch get what one process gets on all of it. balance_pairs (REFUEL, the baselines)
    gives the ranks equal, disjoint shares of every rank's pairs."""
    import socket

    import torch.multiprocessing as mp

    import mtpo
    import single_turn_ppo as stp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_normalise_worker, args=(r, port, q)) for r in (0, 1)]
    for p in procs:
        p.start()
    got = dict((r, rest) for r, *rest in (q.get(timeout=120) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    x = torch.tensor([[1.0, 2.0, 0.0], [3.0, 100.0, 7.0]])
    m = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    whole_w, whole_n = stp.whiten(x, m), mtpo.normalize(x, m.bool())
    for rank in (0, 1):
        torch.testing.assert_close(torch.tensor(got[rank][0]), whole_w[rank:rank + 1], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.tensor(got[rank][1]), whole_n[rank:rank + 1], atol=1e-5, rtol=0)
    everything = [{"rank": r, "k": k} for r in (0, 1) for k in range((5, 3)[r])]
    for script in (2, 3):  # refuel's balance_pairs, the baselines'
        shares = [got[0][script], got[1][script]]
        assert len(shares[0]) == len(shares[1]) == 4
        assert sorted(map(str, shares[0] + shares[1])) == sorted(map(str, everything))  # disjoint, all of them
