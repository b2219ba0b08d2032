"""plumbing/run_io.py, what a run writes and reads back: metrics by name to metrics.jsonl and (with --track) to Weights &
Biases, and checkpoints that are replaced atomically and restored whole. W&B is a fake module here (the tests never
need wandb installed, nor the network): it records what the Logger calls."""
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import refuel
from plumbing import run_io
from conftest import ROOT, subprocess_env

# a stand-in for `wandb`: init's arguments, every log call with its step, and finish, appended as JSON lines to
# $FAKE_WANDB_LOG (for a subprocess) or kept in CALLS (in this process)
FAKE_WANDB = '''
import json, os

CALLS = []


def _record(event):
    CALLS.append(event)
    if os.environ.get("FAKE_WANDB_LOG"):
        with open(os.environ["FAKE_WANDB_LOG"], "a") as f:
            f.write(json.dumps(event, default=str) + "\\n")


class Run:
    def log(self, metrics, step=None):
        _record({"call": "log", "metrics": dict(metrics), "step": step})

    def finish(self):
        _record({"call": "finish"})


def init(**kwargs):
    _record({"call": "init", **kwargs})
    return Run()
'''


@pytest.fixture
def fake_wandb(monkeypatch):
    module = types.ModuleType("wandb")
    exec(FAKE_WANDB, module.__dict__)
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("FAKE_WANDB_LOG", raising=False)
    return module


def test_logger_writes_metrics_jsonl_and_sends_them_to_wandb_by_name(tmp_path, fake_wandb):
    args = refuel.Args(track=True, wandb_project_name="proj", wandb_entity="team", run_name="r1")
    (tmp_path / "r1").mkdir()
    logger = run_io.Logger(tmp_path / "r1", args, enabled=True)
    logger.log(0, {"eval/mean_reward": 0.25})
    logger.log(1, {"losses/refuel_loss": 1.5, "charts/lr": 3e-4}, echo=False)
    logger.close()
    rows = [json.loads(line) for line in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    assert rows == [{"step": 0, "eval/mean_reward": 0.25},
                    {"step": 1, "losses/refuel_loss": 1.5, "charts/lr": 3e-4}]
    init, *logs, finish = fake_wandb.CALLS
    assert init["call"] == "init" and init["project"] == "proj" and init["entity"] == "team"
    assert init["name"] == "r1" and init["resume"] == "allow"  # a resumed run_name continues the same W&B run
    assert init["config"]["eta"] == args.eta and init["config"]["track"] is True
    assert logs == [{"call": "log", "metrics": {"eval/mean_reward": 0.25}, "step": 0},
                    {"call": "log", "metrics": {"losses/refuel_loss": 1.5, "charts/lr": 3e-4}, "step": 1}]
    assert finish == {"call": "finish"}


def test_logger_off_the_main_process_and_without_track_touches_nothing(tmp_path, fake_wandb):
    quiet = run_io.Logger(tmp_path, refuel.Args(track=True), enabled=False)  # not the main process
    quiet.log(0, {"losses/refuel_loss": 1.0})
    quiet.close()
    plain = run_io.Logger(tmp_path, refuel.Args(), enabled=True)  # no --track: wandb is not imported
    plain.log(0, {"losses/refuel_loss": 1.0}, echo=False)
    plain.close()
    assert fake_wandb.CALLS == []
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_track_without_wandb_installed_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now raises ImportError, installed or not
    with pytest.raises(ImportError, match="pip install wandb"):
        run_io.Logger(tmp_path, refuel.Args(track=True), enabled=True)


# ---------------------------------------------------------------- checkpoints
def tiny_training_setup():
    from plumbing import distributed
    from test_simulator import llama3_tokenizer, tiny_llama

    accelerator = distributed.make_accelerator(False)
    tok = llama3_tokenizer()
    model = tiny_llama(tok).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)
    ids = torch.tensor([[1, 5, 7, 9, 11, 2]])

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    weights = lambda: {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    return accelerator, model, tok, step, weights


def test_checkpoint_round_trip_atomic_replace_and_old_fallback(tmp_path):
    accelerator, model, tok, step, weights = tiny_training_setup()
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rng = np.random.default_rng(0)
    step()
    run_io.save_checkpoint(accelerator, model, tok, run_dir, dict(iteration=1, pairs=8), rng)
    step()
    saved, saved_draw = weights(), rng.random()
    run_io.save_checkpoint(accelerator, model, tok, run_dir, dict(iteration=2, pairs=16), rng,
                           extra={"notes.pt": {"seen": [1, 2]}})
    # the second save replaced the first whole: no temporary or previous copy is left behind
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    ckpt = run_dir / "checkpoint"
    assert json.loads((ckpt / "meta.json").read_text()) == dict(iteration=2, pairs=16)
    assert (ckpt / "policy" / "config.json").exists() and (ckpt / "policy" / "tokenizer.json").exists()
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(ckpt / "policy")
    assert all(torch.equal(v, saved[k]) for k, v in policy.state_dict().items())

    step()  # move on: weights, optimizer state and the numpy generator all change
    after_draw = rng.random()
    assert any(not torch.equal(v, saved[k]) for k, v in weights().items())
    meta, folder = run_io.load_checkpoint(accelerator, run_dir, rng)
    assert meta == dict(iteration=2, pairs=16) and folder == ckpt
    assert all(torch.equal(v, saved[k]) for k, v in weights().items())
    assert rng.random() == after_draw != saved_draw  # the generator continues from where the checkpoint left it
    assert torch.load(folder / "notes.pt") == {"seen": [1, 2]}

    # a crash between moving checkpoint/ aside and moving checkpoint.tmp/ in leaves only checkpoint.old/
    os.replace(ckpt, run_dir / "checkpoint.old")
    meta, folder = run_io.load_checkpoint(accelerator, run_dir, rng)
    assert meta["iteration"] == 2 and folder == run_dir / "checkpoint.old"
    run_io.save_checkpoint(accelerator, model, tok, run_dir, dict(iteration=3, pairs=24), rng)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint"]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run_io.load_checkpoint(accelerator, tmp_path / "elsewhere", rng)


# ---------------------------------------------------------------- a whole run
def test_refuel_run_with_track_reaches_wandb(tmp_path):
    """`python refuel.py --track` with a fake wandb first on PYTHONPATH: W&B gets the run's config and every logged
    row of metrics.jsonl, at its step, then finish."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "wandb.py").write_text(FAKE_WANDB)
    calls_path = tmp_path / "wandb_calls.jsonl"
    env = subprocess_env()
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["FAKE_WANDB_LOG"] = str(calls_path)
    cmd = [sys.executable, "refuel.py", "--output_dir", str(tmp_path), "--run_name", "tracked", "--track",
           "--wandb_project_name", "refuel-test", "--num_iterations", "1", "--prompts_per_iteration", "16",
           "--minibatch_size", "16", "--num_eval", "16", "--threads", "1", "--max_turns", "2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    calls = [json.loads(line) for line in calls_path.read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "tracked" / "metrics.jsonl").read_text().splitlines()]
    assert calls[0]["call"] == "init" and calls[0]["project"] == "refuel-test" and calls[0]["name"] == "tracked"
    assert calls[0]["config"]["max_turns"] == 2
    logged = [{"step": c["step"], **c["metrics"]} for c in calls if c["call"] == "log"]
    assert logged == rows and [r["step"] for r in rows] == [0, 1, 1]  # step 1: training, then its evaluation
    assert {"losses/refuel_loss", "charts/rollin_reward", "charts/lr"} <= set(rows[1])
    assert "eval/mean_reward" in rows[2]
    assert calls[-1] == {"call": "finish"}


def test_a_resume_forgets_what_the_stopped_run_wrote_after_its_checkpoint(tmp_path):
    """A run checkpointed after iteration 2 wrote on until it stopped in iteration 4: the resumed run plays
    iterations 3 and 4 again, so their metrics lines and --save_rollouts rows go (the step-2 evaluation line too when
    the checkpoint does not carry it: it is evaluated again); nothing else is touched."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    lines = [{"step": 0, "eval/mean_reward": 0.1}, {"step": 1, "losses/x": 1.0}, {"step": 2, "losses/x": 2.0},
             {"step": 2, "eval/mean_reward": 0.2}, {"step": 3, "losses/x": 3.0}, {"step": 3, "eval/mean_reward": 0.3}]
    rows = [{"iteration": i, "conv_a": [i]} for i in (0, 0, 1, 2, 2, 3)]
    for meta, kept_lines in (({"iteration": 2, "evaluation": {"eval/mean_reward": 0.2}}, lines[:4]),
                             ({"iteration": 2}, lines[:3])):
        (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
        (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        run_io.forget_lost_iterations(accelerator, tmp_path, meta, str(tmp_path / "pairs.jsonl"))
        assert [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == kept_lines
        assert [json.loads(x) for x in (tmp_path / "pairs.jsonl").read_text().splitlines()] == rows[:3]
