"""envs/learned_reward.py: the RLHF baseline's Bradley-Terry reward model learned from preferences on mu's conversations.

The MTPO paper's multi-turn RLHF baseline (Shani et al., NeurIPS 2024, Sec. 5) optimises a reward model r_phi learned
from preferences; mtpo.py (`--variant rlhf --reward learned`) trains against it, frozen (Theorem B.6). This file is
that reward model, not MTPO's own equations (docs/mtpo.md#the-learned-reward-model):

  preference_pairs      two whole conversations from mu per context, p = P(a > b) from the oracle (mtpo.preference)
  bradley_terry_loss    -[t log sigmoid(r_a - r_b) + (1 - t) log sigmoid(r_b - r_a)]: t a label drawn from p (the
                        paper's preference data are labelled pairs), or p itself with --rm_labels soft
  RewardModel           r_phi(x_{H+1}): a scalar head on a copy of the initial policy's backbone (or
                        --rm_model_name_or_path's), read at the conversation's last token
  fit_reward_model      the fit, gradients averaged over ranks, then r_phi shifted to mean 0 on mu's conversations (no
                        rescaling: on the tutor task r_phi ~ 4 r + c, the oracle's scale); held-out accuracy
  learned_reward_model  sample, label, fit (or reload on --resume): what mtpo.py calls
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Optional

import numpy as np
import torch

import simulator as sim
from envs.loading import load_policy
from plumbing.distributed import outside_zero3_init, same_on_all_ranks, sync_gradients


@dataclass
class RewardModelArgs:
    """The learned reward model's flags (mtpo.py's Args extend this class; they matter with --reward learned)."""
    rm_pairs: int = 2048
    """learned: pairs of whole conversations sampled from mu (two per context) across all ranks"""
    rm_labels: Literal["sampled", "soft"] = "sampled"
    """learned: 'sampled' = a binary label drawn from the oracle's p (preference data, as the paper's labelled
    pairs); 'soft' = p itself as the Bradley-Terry target"""
    rm_epochs: int = 4
    """learned: passes over the reward model's training pairs"""
    rm_lr: float = 1e-3
    """learned: reward model AdamW learning rate"""
    rm_batch_size: int = 64
    """learned: pairs per reward model step (per rank)"""
    rm_heldout_fraction: float = 0.2
    """learned: pairs held out of the fit, for reward_model/heldout_accuracy and reward_model/heldout_loss"""
    rm_model_name_or_path: Optional[str] = None
    """learned: the reward model's backbone (None = a copy of the initial policy's), with its own tokenizer"""


def reward_model_flag_errors(args: RewardModelArgs) -> list:
    """The --rm_* flags out of range, each named."""
    bad = [f"--{k} must be > 0" for k in ("rm_pairs", "rm_epochs", "rm_lr", "rm_batch_size")
           if not getattr(args, k) > 0]
    return bad + ([] if 0 < args.rm_heldout_fraction < 1 else ["--rm_heldout_fraction must lie in (0, 1)"])



def bradley_terry_loss(r_a, r_b, target):
    """Mean over pairs of -[t log sigmoid(r_a - r_b) + (1 - t) log sigmoid(r_b - r_a)]: t = 1 when conversation a
    is the preferred one (a sampled label; -log sigmoid(r_chosen - r_rejected)), or t = p for a soft target.
    Gradient with respect to r_a: (sigmoid(r_a - r_b) - t) / n."""
    d = r_a - r_b
    target = target.to(d.dtype)
    return -(target * torch.nn.functional.logsigmoid(d) + (1 - target) * torch.nn.functional.logsigmoid(-d)).mean()


class RewardModel(torch.nn.Module):
    """r_phi(x_{H+1}): a scalar head on an LM backbone, read at the last token of the whole conversation (its final
    user reply included where the environment scores it), rendered with the backbone's own chat template."""

    def __init__(self, backbone, tokenizer):
        super().__init__()
        self.backbone, self.tokenizer = backbone, tokenizer
        self.head = torch.nn.Linear(backbone.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)  # the same on every rank; r_phi = 0 before the fit
        torch.nn.init.zeros_(self.head.bias)

    def inputs(self, convs):
        """Right-padded (input_ids, attention_mask) of whole conversations."""
        rows = [sim.render_ids(self.tokenizer, c, add_generation_prompt=False) for c in convs]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else sim.end_of_turn_id(
            self.tokenizer)
        ids = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, : len(r)], attn[i, : len(r)] = torch.tensor(r), 1
        return ids, attn

    def forward(self, convs):
        """r_phi of each conversation (differentiable)."""
        device = self.head.weight.device
        ids, attn = [x.to(device) for x in self.inputs(convs)]
        hidden = self.backbone(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state
        last = hidden[torch.arange(len(convs), device=device), attn.sum(1) - 1]
        return self.head(last.float()).squeeze(-1)

    @torch.no_grad()
    def score(self, convs, batch_size: int = 256) -> torch.Tensor:
        """r_phi of each conversation, batched, on the CPU."""
        out = torch.cat([self(convs[s:s + batch_size]).float().cpu() for s in range(0, len(convs), batch_size)])
        if not torch.isfinite(out).all():
            raise FloatingPointError("the learned reward model returned NaN or infinite values")
        return out


def build_reward_model(args, accelerator) -> RewardModel:
    """r_phi's backbone: a copy of the initial policy's (or --rm_model_name_or_path's), whole on every rank (built
    outside zero.Init: it is trained here, before and apart from the prepared models, then frozen)."""
    with outside_zero3_init(accelerator):
        lm, tok = load_policy(args.rm_model_name_or_path or args.model_name_or_path)
    rm = RewardModel(lm.get_decoder(), tok).to(accelerator.device)
    rm.eval()  # dropout off for the fit as well; gradients still flow
    return rm


def pair_metrics(r_a, r_b, p, target) -> torch.Tensor:
    """Sums over pairs: [pairs, expected agreement with an oracle label (p where r_phi prefers a, 1 - p where it
    prefers b, 1/2 on a tie), the same for the oracle's own best guess max(p, 1 - p) (the ceiling), untied pairs
    (p != 1/2), untied pairs whose side r_phi picks, Bradley-Terry loss]."""
    d = r_a - r_b
    agree = torch.where(d > 0, p, torch.where(d < 0, 1 - p, torch.full_like(p, 0.5)))
    untied = p != 0.5
    right = untied & ((d > 0) == (p > 0.5)) & (d != 0)
    return torch.stack([torch.tensor(float(len(p))), agree.sum(), torch.maximum(p, 1 - p).sum(),
                        untied.sum().float(), right.sum().float(), bradley_terry_loss(r_a, r_b, target) * len(p)])


def fit_reward_model(rm, convs_a, convs_b, p, target, args, accelerator, rng) -> dict:
    """Bradley-Terry fit of r_phi on this rank's training pairs, gradients averaged over ranks (every rank takes
    the same steps from the same start, so all end with the same r_phi; rank 0's weights are then broadcast to
    make that exact). Then r_phi is shifted to mean 0 on mu's training conversations. Returns the reward_model/*
    metrics, held-out ones over all ranks' held-out pairs."""
    n = len(convs_a)
    k = min(n - 1, max(1, round(args.rm_heldout_fraction * n)))
    perm = rng.permutation(n)
    held, train = perm[:k], perm[k:]
    optimizer = torch.optim.AdamW(rm.parameters(), lr=args.rm_lr, betas=args.adam_betas, weight_decay=0.0)
    losses = []
    for _ in range(args.rm_epochs):
        order = rng.permutation(train)
        for s in range(0, len(order), args.rm_batch_size):
            idx = order[s:s + args.rm_batch_size]
            with accelerator.autocast():
                r = rm([convs_a[i] for i in idx] + [convs_b[i] for i in idx])
            loss = bradley_terry_loss(r[: len(idx)], r[len(idx):], target[idx].to(r.device))
            loss.backward()
            sync_gradients(rm, accelerator)
            if args.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(rm.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
    if accelerator.num_processes > 1:  # exact agreement, whatever the reductions' rounding
        for t in rm.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    with accelerator.autocast():
        score = lambda convs, idx: rm.score([convs[i] for i in idx], args.gen_batch_size)
        (ha, hb), (ta, tb) = [(score(convs_a, ix), score(convs_b, ix)) for ix in (held, train)]
    dev = accelerator.device
    sums = accelerator.reduce(torch.stack([pair_metrics(ha, hb, p[held], target[held]),
                                           pair_metrics(ta, tb, p[train], target[train])]).to(dev), "sum")
    mu_sum = accelerator.reduce(torch.tensor([float(ta.sum() + tb.sum()), float((ta ** 2).sum() + (tb ** 2).sum()),
                                              2.0 * len(train)], device=dev, dtype=torch.float64), "sum")
    mean = float(mu_sum[0] / mu_sum[2])
    with torch.no_grad():
        rm.head.bias -= mean  # r_phi averages 0 on mu's training conversations (a BT reward's offset is free)
    h, t = sums[0].tolist(), sums[1].tolist()
    return {"reward_model/heldout_accuracy": h[1] / h[0], "reward_model/heldout_accuracy_ceiling": h[2] / h[0],
            "reward_model/heldout_untied_accuracy": h[4] / max(h[3], 1.0), "reward_model/heldout_loss": h[5] / h[0],
            "reward_model/train_accuracy": t[1] / t[0], "reward_model/train_loss": t[5] / t[0],
            "reward_model/last_epoch_loss": float(np.mean(losses[-max(1, len(losses) // args.rm_epochs):])),
            "reward_model/heldout_pairs": h[0], "reward_model/train_pairs": t[0],
            "reward_model/untied_fraction": (h[3] + t[3]) / (h[0] + t[0]),
            "reward_model/mu_score_std": math.sqrt(max(float(mu_sum[1] / mu_sum[2]) - mean ** 2, 0.0)),
            "reward_model/steps": float(len(losses))}


def preference_pairs(ref, tokenizer, env, args, accelerator, seed: int, oracle: Callable):
    """This rank's share of --rm_pairs: two whole conversations from mu per context (same context and student
    profile, independent samples), and p = oracle(a, b) = P(a > b) (mtpo.preference: the environment's oracle,
    checked). The training sampler's RNG is left untouched."""
    n = args.rm_pairs // accelerator.num_processes
    rng = np.random.default_rng(seed + 7919 * accelerator.process_index)
    ctx = env.contexts(n, "train", rng)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed + 7919 * accelerator.process_index)
        convs = sim.continue_dialogues(ref, tokenizer, env, [c.messages for c in ctx] * 2, [c.user for c in ctx] * 2,
                                       [c.max_turns or args.max_turns for c in ctx] * 2, rng, args.max_new_tokens,
                                       args.temperature, args.gen_batch_size)[0]
    a, b = convs[:n], convs[n:]
    return a, b, oracle(env, a, b), rng


def learned_reward_model(args, accelerator, ref, tokenizer, env, run_dir: Path, oracle: Callable):
    """--reward learned: sample mu's pairs, label them with the oracle (oracle(env, a, b) = P(a > b)), fit r_phi
    (or, on --resume, load the one the run fitted from runs/<run>/reward_model/). Returns (r_phi, its
    reward_model/* metrics)."""
    rm = build_reward_model(args, accelerator)
    path = run_dir / "reward_model"
    if args.resume and (path / "model.pt").exists():
        rm.load_state_dict(torch.load(path / "model.pt", map_location=accelerator.device))
        return rm, json.loads((path / "metrics.json").read_text())
    t0 = time.time()
    a, b, p, rng = preference_pairs(ref, tokenizer, env, args, accelerator, 20_000 + args.seed, oracle)
    target = (torch.as_tensor(rng.random(len(p)), dtype=torch.float32) < p).float() if args.rm_labels == "sampled" \
        else p  # the paper's preference data are labelled pairs (the judge answers 1 or 2): sampled by default
    metrics = fit_reward_model(rm, a, b, p, target, args, accelerator, rng)
    metrics["reward_model/minutes"] = (time.time() - t0) / 60
    if accelerator.is_main_process:
        path.mkdir(parents=True, exist_ok=True)
        torch.save(rm.state_dict(), path / "model.pt")
        (path / "metrics.json").write_text(json.dumps(metrics))
    accelerator.print("reward model: " + "  ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items()))
    return rm, metrics


def reward_model_summary(reward_model, metrics: dict, first_eval: dict, final_eval: dict, accelerator) -> dict:
    """summary.json's entries for --reward learned: r_phi's fit, its score of pi and mu at the first and the last
    evaluation, and whether every rank holds the same r_phi."""
    fit = {f"reward_model_{k}": metrics[f"reward_model/{k}"]
           for k in ("heldout_accuracy", "heldout_accuracy_ceiling", "heldout_untied_accuracy", "minutes")}
    return {**fit, "initial_rm_reward": first_eval["eval/rm_reward"], "final_rm_reward": final_eval["eval/rm_reward"],
            "mu_rm_reward": final_eval["eval/mu_rm_reward"],
            "reward_model_ranks_in_sync": same_on_all_ranks(reward_model.state_dict().values(), accelerator)}
