"""envs/chat_env.py: the papers' chat setting as an Environment (simulator.Environment).

Prompted judges (the REFUEL paper's GPT-4 leaderboard prompt, the MTPO paper's Education Dialogue judge), a user
played by a prompted LLM (in-process or at an OpenAI-compatible endpoint; REFUEL paper, App. C.2 format), the HF
reward model that scores a chat-templated conversation, and `ChatEnv`, which ties them to a dataset's records
(pre-sampled user turns in setting two). `envs/flags.make_env` builds it from the scripts' flags.
"""
from __future__ import annotations

import inspect
import json
import os
import re
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

import simulator as sim
from envs.chat_datasets import is_education, load_offline, load_prompts, split_opening
from envs.loading import load_policy, load_tokenizer, model_load_error
from plumbing.logprob_memory import unwrap_model

JUDGE_PROMPT = """I require a leaderboard for various chatbots. I'll provide you with dialogues with these chatbots. \
Your task is to assess these dialogues, and select the dialogue that produces the best outputs from a human \
perspective.

Dialogue A:

{dialogue_a}

Dialogue B:

{dialogue_b}

Instructions:

FIRST provide a one-sentence comparison of the two dialogues, explaining which you prefer and why. SECOND, on a new \
line, state only "A" or "B" to indicate your choice. Your response should use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""  # REFUEL paper, App. C.5 (UltraInteract prompt)


def parse_judge_reply(text: str) -> tuple[Optional[str], str]:
    """('A' | 'B' | None, how): how = 'format' (a 'Preferred: X' line), 'fallback' (a last line that is only A or B,
    or a 'Dialogue X' named in the last line), 'failed'."""
    m = re.findall(r"preferred\s*:\s*[\"'(\[*<]*\s*([AB])\b", text, flags=re.IGNORECASE)
    if m:
        return m[-1].upper(), "format"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if lines:
        bare = re.fullmatch(r"[\"'(\[*<\s]*([AB])[\"')\]*>.\s]*", lines[-1])
        if bare:
            return bare.group(1), "fallback"
        named = set(re.findall(r"dialogue\s+([AB])\b", lines[-1], flags=re.IGNORECASE))
        if len(named) == 1:
            return named.pop().upper(), "fallback"
    return None, "failed"


def format_dialogue(conv: sim.Conversation) -> str:
    return "\n\n".join(f"{'User' if m['role'] == 'user' else 'Chatbot'}: {m['content']}" for m in conv
                       if m["role"] != "system")


# MTPO paper, App. C (Education Dialogue's preference oracle), in our words and in JUDGE_PROMPT's answer format
EDUCATION_JUDGE_PROMPT = """You are an expert at assessing teachers. Below are two lessons between a teacher (the \
Chatbot) and a student (the User).

Dialogue A:

{dialogue_a}

Dialogue B:

{dialogue_b}

A good lesson is more than whether the student understood the topic: the teacher presents the material clearly and \
with enthusiasm, invites questions and participation, and adapts to how the student likes to learn; the student \
feels free to ask for clarification, offer ideas and challenge them. Do not let the order of the lessons affect \
your answer.

FIRST give a one-sentence comparison of the two lessons. SECOND, on a new line, state only "A" or "B". Use the format:
Comparison: <one-sentence comparison and explanation>
Preferred: <"A" or "B">"""


def judge_prompt(env, path: Optional[str] = None) -> str:
    """The judge's template: a file (with {dialogue_a} and {dialogue_b}), else the Education Dialogue oracle for
    Education Dialogue data, else JUDGE_PROMPT."""
    if path:
        text = Path(path).read_text()
        if "{dialogue_a}" not in text or "{dialogue_b}" not in text:
            raise ValueError(f"judge prompt {path} must contain {{dialogue_a}} and {{dialogue_b}}")
        return text
    return EDUCATION_JUDGE_PROMPT if is_education(getattr(env, "records", None) or []) else JUDGE_PROMPT


class JudgePreference:
    """P(a preferred to b) from a prompted judge (JUDGE_PROMPT): both orders are asked and the two verdicts
    averaged, which removes position bias; p is then 0, 1/2 or 1. generate(prompts) -> replies: an HF chat model
    (`hf_greedy_generate`) or `OpenAIChatClient(...).complete`. An unparsed verdict counts as a tie and is counted
    (charts/judge_unparsed_rate); a call where more than max_unparsed of the verdicts do not parse is an error,
    not a batch of ties that would train on nothing."""

    def __init__(self, generate, template: str = JUDGE_PROMPT, max_unparsed: float = 0.5):
        self.generate, self.template, self.n_verdicts, self.n_fallbacks, self.n_failed = generate, template, 0, 0, 0
        self.max_unparsed = max_unparsed

    def __call__(self, convs_a, convs_b) -> torch.Tensor:
        n = len(convs_a)
        prompts = [self.template.format(dialogue_a=format_dialogue(x), dialogue_b=format_dialogue(y))
                   for x, y in [*zip(convs_a, convs_b), *zip(convs_b, convs_a)]]
        replies = self.generate(prompts)
        parsed = [parse_judge_reply(t) for t in replies]
        self.n_verdicts += len(parsed)
        self.n_fallbacks += sum(how == "fallback" for _, how in parsed)
        failed = sum(how == "failed" for _, how in parsed)
        self.n_failed += failed
        if parsed and failed / len(parsed) > self.max_unparsed:
            example = next(t for t, (_, how) in zip(replies, parsed) if how == "failed")
            raise ValueError(f"the judge's verdicts did not parse: {failed} of {len(parsed)} replies have no "
                             f"'Preferred: A' or 'Preferred: B' line (more than --judge_max_unparsed "
                             f"{self.max_unparsed}), e.g. {example[-300:]!r}. Use a judge that follows the format, "
                             f"fix --judge_prompt_path, or raise --judge_max_unparsed to score them as ties")
        first = torch.tensor([{"A": 1.0, "B": 0.0}.get(c, 0.5) for c, _ in parsed[:n]])
        second = torch.tensor([{"A": 0.0, "B": 1.0}.get(c, 0.5) for c, _ in parsed[n:]])  # a was shown as B
        return (first + second) / 2


def hf_greedy_generate(model, tokenizer, max_new_tokens: int = 256, max_batch_size: int = 16):
    """generate(prompts) -> greedy replies of an HF chat model, batched through sample_turns."""
    def generate(prompts):
        convs = [[{"role": "user", "content": p}] for p in prompts]
        return sim.sample_turns(model, tokenizer, convs, max_new_tokens, temperature=0.0,
                            max_batch_size=max_batch_size).texts
    return generate


def make_judge_preference(judge_model: str, api_base: Optional[str] = None, device: str = "cpu",
                          dtype=torch.float32, max_new_tokens: int = 256, template: str = JUDGE_PROMPT,
                          max_concurrency: int = 32, timeout: float = 120.0, retries: int = 3,
                          max_unparsed: float = 0.5) -> JudgePreference:
    """A JudgePreference from flags: an OpenAI-compatible endpoint's model when api_base is set (max_concurrency
    requests in flight, each with `timeout` seconds and `retries` tries: see OpenAIChatClient for sizing them),
    else an HF model."""
    if api_base:
        client = OpenAIChatClient(api_base, judge_model, max_workers=max_concurrency, timeout=timeout,
                                  retries=retries)
        judge = JudgePreference(lambda prompts: client.complete(prompts, max_new_tokens, temperature=0.0), template,
                                max_unparsed)
        judge.client = client
        return judge
    model, tok = load_policy(judge_model, dtype)
    return JudgePreference(hf_greedy_generate(model.to(device).eval(), tok, max_new_tokens), template, max_unparsed)


USER_PROMPT = """Below is a dialogue between a user and an AI assistant. Play the user: what would you ask next?

### Dialogue:
{dialogue}

### Instructions:
First give a one-sentence justification of the question you want to ask. Then, on a new line, state only the question.
Use exactly this format:
Justification: <one sentence>
Question: <the question to ask next>"""

# Education Dialogue's student (MTPO paper): the hidden learning preference and reaction come from the record's
# background_info; the teacher (the policy) never sees them.
STUDENT_PROMPT = """You are playing a student in a one-to-one lesson about {topic}. You like {student_prefrences}; \
you prefer to learn this way, {student_reactions}. The teacher does not know this.

### Lesson so far:
{dialogue}

### Instructions:
Write the student's next message, true to your preferences. First give a one-sentence justification, then the \
message on a new line. Use exactly this format:
Justification: <one sentence>
Student: <the student's next message>"""


_LABEL = r"^[\s>*#_\-]*({key})[\s*_]*:[\s*_]*(.*)$"  # a "Key:" line, markdown emphasis around the label allowed


def parse_user_question(text: str, key: str = "Question") -> tuple[str, bool]:
    """The user's next message in a prompted user's reply: the text on the first line that starts with '<key>:'
    (case-insensitive, markdown emphasis allowed), or, when that line is empty, the line after it. Returns
    (message, True). Fallback when no such line has text: the first line ending in '?', else the last line, any
    'Label:' in front of it dropped (a lone 'Justification: ...' reaches the policy without its label), and of a
    question, what follows its last ': ' ("The question to ask next is: Why?" -> "Why?"); returns (message, False),
    counted as charts/user_parse_fallback_rate. Small instruct models miss the format: SmolLM2-135M-Instruct's
    replies all fall back (docs/chat_settings.md)."""
    lines = [line.strip() for line in text.strip().splitlines()]
    label = re.compile(_LABEL.format(key=re.escape(key)), flags=re.IGNORECASE)
    any_label = re.compile(_LABEL.format(key=r"[A-Za-z]+(?: [A-Za-z]+)?"), flags=re.IGNORECASE)  # 1-2 words
    for i, line in enumerate(lines):
        m = label.match(line)
        if not m:
            continue
        found = m.group(2).strip() or next((x for x in lines[i + 1:] if x), "")
        found = found.strip().strip('"').strip()
        if found and not re.match(_LABEL.format(key="justification"), found, flags=re.IGNORECASE):
            return found, True
    content = [(any_label.match(x).group(2) if any_label.match(x) else x).strip() for x in lines]
    content = [x.strip('"').strip() for x in content if x.strip('"').strip()]
    if not content:
        return text.strip(), False
    question = next((x for x in content if x.endswith("?")), None)
    if question is not None:  # "The question to ask next is: Why ...?" -> "Why ...?"
        return question.rsplit(": ", 1)[-1].strip('"').strip(), False
    return content[-1], False


class PromptedUser:
    """A chat model playing the user, prompted in the REFUEL paper's Appendix C.2 format; batched. Either an HF
    model in-process (model, tokenizer) or an OpenAI-compatible endpoint (client=OpenAIChatClient(...)), which is how
    a 70B user served by vLLM or TGI runs beside an 8B policy."""

    def __init__(self, model=None, tokenizer=None, prompt_template: str = USER_PROMPT, max_new_tokens: int = 128,
                 temperature: float = 1.0, max_batch_size: int = 64, client: Optional["OpenAIChatClient"] = None,
                 reply_key: str = "Question", role_names: Optional[dict] = None):
        """The template's {dialogue} receives the conversation; any other {field} is read from the context's user
        state (e.g. Education Dialogue's {topic}, {student_prefrences}); the reply is parsed after '<reply_key>:'."""
        if "{dialogue}" not in prompt_template:
            raise ValueError("the user prompt template must contain a {dialogue} placeholder")
        if client is None and (model is None or tokenizer is None):
            raise ValueError("PromptedUser needs an HF model and tokenizer, or an endpoint client")
        self.model, self.tokenizer, self.template, self.client = model, tokenizer, prompt_template, client
        self.max_new_tokens, self.temperature, self.max_batch_size = max_new_tokens, temperature, max_batch_size
        self.reply_key, self.role_names = reply_key, role_names or {"user": "User", "assistant": "Assistant"}
        self.n_calls = self.n_fallbacks = 0

    def prompt(self, conv, user) -> str:
        dialogue = "\n\n".join(f"{self.role_names[m['role']]}: {m['content']}" for m in conv if m["role"] != "system")
        try:
            return self.template.format_map({**(user if isinstance(user, dict) else {}), "dialogue": dialogue})
        except KeyError as e:
            raise ValueError(f"the user prompt template asks for {{{e.args[0]}}}, which this context's user state "
                             f"lacks (it has: {sorted(user) if isinstance(user, dict) else 'nothing'})") from None

    def __call__(self, convs, users, rng):
        asks = [self.prompt(c, u) for c, u in zip(convs, users)]
        if self.client is not None:  # a seed per request, drawn from the rank's generator (seeded by --seed + rank,
            # advanced by every iteration and conversation): a seeded run reproduces its user turns on a
            # deterministic server
            seeds = None if rng is None else rng.integers(2 ** 31 - 1, size=len(asks)).tolist()
            texts = self.client.complete(asks, self.max_new_tokens, self.temperature, seeds=seeds)
        else:
            texts = sim.sample_turns(self.model, self.tokenizer, [[{"role": "user", "content": a}] for a in asks],
                                 self.max_new_tokens, self.temperature, self.max_batch_size).texts
        parsed = [parse_user_question(t, self.reply_key) for t in texts]
        self.n_calls += len(parsed)
        self.n_fallbacks += sum(not ok for _, ok in parsed)
        return [q for q, _ in parsed]


class OpenAIChatClient:
    """Completions from an OpenAI-compatible chat endpoint (vLLM, TGI, OpenAI): a 70B user or a GPT-4 judge that
    does not fit beside the policy. Standard library only; requests go out concurrently, not one by one.

    max_workers: requests in flight from this process (each rank of a multi-process run has its own client, so
    the server sees ranks x max_workers). timeout: seconds one request may take, its wait in the server's queue
    included. retries: tries per request (a retry sends the whole prompt again), with exponential backoff.
    Sizing: the last request of a wave is answered only once the server has got through every prompt token in
    flight. At 8 ranks x 32 requests of ~7k prompt tokens, 1.8M prompt tokens arrive at once: at P prefill tokens/s
    the last answer comes after about 1.8M / P s (90 s at 20k tokens/s, 180 s at 10k, plus decoding and the queue
    of what the server can batch), so a 120 s timeout expires and each retry sends the same load again. Measure P
    for the served user model, then either lower the concurrency (8 ranks x 8 requests is 0.45M tokens a wave) or
    set the timeout to the whole wave's time with a margin (e.g. 600 s at 8 x 32)."""

    def __init__(self, api_base: str, model: str, api_key_env: str = "OPENAI_API_KEY", max_workers: int = 32,
                 timeout: float = 120.0, retries: int = 3, backoff: float = 1.0):
        if int(max_workers) < 1:
            raise ValueError(f"endpoint {api_base}: the concurrency (requests in flight) must be >= 1, got "
                             f"{max_workers}")
        if not timeout > 0:
            raise ValueError(f"endpoint {api_base}: the timeout must be > 0 seconds, got {timeout}")
        if int(retries) < 1:
            raise ValueError(f"endpoint {api_base}: the number of tries must be >= 1, got {retries}")
        self.url = api_base.rstrip("/") + "/chat/completions"
        self.model, self.api_key = model, os.environ.get(api_key_env, "EMPTY")
        self.max_workers, self.timeout, self.retries, self.backoff = max_workers, timeout, retries, backoff
        self.n_requests = self.n_retries = 0

    def _one(self, prompt: str, max_tokens: int, temperature: float, seed: Optional[int] = None) -> str:
        import urllib.error
        import urllib.request

        body = json.dumps({"model": self.model, "messages": [{"role": "user", "content": prompt}],
                           "max_tokens": max_tokens, "temperature": temperature,
                           **({} if seed is None else {"seed": int(seed)})}).encode()
        req = urllib.request.Request(self.url, body, {"Content-Type": "application/json",
                                                       "Authorization": f"Bearer {self.api_key}"})
        for attempt in range(self.retries):
            self.n_requests += 1
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as r:
                    raw = r.read()
                break
            except urllib.error.HTTPError as e:
                if e.code < 500 and e.code != 429:  # the request itself is wrong: retrying will not help
                    raise ValueError(f"endpoint {self.url} refused the request (HTTP {e.code}): "
                                     f"{e.read()[:300].decode(errors='replace')}") from None
                err = f"HTTP {e.code}"
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                err = repr(getattr(e, "reason", e))
            if attempt == self.retries - 1:
                raise ConnectionError(f"endpoint {self.url} (model {self.model}) failed after {self.retries} "
                                      f"tries (timeout {self.timeout}s): {err}")
            self.n_retries += 1
            time.sleep(self.backoff * 2 ** attempt)  # exponential backoff
        try:
            return json.loads(raw)["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"endpoint {self.url} returned an unexpected reply ({e!r}): {raw[:200]!r}") from None

    def complete(self, prompts: Sequence[str], max_tokens: int = 256, temperature: float = 0.0,
                 seeds: Optional[Sequence[int]] = None) -> list[str]:
        """One reply per prompt, in order; seeds (one per prompt) go into the requests' "seed" field (vLLM, OpenAI)."""
        from concurrent.futures import ThreadPoolExecutor

        seeds = [None] * len(prompts) if seeds is None else list(seeds)
        with ThreadPoolExecutor(self.max_workers) as pool:
            return list(pool.map(lambda ps: self._one(ps[0], max_tokens, temperature, ps[1]), zip(prompts, seeds)))


class HFRewardModel:
    """An HF sequence-classification reward model scoring the chat-templated conversation.

    A conversation longer than max_length tokens is cut from the LEFT: the end of the conversation, its last turns
    (where the two dialogues of a pair differ), is what is scored. Its first token is kept when it is the
    tokenizer's BOS (the template's <|begin_of_text|>, which such models always saw at position 0); the tokens cut
    are those after it. Truncations are counted (n_truncated; charts/reward_truncated).

    Padding is synced with the model: rows are right-padded with its config.pad_token_id, which is set from the
    tokenizer (its pad token, else its EOS) when the config has none. HF sequence-classification models read the
    score at the last token that is not the pad id. When the pad id also occurs inside a conversation (Llama-3
    reward models that pad with <|eot_id|>, the token that ends every turn), that rule would read another token
    than the last, so such a batch is padded with an id that occurs in none of its rows, and the config's pad id is
    that id for that forward only: every row is scored at its own last real token (its length from the attention
    mask), the same alone as in any padded batch."""

    def __init__(self, model, tokenizer, max_length: int = 4096, max_batch_size: int = 16):
        if max_length < 2:
            raise ValueError(f"reward max_length must be >= 2 tokens, got {max_length}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.max_batch_size = max_length, max_batch_size
        self.n_truncated = self.n_scored = 0
        self._configs = [unwrap_model(model).config]
        text = getattr(self._configs[0], "get_text_config", None)
        if text is not None and text() is not self._configs[0]:
            self._configs.append(text())
        pad = self._configs[-1].pad_token_id
        if pad is None:  # HF's classifiers cannot find the last token of padded rows without it
            pad = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
            for cfg in self._configs:
                cfg.pad_token_id = pad
        self.pad_id = int(pad)
        try:  # the ids a substitute pad may take (see batch_pad_id)
            emb = unwrap_model(model).get_input_embeddings()
        except (AttributeError, NotImplementedError):  # custom models may not say
            emb = None
        self._vocab = getattr(emb, "num_embeddings", None) or getattr(self._configs[-1], "vocab_size", None) \
            or len(tokenizer)
        # a scoring pass needs no KV cache (at 8B, 16 x 4,096 tokens of it are 8 GB); custom models may lack the flag
        try:
            takes = "use_cache" in inspect.signature(type(unwrap_model(model)).forward).parameters
        except (TypeError, ValueError):
            takes = False
        self._no_cache = {"use_cache": False} if takes else {}

    def truncate(self, row: list[int]) -> list[int]:
        """The last max_length tokens of a row, its BOS kept in front when it starts with one."""
        if len(row) <= self.max_length:
            return row
        keep = 1 if self.tokenizer.bos_token_id is not None and row[0] == self.tokenizer.bos_token_id else 0
        return row[:keep] + row[len(row) - (self.max_length - keep):]

    def batch_pad_id(self, rows: Sequence[list[int]]) -> int:
        """The model's pad id, or, when it occurs in a row, the smallest id that occurs in none."""
        used = set().union(*rows)
        if self.pad_id not in used:
            return self.pad_id
        free = next((t for t in range(self._vocab) if t not in used), None)
        if free is None:
            raise ValueError(f"reward model {sim.model_name(self.tokenizer)}: its pad id {self.pad_id} occurs in the "
                             f"conversations and no other id is free to pad with; score with max_batch_size=1")
        return free

    def _forward(self, ids, attn, pad: int):
        if pad == self.pad_id:
            return self.model(input_ids=ids, attention_mask=attn, **self._no_cache)
        for cfg in self._configs:  # for this forward only: the classifier finds each row's last token by it
            cfg.pad_token_id = pad
        try:
            return self.model(input_ids=ids, attention_mask=attn, **self._no_cache)
        finally:
            for cfg in self._configs:
                cfg.pad_token_id = self.pad_id

    @torch.no_grad()
    def __call__(self, convs) -> torch.Tensor:
        device = next(self.model.parameters()).device
        scores = []
        for s in range(0, len(convs), self.max_batch_size):
            rows = [sim.render_ids(self.tokenizer, c, add_generation_prompt=False)
                    for c in convs[s:s + self.max_batch_size]]
            self.n_truncated += sum(len(r) > self.max_length for r in rows)
            self.n_scored += len(rows)
            rows = [self.truncate(r) for r in rows]
            pad = self.batch_pad_id(rows)
            L = max(len(r) for r in rows)
            ids = torch.tensor([r + [pad] * (L - len(r)) for r in rows], device=device)
            attn = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=device)
            out = self._forward(ids, attn, pad)
            score = getattr(out, "score", None)  # ArmoRM-style custom outputs carry the preference score here
            if score is None:
                if out.logits.dim() != 2 or out.logits.shape[-1] != 1:
                    raise ValueError(f"reward model {sim.model_name(self.tokenizer)} returned logits of shape "
                                     f"{tuple(out.logits.shape)}; expected one score per conversation (num_labels=1),"
                                     f" or a custom output with .score (--reward_trust_remote_code)")
                score = out.logits[:, 0]
            if score.numel() != len(rows):
                raise ValueError(f"reward model returned {score.numel()} scores for {len(rows)} conversations "
                                 f"(shape {tuple(score.shape)})")
            scores.append(score.reshape(-1).float().cpu())
        out = torch.cat(scores)
        if not torch.isfinite(out).all():
            raise FloatingPointError(f"reward model returned non-finite scores: {out.tolist()}")
        return out


class ChatEnv(sim.Environment):
    """Prompts from a JSONL file; the user is a PromptedUser or pre-sampled questions; reward from a reward model."""
    name = "chat"

    def __init__(self, records: list, reward_model, user=None, max_turns: int = 5, eval_fraction: float = 0.1,
                 offline_records: Optional[list] = None):
        self.records, self.reward_model, self.user, self.max_turns = records, reward_model, user, max_turns
        self.offline_records = offline_records
        n_eval = max(1, int(len(records) * eval_fraction)) if len(records) > 1 else 0
        self.splits = {"eval": list(range(n_eval)) or [0], "train": list(range(n_eval, len(records))) or [0]}
        self.presampled_used = 0

    def supported_turns(self, user) -> Optional[int]:
        """Setting two (no user model or endpoint): 1 + the record's pre-sampled later user turns; else None."""
        if self.user is not None:
            return None
        return 1 + len((user or {}).get("questions") or [])

    def contexts(self, n, split, rng):
        """n contexts; with pre-sampled questions (setting two) each carries max_turns = min(H_max, its record's
        number of turns), the H the scripts play (REFUEL paper Sec. 4.2, App. C: H is the dialogue's own)."""
        idx = rng.choice(self.splits[split], size=n, replace=n > len(self.splits[split]))
        return [self._context(i) for i in idx]

    def all_contexts(self, split):
        return [self._context(i) for i in self.splits[split]]

    def _context(self, i) -> sim.Context:
        user = self.records[i].get("user")
        most = self.supported_turns(user)
        return sim.Context(int(i), list(self.records[i]["messages"]), user,
                           None if most is None else min(self.max_turns, most))

    TALLIES = ("user_replies", "user_fallbacks", "user_retries", "judge_verdicts", "judge_unparsed",
               "reward_scored", "reward_truncated")

    def _raw_counts(self) -> dict:
        """The user's, judge's and reward model's own counters (whole process, both splits)."""
        user, judge, rm = self.user, self.judge, self.reward_model
        client = getattr(user, "client", None)
        return {"user_replies": getattr(user, "n_calls", 0), "user_fallbacks": getattr(user, "n_fallbacks", 0),
                "user_retries": getattr(client, "n_retries", 0),
                "judge_verdicts": getattr(judge, "n_verdicts", 0), "judge_unparsed": getattr(judge, "n_failed", 0),
                "reward_scored": getattr(rm, "n_scored", 0), "reward_truncated": getattr(rm, "n_truncated", 0)}

    def _tallied(self, call):
        """call(), with what it adds to the counters tallied under the current split (train or eval)."""
        before = self._raw_counts()
        try:
            return call()
        finally:
            tally = self.counts()
            for k, v in self._raw_counts().items():
                tally[f"{k}/{self.split}"] += v - before[k]

    def counts(self):
        tally = super().counts()
        for k in self.TALLIES:  # every name on every rank, so the sum over ranks lines up
            for split in ("train", "eval"):
                tally.setdefault(f"{k}/{split}", 0)
        return tally

    def charts(self, totals):
        """Whole-run rates and counts, training rollouts under charts/X and evaluation's under charts/X_eval."""
        out = {}
        for split, tail in (("train", ""), ("eval", "_eval")):
            t = lambda k: totals.get(f"{k}/{split}", 0)
            if isinstance(self.user, PromptedUser) and t("user_replies"):
                out[f"charts/user_parse_fallback_rate{tail}"] = t("user_fallbacks") / t("user_replies")
            if isinstance(self.user, PromptedUser) and self.user.client is not None:
                out[f"charts/user_retries{tail}"] = t("user_retries")
            if isinstance(self.judge, JudgePreference) and t("judge_verdicts"):
                out[f"charts/judge_unparsed_rate{tail}"] = t("judge_unparsed") / t("judge_verdicts")
            if isinstance(self.reward_model, HFRewardModel):
                out[f"charts/reward_truncated{tail}"] = t("reward_truncated")
        return out

    def user_turn(self, convs, users, rng):
        if self.user is not None:
            return self._tallied(lambda: self.user(convs, users, rng))
        out = []  # setting two: the next pre-sampled question
        for c, u in zip(convs, users):
            qs = (u or {}).get("questions") or []
            k = sim.assistant_turns(c) - 1
            if k >= len(qs):
                raise ValueError(f"pre-sampled user turns ran out: this record has {len(qs)} later user turns, so "
                                 f"it supports {len(qs) + 1} assistant turns and a user reply after turn {k + 1} "
                                 f"was asked for (draw H <= Context.max_turns, give the prompt record a "
                                 f"'questions' list with one entry per later turn, or pass --user_model)")
            out.append(qs[k])
        return out

    def reward(self, convs):
        return self._tallied(lambda: self.reward_model(convs))

    def preference(self, convs_a, convs_b, scale: float = 4.0):
        return self._tallied(lambda: super(ChatEnv, self).preference(convs_a, convs_b, scale))

    def offline(self, n, rng):
        if not self.offline_records:
            raise ValueError("this mode needs an offline dataset D_off: pass --offline_path")
        idx = rng.integers(len(self.offline_records), size=n)
        ctx, rows = [], []
        for i in idx:
            d = self.offline_records[i]
            # without a user model, later user turns are the dialogue's own (pre-sampled, setting two)
            context, later = split_opening(d["messages"])
            n_turns = sim.assistant_turns(d["messages"])
            # max_turns: the dialogue's own last turn (LT-OFFLINE / LT-MIXED train it), at most H_max
            ctx.append(sim.Context(int(i), context, {**(d.get("user") or {}), "questions": later},
                               min(self.max_turns, n_turns)))
            rows.append(list(d["messages"]))
        return ctx, rows

    def offline_alternative(self, contexts, prefixes, rng):
        out = []
        for c, p in zip(contexts, prefixes):
            rec = self.offline_records[c.index]
            if rec["alternative"] is None or len(p) != len(rec["messages"]) - 1:
                raise ValueError(f"offline row {c.index} has no alternative reply for turn "
                                 f"{sum(m['role'] == 'assistant' for m in p) + 1} (needs chosen/rejected pairs, "
                                 f"and the state at their last turn)")
            out.append(rec["alternative"])
        return out


def remote_code_error(kind: str, name: str, e: Exception) -> ValueError:
    """An ImportError/NameError raised while loading a model's own code (trust_remote_code), as a ValueError that
    names the model and what is missing."""
    msg = str(e)
    found = re.search(r"cannot import name '([^']+)'(?: from '([^']+)')?", msg)
    if found:
        missing = f"{found.group(1)!r}" + (f" (from {found.group(2)!r})" if found.group(2) else "")
    else:
        missing = repr(getattr(e, "name", None) or msg)
    return ValueError(f"could not load {kind} {name!r}: its own code (trust_remote_code) failed to import "
                      f"{missing}: {type(e).__name__}: {msg}. The model's modeling file was likely written for "
                      f"another transformers version (this is {_transformers_version()}); use a revision or copy "
                      f"of the model whose code imports names this version has, or install the version it needs")


def _transformers_version() -> str:
    try:
        import transformers

        return f"transformers {transformers.__version__}"
    except ImportError:
        return "an unknown transformers"


def resolve_device(spec: Optional[str], default: str) -> str:
    """A frozen model's device: None = the policy's; 'cuda:+K' = K GPUs after the policy's (e.g. 4 policy ranks
    on GPUs 0-3 and their reward models on 4-7); anything else as given ('cuda:7', 'cpu')."""
    if spec is None:
        return default
    if spec.startswith("cuda:+"):
        base = torch.device(default)
        return f"cuda:{(base.index or 0) + int(spec[6:])}"
    return spec


def load_reward_model(name: str, dtype=torch.float32, device: str = "cpu", trust_remote_code: bool = False,
                      max_length: int = 4096) -> HFRewardModel:
    """An HF sequence-classification reward model (or an ArmoRM-style one with its own code) on `device`
    ('auto' = sharded over the visible GPUs)."""
    from transformers import AutoModelForSequenceClassification

    try:
        tok = load_tokenizer(name)
        placement = {"device_map": "auto"} if device == "auto" else {}
        model = AutoModelForSequenceClassification.from_pretrained(name, dtype=dtype,
                                                                   trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError) as e:
        raise model_load_error("reward model", name, e) from None
    except (ImportError, NameError) as e:  # remote code written for another transformers (ArmoRM's copies)
        raise remote_code_error("reward model", name, e) from None
    return HFRewardModel(model if device == "auto" else model.to(device), tok, max_length=max_length)


def make_chat_env(prompts_path, user_model, reward_model, max_turns, device, dtype, trust_remote_code, offline_path,
                  user_api_base, user_prompt_path, dataset_format, bad_records, max_dialogue_tokens, tokenizer,
                  reward_device, user_device, reward_max_length, user_max_concurrency, user_timeout,
                  user_retries, user_max_new_tokens=128) -> ChatEnv:
    """envs/flags.make_env's --env chat (its docstring describes the arguments)."""
    if not prompts_path or not reward_model:
        raise ValueError("--env chat needs --prompts_path (a dataset file) and --reward_model")
    if user_api_base and not user_model:
        raise ValueError("--user_api_base needs --user_model, the model name the endpoint serves")
    filters = dict(max_turns=max_turns, max_tokens=max_dialogue_tokens, tokenizer=tokenizer, bad_records=bad_records)
    records = load_prompts(prompts_path, dataset_format, **filters)
    offline = load_offline(offline_path, dataset_format, **filters) if offline_path else None
    rm = load_reward_model(reward_model, dtype, resolve_device(reward_device, device), trust_remote_code,
                           reward_max_length)
    student = is_education(records)
    template = Path(user_prompt_path).read_text() if user_prompt_path else (STUDENT_PROMPT if student else USER_PROMPT)
    style = dict(reply_key="Student", role_names={"user": "Student", "assistant": "Teacher"}) if student else {}
    user = None
    if user_api_base:
        client = OpenAIChatClient(user_api_base, user_model, max_workers=user_max_concurrency, timeout=user_timeout,
                                  retries=user_retries)
        user = PromptedUser(prompt_template=template, client=client, max_new_tokens=user_max_new_tokens, **style)
    elif user_model:
        u_model, u_tok = load_policy(user_model, dtype)
        user = PromptedUser(u_model.to(resolve_device(user_device, device)).eval(), u_tok, prompt_template=template,
                            max_new_tokens=user_max_new_tokens,
                            **style)
    return ChatEnv(records, rm, user, max_turns, offline_records=offline)
