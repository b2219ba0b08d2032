"""single_turn_ppo.py: Iterative PPO's inner solver, standard single-turn token-level PPO (Observation 1 of Jiang et
al., arXiv 2511.21638: the inner problem of each outer iteration is ordinary single-turn RLHF).

Given prompts (chat message lists), a response scorer (the reward model) and a frozen reference policy, one PPO batch
samples a response per prompt and maximises  E_{y~pi(.|s)} score(s, y) - beta KL(pi(.|s) || pi_ref(.|s)):
  per-token rewards: the score at the last response token (and, with kl_penalty='reward', the sampling-time
  -beta (ln pi_old - ln pi_ref) on every token)                                                   -> `ppo_rewards`
  the exact per-token KL to the reference over the vocabulary (kl_penalty='loss')   -> `token_kl_entropy`
  GAE over the response tokens with a token-level critic (a scalar head at every position)  -> `token_gae`
  whitened advantages, the clipped surrogate and the clipped value loss -> `whiten`, `ppo_clipped_loss`, `value_loss`
  the batch: sample, score, GAE, epochs of minibatches, target-KL stop                            -> `ppo_step_batch`
  afterwards, KL(pi || pi_ref) and pi's entropy on fresh samples (per turn for Iterative PPO)       -> `policy_shift`
Nothing in it knows about turns or conversations. iterative_ppo.py calls it once per outer iteration i with Q_i as
the scorer and pi_i as the reference (Theorem 2); some metric names keep that reading (ppo/q_score, ppo/kl_to_pi_i).
"""
from __future__ import annotations

import numpy as np
import torch

import simulator as sim
from plumbing.distributed import sampling_weights, sync_gradients
from plumbing.logprob_memory import accepts_logits_to_keep


def token_scores(model, input_ids, attention_mask) -> torch.Tensor:
    """The scalar head applied at every position (B x L): hidden state of tokens <= t -> a value (the token
    critic's values; read at the last token it is a reward-model-shaped score)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise ValueError(f"{type(model).__name__}: no 'score' or 'classifier' head found")
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    return head(hidden).squeeze(-1).float()



def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum().clamp(min=1)


def batch_mean_std(x, mask, accelerator=None, eps: float = 1e-8):
    """The mean and sqrt(variance + eps) of the masked entries of the whole batch, every rank's (sums over ranks when
    an accelerator runs several)."""
    m = mask.to(torch.float64)
    moments = torch.stack([(x * m).sum(), (x * x * m).sum(), m.sum()]).double()
    if accelerator is not None and accelerator.num_processes > 1:
        moments = accelerator.reduce(moments, "sum")
    n = moments[2].clamp(min=1)
    mean = moments[0] / n
    return mean.to(x.dtype), ((moments[1] / n - mean ** 2).clamp(min=0) + eps).sqrt().to(x.dtype)


def whiten(x, mask, shift_mean: bool = True, eps: float = 1e-8, accelerator=None):
    """(x - mean) / std over the masked entries of the whole batch, every rank's (`batch_mean_std`), the mean kept
    when shift_mean=False, masked entries left at 0."""
    mean, std = batch_mean_std(x, mask, accelerator, eps)
    out = (x - mean) / std
    return (out if shift_mean else out + mean) * mask


def ppo_rewards(scores, logprobs, ref_logprobs, mask, kl_coef):
    """Per-token reward: -beta (ln pi_old - ln pi_ref) on every response token, plus the score(s, y) at the last one;
    and the log-ratio. With kl_penalty 'loss' beta is 0 here: the KL to the reference is in the loss instead."""
    kl = (logprobs - ref_logprobs) * mask
    last = (mask.cumsum(1) == mask.sum(1, keepdim=True)) & mask.bool()  # one-hot at each row's last token
    return -kl_coef * kl + last * scores[:, None], kl


def token_gae(rewards, values, mask, gamma: float = 1.0, lam: float = 0.95):
    """GAE over the response tokens (left-aligned, mask = 1 on real tokens): advantages and returns (B x T)."""
    T = rewards.shape[1]
    adv, last = torch.zeros_like(rewards), torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        nxt_mask = mask[:, t + 1] if t + 1 < T else torch.zeros_like(mask[:, 0])
        nxt_v = values[:, t + 1] * nxt_mask if t + 1 < T else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * nxt_v - values[:, t]
        last = (delta + gamma * lam * last * nxt_mask) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def ppo_clipped_loss(logprobs, old_logprobs, advantages, mask, cliprange: float = 0.2):
    """PPO's clipped surrogate, masked mean over tokens: max(-A r, -A clip(r, 1-eps, 1+eps)); and the clip fraction,
    the share of tokens whose clipped term is the one in force (TRL's pg_clipfrac; not every |r - 1| > eps, which
    counts tokens whose unclipped term still gives the gradient)."""
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped, clipped = -advantages * ratio, -advantages * ratio.clamp(1 - cliprange, 1 + cliprange)
    return masked_mean(torch.max(unclipped, clipped), mask), masked_mean((clipped > unclipped).float(), mask)


def value_loss(values, old_values, returns, mask, cliprange_value: float = 0.2):
    """PPO's clipped value loss: 0.5 max((V - R)^2, (clip(V, V_old +- c) - R)^2)."""
    clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    return 0.5 * masked_mean(torch.max((values - returns) ** 2, (clipped - returns) ** 2), mask)


def response_batch(tokenizer, prompts, responses):
    """Right-padded prompt+response ids and an index (B x T) of each response token's predicting position."""
    rows = [(sim.conversation_ids(tokenizer, p, add_generation_prompt=True).ids, list(r)) for p, r in zip(prompts, responses)]
    L, T = max(len(p) + len(r) for p, r in rows), max(len(r) for _, r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attn, idx, mask = torch.zeros_like(ids), torch.zeros((len(rows), T), dtype=torch.long), torch.zeros(len(rows), T)
    for b, (p, r) in enumerate(rows):
        ids[b, :len(p) + len(r)], attn[b, :len(p) + len(r)] = torch.tensor(p + r), 1
        idx[b, :len(r)], mask[b, :len(r)] = torch.arange(len(p) - 1, len(p) + len(r) - 1), 1
    return ids, attn, idx, mask


def response_logprobs(model, ids, attn, idx, mask, temperature):
    """log pi of each response token (B x T); the LM head runs over the responses' span only."""
    needed = torch.zeros(ids.shape[0], ids.shape[1] - 1, device=ids.device).scatter_add_(
        1, idx.to(ids.device), mask.to(ids.device, torch.float)) > 0
    lp = sim.token_logprobs(model, ids, attn, temperature, target_mask=needed)  # position j predicts token j + 1
    return lp.gather(1, idx.to(lp.device))


def response_log_dists(model, ids, attn, idx, mask, temperature):
    """log softmax(logits / temperature) over the whole vocabulary at each response token's predicting position
    (B x T x V, float32, 0 on padding), for response_batch's rows. Each row is re-aligned at its end (its response
    ends it; positions from the mask), so the LM head runs over the last T + 1 positions only. Differentiable."""
    L, T = ids.shape[1], mask.shape[1]
    src = torch.arange(L, device=ids.device) - (L - attn.sum(1))[:, None]  # left padding: row ends aligned
    ids_l = ids.gather(1, src.clamp(min=0))
    attn_l = attn.gather(1, src.clamp(min=0)) * (src >= 0)
    pos = (attn_l.cumsum(-1) - 1).clamp(min=0)
    kw = dict(logits_to_keep=T + 1) if accepts_logits_to_keep(model) else {}
    logits = model(input_ids=ids_l, attention_mask=attn_l, position_ids=pos, use_cache=False, **kw).logits
    logits = logits[:, -(T + 1):-1]  # kept entry t predicts the row's token L - T + t
    r = mask.sum(1).long().to(ids.device)  # response lengths: response token j is kept entry T - r + j
    t = ((T - r)[:, None] + torch.arange(T, device=ids.device)).clamp(max=T - 1)
    logp = torch.log_softmax(logits.float() / temperature, -1)
    logp = logp.gather(1, t[:, :, None].expand(-1, -1, logp.shape[-1]))
    return logp * mask.to(logp.device)[:, :, None]


def response_tokens(ids, idx, mask):
    """The response token ids (B x T, 0 on padding): the token each predicting position idx predicts."""
    return ids.gather(1, (idx + 1).clamp(max=ids.shape[1] - 1)) * mask.long()


def token_kl_entropy(logp, ref_logp, mask):
    """Exact per-token KL(p || q) = sum_v p_v (ln p_v - ln q_v) and entropy -sum_v p_v ln p_v over the vocabulary
    (B x T, 0 on padding), from log-distributions p = exp(logp), q = exp(ref_logp) (B x T x V)."""
    p = logp.exp()
    return (p * (logp - ref_logp)).sum(-1) * mask, -(p * logp).sum(-1) * mask


@torch.no_grad()
def response_kl_entropy(policy, ref_policy, tokenizer, prompts, accelerator, args, engine=None):
    """On a fresh y ~ pi(.|s) at every prompt (sampled by the vLLM `engine` when given), per response: the exact
    per-token KL(pi || pi_ref) and pi's entropy summed over its tokens (unbiased estimates of the response-level
    ones), (B,) each."""
    dev, T = accelerator.device, args.temperature
    with sampling_weights(policy, accelerator, engine=engine) as pi:
        samples = sim.sample_turns(pi, tokenizer, prompts, args.max_new_tokens, T, args.gen_batch_size, engine=engine)
        ids, attn, idx, mask = (t.to(dev) for t in response_batch(tokenizer, prompts, samples.token_ids))
        kl, ent = [], []
        for s in range(0, len(prompts), args.gen_batch_size):
            c = slice(s, s + args.gen_batch_size)
            with accelerator.autocast():  # both in the precision training runs in
                logp, ref_logp = (response_log_dists(m, ids[c], attn[c], idx[c], mask[c], T) for m in (pi, ref_policy))
            k, e = token_kl_entropy(logp, ref_logp, mask[c])
            kl.append(k.sum(1))
            ent.append(e.sum(1))
    return torch.cat(kl), torch.cat(ent)


@torch.no_grad()
def policy_shift(policy, ref_policy, tokenizer, prompts, turns, accelerator, args, engine=None) -> dict:
    """How far a PPO solve moved the policy: KL(pi || pi_ref) and pi's entropy on a fresh y ~ pi(.|s) at every prompt,
    per response the exact per-token KL and entropy summed over its tokens (unbiased estimates of the response-level
    ones), averaged over prompts and ranks, the entropy also per turn h (`turns`, 1-based). Iterative PPO reads it
    after each outer iteration as KL(pi_{i+1} || pi_i) (ppo/kl_new_to_pi_i)."""
    dev, H = accelerator.device, max(args.max_turns, max(turns))
    kl, ent = (x.double() for x in response_kl_entropy(policy, ref_policy, tokenizer, prompts, accelerator, args,
                                                       engine))
    h = torch.as_tensor(turns, device=dev) - 1
    onehot = torch.zeros(len(prompts), H, device=dev, dtype=torch.float64).scatter_(1, h[:, None], 1.0)
    count = torch.tensor(float(len(prompts)), device=dev, dtype=torch.float64)
    sums = torch.cat([torch.stack([kl.sum(), ent.sum(), count]), ent @ onehot, onehot.sum(0)])
    sums = accelerator.reduce(sums, "sum") if accelerator.num_processes > 1 else sums
    n, ent_h, n_h = sums[2], sums[3:3 + H], sums[3 + H:]
    out = {"ppo/kl_new_to_pi_i": float(sums[0] / n), "charts/entropy": float(sums[1] / n)}
    out.update({f"charts/entropy_turn{k + 1}": float(ent_h[k] / n_h[k]) for k in range(H) if n_h[k] > 0})
    return out


def ppo_step_batch(policy, ref_policy, score, critic, critic_opt, tokenizer, prompts, optimizer, accelerator,
                   rng, args, log_rows=None, engine=None):
    """One PPO batch: sample y ~ pi(.|s) for every prompt (batched), score(prompts, texts) -> (B,) rewards, GAE,
    ppo_epochs of updates of the policy and the critic (its values: token_scores). With args.kl_penalty 'loss' each
    minibatch's loss is the clipped surrogate + beta x the exact per-token KL(pi_theta || pi_ref) (ppo/kl_term, nats
    per token, on the weights before the step); charts/optimizer_steps counts the steps taken (fewer than epochs x
    minibatches when target-KL stops the batch). args: the PPO fields of iterative_ppo.Args. engine: a vLLM engine
    that samples instead of the HF sampler (its weights synced from the policy first)."""
    dev, T = accelerator.device, args.temperature
    with sampling_weights(policy, accelerator, engine=engine) as pi:
        samples = sim.sample_turns(pi, tokenizer, prompts, args.max_new_tokens, T, args.gen_batch_size, engine=engine)
    ids, attn, idx, mask = (t.to(dev) for t in response_batch(tokenizer, prompts, samples.token_ids))
    values_of = lambda j: token_scores(critic, ids[j], attn[j]).gather(1, idx[j])  # the critic's V per token
    chunks = [slice(s, s + args.gen_batch_size) for s in range(0, len(prompts), args.gen_batch_size)]  # memory
    with torch.no_grad(), accelerator.autocast():  # the reference in the precision the prepared policy runs in
        old_lp = torch.cat([response_logprobs(policy, ids[c], attn[c], idx[c], mask[c], T) for c in chunks]) * mask
        ref_lp = torch.cat([response_logprobs(ref_policy, ids[c], attn[c], idx[c], mask[c], T)
                            for c in chunks]) * mask  # the reference: pi_i (Theorem 2)
        old_v = torch.cat([values_of(c) for c in chunks]) * mask
        scores = score(prompts, samples.texts).to(dev)  # the reward model (Q_i in Iterative PPO)
        in_reward = args.kl_penalty == "reward"  # else the KL to the reference is in the loss (below)
        rewards, kl = ppo_rewards(scores, old_lp, ref_lp, mask, args.kl_coef if in_reward else 0.0)
        if args.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False, accelerator=accelerator)
        adv, returns = token_gae(rewards, old_v, mask, args.ppo_gamma, args.lam)
        adv_std = batch_mean_std(adv, mask, accelerator)[1]
        adv = whiten(adv, mask, accelerator=accelerator)  # over the batch of every rank
    # Theorem 2's beta: the surrogate reads the advantages divided by their spread sigma, so the KL term is weighted
    # beta / sigma and the minibatch's loss is (surrogate of A - beta KL) / sigma, whose maximiser is Theorem 2's
    # whatever Q's spread (weighted beta, the KL's weight drifted with sigma: beta x sigma in Theorem 2's terms)
    kl_weight = float(args.kl_coef / adv_std)
    if log_rows is not None:
        log_rows += [dict(prompt=p, response=t, token_ids=r, q=float(scores[b]), old_logprob=float(old_lp[b].sum()),
                          ref_logprob=float(ref_lp[b].sum())) for b, (p, t, r) in
                     enumerate(zip(prompts, samples.texts, samples.token_ids))]
    mb = max(1, args.ppo_minibatch_size // args.world_size)
    in_loss = args.kl_penalty == "loss" and args.kl_coef > 0
    tokens = response_tokens(ids, idx, mask)
    logs = []
    for _ in range(args.ppo_epochs):
        order = torch.as_tensor(rng.permutation(len(prompts)), device=dev)
        for s in range(0, len(prompts), mb):
            j = order[s:s + mb]
            if in_loss:  # Theorem 2's KL to the reference, exact over the vocabulary, on the current weights
                with torch.no_grad(), accelerator.autocast():  # first: no other forward between pi's and its backward
                    ref_logp = response_log_dists(ref_policy, ids[j], attn[j], idx[j], mask[j], T)
                logp = response_log_dists(policy, ids[j], attn[j], idx[j], mask[j], T)
                lp = logp.gather(2, tokens[j][:, :, None]).squeeze(-1)
                kl_term = masked_mean(token_kl_entropy(logp, ref_logp, mask[j])[0], mask[j])  # nats per token
            else:
                lp = response_logprobs(policy, ids[j], attn[j], idx[j], mask[j], T)
                kl_term = torch.zeros((), device=dev)
            pg_loss, clipfrac = ppo_clipped_loss(lp, old_lp[j], adv[j], mask[j], args.cliprange)
            accelerator.backward(pg_loss + kl_weight * kl_term if in_loss else pg_loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(policy.parameters(), args.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad()
            vf_loss = value_loss(values_of(j), old_v[j], returns[j], mask[j], args.cliprange_value)
            critic_opt.zero_grad()
            vf_loss.backward()
            sync_gradients(critic, accelerator)
            torch.nn.utils.clip_grad_norm_(critic.parameters(), args.max_grad_norm)
            critic_opt.step()
            with torch.no_grad():
                approx_kl = accelerator.reduce(masked_mean(0.5 * (lp - old_lp[j]) ** 2, mask[j]), "mean").item()
            logs.append({"losses/policy_loss": pg_loss.item(), "losses/value_loss": vf_loss.item(),
                         "losses/clipfrac": clipfrac.item(), "losses/approx_kl": approx_kl,
                         "ppo/kl_term": kl_term.item(), "ppo/adv_std": float(adv_std), "ppo/kl_weight": kl_weight})
            if args.target_kl and approx_kl > args.target_kl:  # same decision on every rank
                break
        else:
            continue
        break
    return {**{k: float(np.mean([log[k] for log in logs])) for k in logs[0]},
            "ppo/kl_term_first_minibatch": logs[0]["ppo/kl_term"],
            "ppo/kl_term_last_minibatch": logs[-1]["ppo/kl_term"],
            "charts/optimizer_steps": len(logs), "ppo/q_score": float(scores.mean()),
            "ppo/kl_to_pi_i": float(kl.sum(1).mean()), "ppo/response_tokens": float(mask.sum(1).mean()),
            "ppo/hit_budget": float(samples.hit_budget.float().mean())}
