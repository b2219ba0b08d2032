"""Every documented chat command runs: the fenced code blocks of README.md and of every docs/*.md page are parsed
(backslash-continued lines joined) and each command that runs a repository script with `--env chat` is run once, as
a user would (a subprocess), with every flag as the page writes it except what cannot exist here, replaced through
the explicit tables below:

- hub model names -> tiny random-init local models built here (a Llama-3-template policy, a Bradley-Terry reward
  model, an ArmoRM-style reward model with its own code and a `.score` output);
- `hf:` datasets and the pages' local files -> fixture files in the same format, with real data's variety
  (tests/fixtures_chat.py);
- the endpoint URL -> a local OpenAI-compatible server standing in for the pages' `vllm serve` lines (it serves
  only the models those lines serve);
- `runs/RUN_A...` -> a run made here first (one tiny REFUEL iteration);
- sizes -> tiny ones (one iteration, a few prompts and evaluation contexts, a few new tokens).

The launcher `accelerate launch --config_file configs/deepspeed_zero*.yaml` becomes a single `python` process:
DeepSpeed launches are covered by tests/test_deepspeed.py. A template line with literal `...` placeholders is not a
runnable command and is skipped (only those are). A command written on two pages is run once. A documented command
whose hub model, `hf:` dataset, file or URL the tables do not cover fails here with "add a local stand-in to
tests/test_readme_commands.py", so a chat command added to the README or to a docs page without a stand-in makes the
suite fail."""
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, subprocess_env

SCRIPTS = ("refuel.py", "baselines_dpo_rebel.py", "mtpo.py", "iterative_ppo.py", "evaluate.py")
# where the commands are documented: the README and every docs page
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
HINT = "add a local stand-in to tests/test_readme_commands.py"

# ------------------------------------------------------------------------------------------ substitution tables
# hub model -> the local model built in tests/fixtures_chat.write_models. A model named with --user_model or
# --judge_model next to --user_api_base / --judge_api_base is not loaded here: the local server answers as it.
MODELS = {
    "meta-llama/Meta-Llama-3-8B-Instruct": "policy",
    "meta-llama/Llama-3.2-1B-Instruct": "policy",
    "meta-llama/Llama-3.1-70B-Instruct": "policy",  # only where it would be loaded in-process
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": "armo_rm",
    "sfairXC/FsfairX-LLaMA3-RM-v0.1": "rm",
    "YOUR_BT_REWARD_MODEL": "rm",
}
# hf: dataset -> fixture file in the same format
DATASETS = {
    "hf:Anthropic/hh-rlhf": "hh.jsonl",
    "hf:openbmb/UltraInteract_pair": "ultrainteract.jsonl",
}
# a local file or folder a page names (exact, or a prefix ending in '/') -> its stand-in under tmp
FILES = {
    "conversations_train1.json": "conversations_train1.json",  # Education Dialogue's training file
    "runs/RUN_A/": "RUN_A/",  # a tiny REFUEL run made by the test first
}
# endpoint -> the local OpenAI-compatible server
URLS = {"http://USER_HOST:8000/v1": "server"}
# flags whose values a run writes: redirected under tmp, no stand-in needed
OUTPUT_FLAGS = ("--save_rollouts", "--output", "--output_dir")
API_OF = {"--user_model": "--user_api_base", "--judge_model": "--judge_api_base"}
# sizes: replaced where a page sets them, added where it does not (the defaults are for real runs)
COMMON_SIZES = {"--num_iterations": "1", "--prompts_per_iteration": "8", "--num_eval": "4", "--max_new_tokens": "4",
                "--gen_batch_size": "8"}
SIZES = {
    "refuel.py": {**COMMON_SIZES, "--minibatch_size": "4", "--gradient_accumulation_steps": "2"},  # 2 divides 4
    "baselines_dpo_rebel.py": {**COMMON_SIZES, "--prompts_per_iteration": "4", "--minibatch_size": "4"},
    # --max_turns 10 -> 3 (the lessons are cut to it); no value-only warm-up, so the one iteration trains the policy
    "mtpo.py": {**COMMON_SIZES, "--prompts_per_iteration": "4", "--max_turns": "3", "--value_warmup_iterations": "0"},
    "iterative_ppo.py": {**COMMON_SIZES, "--q_minibatch_size": "4", "--ppo_minibatch_size": "4"},
    "evaluate.py": {"--num_contexts": "4", "--max_new_tokens": "4", "--gen_batch_size": "8"},
}

# what makes a value need a stand-in
HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name
PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9]*(_[A-Z0-9]+)+$")  # YOUR_BT_REWARD_MODEL
FILE_EXT = re.compile(r"\.(jsonl?|txt|ya?ml|csv|parquet|tsv|pt|bin|safetensors)$")


# -------------------------------------------------------------------------------------------------- page parsing
def fenced_lines(text: str) -> list[tuple[int, list[str]]]:
    """(block number, logical lines) of every fenced code block, backslash-continued lines joined."""
    blocks, inside, lines, pending = [], False, [], ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("```"):
            if inside:
                blocks.append((len(blocks), lines + ([pending] if pending.strip() else [])))
                lines, pending = [], ""
            inside = not inside
            continue
        if not inside:
            continue
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
        else:
            lines.append(pending + stripped)
            pending = ""
    return blocks


def parse_page(text: str) -> dict:
    """One markdown page's {'commands': chat commands as dicts (block, line, launcher, script, args), 'templates':
    chat command lines with '...' placeholders, 'served': [(model, port)] of the `vllm serve` lines}."""
    commands, templates, served = [], [], []
    for block, lines in fenced_lines(text):
        for line in lines:
            try:
                tokens = shlex.split(line, comments=True)
            except ValueError:
                continue
            if tokens[:2] == ["vllm", "serve"]:
                port = tokens[tokens.index("--port") + 1] if "--port" in tokens else "8000"
                served.append((tokens[2], port))
                continue
            at = next((i for i, t in enumerate(tokens) if Path(t).name in SCRIPTS), None)
            if at is None:
                continue
            args = tokens[at + 1:]
            if not any(a == "--env" and b == "chat" for a, b in zip(args, args[1:])):
                continue
            cmd = dict(block=block, line=line, launcher=tokens[:at], script=Path(tokens[at]).name, args=args)
            (templates if any("..." in t for t in args) else commands).append(cmd)
    return dict(commands=commands, templates=templates, served=served)


def parse_pages(paths: list[Path]) -> dict:
    """parse_page over several pages, each command tagged with its page ('page'); a command written on more than one
    page (the same launcher, script and arguments) is kept once, so it runs once."""
    parsed, seen = dict(commands=[], templates=[], served=[]), set()
    for path in paths:
        one = parse_page(path.read_text())
        page = str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)
        for kind in ("commands", "templates"):
            for cmd in one[kind]:
                key = (tuple(cmd["launcher"]), cmd["script"], tuple(cmd["args"]))
                if key not in seen:
                    seen.add(key)
                    parsed[kind].append(dict(cmd, page=page))
        parsed["served"] += one["served"]
    return parsed


def flag_value(args: list, flag: str):
    return args[args.index(flag) + 1] if flag in args else None


def label(cmd: dict) -> str:
    """A readable name for a documented command."""
    a, script = cmd["args"], cmd["script"]
    if script == "refuel.py":
        if "--user_model" in a or "--user_api_base" in a:
            return "refuel-setting-one"
        data = flag_value(a, "--prompts_path") or ""
        return "refuel-setting-two-" + ("hh" if "hh-rlhf" in data else "ultrainteract" if "UltraInteract" in data
                                        else Path(data).stem) + ("-lora" if "--lora_r" in a else "")
    if script == "baselines_dpo_rebel.py":
        return f"baselines-{flag_value(a, '--loss')}-{flag_value(a, '--mode')}"
    if script == "mtpo.py":
        data = flag_value(a, "--prompts_path") or ""
        return f"mtpo-{flag_value(a, '--variant') or 'mtpo-tau'}-" + ("education" if "conversations" in data
                                                                       else Path(data).stem)
    if script == "iterative_ppo.py":
        return "iterative-ppo"
    return f"evaluate-{flag_value(a, '--judge') or 'oracle'}-judge"


def needs_stand_in(value: str) -> str | None:
    """What kind of thing `value` names that cannot exist here (None: a plain value, or a file in the repository)."""
    if "://" in value:
        return "URL"
    if value.startswith("hf:"):
        return "hf: dataset"
    if PLACEHOLDER.match(value):
        return "placeholder"
    if (ROOT / value).exists():
        return None
    if HUB_NAME.match(value) and not FILE_EXT.search(value):
        return "hub model"
    if "/" in value or FILE_EXT.search(value):
        return "file"
    return None


def covered(value: str) -> bool:
    return (value in MODELS or value in DATASETS or value in URLS or value in FILES
            or any(k.endswith("/") and value.startswith(k) for k in FILES))


def uncovered(cmd: dict) -> list[str]:
    """The values of a documented command that need a stand-in the tables lack, each with what to do."""
    problems, args = [], cmd["args"]
    for i, value in enumerate(args):
        if value.startswith("--") or (i and args[i - 1] in OUTPUT_FLAGS):
            continue
        kind = needs_stand_in(value)
        if kind and not covered(value):
            problems.append(f"{label(cmd)}: {kind} {value!r} has no stand-in: {HINT} (MODELS, DATASETS, FILES or "
                            f"URLS) and build it there")
    launcher = cmd["launcher"]
    if launcher and launcher[0] not in ("python", "python3"):
        if launcher[:2] != ["accelerate", "launch"]:
            problems.append(f"{label(cmd)}: launcher {' '.join(launcher)!r} is not python or accelerate launch: {HINT}")
        config = flag_value(launcher, "--config_file")
        if config and not (ROOT / config).exists():
            problems.append(f"{label(cmd)}: accelerate config {config} is not in the repository")
    return problems


PARSED = parse_pages(PAGES)
COMMANDS = PARSED["commands"]
# the chat commands the README and docs pages have today; a new one is run as well (and must have its stand-ins)
EXPECTED = {"refuel-setting-one", "refuel-setting-two-hh", "refuel-setting-two-ultrainteract",
            "refuel-setting-two-hh-lora", "mtpo-mtpo-tau-education", "baselines-rebel-lt-mixed", "iterative-ppo", "evaluate-reward_model-judge",
            "evaluate-llm-judge"}


# --------------------------------------------------------------------------------------------- the stand-ins
@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory):
    """Models, datasets, the local server and RUN_A, built once for the module."""
    import fixtures_chat as fc

    path = tmp_path_factory.mktemp("readme")
    models = fc.write_models(path)
    info = fc.write_datasets(path)
    served = {model for model, _ in PARSED["served"]}
    server, url = fc.start_server(served)
    # runs/RUN_A: one tiny REFUEL iteration on the HH fixture
    run_a = [sys.executable, "refuel.py", "--env", "chat", "--model_name_or_path", str(models["policy"]),
             "--reward_model", str(models["rm"]), "--prompts_path", str(path / "hh.jsonl"), "--num_iterations", "1",
             "--prompts_per_iteration", "4", "--minibatch_size", "4", "--num_eval", "2", "--max_new_tokens", "4",
             "--output_dir", str(path), "--run_name", "RUN_A"]
    run(run_a)
    assert (path / "RUN_A" / "checkpoint" / "policy" / "config.json").exists()
    yield dict(path=path, models=models, url=url, **info)
    server.shutdown()


def substitute(cmd: dict, s: dict, run: Path) -> list[str]:
    """The command line to run: python, the script, the page's args with the tables applied, tiny sizes."""
    args, out = list(cmd["args"]), []
    for i, value in enumerate(args):
        flag = args[i - 1] if i else None
        if flag in OUTPUT_FLAGS:
            out.append(str(run / Path(value).name))
        elif value in URLS:
            out.append(s["url"])
        elif value in MODELS:
            api = API_OF.get(flag)
            out.append(value if api and api in args else str(s["models"][MODELS[value]]))
        elif value in DATASETS:
            out.append(str(s["path"] / DATASETS[value]))
        elif value in FILES:
            out.append(str(s["path"] / FILES[value]))
        else:
            prefix = next((k for k in FILES if k.endswith("/") and value.startswith(k)), None)
            out.append(str(s["path"] / (FILES[prefix] + value[len(prefix):])) if prefix else value)
    for flag, size in SIZES[cmd["script"]].items():
        if flag in out:
            out[out.index(flag) + 1] = size
        else:
            out += [flag, size]
    return [sys.executable, cmd["script"], *out]


def one_thread_env() -> dict:
    """subprocess_env with one torch thread: the tiny models run twice as fast on a shared 2-core machine."""
    return dict(subprocess_env(), OMP_NUM_THREADS="1")


def run(argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env=one_thread_env(), timeout=timeout)
    assert p.returncode == 0, f"{shlex.join(argv)}\n" + p.stdout[-3000:] + p.stderr[-3000:]
    return p


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------------- tests
def test_the_documented_chat_commands_are_found_and_only_templates_are_skipped():
    labels = [label(c) for c in COMMANDS]
    assert EXPECTED <= set(labels), f"documented chat commands not found: {sorted(EXPECTED - set(labels))}"
    assert len(labels) == len(set(labels)), \
        f"two different documented commands with the same label: {[(label(c), c['page']) for c in COMMANDS]}"
    # the only chat lines not run are templates with literal '...' placeholders
    for t in PARSED["templates"]:
        assert any(tok == "..." or tok.startswith("...") or tok.endswith("...") for tok in t["args"]), t["line"]
    assert "mtpo.py" in [t["script"] for t in PARSED["templates"]], PARSED["templates"]  # `--model_name_or_path ...`
    # the endpoint the commands use is a page's `vllm serve` line's (the local server stands in for it)
    assert PARSED["served"] and all(port == "8000" for _, port in PARSED["served"])
    for c in COMMANDS:
        for api in API_OF.values():
            if api in c["args"]:
                model = flag_value(c["args"], next(k for k, v in API_OF.items() if v == api))
                assert model in {m for m, _ in PARSED["served"]}, \
                    f"{label(c)} ({c['page']}): {model} is not served by any page's `vllm serve` line"


def test_every_documented_chat_command_has_its_stand_ins():
    problems = [p for c in COMMANDS for p in uncovered(c)]
    assert not problems, "\n".join(problems)


SYNTHETIC = """
Some text.

```bash
# a new setting
vllm serve org/served-judge --port 9000
accelerate launch --config_file configs/deepspeed_zero2.yaml refuel.py --env chat \\
  --model_name_or_path new-org/New-Model-7B --reward_model sfairXC/FsfairX-LLaMA3-RM-v0.1 \\
  --prompts_path hf:someone/new-dataset --offline_path data/offline.jsonl --save_rollouts pairs.jsonl \\
  --user_api_base http://OTHER_HOST:9000/v1 --user_model org/served-judge --prompts_per_iteration 32
python mtpo.py --env chat --model_name_or_path ... --prompts_path ...   # a template
python refuel.py --prompts_path hf:tutor/not-chat   # not --env chat: not collected
python evaluate.py --env chat --policies runs/RUN_A/checkpoint/policy --names x --prompts_path hf:Anthropic/hh-rlhf
```
"""


def test_a_new_documented_command_without_stand_ins_fails_with_what_to_add():
    parsed = parse_page(SYNTHETIC)
    assert [label(c) for c in parsed["commands"]] == ["refuel-setting-one", "evaluate-oracle-judge"]
    assert [t["script"] for t in parsed["templates"]] == ["mtpo.py"]
    assert parsed["served"] == [("org/served-judge", "9000")]
    new, known = parsed["commands"]
    assert new["launcher"] == ["accelerate", "launch", "--config_file", "configs/deepspeed_zero2.yaml"]
    assert flag_value(new["args"], "--prompts_per_iteration") == "32"  # continued lines joined
    problems = uncovered(new)
    named = {p.split(" has no stand-in")[0].split(": ", 1)[1] for p in problems}
    assert named == {"hub model 'new-org/New-Model-7B'", "hf: dataset 'hf:someone/new-dataset'",
                     "file 'data/offline.jsonl'", "URL 'http://OTHER_HOST:9000/v1'", "hub model 'org/served-judge'"}
    assert all(HINT in p for p in problems)
    assert uncovered(known) == []  # runs/RUN_A/... and the HH dataset have stand-ins; pairs.jsonl is an output
    assert needs_stand_in("configs/deepspeed_zero2.yaml") is None and needs_stand_in("0.05") is None
    assert needs_stand_in("YOUR_REWARD_MODEL") == "placeholder" and needs_stand_in("lt-mixed") is None


def test_a_command_on_two_pages_runs_once(tmp_path):
    (tmp_path / "a.md").write_text(SYNTHETIC)
    (tmp_path / "b.md").write_text(SYNTHETIC.replace("--names x", "--names y"))
    parsed = parse_pages([tmp_path / "a.md", tmp_path / "b.md"])
    assert [(label(c), Path(c["page"]).name) for c in parsed["commands"]] == [
        ("refuel-setting-one", "a.md"), ("evaluate-oracle-judge", "a.md"), ("evaluate-oracle-judge", "b.md")]
    assert len(parsed["templates"]) == 1 and len(parsed["served"]) == 2


@pytest.mark.parametrize("cmd", COMMANDS, ids=[label(c) for c in COMMANDS])
def test_documented_chat_command_runs(cmd, stand_ins, tmp_path):
    problems = uncovered(cmd)
    assert not problems, "\n".join(problems)
    name = label(cmd)
    argv = substitute(cmd, stand_ins, tmp_path)
    from fixtures_chat import StandInHandler

    before = dict(StandInHandler.counts)
    if cmd["script"] == "evaluate.py":
        out_json = tmp_path / "evaluation.json"
        p = run(argv + ["--output", str(out_json)])
        assert "win rate (%) against" in p.stdout, p.stdout[-3000:]
        result = json.loads(out_json.read_text())
        (row,) = result["rows"]
        assert row["name"] == flag_value(cmd["args"], "--names") and row["win_rate"], row
        assert row["name"] in p.stdout  # the printed table
        if flag_value(cmd["args"], "--judge") == "llm":
            assert StandInHandler.counts["judge"] > before.get("judge", 0)
            assert result["judge_parse"].get("format", 0) > 0 and not result["judge_parse"].get("failed"), result
        return

    extra = ["--output_dir", str(tmp_path), "--run_name", name]
    pairs = tmp_path / "pairs.jsonl"
    hh_pairs = name == "refuel-setting-two-hh" or (cmd["script"] == "baselines_dpo_rebel.py" and "hh-rlhf" in (
        flag_value(cmd["args"], "--offline_path") or flag_value(cmd["args"], "--prompts_path") or ""))
    if hh_pairs and "--save_rollouts" not in cmd["args"]:
        extra += ["--save_rollouts", str(pairs)]
    p = run(argv + extra)
    run_dir = tmp_path / name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 1, summary
    rows = metrics(run_dir)
    assert rows, "no metrics logged"
    text = p.stdout + p.stderr

    if "--user_api_base" in cmd["args"]:  # every user turn came from the stand-in server, in its format
        kind = "student" if "conversations" in (flag_value(cmd["args"], "--prompts_path") or "") else "user"
        assert StandInHandler.counts[kind] > before.get(kind, 0)
        fallback = [r[k] for r in rows for k in r if k.endswith("user_parse_fallback_rate")]
        assert fallback and all(v == 0 for v in fallback), f"replies off the format: {fallback}"
    if "--judge_api_base" in cmd["args"]:
        assert StandInHandler.counts["judge"] > before.get("judge", 0)
    data = flag_value(cmd["args"], "--prompts_path") or ""
    if "hh-rlhf" in data:  # the records with roles out of order are skipped and counted
        assert f"skipped {stand_ins['hh_malformed']} malformed" in text, text[-3000:]
    if "UltraInteract" in data:  # trajectories of more than 5 turns are dropped (the papers' filter)
        assert f"skipped {stand_ins['ui_too_long']} more than 5 turns" in text, text[-3000:]
    if hh_pairs:  # H is each record's own number of turns (setting two; D_off's own last turn for the LT modes)
        saved = [json.loads(line) for line in pairs.read_text().splitlines()]
        assert saved, "no pairs saved"
        for r in saved:
            first = next(m["content"] for m in r["conv_a"] if m["role"] == "user")
            turns = stand_ins["hh_turns"][first]
            assert r["H"] <= turns, f"{name}: H = {r['H']} for a record of {turns} turns: {first!r}"
            assert r["H"] == turns, f"{name}: H = {r['H']}, the record has {turns} turns: {first!r}"
            assert 1 <= r["h"] <= r["H"] and (r["h"] == r["H"] or not r.get("mode", "").startswith("lt-")), r
            assert sum(m["role"] == "assistant" for m in r["conv_a"]) == r["H"]
