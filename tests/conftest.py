import os
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
