"""LoRA (--lora_r, plumbing/lora.py) in every script: only the adapters train, the references equal to the initial
policy are the same weights with the adapters off (Iterative PPO's pi_i a copy of the adapters), checkpoints hold the
adapters and resume exactly, --merge_on_save and `python -m envs.loading merge` write a plain HF model, and the
runs pass on 2 processes (DDP here; DeepSpeed ZeRO-2/3 in test_deepspeed.py) and on the real SmolLM2."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, TWO_CPU_PROCESSES, logged_steps, run_script, subprocess_env, summary

pytest.importorskip("peft")

import simulator as sim  # noqa: E402
from envs.loading import load_policy  # noqa: E402
from plumbing import lora  # noqa: E402

LORA = ["--lora_r", "4", "--threads", "1"]
TINY = ["--num_iterations", "1", "--prompts_per_iteration", "16", "--num_eval", "8", *LORA]
# name: (script, flags): every script, and every reference a LoRA run reads through the policy's weights
RUNS = {
    "refuel": ("refuel", ["--gamma", "0.05", "--minibatch_size", "16", "--merge_on_save"]),  # pi_0 = adapters off
    "dpo": ("baselines_dpo_rebel", ["--loss", "dpo", "--mode", "lt-online", "--minibatch_size", "8"]),  # pi_ref
    "mtpo-tau": ("mtpo", ["--variant", "mtpo-tau", "--value_warmup_iterations", "0"]),  # mu, mixed in per token
    "rlhf-learned": ("mtpo", ["--variant", "rlhf", "--reward", "learned", "--rm_pairs", "8", "--rm_epochs", "1",
                                  "--value_warmup_iterations", "0"]),
    "iterative_ppo": ("iterative_ppo", ["--ppo_minibatch_size", "8", "--q_minibatch_size", "8", "--q_epochs", "1"]),
}


def run_all(folder: Path) -> dict:
    """Every entry of RUNS for one iteration, parsed by tyro as on the command line, in this one process."""
    import importlib

    import tyro

    out = {}
    for name, (script, flags) in RUNS.items():
        module = importlib.import_module(script)
        argv = [*TINY, *flags, "--output_dir", str(folder), "--run_name", name]
        out[name] = module.main(tyro.cli(module.Args, args=argv))["iterations"]
    return out


def tutor_dialogues(policy, tok, n: int = 8):
    """n held-out tutor dialogues of 2 turns played by `policy`."""
    import numpy as np

    from envs.flags import make_env

    env = make_env("tutor", max_turns=2)
    ctx = env.contexts(n, "eval", np.random.default_rng(0))
    with torch.no_grad():
        return sim.continue_dialogues(policy, tok, env, [c.messages for c in ctx], [c.user for c in ctx], [2] * n,
                                      np.random.default_rng(1), 12)[0]


def logprobs(model, tok, convs):
    return sim.turn_logprob(model, tok, convs, [1] * len(convs))


def test_every_script_trains_adapters_and_reads_its_references_through_them(tmp_path, base_policy):
    out = subprocess.run([sys.executable, __file__, str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                         env=subprocess_env(), timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {name: 1 for name in RUNS}
    base, tok = load_policy("tutor")
    convs = tutor_dialogues(base, tok)
    with torch.no_grad():
        base_lp = logprobs(base, tok, convs)
        for name in RUNS:
            policy_dir = tmp_path / name / "checkpoint" / "policy"
            # the checkpoint holds the adapters (PEFT's format), not a copy of the model
            assert (policy_dir / "adapter_config.json").exists() and not (policy_dir / "model.safetensors").exists()
            from safetensors.torch import load_file

            state = load_file(tmp_path / name / "checkpoint" / "state" / "model.safetensors")
            # checkpoint/state: the trained entries alone (the adapters; MTPO's value model), not the frozen base
            assert state and all(".lora_" in k or k.startswith("value_") for k in state), name
            assert not any("frozen_copy" in k for k in state), name  # Iterative PPO's pi_i is re-taken, not saved
            trained, _ = load_policy(str(policy_dir))  # the base named in adapter_config.json, adapters on top
            assert lora.peft_model_of(trained) is trained
            trained_lp = logprobs(trained, tok, convs)
            assert (trained_lp - base_lp).abs().max() > 1e-4, name  # the adapters trained
            off_lp = logprobs(lora.AdaptersOff(trained), tok, convs)
            assert torch.allclose(off_lp, base_lp, atol=1e-6, rtol=0), name  # adapters off: the base model, exactly
        # --merge_on_save, and the merge command on the checkpoint: a plain HF model computing the LoRA policy
        from transformers import AutoModelForCausalLM

        trained, _ = load_policy(str(tmp_path / "refuel" / "checkpoint" / "policy"))
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "refuel" / "merged")
        assert not hasattr(merged, "peft_config")
        assert torch.allclose(logprobs(merged, tok, convs), logprobs(trained, tok, convs), atol=1e-5, rtol=0)
    cmd = [sys.executable, "-m", "envs.loading", "merge", str(tmp_path / "refuel" / "checkpoint" / "policy"),
           str(tmp_path / "merged_by_command")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_by_command")
    with torch.no_grad():
        assert torch.allclose(logprobs(again, tok, convs), logprobs(merged, tok, convs), atol=1e-6, rtol=0)
    # evaluate.py reads a LoRA run's directory as it reads any other
    cmd = [sys.executable, "evaluate.py", "--policies", str(tmp_path / "refuel"), "--num_contexts", "8", "--max_turns",
           "2", "--output", str(tmp_path / "eval.json")]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads((tmp_path / "eval.json").read_text())


def first_steps_logratios(run_dir: Path) -> list:
    """|ln pi/pi_t| of each iteration's first step (runs with one minibatch per iteration and one epoch)."""
    return [abs(m["losses/mean_logratio_a"]) for m in logged_steps(run_dir) if "losses/refuel_loss" in m]


def test_lora_dropout_is_kept_when_asked_for(tmp_path, base_policy):
    """The scripts switch every dropout off but LoRA's: --lora_dropout 0.5 is kept as asked, so once B != 0 (the
    second iteration) the loss's log pi differs from the collection's log pi_t even at an iteration's first step.
    (In the first iteration B = 0 and dropout on the adapters' input changes nothing; with the default 0 every
    iteration's first step has log-ratio 0: test_a_resumed_lora_run_continues_exactly.)"""
    run_script("refuel.py", [*TINY, "--num_iterations", "2", "--minibatch_size", "16", "--num_epochs", "1",
                             "--lora_dropout", "0.5", "--run_name", "r"], tmp_path)
    logratios = first_steps_logratios(tmp_path / "r")
    assert logratios[0] < 1e-6 and logratios[1] > 1e-5, logratios  # without dropout: 0 to float precision


def test_a_resumed_lora_run_continues_exactly(tmp_path, base_policy):
    """Two iterations in one go, and one iteration then --resume for the second: the second iteration's training
    metrics and the final adapters agree to 1e-6 (the adapters, AdamW's state and every RNG come back)."""
    flags = [*LORA, "--prompts_per_iteration", "16", "--num_eval", "8", "--minibatch_size", "16", "--num_epochs", "1",
             "--gamma", "0.05"]
    run_script("refuel.py", [*flags, "--num_iterations", "2", "--run_name", "whole"], tmp_path)
    run_script("refuel.py", [*flags, "--num_iterations", "1", "--run_name", "parts"], tmp_path)
    run_script("refuel.py", [*flags, "--num_iterations", "2", "--run_name", "parts", "--resume"], tmp_path)
    # an iteration's first step scores its pairs with the weights that collected them: log-ratio 0 (--lora_dropout 0)
    assert all(x < 1e-6 for x in first_steps_logratios(tmp_path / "whole")), first_steps_logratios(tmp_path / "whole")
    whole, parts = (logged_steps(tmp_path / name)[2] for name in ("whole", "parts"))
    for key in ("losses/refuel_loss", "losses/abs_logratio_diff", "losses/mean_logratio_a", "charts/rollin_reward",
                "charts/optimizer_steps", "eval/mean_reward"):
        assert parts[key] == pytest.approx(whole[key], abs=1e-6), key
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / name / "checkpoint" / "policy" / "adapter_model.safetensors")
            for name in ("whole", "parts"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    # checkpoint/state holds the trained entries alone (the frozen base is --model_name_or_path's)
    state = load_file(tmp_path / "whole" / "checkpoint" / "state" / "model.safetensors")
    assert state and all(".lora_" in k for k in state), sorted(state)[:5]


@pytest.mark.long  # CI: the 2-process ZeRO-3 runs of test_deepspeed.py
def test_lora_on_two_ddp_processes(tmp_path, base_policy):
    """DDP on 2 CPU processes: the adapters all-reduce and stay equal on both ranks, pi_0 read through them."""
    run_script("refuel.py", [*TINY, "--num_iterations", "2", "--gamma", "0.05", "--minibatch_size", "8",
                             "--run_name", "ddp"], tmp_path, TWO_CPU_PROCESSES)
    s = summary(tmp_path, "ddp")
    assert s["num_processes"] == 2 and s["ranks_in_sync"] and s["iterations"] == 2


def test_gradient_checkpointing_trains_the_adapters(base_policy):
    """--gradient_checkpointing with frozen base weights: every adapter still gets its gradient (B's first: A's is
    zero while B = 0), the same as without checkpointing."""
    import refuel

    grads = []
    for checkpointing in (False, True):
        policy, tok = load_policy("tutor")
        args = refuel.Args(lora_r=4, gradient_checkpointing=checkpointing)
        torch.manual_seed(0)  # the same A in both
        policy = refuel.prepare_for_training(lora.add_adapters(policy, args, "tutor"), args)
        convs = tutor_dialogues(base_policy[0], tok, 4)
        sim.turn_logprob(policy, tok, convs, [1] * 4).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.requires_grad})
    plain, checkpointed = grads
    assert all(g is not None and g.abs().sum() > 0 for n, g in checkpointed.items() if "lora_B" in n)
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


BAD_FLAGS = [(dict(merge_on_save=True), "--merge_on_save merges LoRA adapters: it needs --lora_r"),
             (dict(lora_r=4, lora_dropout=1.0), "--lora_dropout must lie in [0, 1)"),
             (dict(lora_r=-1), "--lora_r must be >= 0")]


@pytest.mark.parametrize("script,flags,message", [
    *[(s, f, m) for s in ("refuel", "baselines_dpo_rebel", "mtpo", "iterative_ppo") for f, m in BAD_FLAGS],
    *[(s, dict(lora_r=4, train_top_layers=2), "--train_top_layers and --lora_r")  # the scripts that have it
      for s in ("refuel", "baselines_dpo_rebel")]])
def test_bad_lora_flags_are_errors_naming_them(script, flags, message):
    import importlib

    module = importlib.import_module(script)
    with pytest.raises(ValueError, match=re.escape(message)):
        module.check_args(module.Args(**flags))


def test_a_target_module_the_model_lacks_is_an_error_naming_it(base_policy):
    import refuel

    policy, _ = load_policy("tutor")
    with pytest.raises(ValueError, match="--lora_target_modules no_such_proj"):
        lora.add_adapters(policy, refuel.Args(lora_r=4, lora_target_modules=("no_such_proj",)), "tutor")


def test_without_peft_lora_is_an_error_naming_the_install(tmp_path):
    """PEFT is an optional extra: a run that asks for LoRA without it stops before loading anything, saying what to
    install; a run without --lora_r never imports it."""
    hide = "import sys, runpy; sys.modules['peft'] = None; sys.argv = ['refuel.py', *sys.argv[1:]]; " \
           "runpy.run_path('refuel.py', run_name='__main__')"
    cmd = [sys.executable, "-c", hide, "--lora_r", "4", "--output_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode != 0 and "pip install peft" in out.stderr, out.stderr[-2000:]
    check = "import sys; sys.path.insert(0, '.'); import refuel, mtpo, iterative_ppo, baselines_dpo_rebel, evaluate; " \
            "print('peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True,
                         env=subprocess_env(), timeout=300)
    assert out.stdout.strip() == "False", out.stderr[-2000:]


# ---------------------------------------------------------------- the real SmolLM2-135M-Instruct
SMOLLM2_RUNS = {  # every script with --long
    "refuel": ("refuel.py", ["--gamma", "0.05", "--minibatch_size", "4", "--num_epochs", "1"]),
    "dpo": ("baselines_dpo_rebel.py", ["--loss", "dpo", "--mode", "lt-online", "--minibatch_size", "4"]),
    "mtpo-tau": ("mtpo.py", ["--variant", "mtpo-tau", "--value_warmup_iterations", "0", "--prompts_per_iteration",
                             "2"]),
    "iterative_ppo": ("iterative_ppo.py", ["--ppo_minibatch_size", "4", "--q_minibatch_size", "4", "--q_epochs", "1",
                                           "--time_budget_minutes", "0"]),
}


def test_adapters_off_is_smollm2_itself():
    """The real SmolLM2-135M-Instruct (tied embeddings, its own chat template) with adapters whose B is not 0: the
    policy moves, and with the adapters disabled it computes the base model's log-probs to 1e-6 (CI's real-model
    check; test_lora_on_smollm2 trains every script on it with --long)."""
    import refuel
    from real_models import smollm2_dir
    from test_chat_templates import QUESTIONS

    base, tok = load_policy(str(smollm2_dir()))
    policy = lora.add_adapters(load_policy(str(smollm2_dir()))[0], refuel.Args(lora_r=4), str(smollm2_dir()))
    torch.manual_seed(0)
    for name, p in policy.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.01)
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "I think it is a good question."}]
             for q in QUESTIONS[:4]]
    with torch.no_grad():
        base_lp, lora_lp = logprobs(base, tok, convs), logprobs(policy, tok, convs)
        off_lp = logprobs(lora.AdaptersOff(policy), tok, convs)
    assert (lora_lp - base_lp).abs().max() > 1e-3
    assert torch.allclose(off_lp, base_lp, atol=1e-6, rtol=0), (off_lp - base_lp).abs().max()


@pytest.mark.long
@pytest.mark.parametrize("name", list(SMOLLM2_RUNS))
def test_lora_on_smollm2(tmp_path, name):
    """One iteration with LoRA on SmolLM2-135M-Instruct (its own chat template, real questions): the first step
    starts at pi = pi_t, the adapters train, and with them disabled the checkpoint computes the real base model's
    log-probs to 1e-6."""
    from test_chat_templates import QUESTIONS, write_smollm2

    write_smollm2(tmp_path)
    script, flags = SMOLLM2_RUNS[name]
    run_script(script, ["--env", "chat", "--model_name_or_path", str(tmp_path / "policy"), "--reward_model",
                        str(tmp_path / "rm"), "--prompts_path", str(tmp_path / "prompts.jsonl"), "--max_turns", "2",
                        "--max_new_tokens", "8", "--num_iterations", "1", "--num_eval", "2",
                        "--prompts_per_iteration", "4", "--lora_r", "4", "--lr", "1e-3", "--run_name", name, *flags],
               tmp_path, timeout=900)
    if name == "refuel":
        trained = next(m for m in logged_steps(tmp_path / name) if "losses/refuel_loss" in m)
        assert abs(trained["losses/mean_logratio_a"]) < 1e-3, trained  # one minibatch, one epoch: the first step
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "policy")
    policy, tok = load_policy(str(tmp_path / name / "checkpoint" / "policy"))
    convs = [[{"role": "user", "content": q}, {"role": "assistant", "content": "I think it is a good question."}]
             for q in QUESTIONS[:4]]
    with torch.no_grad():
        base_lp, lora_lp = logprobs(base, tok, convs), logprobs(policy, tok, convs)
        off_lp = logprobs(lora.AdaptersOff(policy), tok, convs)
    assert (lora_lp - base_lp).abs().max() > 1e-4  # the adapters trained
    assert torch.allclose(off_lp, base_lp, atol=1e-6, rtol=0), (off_lp - base_lp).abs().max()


if __name__ == "__main__":  # RUNS in one process (each CLI start costs 5 s): test_every_script_trains_adapters_...
    sys.path.insert(0, str(ROOT))
    print(json.dumps(run_all(Path(sys.argv[1]))))
