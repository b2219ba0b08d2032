"""benchmarks/gpu_check.py's CPU dry run, as a user runs it: every section's row, the four algorithm scripts' one
iteration in the chat setting with a first-step log-ratio of ~0, the compile count, the time budget."""
import json
import math
import re
import subprocess
import sys

import pytest

from conftest import ROOT, subprocess_env

SCRIPTS = ("refuel.py", "baselines_dpo_rebel.py", "mtpo.py", "iterative_ppo.py")


def run_check(tmp_path, *flags, timeout=600):
    out = tmp_path / "gpu_check.md"
    cmd = [sys.executable, "benchmarks/gpu_check.py", "--dry_run", "--threads", "1", "--out", str(out),
           "--workdir", str(tmp_path / "work"), *flags]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=subprocess_env(), timeout=timeout)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout, out


def final_table(stdout):
    """The rows of the one markdown table printed at the end."""
    lines = stdout[stdout.rindex("| section | check | result | status |"):].splitlines()
    rows = []
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        rows.append(dict(zip(("section", "check", "result", "status"), cells)))
    return rows


@pytest.mark.long  # about a minute: CI runs the budget check below (the script's argument handling and table)
def test_dry_run_covers_every_section(tmp_path):
    stdout, out = run_check(tmp_path)
    rows = final_table(stdout)
    assert {r["section"] for r in rows} == {"compile", "throughput", "scripts", "memory"}, rows
    assert stdout.index("GPU check, 20") < stdout.index("| section |")  # the date and the device above the table
    assert "CPU dry run" in stdout

    scripts = [r for r in rows if r["section"] == "scripts" and r["status"] != "skipped: no CUDA"]
    assert [r["check"].split()[0] for r in scripts] == list(SCRIPTS), scripts
    assert any(r["section"] == "scripts" and r["status"] == "skipped: no CUDA" for r in rows)
    for r in scripts:
        assert r["status"] == "ok", r
        value = float(re.search(r"first-step log-ratio (\S+)", r["result"]).group(1))
        assert math.isfinite(value) and abs(value) < 1e-3, r
        calls, total = map(int, re.search(r"sampler calls (\d+)/(\d+) on the fast path", r["result"]).groups())
        assert calls == total > 0 and "0 on the plain loop" in r["result"], r

    compile_rows = [r for r in rows if r["section"] == "compile"]
    first = re.search(r"1st call \(batch \d+\) \S+ s, (\d+) graphs, (\d+) graph breaks", compile_rows[0]["result"])
    assert compile_rows[0]["status"] == "ok" and int(first.group(1)) >= 1 and first.group(2) == "0", compile_rows
    assert "(same shape)" in compile_rows[0]["result"] and "s, 0 new graphs" in compile_rows[0]["result"]
    assert any(r["status"] == "skipped: no CUDA" for r in compile_rows)

    throughput = [r for r in rows if r["section"] == "throughput"]
    assert any("tok/s: sampler" in r["result"] and r["status"] == "ok" for r in throughput), throughput
    assert any("REFUEL collection vs one flat batch" in r["check"] for r in throughput)
    assert any("MFU" in r["result"] for r in throughput)
    memory = [r for r in rows if r["section"] == "memory"]
    assert memory and memory[0]["status"] in ("ok", "not available"), memory

    text = out.read_text()  # the file: the same table under the date and device, the sub-benchmarks' tables below
    assert "| section | check | result | status |" in text and "GPU check, 20" in text
    assert "benchmarks/throughput.py" in text
    data = json.loads(out.with_suffix(".json").read_text())
    assert len(data["rows"]) == len(rows) and not data["cuda"]
    assert all(data["data"][f"script_{s[:-3]}"]["first_step_logratio"] is not None for s in SCRIPTS)


def test_spent_budget_skips_sections(tmp_path):
    stdout, _ = run_check(tmp_path, "--time_budget", "0", "--sections", "compile", "scripts", "throughput",
                          timeout=300)
    rows = final_table(stdout)
    assert {r["section"] for r in rows} == {"compile", "scripts", "throughput"}
    assert all(r["status"] == "skipped: time" for r in rows), rows
