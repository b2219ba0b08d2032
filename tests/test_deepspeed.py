"""DeepSpeed ZeRO-2/3 through `accelerate launch`, on two CPU processes.

DeepSpeed's CPU accelerator (DS_ACCELERATOR=cpu) runs the real engine over gloo: partitioned parameters, the ZeRO
optimizer, engine checkpoints. The scripts ask accelerate for a gloo process group when a DeepSpeed config meets a
machine without CUDA (make_accelerator). What only a GPU shows (bf16 kernels, NCCL, memory) is not covered here."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_script, subprocess_env, summary

pytest.importorskip("deepspeed")

# the accelerate launcher with a DeepSpeed config, two processes, fp32 (CPU)
def launcher(config):
    return (sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
            "--mixed_precision", "no")


ZERO2, ZERO3 = ROOT / "configs" / "deepspeed_zero2.yaml", ROOT / "configs" / "deepspeed_zero3.yaml"
TINY = ["--prompts_per_iteration", "16", "--num_eval", "16", "--threads", "1"]

# ZeRO-3 with every parameter partitioned (the shipped config keeps tensors under 1e5 elements whole, which is every
# tensor of the tutor's 135k-parameter policy, so it would not show per-layer gathers at all)
STRICT_ZERO3_JSON = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0,
                                           "stage3_prefetch_bucket_size": 0},
                     "train_micro_batch_size_per_gpu": "auto", "train_batch_size": "auto",
                     "gradient_accumulation_steps": "auto", "gradient_clipping": "auto"}
STRICT_ZERO3_YAML = """compute_environment: LOCAL_MACHINE
distributed_type: DEEPSPEED
deepspeed_config:
  deepspeed_config_file: {json}
  zero3_init_flag: true
num_machines: 1
num_processes: 2
machine_rank: 0
rdzv_backend: static
same_network: true
use_cpu: false
"""

ENGINE_CHECK = r'''
import json, os, sys, threading
from pathlib import Path
sys.path.insert(0, sys.argv[1])
out_dir = Path(sys.argv[2])
import numpy as np, torch
import refuel, simulator as sim
from envs import loading, tutor_task
from plumbing import distributed, run_io
import deepspeed.comm as dcomm
from transformers import AutoModelForCausalLM

args = refuel.Args(prompts_per_iteration=8, minibatch_size=8, num_epochs=1, lr=3e-4)
accelerator = distributed.make_accelerator(args.bf16, args.gradient_accumulation_steps)
rank = accelerator.process_index
report = {"distributed_type": str(accelerator.distributed_type).split(".")[-1],
          "num_processes": accelerator.num_processes, "zero_stage": accelerator.state.deepspeed_plugin.zero_stage}
path = str(tutor_task.DEFAULT_BASE_POLICY)  # the tutor's mu, cached by the test before launch
with distributed.outside_zero3_init(accelerator):  # how the scripts load models that are not trained
    frozen = AutoModelForCausalLM.from_pretrained(path)
    report["frozen_numel"] = sum(p.numel() for p in frozen.parameters())
policy, tok = loading.load_policy(path)  # trained: under ZeRO-3 this loads straight into shards
report["policy_numel_before_prepare"] = sum(p.numel() for p in policy.parameters())
refuel.prepare_for_training(policy, args)
optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
distributed.configure_deepspeed(accelerator, 4, args.gradient_accumulation_steps, args.max_grad_norm)
model, optimizer = accelerator.prepare(policy, optimizer)
report["train_batch_size"] = model.train_batch_size()

# every all-gather DeepSpeed issues, counted once (not again for the calls one makes inside another)
calls, inside = [0], threading.local()
def counted(fn):
    def wrapper(*a, **k):
        if getattr(inside, "on", False):
            return fn(*a, **k)
        inside.on, calls[0] = True, calls[0] + 1
        try:
            return fn(*a, **k)
        finally:
            inside.on = False
    return wrapper
for name in dir(dcomm):
    if "gather" in name and callable(getattr(dcomm, name)):
        setattr(dcomm, name, counted(getattr(dcomm, name)))

convs = [[{"role": "user", "content": f"hello teacher , please teach me {t} ."}] for t in tutor_task.TOPICS[:4]]
report["gathers"], report["decoded"] = {}, {}
for budget in (2, 12):
    calls[0] = 0
    with distributed.sampling_weights(model, accelerator) as pi:  # one collection: two sampler calls
        n = budget + 5 * rank  # the ranks' decode loops stop at different steps
        lengths = [max(map(len, sim.sample_turns(pi, tok, convs, n, fast=False).token_ids)) for _ in range(2)]
    report["gathers"][budget], report["decoded"][budget] = calls[0], lengths
report["parameter_tensors"] = len(list(accelerator.unwrap_model(model).parameters()))

def step():
    turn = [c + [{"role": "assistant", "content": "let us learn with songs ."}] for c in convs]
    accelerator.backward(-sim.turn_logprob(model, tok, turn, [1] * 4).mean())
    optimizer.step()
    optimizer.zero_grad()

def weights():
    with distributed.sampling_weights(model, accelerator) as full:
        return {k: v.detach().clone() for k, v in full.state_dict().items()}

step()
saved = weights()
run_io.save_checkpoint(accelerator, model, tok, out_dir, dict(iteration=1, elapsed=0.0, pairs=0, optimizer_steps=1),
                       np.random.default_rng(0))
step()
moved = weights()
accelerator.load_state(str(out_dir / "checkpoint" / "state"))
restored = weights()
step()  # from the restored weights and optimizer state, the same step as before
again = weights()
report["moved"] = any(not torch.equal(saved[k], moved[k]) for k in saved)
report["restored"] = all(torch.equal(saved[k], restored[k]) for k in saved)
report["same_step_after_restore"] = max(float((moved[k] - again[k]).abs().max()) for k in moved)
report["ranks_in_sync"] = distributed.ranks_in_sync(model, accelerator)
(out_dir / f"rank{rank}.json").write_text(json.dumps(report))
accelerator.wait_for_everyone()
'''


def launch(cmd, tmp_path, timeout=420):
    env = subprocess_env()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_engine_gathers_once_per_collection_and_round_trips(tmp_path, stage, base_policy):
    """A ZeRO engine on two ranks: batch sizes set from Args, frozen models whole, one all-gather per parameter per
    collection however many tokens each rank decodes (no hang when the ranks' decode loops stop at different steps),
    an optimizer step, and a checkpoint whose weights and optimizer state come back."""
    if stage == 3:
        (tmp_path / "zero3.json").write_text(json.dumps(STRICT_ZERO3_JSON))
        config = tmp_path / "zero3.yaml"
        config.write_text(STRICT_ZERO3_YAML.format(json=tmp_path / "zero3.json"))
    else:
        config = ZERO2
    script = tmp_path / "engine_check.py"
    script.write_text(ENGINE_CHECK)
    launch([*launcher(config), str(script), str(ROOT), str(tmp_path)], tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    n_params = sum(p.numel() for p in base_policy[0].parameters())
    for r in ranks:
        assert r["distributed_type"] == "DEEPSPEED" and r["num_processes"] == 2 and r["zero_stage"] == stage
        assert r["frozen_numel"] == n_params  # loaded outside zero.Init: real weights on every rank
        assert r["train_batch_size"] == 4 * 2  # micro-batch x accumulation x ranks
        assert r["moved"] and r["restored"] and r["same_step_after_restore"] < 1e-6
        assert r["ranks_in_sync"]
    assert ranks[0]["decoded"] != ranks[1]["decoded"]  # the decode loops did stop at different steps
    if stage == 3:
        assert ranks[0]["policy_numel_before_prepare"] == 0  # the trained policy loads into shards
        # one all-gather per parameter tensor per collection, not per layer per token
        assert ranks[0]["gathers"] == ranks[1]["gathers"] == {"2": ranks[0]["parameter_tensors"],
                                                              "12": ranks[0]["parameter_tensors"]}
    else:
        assert ranks[0]["gathers"] == {"2": 0, "12": 0}  # ZeRO-2 keeps whole parameters


def test_refuel_under_zero3_trains_and_resumes(tmp_path, base_policy):
    """The README's ZeRO-3 command, scaled down: two iterations with the cosine schedule and Eq. (11)'s frozen pi_0,
    a checkpoint, and --resume continuing the optimizer-step count and the schedule."""
    args = ["--num_iterations", "2", "--save_every", "1", "--run_name", "z3", "--minibatch_size", "8",
            "--lr_schedule", "cosine", "--warmup_ratio", "0.25", "--gamma", "0.05", *TINY]
    run_script("refuel.py", args, tmp_path, launcher(ZERO3))
    s = summary(tmp_path, "z3")
    assert s["distributed_type"] == "DEEPSPEED" and s["num_processes"] == 2 and s["ranks_in_sync"]
    out = run_script("refuel.py", [*args, "--num_iterations", "3", "--resume"], tmp_path, launcher(ZERO3))
    assert "resumed" in out.stdout + out.stderr
    rows = [json.loads(line) for line in (tmp_path / "z3" / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in rows if "charts/optimizer_steps" in r]
    assert [r["step"] for r in trained] == [1, 2, 3]
    steps = [r["charts/optimizer_steps"] for r in trained]
    assert steps[0] > 0 and steps[0] <= steps[1] <= steps[2]
    import refuel

    for r in trained:  # the schedule of the launch that logged the row (the resumed one runs 3 iterations)
        schedule = refuel.Args(num_iterations=max(2, r["step"]), lr_schedule="cosine", warmup_ratio=0.25,
                               lr=3e-4)
        schedule.steps_per_iteration = 4  # 2 epochs x ceil(8 prompts / 4 pairs per step) per rank
        assert r["charts/lr"] == pytest.approx(refuel.get_lr(r["charts/optimizer_steps"] - 1, schedule), rel=1e-9)


@pytest.mark.parametrize("script,extra", [
    ("baselines_dpo_rebel.py", ["--loss", "dpo", "--mode", "lt-online", "--minibatch_size", "8"]),
    ("mtpo.py", ["--variant", "mtpo-tau"]),
    ("iterative_ppo.py", ["--ppo_minibatch_size", "8", "--q_minibatch_size", "8", "--q_epochs", "1"]),
])
def test_other_scripts_under_zero3(tmp_path, script, extra, base_policy):
    """One iteration of each script under the shipped ZeRO-3 config: frozen models (pi_ref, mu, Q_i, the critic)
    load whole, sampling gathers the policy once, the engine steps, the checkpoint is written."""
    run_script(script, ["--num_iterations", "1", "--run_name", "z3", *extra, *TINY], tmp_path, launcher(ZERO3))
    s = summary(tmp_path, "z3")
    assert s["distributed_type"] == "DEEPSPEED" and s["num_processes"] == 2 and s["ranks_in_sync"]
    assert (tmp_path / "z3" / "checkpoint" / "policy" / "config.json").exists()


def test_frozen_hf_models_under_zero3_on_the_chat_path(tmp_path):
    """--env chat under ZeRO-3: the HF policy loads into shards, the reward model and pi_0 whole (else their
    first forward fails on 0-element weights)."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"teach me {t} ."}],
                                           "questions": ["why ?", "go on ."]}) + "\n" for t in range(8)))
    run_script("refuel.py", ["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model",
                             str(tmp_path / "rm"), "--prompts_path", str(prompts), "--max_turns", "2",
                             "--max_new_tokens", "4", "--gamma", "0.05", "--num_iterations", "1",
                             "--minibatch_size", "8", "--run_name", "chat", *TINY, "--num_eval", "4"],
               tmp_path, launcher(ZERO3))
    s = summary(tmp_path, "chat")
    assert s["distributed_type"] == "DEEPSPEED" and s["ranks_in_sync"]


# ---------------------------------------------------------------- LoRA (plumbing/lora.py) under ZeRO
def strict_zero3(tmp_path):
    (tmp_path / "zero3.json").write_text(json.dumps(STRICT_ZERO3_JSON))
    config = tmp_path / "zero3.yaml"
    config.write_text(STRICT_ZERO3_YAML.format(json=tmp_path / "zero3.json"))
    return config


@pytest.mark.parametrize("stage", [3, pytest.param(2, marks=pytest.mark.long)])
def test_lora_under_zero_trains_resumes_and_merges(tmp_path, stage, base_policy):
    """REFUEL with LoRA on two ranks, every tensor (adapters included) partitioned under ZeRO-3: pi_0 of Eq. (11) read
    through the policy's weights with the adapters off, the adapters saved in PEFT's format, --resume, and
    --merge_on_save gathering the weights into a plain HF model."""
    pytest.importorskip("peft")
    config = strict_zero3(tmp_path) if stage == 3 else ZERO2
    args = ["--num_iterations", "1", "--save_every", "1", "--run_name", "lora", "--minibatch_size", "8", "--gamma",
            "0.05", "--lora_r", "4", "--merge_on_save", *TINY]
    run_script("refuel.py", args, tmp_path, launcher(config))
    out = run_script("refuel.py", [*args, "--num_iterations", "2", "--resume"], tmp_path, launcher(config))
    assert "resumed" in out.stdout + out.stderr
    s = summary(tmp_path, "lora")
    assert s["distributed_type"] == "DEEPSPEED" and s["ranks_in_sync"] and s["iterations"] == 2
    assert (tmp_path / "lora" / "checkpoint" / "policy" / "adapter_model.safetensors").exists()
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "lora" / "merged")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base_policy[0].parameters())


def test_iterative_ppo_lora_snapshot_under_zero3(tmp_path, base_policy):
    """Iterative PPO's pi_i with LoRA is a frozen copy of the adapters inside the policy's module: under ZeRO-3 it
    is partitioned like the rest, and taking the copy gathers and rewrites its shards on every rank."""
    pytest.importorskip("peft")
    run_script("iterative_ppo.py", ["--num_iterations", "2", "--run_name", "ppo", "--lora_r", "4",
                                    "--ppo_minibatch_size", "8", "--q_minibatch_size", "8", "--q_epochs", "1", *TINY],
               tmp_path, launcher(strict_zero3(tmp_path)))
    s = summary(tmp_path, "ppo")
    assert s["distributed_type"] == "DEEPSPEED" and s["ranks_in_sync"] and s["iterations"] == 2
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    shifts = [r["ppo/kl_new_to_pi_i"] for r in rows if "ppo/kl_new_to_pi_i" in r]  # KL(pi_{i+1} || pi_i)
    assert len(shifts) == 2 and all(0 < k < 1 for k in shifts), shifts
