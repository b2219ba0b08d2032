"""docs/your_environment.md, as a user follows it: the page's example environment is written to a folder outside the
repository, and every command of its "Running it" section runs (refuel.py first: evaluate.py reads its run), with
a 2-layer random-init Llama with SmolLM2-135M-Instruct's own tokenizer and chat template (from the local copy)
for the hub name, the temporary folder for `~`, and tiny sizes. Also: the
example's user and reward on hand-written conversations, and the errors a wrong --env gives."""
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (ROOT, SMOLLM2_HUB_NAME, fenced_blocks, subprocess_env, tiny_chat_model,
                      tiny_sizes)

PAGE = ROOT / "docs" / "your_environment.md"


def example_source() -> str:
    (block,) = [b for b in fenced_blocks(PAGE.read_text(), "python") if b.startswith("# my_tasks/colour.py")]
    return block


def running_commands() -> list[list[str]]:
    section = PAGE.read_text().split("## Running it", 1)[1].split("\n## ", 1)[0]
    return [shlex.split(line) for block in fenced_blocks(section, "bash") for line in block.splitlines()
            if line.strip() and not line.startswith("#")]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    """A user's home: ~/my_tasks/colour.py, outside the repository."""
    home = tmp_path_factory.mktemp("home")
    (home / "my_tasks").mkdir()
    (home / "my_tasks" / "colour.py").write_text(example_source())
    assert not home.resolve().is_relative_to(ROOT)
    return home


@pytest.fixture(scope="module")
def policy(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct's tokenizer and chat template on a 2-layer random-init Llama (seconds per run, not
    minutes; the real model runs every script in tests/test_chat_templates.py)."""
    return tiny_chat_model(tmp_path_factory.mktemp("policy"))


def as_here(argv: list[str], home: Path, policy: Path, runs: Path, run_name: str) -> tuple[list[str], dict]:
    """A documented command with what cannot exist here replaced: ~ -> home, the hub model -> the local stand-in,
    runs/RUN_A -> the REFUEL run made first, sizes -> tiny, one thread."""
    env = dict(subprocess_env())
    if argv[0].startswith("PYTHONPATH="):
        env["PYTHONPATH"] = argv.pop(0).split("=", 1)[1].replace("~", str(home))
    assert argv[0] == "python", argv
    script = argv[1]
    args = [a.replace("~", str(home)) for a in argv[2:]]
    args = [str(policy) if a == SMOLLM2_HUB_NAME else str(runs / "RUN_A") if a == "runs/RUN_A" else a
            for a in args]
    args = tiny_sizes(script, args)
    if script == "evaluate.py":
        args += ["--output", str(runs / "evaluate.json"), "--device", "cpu"]
    else:
        args += ["--output_dir", str(runs), "--run_name", run_name, "--threads", "1"]
    return [sys.executable, script, *args], env


def test_every_script_trains_in_the_pages_environment_from_outside_the_repository(request, home, policy, tmp_path):
    """CI runs REFUEL (the file form) and evaluate.py (the module form); --long every line of the page (each script
    also runs on a task of this kind, --env gift, in test_gift_task.py)."""
    commands = running_commands()
    scripts = [c[1] if c[0] == "python" else c[2] for c in commands]
    assert sorted(scripts) == sorted(["refuel.py", "mtpo.py", "iterative_ppo.py", "baselines_dpo_rebel.py",
                                      "evaluate.py"]), scripts
    assert any(c[0].startswith("PYTHONPATH=") and ":" in c[c.index("--env") + 1] and ".py:" not in
               c[c.index("--env") + 1] for c in commands)  # the module form is on the page too
    runs = tmp_path / "runs"
    if not request.config.getoption("--long"):
        commands = [c for c in commands if {"refuel.py", "evaluate.py"} & set(c)]
    for argv in sorted(commands, key=lambda c: "evaluate.py" in c):  # evaluate.py reads REFUEL's run
        script = argv[1] if argv[0] == "python" else argv[2]
        name = "RUN_A" if script == "refuel.py" else Path(script).stem
        cmd, env = as_here(list(argv), home, policy, runs, name)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=900)
        assert out.returncode == 0, f"{shlex.join(argv)}\n" + out.stdout[-3000:] + out.stderr[-3000:]
        if script == "evaluate.py":
            result = json.loads((runs / "evaluate.json").read_text())
            assert result["v_star"] == 1.0 and result["rows"][0]["name"] == "refuel"
            assert result["rows"][0]["fraction_of_v_star"] == result["rows"][0]["reward"]
            continue
        assert json.loads((runs / name / "summary.json").read_text())["iterations"] == 1
        evaluated = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()
                     if "eval/mean_reward" in line]
        assert evaluated and all(m["eval/fraction_of_v_star"] == m["eval/mean_reward"] for m in evaluated)
        assert all(0 <= m["eval/asked_rate"] <= 1 for m in evaluated)  # the example's dialogue_metrics


def load_example(home: Path):
    sys.path.insert(0, str(ROOT))
    from envs.flags import environment_class

    return environment_class(f"{home / 'my_tasks' / 'colour.py'}:FavouriteColourEnv")


def test_the_examples_user_and_reward(home):
    import numpy as np

    env = load_example(home)()
    (ctx,) = env.contexts(1, "train", np.random.default_rng(0))
    colour = ctx.user
    other = next(c for c in ("red", "blue") if c != colour)
    ask = ctx.messages + [{"role": "assistant", "content": "What is your favourite colour?"}]
    (reply,) = env.user_turn([ask], [colour], None)
    assert reply == f"My favourite colour is {colour}."
    right = ask + [{"role": "user", "content": reply}, {"role": "assistant", "content": f"A {colour} one!"}]
    wrong = ask + [{"role": "user", "content": reply}, {"role": "assistant", "content": f"A {other} one!"}]
    both = ask + [{"role": "user", "content": reply}, {"role": "assistant", "content": f"{colour} or {other}"}]
    replies = env.user_turn([right, wrong, both], [colour] * 3, None)
    finished = [c + [{"role": "user", "content": r}] for c, r in zip([right, wrong, both], replies)]
    assert env.reward(finished).tolist() == [1.0, 0.0, 0.0]
    assert env.optimal_value() == 1.0 and env.scores_final_user_reply


def test_a_wrong_env_names_the_problem(home, tmp_path):
    sys.path.insert(0, str(ROOT))
    from envs.flags import environment_class

    with pytest.raises(ValueError, match="could not load .*no file"):
        environment_class(f"{tmp_path / 'missing.py'}:FavouriteColourEnv")
    with pytest.raises(ValueError, match="has nothing named 'ColourEnv'"):
        environment_class(f"{home / 'my_tasks' / 'colour.py'}:ColourEnv")
    with pytest.raises(ValueError, match="not a subclass of simulator.Environment"):
        environment_class(f"{home / 'my_tasks' / 'colour.py'}:DELIGHTED")
    with pytest.raises(ValueError, match="could not load 'no_such_package.tasks'"):
        environment_class("no_such_package.tasks:Env")
    # the default from_flags reads no chat flag: one given is an error, not ignored
    cmd = [sys.executable, "refuel.py", "--env", f"{home / 'my_tasks' / 'colour.py'}:FavouriteColourEnv",
           "--prompts_path", "prompts.jsonl", "--output_dir", str(tmp_path)]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert out.returncode != 0 and "FavouriteColourEnv.from_flags reads none of --prompts_path" in out.stderr, \
        out.stderr[-2000:]


def test_the_example_gives_an_environment_the_scripts_build(home):
    """from_flags sets the scripts' --max_turns, and optimal_value follows it."""
    sys.path.insert(0, str(ROOT))
    from envs.flags import EnvArgs, make_env_from_args

    args = EnvArgs(env=f"{home / 'my_tasks' / 'colour.py'}:FavouriteColourEnv")
    env = make_env_from_args(args, 1, "cpu", torch.float32)
    assert env.max_turns == 1 and env.optimal_value() == pytest.approx(1 / 6)


def test_a_file_named_like_a_repository_module_does_not_replace_it(home, tmp_path):
    """--env path/simulator.py:Class loads the user's file under its own module name: the repository's simulator
    (which the scripts and the user's file itself import) stays the one in sys.modules."""
    sys.path.insert(0, str(ROOT))
    import simulator
    from envs.flags import environment_class

    (tmp_path / "simulator.py").write_text(example_source())
    cls = environment_class(f"{tmp_path / 'simulator.py'}:FavouriteColourEnv")
    assert sys.modules["simulator"] is simulator and issubclass(cls, simulator.Environment)
