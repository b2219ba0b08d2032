"""plumbing/run_io.py: what a run writes and reads back, shared by the algorithm scripts.

runs/<run_name>/ holds args.json, metrics.jsonl (one JSON line per logged step; TensorBoard with --tensorboard,
Weights & Biases with --track), checkpoint/ (replaced atomically, so a crash never leaves a half-written one) and
summary.json. `--resume --run_name NAME` continues from checkpoint/ (or checkpoint.old, which a crash during the
replace leaves).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from tqdm.auto import tqdm


WANDB_MISSING = ("--track logs to Weights & Biases: `pip install wandb` (and `wandb login`), or drop --track "
                 "(metrics.jsonl is always written)")


@dataclass
class RunArgs:
    """Where a run's files go and where its metrics are also sent, shared by every script (whose Args extend this
    class, so the flags stay flat: --output_dir, --tensorboard, --track, ...)."""
    output_dir: str = "runs"
    """parent of runs/<run_name>/"""
    tensorboard: bool = False
    """also write TensorBoard scalars (needs the tensorboard package)"""
    track: bool = False
    """log to Weights & Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "multiturn-rlhf"
    """the W&B project (with --track)"""
    wandb_entity: Optional[str] = None
    """the W&B team or user (with --track; None = your default entity)"""


def make_run_dir(args, accelerator, name: Optional[str] = None) -> Path:
    """runs/<run_name>/ with args.json; run_name defaults to NAME__env__seed__time, NAME = `name` or exp_name (the
    same on every rank)."""
    if args.resume and not args.run_name:
        raise ValueError("--resume needs --run_name (the run directory under output_dir)")
    if getattr(args, "track", False):  # before any model is loaded, not after
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ImportError(WANDB_MISSING)
    if not args.run_name:
        import time

        stamp = torch.tensor([int(time.time())], device=accelerator.device)
        stamp = int(accelerator.gather(stamp)[0])  # rank 0's clock: ranks may start a second apart
        args.run_name = f"{name or args.exp_name}__{args.env}__{args.seed}__{stamp}"
    run_dir = Path(args.output_dir) / args.run_name
    if hasattr(args, "chat_template_date") and not args.chat_template_date:  # one date for the whole run
        import time

        saved = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").exists() else {}
        args.chat_template_date = (args.resume and saved.get("chat_template_date")) or time.strftime("%d %b %Y")
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "args.json").write_text(json.dumps(asdict(args), indent=1))
    return run_dir


class Logger:
    """Scalars by name to runs/<run>/metrics.jsonl, TensorBoard (--tensorboard) and Weights & Biases (--track:
    `wandb` is imported only then), one console line per call. Only the main process logs."""

    def __init__(self, run_dir: Path, args, enabled: bool):
        self.enabled, self.path, self.tb, self.wandb = enabled, run_dir / "metrics.jsonl", None, None
        if not enabled:
            return
        if getattr(args, "tensorboard", False):
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir))
        if getattr(args, "track", False):
            try:
                import wandb
            except ImportError:
                raise ImportError(WANDB_MISSING) from None
            # resuming the same run_name continues the same W&B run
            self.wandb = wandb.init(project=args.wandb_project_name, entity=args.wandb_entity, name=run_dir.name,
                                    id=run_dir.name.replace("/", "_"), resume="allow", config=vars(args),
                                    dir=str(run_dir))

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)
        if echo:
            tqdm.write(f"[{step:4d}] " + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()
                                                   if not k.startswith("eval/learned")))

    def close(self) -> None:
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def save_checkpoint(accelerator, model, tokenizer, run_dir: Path, meta: dict, rng,
                    policy_of: Optional[Callable] = None, extra: Optional[dict] = None) -> None:
    """runs/<run>/checkpoint/{policy (save_pretrained), state (accelerate: model, optimizer, RNGs), meta.json and
    `extra` (name -> object, torch.save'd)}, written to checkpoint.tmp and swapped in atomically.

    policy_of(unwrapped model, its full state dict) -> (policy module, policy state dict): what goes to policy/
    when the prepared model is more than the policy (MTPO's actor-critic)."""
    final, tmp, old = run_dir / "checkpoint", run_dir / "checkpoint.tmp", run_dir / "checkpoint.old"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3
    if accelerator.is_main_process:
        policy, policy_sd = (policy_of or (lambda m, sd: (m, sd)))(accelerator.unwrap_model(model), state_dict)
        policy.save_pretrained(tmp / "policy", state_dict=policy_sd)
        tokenizer.save_pretrained(tmp / "policy")
    if trains_adapters_only(accelerator):  # LoRA: the frozen base is the run's --model_name_or_path, not saved again
        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        hook = accelerator.register_save_state_pre_hook(_trained_entries_only)
        try:
            accelerator.save_state(str(tmp / "state"), **({"exclude_frozen_parameters": True} if deepspeed else {}))
        finally:
            hook.remove()
    else:
        accelerator.save_state(str(tmp / "state"))
    (tmp / "state").mkdir(parents=True, exist_ok=True)
    with open(tmp / "state" / f"numpy_rng_{accelerator.process_index}.json", "w") as f:
        json.dump(rng.bit_generator.state, f)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta))
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def trains_adapters_only(accelerator) -> bool:
    """Whether a prepared model carries LoRA adapters (MTPO's inside its actor-critic): then only the trained
    entries go into checkpoint/state."""
    return any(hasattr(sub, "peft_config") for model in accelerator._models for sub in model.modules())


def _trained_entries_only(models, weights, output_dir) -> None:
    """accelerate's save-state hook: keep each model's trained parameters (at 8B the frozen base is 16 GB a save)."""
    for model, state in zip(models, weights):
        trained = {name for name, p in model.named_parameters() if p.requires_grad}
        for name in [k for k in state if k not in trained]:
            del state[name]


def load_checkpoint(accelerator, run_dir: Path, rng) -> tuple[dict, Path]:
    """Restore runs/<run>/checkpoint (or the .old one a crash mid-replace left): the prepared model and optimizer,
    the RNGs, this rank's numpy generator. Returns (meta, the checkpoint folder, for a script's extra files)."""
    ckpt = run_dir / "checkpoint"
    ckpt = ckpt if ckpt.exists() else run_dir / "checkpoint.old"
    if not ckpt.exists():
        raise FileNotFoundError(f"--resume: no checkpoint under {run_dir}")
    partial = {}
    if trains_adapters_only(accelerator):  # the state holds the trained entries; the base came with the model
        deepspeed = getattr(accelerator.state, "deepspeed_plugin", None) is not None
        partial = {"load_module_strict": False} if deepspeed else {"strict": False}
    accelerator.load_state(str(ckpt / "state"), **partial)
    meta = json.loads((ckpt / "meta.json").read_text())
    rng_file = ckpt / "state" / f"numpy_rng_{accelerator.process_index}.json"
    if rng_file.exists():
        rng.bit_generator.state = json.loads(rng_file.read_text())
    accelerator.print(f"resumed {run_dir} at iteration {meta['iteration']}")
    return meta, ckpt


def record_evaluation(accelerator, run_dir: Path, step: int, evaluation: dict, tallies: dict) -> None:
    """The evaluation at `step` (and the environment's tallies after it) added to the checkpoint's meta.json when
    that checkpoint is of the same step. The scripts checkpoint before they evaluate, so an endpoint that fails in
    the evaluation loses no finished iteration; a --resume from a checkpoint that carries its evaluation reuses it
    instead of evaluating and logging that step a second time."""
    meta_path = run_dir / "checkpoint" / "meta.json"
    if accelerator.is_main_process and meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta["iteration"] == step:
            meta.update(evaluation=evaluation, env_counts=tallies)
            tmp = meta_path.with_suffix(".tmp")
            tmp.write_text(json.dumps(meta))
            os.replace(tmp, meta_path)  # atomic: the old meta or the new one, never half of it
    accelerator.wait_for_everyone()


def forget_lost_iterations(accelerator, run_dir: Path, meta: dict, rollouts_path: Optional[str] = None) -> None:
    """On --resume: what the interrupted run wrote after its checkpoint is dropped, since the resumed run does that
    work again: metrics.jsonl lines of later steps (and the evaluation line of the checkpoint's own step when the
    checkpoint does not carry that evaluation: it is redone), and --save_rollouts rows of the iterations that are
    played again. Nothing is logged or written twice."""
    if accelerator.is_main_process:
        step = meta["iteration"]

        def keep_lines(path: Path, keep: Callable[[dict], bool]) -> None:
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                kept = [line for line in lines if line.strip() and keep(json.loads(line))]
                if len(kept) < len(lines):
                    tmp = path.with_name(path.name + ".tmp")
                    tmp.write_text("".join(kept))
                    os.replace(tmp, path)

        redo_eval = "evaluation" not in meta
        keep_lines(run_dir / "metrics.jsonl",
                   lambda r: r["step"] < step or (r["step"] == step and not (redo_eval and "eval/mean_reward" in r)))
        if rollouts_path:
            keep_lines(Path(rollouts_path), lambda r: r.get("iteration", -1) < step)
    accelerator.wait_for_everyone()


@contextlib.contextmanager
def resume_hint(args):
    """Around a script's main: an endpoint that stays down (a ConnectionError after its retries) ends the run with
    what to do next, the last checkpoint and the command that continues from it."""
    try:
        yield
    except ConnectionError as e:
        if not getattr(args, "run_name", None):
            raise
        ckpt = Path(args.output_dir) / args.run_name / "checkpoint"
        meta = ckpt / "meta.json"
        saved = (f"its last checkpoint is {ckpt} (after iteration {json.loads(meta.read_text())['iteration']})"
                 if meta.exists() else f"it wrote no checkpoint yet ({ckpt})")
        argv, keep, skip = sys.argv[1:], [], False
        for a in argv:  # the same flags, without a --resume or --run_name of their own
            if skip or a == "--resume":
                skip = False
                continue
            if a == "--run_name":
                skip = True
                continue
            keep.append(a)
        again = " ".join([os.path.basename(sys.argv[0]), *keep, "--resume", "--run_name", args.run_name])
        raise ConnectionError(f"{e}\nThe run stopped: {saved}. Once the endpoint answers, continue it with the same "
                              f"launcher and: {again}") from e
