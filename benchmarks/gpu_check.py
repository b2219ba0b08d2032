"""One prepared GPU check: the README's GPU claims measured in one command, one markdown table at the end.

Sections, in the default order (each step a subprocess, so one failure or a held GPU allocation does not spoil the
next):
  compile     the fast path's compile count and time: a first and a second `sample_turns(fast=True)` call of the
              same shape on the 1B model (torch._dynamo counters), then one of a new batch shape; it also warms
              inductor's cache for the 1B shapes that follow;
  throughput  `benchmarks/throughput.py` at the 1B and 8B Llama shapes, batches 32 and 256: sampler, fast path and
              `generate` tok/s, share of the decode roofline, REFUEL collection vs a flat batch, training-step MFU,
              against the README's goals (roofline and MFU peaks from the GPU's name, or --bandwidth_gbs and
              --peak_tflops);
  scripts     one iteration of refuel.py, baselines_dpo_rebel.py (DPO, LT-ONLINE), mtpo.py (MTPO self-play) and
              iterative_ppo.py in bf16 on a random-init 1B Llama with `--env chat` (a random-init
              sequence-classification reward model, pre-sampled questions from a generated JSONL of two-turn
              dialogues), `--gradient_checkpointing` where the script has the flag, and the sampler's default path,
              the fast path on CUDA; each row checks the first step's log-ratio (pi = pi_t = pi_0 there, so ~0)
              from the run's metrics.jsonl, that no "fast path failed" warning appears, and that every default
              sampler call ran on the fast path (counted by a probe around simulator.sample_turns);
  memory      `benchmarks/memory.py --shape 8b --measure` (peak GPU memory beside its CPU estimate), when the file
              exists ("not available" otherwise).

    python benchmarks/gpu_check.py --out gpu_check.md                  # on one H100/H200, at most ~8 minutes
    python benchmarks/gpu_check.py --dry_run --out /tmp/gpu_check.md   # CPU, tiny shapes, every CPU-capable path
    python benchmarks/gpu_check.py --sections scripts memory --time_budget 300   # a second run: what was skipped

The dry run (`--dry_run`, or any run without CUDA) runs the same steps at tiny shapes on the CPU, in fp32: throughput
without its fast path (inductor compiles take minutes on a CPU), the compile step with dynamo's 'eager' backend
(full-graph capture and recompile counts, no code generation), the scripts with the default sampler path sent
down the fast path (its uncompiled static-cache step), and marks the GPU-only figures "skipped: no CUDA".
The scripts' checkpoint writes of model weights and accelerate state are skipped unless --keep_checkpoints (at
1B one run's checkpoint is 24-42 GB: the GPU machine's disk and many seconds).

`--time_budget` (seconds) bounds the whole run: a section that would start after it is spent is marked
"skipped: time", one that runs past it is stopped ("timeout"). `--sections` runs a subset, in the order given.
The file named by --out gets the table, the date and the GPU, and below it the sub-benchmarks' own tables;
--json (default: --out with .json) gets every figure. Only torch, transformers and the standard library are
imported here; the algorithm scripts and throughput.py also need tyro (the GPU machine may lack it: carry the
wheel). Models and tokenizers are built in code: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

# hidden, layers, heads, kv heads, intermediate, vocab (1b and 8b as in benchmarks/throughput.py)
SHAPES = {"tiny": (64, 2, 4, 2, 128, 512), "1b": (2048, 16, 32, 8, 8192, 128256)}
RM_SHAPES = {"tiny": (32, 1, 4, 2, 64), "1b": (256, 2, 4, 4, 512)}  # the reward model: small, same vocabulary
sys.path.insert(0, str(ROOT / "tests"))
from templates import LLAMA3_TEMPLATE  # noqa: E402  (the tests' tiny-model template, one copy)
SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
# memory bandwidth GB/s and dense bf16 TFLOP/s by device name (first match wins)
GPU_SPECS = [("H200", 4800, 989), ("H100 NVL", 3900, 835), ("H100 PCIe", 2000, 756), ("H100", 3350, 989),
             ("A100", 2039, 312)]
GOALS = {"share_8b_256": 50.0, "share_8b_32": 40.0, "collection_ratio": 1.3, "mfu_1b": 40.0}
SECTIONS = ("compile", "throughput", "scripts", "memory")  # the default order
FAST_FAILED = re.compile(r"fast path failed", re.IGNORECASE)


# ----------------------------------------------------------------------------------------------------------------
# Fixtures: a word-level tokenizer with a Llama-3 chat template, random-init Llama policy and reward model, prompts
# ----------------------------------------------------------------------------------------------------------------
def word_tokenizer(vocab_size: int):
    """A word-level tokenizer of exactly vocab_size entries (words w0, w1, ...) with Llama-3 special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", *SPECIALS, "user", "assistant", "system"]
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<|begin_of_text|>", additional_special_tokens=SPECIALS,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


def llama(shape: str, tok, device="cpu", dtype=None, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, _ = SHAPES[shape]
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=4096,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(dtype or torch.float32).eval()


def random_words(rng, tok, n: int) -> str:
    return " ".join(f"w{i}" for i in rng.integers(0, min(len(tok) - 8, 2000), size=n))


def build_fixtures(workdir: Path, shape: str, n_dialogues: int = 32, max_turns: int = 2, device: str = "cpu") -> dict:
    """workdir/{policy, rm, dialogues.jsonl}: a random-init Llama policy (saved in bf16 on GPU shapes), a
    random-init LlamaForSequenceClassification reward model on the same tokenizer, and two-turn dialogues
    ({"messages": [...]}) whose later user turns become the pre-sampled questions."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = word_tokenizer(SHAPES[shape][5])
    dtype = torch.float32 if shape == "tiny" else torch.bfloat16
    policy = llama(shape, tok, device, dtype)  # initialised on the GPU when there is one: seconds, not a minute
    policy.save_pretrained(workdir / "policy")
    tok.save_pretrained(workdir / "policy")
    del policy
    if device != "cpu":
        torch.cuda.empty_cache()
    hidden, layers, heads, kv, inter = RM_SHAPES[shape]
    torch.manual_seed(1)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv, intermediate_size=inter, num_labels=1, pad_token_id=tok.pad_token_id))
    rm.to(dtype).save_pretrained(workdir / "rm")
    tok.save_pretrained(workdir / "rm")
    rng = np.random.default_rng(0)
    lines = []
    for _ in range(n_dialogues):  # short turns: every turn's static cache fits the smallest length bucket
        msgs = []
        for k in range(max_turns):
            msgs.append({"role": "user", "content": random_words(rng, tok, 6 if k == 0 else 4)})
            msgs.append({"role": "assistant", "content": random_words(rng, tok, 4)})
        lines.append(json.dumps({"messages": msgs}))
    (workdir / "dialogues.jsonl").write_text("\n".join(lines) + "\n")
    return {"policy": str(workdir / "policy"), "rm": str(workdir / "rm"), "prompts": str(workdir / "dialogues.jsonl")}


# ----------------------------------------------------------------------------------------------------------------
# Child processes: an algorithm script under a sampler probe, and the compile measurement
# ----------------------------------------------------------------------------------------------------------------
def dynamo_counts() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # noqa: BLE001 - a torch without dynamo: no counts
        return {}
    return {"frames_ok": int(counters["frames"]["ok"]), "frames_total": int(counters["frames"]["total"]),
            "unique_graphs": int(counters["stats"]["unique_graphs"]),
            "graph_breaks": int(sum(counters["graph_break"].values())),
            "recompiles": int(sum(v for k, v in counters["recompiles"].items())) if "recompiles" in counters else 0}


def child_script(stats_path: str, force_fast: bool, keep_checkpoints: bool, script: str, argv: list) -> None:
    """Run an algorithm script as `python script argv` would, in this process, counting the sampler's calls by the
    path they took (fast or plain). force_fast: the default path (fast=None) takes the fast path on CPU too (its
    uncompiled static-cache step), as it does on CUDA. Unless keep_checkpoints, model weights and accelerate state
    are not written (a 1B run's checkpoint is 24-42 GB of disk and many seconds)."""
    import runpy
    import warnings

    sys.path.insert(0, str(ROOT))
    os.chdir(ROOT)
    import simulator as sim

    stats = {"auto_calls": 0, "auto_fast": 0, "auto_plain": 0, "explicit_calls": 0, "explicit_plain": 0,
             "fast_failed_warnings": 0, "first_fast_call_s": None, "fast_call_s": [], "error": None}
    inner, outer = sim._sample_turns, sim.sample_turns
    inner_sig, outer_sig = inspect.signature(inner), inspect.signature(outer)
    state = {"auto": False}

    def probe_inner(*a, **k):  # the decode loop, told which path to take
        fast = bool(inner_sig.bind(*a, **k).arguments.get("fast", False))
        if state["auto"]:
            stats["auto_fast" if fast else "auto_plain"] += 1
        elif not fast:
            stats["explicit_plain"] += 1
        t = time.perf_counter()
        out = inner(*a, **k)
        if fast:
            stats["fast_call_s"].append(round(time.perf_counter() - t, 3))
        return out

    def probe_outer(*a, **k):  # the sampler as the scripts call it: fast=None is the default path
        auto = outer_sig.bind(*a, **k).arguments.get("fast") is None
        stats["auto_calls" if auto else "explicit_calls"] += 1
        state["auto"] = auto
        try:
            return outer(*a, **k)
        finally:
            state["auto"] = False
    sim._sample_turns, sim.sample_turns = probe_inner, probe_outer
    if force_fast:
        from plumbing import fast_decode

        use = fast_decode.use_fast_path
        fast_decode.use_fast_path = lambda model, fast: True if fast is None else use(model, fast)
    if not keep_checkpoints:
        import accelerate
        import transformers

        transformers.PreTrainedModel.save_pretrained = lambda self, *a, **k: None
        accelerate.Accelerator.save_state = lambda self, *a, **k: None
    shown = warnings.showwarning

    def count_warning(message, *a, **k):
        if FAST_FAILED.search(str(message)):
            stats["fast_failed_warnings"] += 1
        return shown(message, *a, **k)
    warnings.showwarning = count_warning
    sys.argv = [script, *argv]
    try:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    except BaseException as e:  # noqa: BLE001 - recorded, then raised again
        stats["error"] = f"{type(e).__name__}: {str(e)[:500]}"
        raise
    finally:
        stats["first_fast_call_s"] = stats["fast_call_s"][0] if stats["fast_call_s"] else None
        stats["fast_call_s"] = stats["fast_call_s"][:8]
        stats["dynamo"] = dynamo_counts()
        stats["fast_path_failed_models"] = len(getattr(sim, "_FAST_PATH_FAILED", ()))
        Path(stats_path).write_text(json.dumps(stats))


def child_compile(out_path: str, shape: str, batches: list, prompt_len: int, new_tokens: int) -> None:
    """Time sample_turns(fast=True, compile_step=True) twice at one shape, then once at a second batch size, with
    torch._dynamo's counters after each call. Without CUDA the step is compiled with the 'eager' backend (dynamo's
    full-graph capture is checked, no inductor code is generated: minutes on a CPU)."""
    import numpy as np
    import torch

    sys.path.insert(0, str(ROOT))
    import simulator as sim

    cuda = torch.cuda.is_available()
    if not cuda:
        real_compile = torch.compile

        def eager_compile(fn=None, **kw):
            return real_compile(fn, backend="eager", fullgraph=kw.get("fullgraph", False), dynamic=kw.get("dynamic"))
        torch.compile = eager_compile
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    tok = word_tokenizer(SHAPES[shape][5])
    model = llama(shape, tok, device, dtype)
    rng = np.random.default_rng(0)
    res = {"shape": shape, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "backend": "inductor (reduce-overhead)" if cuda else "eager", "calls": []}

    def call(batch):
        convs = [[{"role": "user", "content": random_words(rng, tok, prompt_len - 8)}] for _ in range(batch)]
        before = dynamo_counts()
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        sim.sample_turns(model, tok, convs, new_tokens, fast=True, compile_step=True, max_batch_size=batch)
        if cuda:
            torch.cuda.synchronize()
        after = dynamo_counts()
        res["calls"].append({"batch": batch, "seconds": round(time.perf_counter() - t, 3),
                             **{f"new_{k}": after.get(k, 0) - before.get(k, 0) for k in after}})
        Path(out_path).write_text(json.dumps(res))  # what is done so far survives a timeout
    call(batches[0])
    call(batches[0])
    for b in batches[1:]:
        call(b)
    res["totals"] = dynamo_counts()
    Path(out_path).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------------------------------
# The parent: sections, budget, table
# ----------------------------------------------------------------------------------------------------------------
def run_cmd(cmd, timeout: float, log_dir: Path, name: str, cpu_only: bool = False):
    """(returncode or None on timeout, combined output, seconds). The child's process group is killed on timeout."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if cpu_only:  # a dry run on a machine with a GPU stays on the CPU
        env["CUDA_VISIBLE_DEVICES"] = ""
    log = log_dir / f"{name}.log"
    t = time.time()
    with open(log, "w") as f:
        p = subprocess.Popen([str(c) for c in cmd], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env,
                             start_new_session=True)
        try:
            rc = p.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc = None
    return rc, log.read_text(errors="replace"), time.time() - t


def tail(text: str, n: int = 300) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " / ".join(lines[-3:])[-n:]


def md_cell(x) -> str:
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_tables(text: str) -> list:
    """Every markdown table in a program's output: a list of (header cells, [row dicts])."""
    tables, block = [], []
    for line in text.splitlines() + [""]:
        if line.strip().startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
            continue
        if len(block) >= 2 and set("".join(block[1])) <= set("-: "):
            tables.append((block[0], [dict(zip(block[0], r)) for r in block[2:]]))
        block = []
    return tables


def percent(s) -> float:
    try:
        return float(str(s).strip().rstrip("%").rstrip("x"))
    except ValueError:
        return float("nan")


def find(row: dict, *words):
    """The value of the first column whose name contains every word (case-insensitive)."""
    for k, v in row.items():
        if all(w in k.lower() for w in words):
            return v
    return None


def has_arg(script: str, name: str) -> bool:
    """Whether the script's Args dataclass has this field (so the flag exists)."""
    return re.search(rf"^    {name}\s*:", (ROOT / script).read_text(), re.MULTILINE) is not None


def gpu_specs(name: str, bandwidth: float, peak: float):
    for key, bw, tf in GPU_SPECS:
        if key.lower() in name.lower():
            return bandwidth or bw, peak or tf
    return bandwidth, peak


class Check:
    def __init__(self, args):
        import torch

        self.args, self.rows, self.details, self.data = args, [], [], {}
        self.training_shapes = set()  # shapes whose training-step row is written
        self.t0 = time.time()
        self.cuda = torch.cuda.is_available() and not args.dry_run
        self.gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
        self.tyro = importlib.util.find_spec("tyro") is not None
        self.work = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_check_"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs = self.work / "logs"
        self.logs.mkdir(exist_ok=True)
        self.fixtures = None

    def left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    def row(self, section, check, result, status):
        self.rows.append((section, check, result, status))
        print(f"  {section} | {check} | {result} | {status}", flush=True)

    def slot(self, cap: float, need: float = 15.0):
        """Seconds this step may run (min of its cap and the budget left), or None when the budget is spent."""
        left = self.left()
        return None if left < need else min(cap, left)

    def python(self, script_rel):
        return [PY, str(ROOT / script_rel)]

    # ------------------------------------------------------------------------------------------------ throughput
    def throughput(self):
        a = self.args
        if not self.tyro:
            return self.row("throughput", "benchmarks/throughput.py", "needs tyro (pip install tyro)",
                            "skipped: no tyro")
        if self.cuda:
            bw, tf = gpu_specs(self.gpu, a.bandwidth_gbs, a.peak_tflops)
            runs = [(s, ["--shapes", s, "--batches", "32", "256"], 240 if s == "8b" else 150) for s in ("1b", "8b")]
        else:
            # a CPU has no datasheet peaks: nominal ones let the dry run execute the roofline and MFU columns'
            # code (so it cannot rot); the row below says their values mean nothing here
            bw, tf = a.bandwidth_gbs or 50.0, a.peak_tflops or 1.0
            runs = [("tiny", ["--shapes", "tiny", "--batches", "2", "--prompt_len", "16", "--new_tokens", "4",
                              "--collection_prompts", "2", "--no-fast_path", "--device", "cpu"], 300)]
        for shape, flags, cap in runs:
            extra = (["--bandwidth_gbs", str(bw)] if bw else []) + (["--peak_tflops", str(tf)] if tf else [])
            extra += ["--threads", str(a.threads)] if a.threads else []
            timeout = self.slot(cap)
            if timeout is None:
                self.row("throughput", f"{shape}: benchmarks/throughput.py", "", "skipped: time")
                continue
            rc, out, dt = run_cmd([*self.python("benchmarks/throughput.py"), *flags, *extra], timeout, self.logs,
                                  f"throughput_{shape}")
            self.details.append((f"benchmarks/throughput.py {' '.join(flags + extra)} ({dt:.0f} s)", out))
            if rc != 0:
                self.row("throughput", f"{shape}: benchmarks/throughput.py", f"{tail(out)} ({dt:.0f} s)",
                         "timeout" if rc is None else f"FAIL (rc {rc})")
                continue
            tables = markdown_tables(out)
            self.data[f"throughput_{shape}"] = tables
            for header, rows in tables:
                for r in rows:
                    if "batch" in header:
                        self.sampler_row(r, shape)
                    elif find(r, "ratio") is not None:
                        self.training_row(r, shape)
            if not self.cuda:
                self.row("throughput", f"{shape}: fast path, roofline share, MFU on a GPU",
                         "CPU dry run: fast path off (it compiles), roofline/MFU from nominal peaks",
                         "skipped: no CUDA")

    def sampler_row(self, r, shape):
        b = r.get("batch", "?")
        fast_share, samp_share = percent(find(r, "fast", "share")), percent(find(r, "sampler", "share"))
        result = (f"tok/s: sampler {find(r, 'sampler', 'tok/s')}, fast path {find(r, 'fast', 'tok/s')}, generate "
                  f"{find(r, 'generate', 'tok/s')}; roofline share: sampler {find(r, 'sampler', 'share')}, fast path "
                  f"{find(r, 'fast', 'share')}, generate {find(r, 'generate', 'share')}; peak "
                  f"{find(r, 'peak')} GiB")
        goal = {"256": GOALS["share_8b_256"], "32": GOALS["share_8b_32"]}.get(b) if "8b" in shape else None
        status = "ok"
        check = f"{shape} batch {b}: sampler"
        if goal is not None and self.cuda:
            check += f" (goal: fast path >= {goal:.0f}% of the decode roofline)"
            status = "meets goal" if fast_share >= goal else "below goal"
        elif self.cuda and math.isnan(fast_share) and math.isnan(samp_share):
            status = "no roofline (unknown GPU: pass --bandwidth_gbs)"
        self.row("throughput", check, result, status)

    def training_row(self, r, shape):
        """One collection row (a sampler and a user: the goal is about the policy's sampling alone, pre-sampled user
        turns); the training step's figures once per shape."""
        ratio, label = percent(find(r, "ratio")), find(r, "shape") or shape
        coll = [v for k, v in r.items() if "collection" in k.lower()]
        goal = "pre-sampled" in label
        self.row("throughput", f"{label}: REFUEL collection vs one flat batch" +
                 (f" (goal: <= {GOALS['collection_ratio']}x)" if goal else ""),
                 f"{coll[0] if coll else '?'} vs {find(r, 'flat')}: {find(r, 'ratio')}",
                 ("meets goal" if ratio <= GOALS["collection_ratio"] else "below goal") if self.cuda and goal else "ok")
        if shape in self.training_shapes:
            return
        self.training_shapes.add(shape)
        mfu = percent(find(r, "mfu"))
        goal = " (goal: >= 40% MFU)" if shape == "1b" else ""
        self.row("throughput", f"{shape}: REFUEL training step{goal}",
                 f"{find(r, 'train', 'tok/s')} tok/s, MFU {find(r, 'mfu')}",
                 ("meets goal" if mfu >= GOALS["mfu_1b"] else "below goal") if self.cuda and goal else "ok")

    # ------------------------------------------------------------------------------------------------ memory
    def memory(self):
        path = ROOT / "benchmarks" / "memory.py"
        if not path.exists():
            return self.row("memory", "benchmarks/memory.py", "benchmarks/memory.py not in this checkout",
                            "not available")
        flags = ["--shape", "8b" if self.cuda else "tiny", "--measure"]
        timeout = self.slot(180)
        if timeout is None:
            return self.row("memory", f"benchmarks/memory.py {' '.join(flags)}", "", "skipped: time")
        rc, out, dt = run_cmd([*self.python("benchmarks/memory.py"), *flags], timeout, self.logs, "memory",
                              not self.cuda)
        self.details.append((f"benchmarks/memory.py {' '.join(flags)} ({dt:.0f} s)", out))
        tables = markdown_tables(out)
        self.data["memory"] = tables
        if rc != 0:
            return self.row("memory", f"benchmarks/memory.py {' '.join(flags)}", f"{tail(out)} ({dt:.0f} s)",
                            "timeout" if rc is None else f"FAIL (rc {rc})")
        measured = [rows for header, rows in tables if "measured" in header and "predicted" in header]
        if measured:  # measured vs the formulas, phase by phase
            parts = []
            for r in measured[-1]:
                got, want = percent(r["measured"]), percent(r["predicted"])
                ratio = f" ({got / want:.2f}x)" if want and math.isfinite(got / want) else ""
                parts.append(f"{next(iter(r.values()))} {r['measured']} vs {r['predicted']}{ratio}")
            result = "measured vs predicted: " + "; ".join(parts)
        else:
            result = f"{sum(len(rows) for _, rows in tables)} table rows (details below)"
        self.row("memory", f"benchmarks/memory.py {' '.join(flags)}", f"{result} ({dt:.0f} s)", "ok")
        if not self.cuda:
            self.row("memory", "memory.py --shape 8b --measure (torch.cuda.max_memory_allocated)", "",
                     "skipped: no CUDA")

    # ------------------------------------------------------------------------------------------------ scripts
    def scripts(self):
        a = self.args
        shape = "1b" if self.cuda else "tiny"
        if not self.tyro:
            return self.row("scripts", "all four scripts", "the scripts need tyro (pip install tyro)",
                            "skipped: no tyro")
        if self.slot(600, 60) is None:
            return self.row("scripts", "all four scripts", "", "skipped: time")
        t = time.time()
        self.fixtures = build_fixtures(self.work / "fixtures", shape, max_turns=2,
                                       device="cuda" if self.cuda else "cpu")
        print(f"fixtures ({shape} policy, reward model, dialogues) built in {time.time() - t:.0f} s", flush=True)
        n, n_eval, new = (8, 8, 12) if self.cuda else (4, 2, 4)
        tol = a.logratio_tol or (0.05 if self.cuda else 1e-3)
        for script, flags, metric in self.script_specs(n):
            self.one_script(script, flags, metric, n, n_eval, new, tol, shape)
        shutil.rmtree(self.work / "fixtures", ignore_errors=True)
        if not self.cuda:
            self.row("scripts", "1b, bf16, compiled fast path on CUDA", "", "skipped: no CUDA")

    def script_specs(self, n):
        rm = self.fixtures["rm"]
        return [
            ("refuel.py", {"num_epochs": 1, "minibatch_size": n}, "losses/mean_logratio_a"),
            ("baselines_dpo_rebel.py", {"loss": "dpo", "mode": "lt-online", "num_epochs": 1, "minibatch_size": n},
             "dpo"),
            ("mtpo.py", {"variant": "mtpo", "value_warmup_iterations": 0, "num_epochs": 1, "num_minibatches": 1},
             "charts/kl_to_mu"),
            ("iterative_ppo.py", {"q_model_name_or_path": rm, "q_epochs": 1, "ppo_batches": 1, "ppo_epochs": 1,
                                  "ppo_minibatch_size": 2 * n, "q_minibatch_size": 2 * n},
             "ppo/kl_to_pi_i_first_batch"),
        ]

    def one_script(self, script, flags, metric, n, n_eval, new, tol, shape):
        a, fx = self.args, self.fixtures
        name = script[:-3]
        label = " ".join([script] + [str(flags[k]) for k in ("loss", "mode", "variant") if k in flags])
        argv = ["--env", "chat", "--model_name_or_path", fx["policy"], "--reward_model", fx["rm"],
                "--prompts_path", fx["prompts"], "--max_turns", "2", "--max_new_tokens", str(new),
                "--num_iterations", "1", "--prompts_per_iteration", str(n), "--num_eval", str(n_eval),
                "--eval_every", "1", "--save_every", "1", "--seed", "1", "--bf16", str(self.cuda),
                "--output_dir", str(self.work / "runs"), "--run_name", name]
        missing = []
        for k, v in flags.items():
            if has_arg(script, k):
                argv += [f"--{k}", str(v)]
            else:
                missing.append(k)
        if has_arg(script, "gradient_checkpointing"):
            argv.append("--gradient_checkpointing")
        else:
            missing.append("gradient_checkpointing")
        if a.threads:
            argv += ["--threads", str(a.threads)]
        timeout = self.slot(150 if self.cuda else 300, 30)
        if timeout is None:
            return self.row("scripts", label, "", "skipped: time")
        stats_path = self.work / f"{name}_stats.json"
        cmd = [PY, str(Path(__file__).resolve()), "--_child_script", str(stats_path), str(int(not self.cuda)),
               str(int(a.keep_checkpoints)), script, *argv]
        rc, out, dt = run_cmd(cmd, timeout, self.logs, name, not self.cuda)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        run_dir = self.work / "runs" / name
        metrics = []
        if (run_dir / "metrics.jsonl").exists():
            metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
        value, shown = self.first_step_logratio(metrics, metric, run_dir)
        self.data[f"script_{name}"] = {"argv": argv, "rc": rc, "seconds": round(dt, 1), "stats": stats,
                                       "first_step_logratio": value, "metric": metric, "missing_flags": missing}
        fast_failed = bool(FAST_FAILED.search(out)) or stats.get("fast_failed_warnings", 0) > 0
        calls, fast, plain = stats.get("auto_calls", 0), stats.get("auto_fast", 0), stats.get("auto_plain", 0)
        dyn = stats.get("dynamo", {})
        compiled = f", {dyn.get('unique_graphs', 0)} graphs compiled" if self.cuda else ""
        first = stats.get("first_fast_call_s")
        first = f", first fast call {first:.1f} s" if first is not None else ""
        explicit = stats.get("explicit_calls", 0)
        explicit = f" (+{explicit} with an explicit fast=)" if explicit else ""
        result = (f"first-step log-ratio {shown}; sampler calls {fast}/{calls} on the fast path{explicit}, {plain} on "
                  f"the plain loop{compiled}{first}; {'fast path failed warning; ' if fast_failed else ''}{dt:.0f} s")
        if missing:
            result += f"; no --{', --'.join(missing)} in this script"
        if rc is None:
            status = "timeout"
        elif rc != 0:
            status, result = f"FAIL (rc {rc})", f"{stats.get('error') or tail(out)}; {result}"
        elif value is None or not math.isfinite(value):
            status = f"FAIL (no finite {metric} in metrics.jsonl)"
        elif abs(value) > tol:
            status = f"FAIL (|log-ratio| > {tol:g})"
        elif fast_failed or calls == 0 or plain or fast < calls:
            status = "FAIL (sampler not on the fast path)"
        else:
            status = "ok"
        self.row("scripts", f"{label} (1 iteration, chat, {shape}, {'bf16' if self.cuda else 'fp32'})", result,
                 status)
        shutil.rmtree(run_dir, ignore_errors=True)

    @staticmethod
    def first_step_logratio(metrics, metric, run_dir):
        """(value, text) of the first training step's log-ratio. DPO logs its loss only: at pi = pi_ref it is
        ln 2, and loss - ln 2 ~ -beta * mean margin / 2, so the mean log-ratio margin is 2 (ln 2 - loss) / beta."""
        if metric == "dpo":
            rec = next((m for m in metrics if "losses/dpo_loss" in m), None)
            if rec is None:
                return None, "missing (losses/dpo_loss)"
            beta = 0.1
            if (run_dir / "args.json").exists():
                beta = json.loads((run_dir / "args.json").read_text()).get("beta", beta)
            loss = rec["losses/dpo_loss"]
            value = 2 * (math.log(2) - loss) / beta
            return value, f"{value:.2e} (DPO loss {loss:.5f} vs ln 2, beta {beta:g})"
        rec = next((m for m in metrics if metric in m), None)
        if rec is None:
            return None, f"missing ({metric})"
        return float(rec[metric]), f"{float(rec[metric]):.2e} ({metric})"

    # ------------------------------------------------------------------------------------------------ compile
    def compile(self):
        shape = "1b" if self.cuda else "tiny"
        batches, prompt_len, new = ([32, 256], 128, 32) if self.cuda else ([2, 20], 16, 4)
        timeout = self.slot(120 if self.cuda else 240, 20)
        if timeout is None:
            return self.row("compile", f"{shape} fast path compile count and time", "", "skipped: time")
        out_path = self.work / "compile.json"
        cmd = [PY, str(Path(__file__).resolve()), "--_compile_child", str(out_path), shape,
               ",".join(map(str, batches)), str(prompt_len), str(new)]
        rc, out, dt = run_cmd(cmd, timeout, self.logs, "compile", not self.cuda)
        res = json.loads(out_path.read_text()) if out_path.exists() else {"calls": []}
        self.data["compile"] = res
        calls = res["calls"]
        if len(calls) < 2:
            return self.row("compile", f"{shape} fast path compile count and time", f"{tail(out)} ({dt:.0f} s)",
                            "timeout" if rc is None else f"FAIL (rc {rc})")
        c1, c2 = calls[0], calls[1]
        backend = res.get("backend", "")
        result = (f"{backend}: 1st call (batch {c1['batch']}) {c1['seconds']:.1f} s, {c1.get('new_unique_graphs', 0)} "
                  f"graphs, {c1.get('new_graph_breaks', 0)} graph breaks; 2nd call (same shape) {c2['seconds']:.2f} s, "
                  f"{c2.get('new_unique_graphs', 0)} new graphs")
        for c in calls[2:]:
            result += f"; new batch {c['batch']}: {c['seconds']:.1f} s, {c.get('new_unique_graphs', 0)} new graphs"
        ok = rc == 0 and c1.get("new_unique_graphs", 0) >= 1 and c2.get("new_unique_graphs", 0) == 0 and \
            c1.get("new_graph_breaks", 0) == 0
        status = "ok" if ok else ("timeout" if rc is None else f"FAIL{'' if rc == 0 else f' (rc {rc})'}")
        self.row("compile", f"{shape} sample_turns(fast=True) compile count and time", result, status)
        if not self.cuda:
            self.row("compile", "1b inductor + CUDA graphs compile time", "", "skipped: no CUDA")

    # ------------------------------------------------------------------------------------------------ output
    def table(self) -> str:
        lines = ["| section | check | result | status |", "|---|---|---|---|"]
        lines += ["| " + " | ".join(md_cell(c) for c in r) + " |" for r in self.rows]
        return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--dry_run", action="store_true", help="tiny shapes on CPU; GPU-only measurements are skipped")
    p.add_argument("--time_budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS, help="which, in this order")
    p.add_argument("--out", default="gpu_check.md", help="markdown file for the table and the details")
    p.add_argument("--json", default=None, help="JSON file of every figure (default: --out with .json)")
    p.add_argument("--workdir", default=None, help="fixtures, logs and runs (default: a new temporary folder)")
    p.add_argument("--bandwidth_gbs", type=float, default=0.0, help="memory bandwidth (default: by GPU name)")
    p.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 TFLOP/s (default: by GPU name)")
    p.add_argument("--logratio_tol", type=float, default=0.0, help="|first-step log-ratio| allowed (default: "
                   "0.05 in bf16, 1e-3 in fp32)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads of the children (0 = default)")
    p.add_argument("--keep_checkpoints", action="store_true", help="let the scripts write their checkpoints")
    args = p.parse_args(argv)

    import torch
    import transformers

    check = Check(args)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    if not torch.cuda.is_available() and not args.dry_run:
        print("no CUDA device: running the CPU dry run (tiny shapes; GPU-only measurements skipped)")
        args.dry_run = True
    device = f"GPU: {check.gpu}" if check.cuda else \
        f"CPU dry run ({platform.processor() or platform.machine()}, GPU: {check.gpu})"
    head = (f"GPU check, {date}; {device}; torch {torch.__version__}, transformers {transformers.__version__}; "
            f"budget {args.time_budget:.0f} s")
    print(head, flush=True)
    if not check.tyro:
        print("tyro is not installed: benchmarks/throughput.py and the algorithm scripts need it (pip install tyro, "
              "or pip install --no-index <carried tyro wheel and its dependencies>); their sections are skipped.",
              flush=True)
    for section in args.sections:
        t = time.time()
        print(f"\n== {section} ({check.left():.0f} s of the budget left)", flush=True)
        try:
            getattr(check, section)()
        except Exception as e:  # noqa: BLE001 - one section's bug must not lose the others' figures
            check.row(section, "section", f"{type(e).__name__}: {str(e)[:300]}", "FAIL (gpu_check)")
        check.data.setdefault("section_seconds", {})[section] = round(time.time() - t, 1)
    total = time.time() - check.t0
    table = check.table()
    took = ", ".join(f"{k} {v:.0f} s" for k, v in check.data.get("section_seconds", {}).items())
    footer = f"total {total:.0f} s of a {args.time_budget:.0f} s budget ({took}); logs in {check.logs}"
    print(f"\n{head}\n\n{table}\n\n{footer}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    details = "\n".join(f"\n### {title}\n\n```\n{text.strip()[-6000:]}\n```" for title, text in check.details)
    out.write_text(f"{head}\n\n{table}\n\n{footer}\n" + (f"\n## Details\n{details}\n" if details else ""))
    js = Path(args.json) if args.json else out.with_suffix(".json")
    js.write_text(json.dumps({"date": date, "device": device, "gpu": check.gpu, "cuda": check.cuda,
                              "torch": torch.__version__, "transformers": transformers.__version__,
                              "seconds": round(total, 1), "rows": [dict(zip(("section", "check", "result", "status"),
                                                                            r)) for r in check.rows],
                              "data": check.data}, indent=1, default=str))
    print(f"wrote {out} and {js}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--_child_script":
        child_script(sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1", sys.argv[5], sys.argv[6:])
    elif len(sys.argv) > 1 and sys.argv[1] == "--_compile_child":
        child_compile(sys.argv[2], sys.argv[3], [int(b) for b in sys.argv[4].split(",")], int(sys.argv[5]),
                      int(sys.argv[6]))
    else:
        sys.exit(main())
