"""envs/tutor_task.py: the embedded task "tutor", a small cousin of the MTPO paper's Education Dialogue.

A teacher (the policy) teaches a student with a hidden learning style and a hidden patience over H = 5 teacher
turns. Everything is built in code: a word-level tokenizer with a chat template, a tiny Llama-architecture reference
policy mu trained by SFT on a scripted reference teacher, an offline dataset D_off, and the exact values V*
(expectimax over beliefs), V(reference) and the last-turn-only bound, so learning is measured against a known
optimum. docs/tutor_task.md describes the rules.

    python -m envs.tutor_task     # build (or load) mu and print its value beside V*
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

import simulator as sim

STYLES = ("pictures", "stories", "songs", "puzzles")
TOPICS = ("fractions", "planets", "volcanoes", "grammar", "rivers", "insects", "magnets", "poems")
ASK = "how do you like to learn ?"
TEACH = "let us learn with {} ."
GREETING = "hello teacher , please teach me {} ."
NAMED, NOT_SURE = "i like {} best .", "i am not sure ."
LEARNED, NEUTRAL, BORED = "i learned it , thank you !", "hmm , i did not get that .", "this is boring ."
ASLEEP, CONFUSED = "zzz ... i am asleep .", "i do not understand you ."
_TEACH_RE = re.compile(r"^let us learn with (\w+) \.$")


@dataclass(frozen=True)
class TutorRules:
    """Constants of the tutor task; the exact values below are computed from them."""
    p_name_style: float = 0.7  # an asked student names its style, else says it is not sure
    p_learn_match: float = 0.9  # a lesson in the student's style is learned
    p_learn_mismatch: float = 0.1  # a lesson in another style is learned (and uses one unit of patience)
    p_bored: float = 0.7  # an unlearned mismatched lesson makes the student say it is bored
    patience: tuple = (1, 2)  # mismatched lessons tolerated, drawn uniformly; then the student is asleep
    max_turns: int = 5  # H: teacher turns; reward = lessons learned / (H - 1)
    ref_ask: float = 0.2  # reference teacher: asks at turn 1 with this probability
    ref_repeat: float = 0.6  # reference teacher: repeats a style whose lesson was just learned
    ref_follow_answer: bool = True  # "V1": after asking at turn 1 and hearing a style, teach it at turn 2


def parse_teacher(text: str) -> tuple[str, int]:
    """('ask', -1) | ('teach', style index) | ('other', -1)."""
    text = " ".join(text.split())
    if text == ASK:
        return "ask", -1
    m = _TEACH_RE.match(text)
    if m and m.group(1) in STYLES:
        return "teach", STYLES.index(m.group(1))
    return "other", -1


def student_reply(conv: sim.Conversation, style: int, patience: int, rules: TutorRules, u: np.ndarray) -> str:
    """The student's answer to the last teacher turn; u holds 3 uniforms. Patience is replayed from history."""
    left = patience
    teacher = [m["content"] for m in conv if m["role"] == "assistant"]
    for text in teacher[:-1]:
        kind, s = parse_teacher(text)
        if left > 0 and kind == "teach" and s != style:
            left -= 1
    if left == 0:
        return ASLEEP
    kind, s = parse_teacher(teacher[-1])
    if kind == "ask":
        return NAMED.format(STYLES[style]) if u[0] < rules.p_name_style else NOT_SURE
    if kind == "other":
        return CONFUSED
    if s == style:
        return LEARNED if u[0] < rules.p_learn_match else NEUTRAL
    if u[0] < rules.p_learn_mismatch:
        return LEARNED
    return BORED if u[1] < rules.p_bored else NEUTRAL


def lessons_learned(conv: sim.Conversation) -> list[int]:
    """Per teacher turn, 1 if the student's next message says the lesson was learned."""
    out, teacher_seen = [], False
    for m in conv:
        if m["role"] == "assistant":
            out.append(0)
            teacher_seen = True
        elif m["role"] == "user" and teacher_seen:
            out[-1] = int(" ".join(m["content"].split()) == LEARNED)
    return out


def reference_teacher(conv: sim.Conversation, rules: TutorRules, u: np.ndarray) -> str:
    """The scripted reference teacher's next turn (the behaviour mu imitates); u holds 2 uniforms."""
    teacher = [m["content"] for m in conv if m["role"] == "assistant"]
    t = len(teacher) + 1
    if t == 1:
        return ASK if u[0] < rules.ref_ask else TEACH.format(STYLES[int(u[1] * 4)])
    last_kind, last_style = parse_teacher(teacher[-1])
    reply = " ".join(conv[-1]["content"].split())
    if t == 2 and rules.ref_follow_answer and last_kind == "ask":
        named = [s for s in STYLES if reply == NAMED.format(s)]
        if named:
            return TEACH.format(named[0])
    if last_kind == "teach" and reply == LEARNED and u[0] < rules.ref_repeat:
        return TEACH.format(STYLES[last_style])
    return TEACH.format(STYLES[int(u[1] * 4)])


class TutorEnv(sim.Environment):
    """The embedded teacher/student task. user = (style, patience), hidden from the policy."""
    name = "tutor"
    scores_final_user_reply = True

    def __init__(self, rules: TutorRules = TutorRules(), offline_size: int = 10000, offline_seed: int = 0):
        self.rules = rules
        self.max_turns = rules.max_turns
        self.offline_size, self.offline_seed, self._pool = offline_size, offline_seed, None

    def offline_pool(self) -> tuple[list[sim.Context], list[sim.Conversation]]:
        """D_off: a fixed set of reference-teacher dialogues (same seed, same rows) of H ~ U{1..H_max} turns each,
        with their students. Each context carries its dialogue's H (Context.max_turns), as D_off's records do on
        the chat path: LT-OFFLINE and LT-MIXED train that dialogue's own last turn, MT-MIXED resets within it."""
        if self._pool is None:
            rng = np.random.default_rng(self.offline_seed)
            ctx = self.contexts(self.offline_size, "offline", rng)
            full = self.reference_dialogues(ctx, rng)
            lengths = rng.integers(1, self.max_turns + 1, size=len(ctx)).tolist()
            ctx = [dataclasses.replace(c, max_turns=H) for c, H in zip(ctx, lengths)]
            self._pool = ctx, [conv[:1 + 2 * H] for conv, H in zip(full, lengths)]  # to the student's reply to y_H
        return self._pool

    def offline(self, n, rng):
        ctx, convs = self.offline_pool()
        idx = rng.integers(len(convs), size=n)
        return [ctx[i] for i in idx], [convs[i] for i in idx]

    def offline_alternative(self, contexts, prefixes, rng):
        u = rng.random((len(prefixes), 2))  # D_off's behaviour policy (the scripted reference), resampled
        return [reference_teacher(p, self.rules, u[i]) for i, p in enumerate(prefixes)]

    def contexts(self, n, split, rng):
        # "train" and "eval" prompts differ only in their randomness; the topic does not matter to the student
        topics = rng.integers(len(TOPICS), size=n)
        styles = rng.integers(len(STYLES), size=n)
        patience = rng.choice(self.rules.patience, size=n)
        return [sim.Context(i, [{"role": "user", "content": GREETING.format(TOPICS[topics[i]])}],
                        (int(styles[i]), int(patience[i]))) for i in range(n)]

    def user_turn(self, convs, users, rng):
        u = rng.random((len(convs), 3))
        return [student_reply(c, s, p, self.rules, u[i]) for i, (c, (s, p)) in enumerate(zip(convs, users))]

    def reward(self, convs):
        return torch.tensor([sum(lessons_learned(c)) / (self.max_turns - 1) for c in convs], dtype=torch.float32)

    def optimal_value(self) -> float:
        return tutor_value(self.rules, "optimal")  # V*: expectimax over the student's belief states

    def dialogue_metrics(self, convs):
        """Lessons learned by turn h (eval/learned_turn{h}) and how often the teacher asks (eval/ask_rate)."""
        per_turn = np.array([lessons_learned(c) for c in convs]).mean(0)
        out = {f"eval/learned_turn{h + 1}": float(v) for h, v in enumerate(per_turn)}
        out["eval/ask_rate"] = float(np.mean([[parse_teacher(m["content"])[0] == "ask" for m in c
                                               if m["role"] == "assistant"] for c in convs]))
        return out

    def scripted_policies(self):
        return {"reference": lambda contexts, rng: self.reference_dialogues(contexts, rng)}

    def reference_dialogues(self, n_or_contexts, rng: np.random.Generator, n_turns: Optional[int] = None) -> list:
        """Full dialogues of the scripted reference teacher from n new contexts (or the given ones)."""
        ctx = self.contexts(n_or_contexts, "offline", rng) if isinstance(n_or_contexts, int) else n_or_contexts
        n = len(ctx)
        convs, users = [list(c.messages) for c in ctx], [c.user for c in ctx]
        for _ in range(n_turns or self.max_turns):
            u = rng.random((n, 2))
            for i, c in enumerate(convs):
                c.append({"role": "assistant", "content": reference_teacher(c, self.rules, u[i])})
            for c, r in zip(convs, self.user_turn(convs, users, rng)):
                c.append({"role": "user", "content": r})
        return convs


# Exact values by expectimax over beliefs on the hidden (style, patience left).
def _obs_model(rules: TutorRules, state: tuple, action: int) -> list:
    """[(observation, probability, next state)]; action -1 = ask, 0..3 = teach that style."""
    style, left = state
    if left == 0:
        return [("asleep", 1.0, state)]
    if action < 0:
        return [(f"named{style}", rules.p_name_style, state), ("notsure", 1 - rules.p_name_style, state)]
    if action == style:
        return [("learned", rules.p_learn_match, state), ("neutral", 1 - rules.p_learn_match, state)]
    nxt = (style, left - 1)
    pl, pb = rules.p_learn_mismatch, rules.p_bored
    return [("learned", pl, nxt), ("bored", (1 - pl) * pb, nxt), ("neutral", (1 - pl) * (1 - pb), nxt)]


def belief_branches(states: list, belief: tuple, transitions) -> dict:
    """{observation: (probability, posterior belief)} of one teacher action: transitions(state) gives
    [(observation, probability, next state)] (posteriors rounded to 12 digits, so equal beliefs cache as one)."""
    obs = {}
    for st, b in zip(states, belief):
        if b > 0:
            for o, p, nxt in transitions(st):
                post, tot = obs.setdefault(o, ([0.0] * len(states), [0.0]))
                post[states.index(nxt)] += b * p
                tot[0] += b * p
    return {o: (tot[0], tuple(round(x / tot[0], 12) for x in post)) for o, (post, tot) in obs.items()}


def _reference_policy(rules: TutorRules, t: int, memory: tuple) -> dict:
    """Action distribution of the scripted reference at turn t; memory = (turn-1 named style, last action, obs)."""
    named, last_a, last_o = memory
    uniform = {a: 1 / len(STYLES) for a in range(len(STYLES))}
    if t == 1:
        return {-1: rules.ref_ask, **{a: (1 - rules.ref_ask) / len(STYLES) for a in uniform}}
    if t == 2 and rules.ref_follow_answer and named is not None:
        return {named: 1.0}
    if last_a >= 0 and last_o == "learned":
        return {a: (1 - rules.ref_repeat) / len(STYLES) + (rules.ref_repeat if a == last_a else 0) for a in uniform}
    return uniform


def tutor_value(rules: TutorRules = TutorRules(), policy: str = "optimal") -> float:
    """Exact expected reward of: 'optimal' (V*), 'reference', 'last_turn' (reference, then a Bayes-optimal last
    turn: the best any last-turn-only method can reach from the reference's states) or 'never_ask' (best policy
    that only teaches)."""
    H = rules.max_turns
    states = [(s, p) for s in range(len(STYLES)) for p in range(max(rules.patience) + 1)]
    prior = tuple(1 / (len(STYLES) * len(rules.patience)) if p in rules.patience else 0.0 for s, p in states)

    @functools.lru_cache(maxsize=None)
    def value(belief: tuple, t: int, memory: tuple) -> float:
        if t > H:
            return 0.0

        def q(a):  # expected learned lessons from action a onwards
            total = 0.0
            for o, (p_o, nb) in belief_branches(states, belief, lambda st: _obs_model(rules, st, a)).items():
                named = int(o[5:]) if (t == 1 and o.startswith("named")) else memory[0]
                total += p_o * ((o == "learned") + value(nb, t + 1, (named, a, o)))
            return total

        teach = range(len(STYLES))
        if policy == "optimal" or (policy == "last_turn" and t == H):
            return max(q(a) for a in [-1, *teach])
        if policy == "never_ask":
            return max(q(a) for a in teach)
        return sum(p * q(a) for a, p in _reference_policy(rules, t, memory).items())

    return value(prior, 1, (None, None, None)) / (H - 1)


# The word-level tokenizer and the tiny Llama reference policy mu.
def build_tutor_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<bos>", "<eot>", "<|user|>", "<|assistant|>", "<|system|>"]
    texts = [ASK, TEACH, GREETING, NAMED, NOT_SURE, LEARNED, NEUTRAL, BORED, ASLEEP, CONFUSED]
    words = sorted({w for t in texts for w in t.split()} - {"{}"} | set(STYLES) | set(TOPICS))
    vocab = {w: i for i, w in enumerate(special + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  bos_token="<bos>", eos_token="<eot>", clean_up_tokenization_spaces=False,
                                  additional_special_tokens=special[4:])
    tok.chat_template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eot> "
                         "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")
    tok.name_or_path = "tutor-wordlevel"
    return tok


def tutor_model_config(tokenizer):
    from transformers import LlamaConfig

    # initializer_range 0.1, not HF's 0.02: with 0.02 SFT stalls and never learns "repeat the style that worked"
    # (a copy from context), whatever the lr or steps (docs/implementation_notes.md#initialising-mu).
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                       initializer_range=0.1, tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)


def sft_batch(tokenizer, convs: Sequence[sim.Conversation]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ids, attention mask, and a mask over every assistant turn's tokens (for SFT)."""
    rows = []
    for c in convs:
        tokens = sim.conversation_ids(tokenizer, c)
        mask = [False] * len(tokens.ids)
        for start, end in tokens.turns:
            mask[start:end] = [True] * (end - start)
        rows.append((tokens.ids, mask))
    L = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), L), tokenizer.pad_token_id, dtype=torch.long)
    attn, mask = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
    for b, (full, m) in enumerate(rows):
        ids[b, : len(full)], attn[b, : len(full)], mask[b, : len(full)] = torch.tensor(full), 1, torch.tensor(m)
    return ids, attn, mask


def atomic_save_pretrained(objs: Sequence, path: Path) -> None:
    """save_pretrained every object into path via a temporary sibling and a rename: never a half-written dir."""
    path = Path(path)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for o in objs:
        o.save_pretrained(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def train_base_policy(env: TutorEnv, steps: int = 900, batch_size: int = 64, lr: float = 3e-3, seed: int = 0,
                      pool: int = 12800, log_every: int = 250):
    """SFT of a tiny Llama on D_off (the scripted reference teacher's dialogues); returns (model, tokenizer)."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    tok = build_tutor_tokenizer()
    model = LlamaForCausalLM(tutor_model_config(tok))
    data = env.reference_dialogues(pool, rng)
    batches = [sft_batch(tok, data[i:i + batch_size]) for i in range(0, pool, batch_size)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup_cosine = lambda s: min(1.0, (s + 1) / 50) * 0.5 * (1 + math.cos(math.pi * s / steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine)
    model.train()
    start = time.time()
    for step in range(steps):
        ids, attn, mask = batches[rng.integers(len(batches))]
        lp = sim.token_logprobs(model, ids, attn)
        loss = -(lp * mask[:, 1:]).sum() / mask[:, 1:].sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[sft] step {step:5d} loss {loss.item():.4f} ({time.time() - start:.0f}s)", flush=True)
    model.eval()
    return model, tok


DEFAULT_BASE_POLICY = Path(__file__).resolve().parent.parent / "runs" / "tutor_base_policy"


def load_tutor_base_policy(path: Path = DEFAULT_BASE_POLICY, rebuild: bool = False, **sft_kwargs):
    """mu for the tutor task: loaded from `path` when present, else built by SFT and saved there atomically."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    path = Path(path)
    if rebuild or not (path / "config.json").exists():
        print(f"[simulator] building the tutor base policy by SFT into {path} (once; about 2.5-3 minutes on 2 CPU cores)")
        model, tok = train_base_policy(TutorEnv(), **sft_kwargs)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_save_pretrained([model, tok], path)
    tok = PreTrainedTokenizerFast.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), tok


@dataclass
class Args:
    base_policy_path: str = str(DEFAULT_BASE_POLICY)
    """where the tutor's reference policy mu is cached (built by SFT when missing)"""
    rebuild: bool = False
    """retrain mu even if a cached copy exists"""
    sft_steps: int = 900
    """SFT steps for mu (batch 64)"""
    num_eval: int = 4000
    """dialogues sampled to measure mu and the scripted reference"""
    seed: int = 0
    """random seed"""
    threads: int = 0
    """torch CPU threads (0 = torch's default)"""
    write_offline: Optional[str] = None
    """also write D_off (scripted reference dialogues, one JSON message list per line) to this path"""
    num_offline: int = 10000
    """dialogues in D_off"""


def main(args: Args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    env = TutorEnv()
    t0 = time.time()
    model, tok = load_tutor_base_policy(Path(args.base_policy_path), args.rebuild, steps=args.sft_steps, seed=args.seed)
    t_build = time.time() - t0
    mu = sim.evaluate_policy(model, tok, env, args.num_eval, seed=args.seed + 1, max_new_tokens=12)
    ref = env.reward(env.reference_dialogues(args.num_eval, np.random.default_rng(args.seed + 2)))
    values = {p: tutor_value(env.rules, p) for p in ("optimal", "reference", "last_turn", "never_ask")}
    se = lambda x: x.std().item() / math.sqrt(len(x))
    print(f"mu (SFT base policy, {args.num_eval} dialogues): "
          f"{mu['eval/mean_reward']:.4f} +- {mu['eval/reward_stderr']:.4f}"
          f"   (loaded/built in {t_build:.0f}s)")
    print(f"scripted reference, sampled:                   {ref.mean().item():.4f} +- {se(ref):.4f}")
    print(f"scripted reference, exact:                     {values['reference']:.4f}")
    print(f"reference with a Bayes-optimal last turn:      {values['last_turn']:.4f}   (last-turn-only bound)")
    print(f"best never-ask policy:                         {values['never_ask']:.4f}")
    print(f"V* (Bayes-optimal, expectimax over beliefs):   {values['optimal']:.4f}")
    if args.write_offline:
        with open(args.write_offline, "w") as f:
            for c in env.reference_dialogues(args.num_offline, np.random.default_rng(args.seed + 3)):
                f.write(json.dumps(c) + "\n")
        print(f"wrote {args.num_offline} reference dialogues (D_off) to {args.write_offline}")
    return {"mu": mu["eval/mean_reward"], "reference_sampled": ref.mean().item(), **values}


if __name__ == "__main__":
    import tyro

    main(tyro.cli(Args))
