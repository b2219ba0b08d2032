"""Users and judges at a real endpoint: vLLM's own OpenAI-compatible server (`python -m vllm.entrypoints.openai.
api_server`) serving the real SmolLM2-135M-Instruct, a server nobody here wrote.

A REFUEL run and an MTPO iteration put their user (and MTPO its judge) at the server by flags only; the server is
killed in the middle of the REFUEL run, which stops with an error naming its checkpoint, and once it is restarted
`--resume` finishes the run with every iteration trained once, no step logged twice and every rollout written
once. The policy is the suite's tiny Llama (the served model is what is real here). Skipped where vLLM cannot be
imported (the main suite); `.ci/vllm_env` runs this file in its virtualenv with REQUIRE_VLLM=1.
"""
import collections
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from plumbing import vllm_engine
from conftest import ROOT, free_port, logged_steps, subprocess_env
from real_models import smollm2_dir

if not vllm_engine.vllm_available():
    if os.environ.get("REQUIRE_VLLM") == "1":
        raise RuntimeError("REQUIRE_VLLM=1 but vllm cannot be imported here (see .ci/vllm_env)")
    pytest.skip("vllm is not installed (run .ci/vllm_env)", allow_module_level=True)

SERVED = "smollm2"  # --served-model-name: what --user_model / --judge_model name


class VLLMServer:
    """`python -m vllm.entrypoints.openai.api_server` on SmolLM2, in its own process group (killed whole)."""

    def __init__(self, model_dir, port: int, log_path):
        self.model_dir, self.port, self.log_path, self.proc = model_dir, port, log_path, None
        self.api_base = f"http://127.0.0.1:{port}/v1"

    def start(self, timeout: float = 300.0) -> None:
        env = dict(subprocess_env(), VLLM_CPU_KVCACHE_SPACE="2", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", SERVED, "--dtype", "float32", "--enforce-eager", "--max-model-len", "2048",
               "--host", "127.0.0.1", "--port", str(self.port), "--seed", "0"]
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the vLLM server exited ({self.proc.returncode}):\n"
                                   + open(self.log_path).read()[-3000:])
            try:
                with urllib.request.urlopen(self.api_base + "/models", timeout=2) as r:
                    if SERVED in r.read().decode():
                        return
            except OSError:
                time.sleep(1)
        self.kill()
        raise TimeoutError(f"the vLLM server was not ready in {timeout} s:\n" + open(self.log_path).read()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = VLLMServer(smollm2_dir(), free_port(), tmp_path_factory.mktemp("vllm_server") / "server.log")
    srv.start()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from test_simulator import save_tiny_policy_and_reward_model

    path = tmp_path_factory.mktemp("models")
    save_tiny_policy_and_reward_model(path)
    prompts = path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps([{"role": "user", "content": f"hello teacher , teach me {t} ."}]) + "\n"
                               for t in ("fractions", "planets", "volcanoes", "grammar", "rivers", "insects",
                                         "magnets", "poems", "plants", "clouds")))
    return path, prompts


def chat_flags(models, server, tmp_path, run_name):
    path, prompts = models
    return ["--env", "chat", "--model_name_or_path", str(path / "policy"), "--reward_model", str(path / "rm"),
            "--prompts_path", str(prompts), "--user_api_base", server.api_base, "--user_model", SERVED,
            "--user_max_new_tokens", "24", "--user_timeout", "30", "--user_retries", "2", "--max_turns", "2",
            "--max_new_tokens", "4", "--num_eval", "4", "--threads", "1", "--output_dir", str(tmp_path),
            "--run_name", run_name]


def test_refuel_with_the_user_at_vllms_server_survives_a_server_kill(server, models, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "refuel.py", *chat_flags(models, server, tmp_path, "killed"), "--num_iterations", "2",
           "--prompts_per_iteration", "8", "--minibatch_size", "4", "--num_epochs", "1", "--eval_every", "1",
           "--save_every", "1", "--save_rollouts", str(pairs)]
    run_dir = tmp_path / "killed"
    meta = run_dir / "checkpoint" / "meta.json"
    run = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=subprocess_env())
    while run.poll() is None and not (meta.exists() and json.loads(meta.read_text())["iteration"] >= 1):
        time.sleep(0.5)
    server.kill()  # mid-run: iteration 2 still needs the user
    out, err = run.communicate(timeout=600)
    assert run.returncode != 0, out[-2000:] + err[-2000:]
    assert f"(model {SERVED}) failed after 2 tries" in err and "--resume --run_name killed" in err, err[-3000:]
    stopped_at = json.loads(meta.read_text())["iteration"]
    assert f"(after iteration {stopped_at})" in err and stopped_at == 1

    server.start()
    p = subprocess.run([*cmd, "--resume"], cwd=ROOT, capture_output=True, text=True, env=subprocess_env(),
                       timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    logged = logged_steps(run_dir)  # a name logged twice at one step fails here
    assert [m["step"] for m in logged] == [0, 1, 2] and all("eval/mean_reward" in m for m in logged)
    assert [m["charts/optimizer_steps"] for m in logged[1:]] == [2, 4]  # every iteration trained once
    rows = [json.loads(line)["iteration"] for line in pairs.read_text().splitlines()]
    per_iteration = collections.Counter(rows)
    assert rows == sorted(rows) and set(per_iteration) == {0, 1} and max(per_iteration.values()) <= 8, \
        per_iteration  # each iteration's rollouts written once: at most 8 pairs each, in order
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["iterations"] == 2 and s["initial_reward"] == logged[0]["eval/mean_reward"]
    last = logged[-1]
    assert last["charts/user_retries"] >= 0 and 0 <= last["charts/user_parse_fallback_rate"] <= 1
    assert 0 <= last["charts/user_parse_fallback_rate_eval"] <= 1
    print(f"\nvLLM server, SmolLM2 user: parse fallback rate {last['charts/user_parse_fallback_rate']:.3f} "
          f"(training), {last['charts/user_parse_fallback_rate_eval']:.3f} (evaluation); stopped after iteration "
          f"{stopped_at}, resumed to 2; pairs per iteration {dict(sorted(per_iteration.items()))}")


def test_mtpo_with_the_user_and_the_judge_at_vllms_server(server, models, tmp_path):
    if server.proc is None:
        server.start()
    cmd = [sys.executable, "mtpo.py", *chat_flags(models, server, tmp_path, "judged"), "--variant", "mtpo",
           "--judge_model", SERVED, "--judge_api_base", server.api_base, "--judge_max_unparsed", "1.0",
           "--num_iterations", "1", "--prompts_per_iteration", "4", "--num_minibatches", "1"]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=900)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    logged = logged_steps(tmp_path / "judged")
    assert [m["step"] for m in logged] == [0, 1]
    rate = logged[-1]["charts/judge_unparsed_rate"]
    assert 0 <= rate <= 1 and 0 <= logged[-1]["charts/judge_unparsed_rate_eval"] <= 1
    print(f"\nvLLM server, SmolLM2 judge: unparsed verdicts {rate:.3f} (training), "
          f"{logged[-1]['charts/judge_unparsed_rate_eval']:.3f} (evaluation); user parse fallback rate "
          f"{logged[-1]['charts/user_parse_fallback_rate']:.3f}")
