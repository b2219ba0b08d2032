import json
import os
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test may reach the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true", help="run the long learning checks (several seeds, minutes each)")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: long learning check, run with --long")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long"):
        return
    skip = pytest.mark.skip(reason="long learning check: run with pytest --long")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_policy():
    """The tutor's cached reference policy mu (built by SFT on first use, then reused from runs/)."""
    import simulator

    return simulator.load_tutor_base_policy()


def subprocess_env():
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


# `accelerate launch` of two CPU processes (gloo): how the tests check multi-process runs
TWO_CPU_PROCESSES = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                     "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")


def run_script(script, args, tmp_path, launcher=(sys.executable,), timeout=600):
    """Run a repository script as a user would, its runs under tmp_path; fail with its output's tail."""
    cmd = [*launcher, script, "--output_dir", str(tmp_path), *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def summary(tmp_path, name):
    """runs/<name>/summary.json of a run made by run_script."""
    return json.loads((tmp_path / name / "summary.json").read_text())
