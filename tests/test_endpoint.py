"""The OpenAI-compatible client (user simulator and judge backend) against a small local HTTP server."""
import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from envs import chat_env
from envs import flags
from envs import tutor_task
from conftest import ROOT, logged_steps, subprocess_env


class Handler(BaseHTTPRequestHandler):
    seen: dict = {}
    seeds: dict = {}  # prompt -> the request's "seed" field
    in_flight = most_in_flight = 0
    seen_training = False
    lock = threading.Lock()

    def log_message(self, *a):  # keep pytest output clean
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        model, prompt = body["model"], body["messages"][-1]["content"]
        n = Handler.seen[prompt] = Handler.seen.get(prompt, 0) + 1
        Handler.seeds[prompt] = body.get("seed")
        if model == "slow":
            time.sleep(1.0)
        if model == "counted":  # how many requests are in flight at once
            with Handler.lock:
                Handler.in_flight += 1
                Handler.most_in_flight = max(Handler.most_in_flight, Handler.in_flight)
            time.sleep(0.2)
            with Handler.lock:
                Handler.in_flight -= 1
        if model == "flaky" and n == 1:
            return self.reply(503, b"overloaded")
        if model == "down":  # an outage: every request fails
            return self.reply(503, b"service unavailable")
        if model == "eval_down":  # fails on held-out prompts once a training prompt was seen: the evaluation
            held_out = "quiz me" in prompt  # that follows the first training iteration
            Handler.seen_training |= not held_out
            if held_out and Handler.seen_training:
                return self.reply(503, b"down during the evaluation")
        if model == "unknown":
            return self.reply(404, b'{"error": "model unknown not found"}')
        if model == "garbage":
            return self.reply(200, b"<html>not json</html>")
        lines = prompt.strip().splitlines()
        tail = ([line for line in lines if line.startswith("Assistant:")] or lines)[-1]  # what it answers
        text = f"Justification: keep going.\nQuestion: what about {tail[-20:]}?"
        self.reply(200, json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode())

    def reply(self, code, data):
        try:
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except BrokenPipeError:  # the client gave up (timeout test)
            pass


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()


def test_batched_completions_keep_their_order(server):
    client = chat_env.OpenAIChatClient(server, "ok", max_workers=8)
    prompts = [f"prompt number {i:03d}" for i in range(40)]
    out = client.complete(prompts)
    assert out == [f"Justification: keep going.\nQuestion: what about prompt number {i:03d}?" for i in range(40)]
    assert client.n_requests == 40 and client.n_retries == 0


def test_server_errors_are_retried_with_backoff(server):
    client = chat_env.OpenAIChatClient(server, "flaky", retries=3, backoff=0.05)
    assert client.complete(["flaky one", "flaky two"])[1].endswith("two?")
    assert client.n_retries == 2 and client.n_requests == 4


def test_timeouts_end_in_a_clear_error(server):
    client = chat_env.OpenAIChatClient(server, "slow", timeout=0.2, retries=2, backoff=0.05)
    with pytest.raises(ConnectionError, match=r"model slow\) failed after 2 tries \(timeout 0.2s\)"):
        client.complete(["slow prompt"])


def test_refused_and_malformed_replies(server):
    with pytest.raises(ValueError, match="refused the request \\(HTTP 404\\).*model unknown not found"):
        chat_env.OpenAIChatClient(server, "unknown", backoff=0.05).complete(["x"])
    with pytest.raises(ValueError, match="unexpected reply.*not json"):
        chat_env.OpenAIChatClient(server, "garbage").complete(["y"])


def test_prompted_user_over_the_endpoint(server):
    user = chat_env.PromptedUser(client=chat_env.OpenAIChatClient(server, "ok"), max_new_tokens=32)
    env = chat_env.ChatEnv([{"messages": [{"role": "user", "content": "hi"}], "user": None}], reward_model=None,
                      user=user)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(5)]
    replies = env.user_turn(convs, [None] * 5, None)
    assert replies == [f"what about Assistant: answer {i}?" for i in range(5)]  # parsed off "Question:", in order
    assert user.n_calls == 5 and user.n_fallbacks == 0
    with pytest.raises(ValueError, match="dialogue"):
        chat_env.PromptedUser(client=user.client, prompt_template="no placeholder")


def test_user_requests_carry_a_seed_from_the_runs_generator(server):
    """The user samples at temperature 1 at the endpoint: without a seed in each request, --seed did not fix the
    user's turns. Each request's seed comes from the rank's generator: the same seed, the same seeds; another
    conversation, another seed."""
    user = chat_env.PromptedUser(client=chat_env.OpenAIChatClient(server, "ok"), max_new_tokens=32)
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"seeded answer {i}"}]
             for i in range(4)]
    runs = []
    for seed in (7, 7, 8):
        user(convs, [None] * 4, np.random.default_rng(seed))
        runs.append([Handler.seeds[user.prompt(c, None)] for c in convs])
    assert runs[0] == runs[1] != runs[2]
    assert len(set(runs[0])) == 4 and all(isinstance(s, int) for s in runs[0])


def test_refuel_iteration_with_the_user_served_by_an_endpoint(server, tmp_path):
    """A full REFUEL iteration by flags only: tiny HF policy, HF reward model, user at --user_api_base."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps([{"role": "user", "content": f"hello teacher , teach me {t} ."}]) + "\n"
                               for t in tutor_task.TOPICS))
    pairs = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "refuel.py", "--env", "chat", "--model_name_or_path", str(tmp_path / "policy"),
           "--reward_model", str(tmp_path / "rm"), "--prompts_path", str(prompts), "--user_api_base", server,
           "--user_model", "ok", "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "1",
           "--prompts_per_iteration", "8", "--minibatch_size", "4", "--num_eval", "4", "--threads", "1",
           "--output_dir", str(tmp_path), "--run_name", "endpoint", "--save_rollouts", str(pairs)]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows
    for r in rows:  # every later user turn came from the endpoint, parsed off its "Question:" line
        assert all(m["content"].startswith("what about ") for m in r["conv_b"][2::2]), r["conv_b"]
    assert json.loads((tmp_path / "endpoint" / "summary.json").read_text())["iterations"] == 1
    logged = logged_steps(tmp_path / "endpoint")
    assert logged[-1]["charts/user_retries"] == 0 and logged[-1]["charts/user_parse_fallback_rate"] == 0
    assert logged[-1]["charts/user_retries_eval"] == 0 and logged[-1]["charts/user_parse_fallback_rate_eval"] == 0

    # an outage: the run stops with the endpoint's error and loses nothing (checkpoint, pairs); --resume continues
    resume = [*cmd, "--num_iterations", "2", "--resume"]
    resume[resume.index("--user_model") + 1] = "down"
    p = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode != 0 and "(model down) failed after 3 tries" in p.stderr, p.stderr[-2000:]
    # the error says what to do next: the last checkpoint and the command that continues from it
    ckpt = tmp_path / "endpoint" / "checkpoint"
    assert f"its last checkpoint is {ckpt} (after iteration 1)" in p.stderr, p.stderr[-2000:]
    assert "refuel.py --env chat" in p.stderr and p.stderr.count("--run_name endpoint") == 1
    assert "--resume --run_name endpoint" in p.stderr
    meta = json.loads((tmp_path / "endpoint" / "checkpoint" / "meta.json").read_text())
    assert meta["iteration"] == 1 and len(pairs.read_text().splitlines()) == len(rows)
    resume[resume.index("--user_model") + 1] = "ok"
    p = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "resumed" in p.stdout + p.stderr
    assert json.loads((tmp_path / "endpoint" / "summary.json").read_text())["iterations"] == 2
    assert len(pairs.read_text().splitlines()) > len(rows)


def test_an_endpoint_failing_in_the_evaluation_loses_no_iteration(server, tmp_path):
    """The server fails during the evaluation that follows iteration 1. The finished iteration is already in the
    checkpoint (written before the evaluation); --resume evaluates that step once, trains iteration 2, and nothing
    is logged, trained or written twice; summary.json's initial reward is the start of the run's, not the resumed
    evaluation's."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"  # the first record is the held-out one (ChatEnv's eval split)
    prompts.write_text("".join(json.dumps([{"role": "user", "content": f"hello teacher , {ask} {t} ."}]) + "\n"
                               for ask, t in [("quiz me on", "plants"), *[("teach me", t) for t in tutor_task.TOPICS]]))
    pairs = tmp_path / "pairs.jsonl"
    cmd = [sys.executable, "refuel.py", "--env", "chat", "--model_name_or_path", str(tmp_path / "policy"),
           "--reward_model", str(tmp_path / "rm"), "--prompts_path", str(prompts), "--user_api_base", server,
           "--user_model", "eval_down", "--max_turns", "3", "--max_new_tokens", "4", "--num_iterations", "2",
           "--prompts_per_iteration", "8", "--minibatch_size", "4", "--num_eval", "4", "--threads", "1",
           "--eval_every", "1", "--save_every", "1", "--output_dir", str(tmp_path), "--run_name", "evalfail",
           "--save_rollouts", str(pairs)]
    Handler.seen_training = False
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode != 0 and "(model eval_down) failed after 3 tries" in p.stderr, p.stderr[-2000:]
    run_dir = tmp_path / "evalfail"
    assert "after iteration 1" in p.stderr, p.stderr[-2000:]
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["iteration"] == 1 and "evaluation" not in meta
    first = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert first and {r["iteration"] for r in first} == {0}
    assert [(m["step"], "eval/mean_reward" in m) for m in logged_steps(run_dir)] == [(0, True), (1, False)]
    initial = logged_steps(run_dir)[0]["eval/mean_reward"]

    resume = [*cmd, "--resume"]
    resume[resume.index("--user_model") + 1] = "ok"
    p = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    logged = logged_steps(run_dir)  # also: no name logged twice at a step
    assert [m["step"] for m in logged] == [0, 1, 2] and all("eval/mean_reward" in m for m in logged)
    assert [m["charts/optimizer_steps"] for m in logged[1:]] == [4, 8]  # each iteration trained once (2 epochs x 2)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    assert rows[:len(first)] == first and {r["iteration"] for r in rows[len(first):]} == {1}
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["iterations"] == 2 and s["initial_reward"] == initial
    assert "start of run " + f"{initial:.3f}" in p.stdout
    meta = json.loads((run_dir / "checkpoint" / "meta.json").read_text())
    assert meta["iteration"] == 2 and meta["evaluation"]["eval/mean_reward"] == s["final_reward"]

    # resumed once more, finished: nothing to train, nothing logged again, the same summary
    p = subprocess.run(resume, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert logged_steps(run_dir) == logged
    again = json.loads((run_dir / "summary.json").read_text())
    assert (again["iterations"], again["initial_reward"], again["final_reward"]) == (2, initial, s["final_reward"])


def test_endpoint_concurrency_timeout_and_tries_are_passed_from_make_env(server, tmp_path):
    """make_env's user_max_concurrency / user_timeout / user_retries reach the user's client (and
    make_judge_preference's the judge's); the concurrency bounds the requests in flight; bad values are refused."""
    from test_simulator import save_tiny_policy_and_reward_model

    save_tiny_policy_and_reward_model(tmp_path)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps([{"role": "user", "content": "hi"}]) + "\n")
    env = flags.make_env("chat", str(prompts), user_model="counted", reward_model=str(tmp_path / "rm"),
                       user_api_base=server, user_max_concurrency=3, user_timeout=7.5, user_retries=2)
    client = env.user.client
    assert (client.max_workers, client.timeout, client.retries) == (3, 7.5, 2)
    default = flags.make_env("chat", str(prompts), user_model="ok", reward_model=str(tmp_path / "rm"),
                           user_api_base=server).user.client
    assert (default.max_workers, default.timeout, default.retries) == (32, 120.0, 3)
    Handler.most_in_flight = 0
    convs = [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"answer {i}"}] for i in range(9)]
    assert len(env.user_turn(convs, [None] * 9, None)) == 9
    assert Handler.most_in_flight == 3
    judge = chat_env.make_judge_preference("ok", api_base=server, max_concurrency=5, timeout=9.0, retries=4)
    assert (judge.client.max_workers, judge.client.timeout, judge.client.retries) == (5, 9.0, 4)
    for bad, match in ((dict(user_max_concurrency=0), "concurrency"), (dict(user_timeout=0), "timeout"),
                       (dict(user_retries=0), "tries")):
        with pytest.raises(ValueError, match=match):
            flags.make_env("chat", str(prompts), user_model="ok", reward_model=str(tmp_path / "rm"),
                         user_api_base=server, **bad)
