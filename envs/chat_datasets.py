"""envs/chat_datasets.py: the papers' prompt and dialogue files, read into contexts and offline dialogues.

Formats: message lists, UltraInteract, Anthropic HH, Education Dialogue (teacher/student lessons with hidden
learning preferences), from local JSONL/JSON files or the hub (`hf:NAME[:SPLIT]`, needs `datasets`). Records that
do not parse are skipped and counted, or stop the run (--bad_records error).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Optional, Sequence

import simulator as sim


def validate_conversation(messages: Sequence[dict], where: str = "conversation") -> None:
    """Roles must be an optional system message, then user/assistant alternating, starting with the user."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {messages!r:.200}")
    start = 1 if messages[0].get("role") == "system" else 0
    if start == len(messages):
        raise ValueError(f"{where}: only a system message, no user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise ValueError(f"{where}: message {i} must be a dict with string 'role' and 'content', got {m!r:.200}")
        if i >= start:
            want = "user" if (i - start) % 2 == 0 else "assistant"
            if m["role"] != want:
                raise ValueError(f"{where}: roles must alternate user/assistant starting with user; "
                                 f"message {i} has role {m['role']!r}, expected {want!r}")


def read_records(path: str, what: str):
    """(where, record) pairs from a local .jsonl file, a .json file (a list of records), or, with the `hf:` prefix,
    a hub dataset `hf:NAME[:SPLIT]` (default split train; the `datasets` package is imported only then)."""
    if path.startswith("hf:"):
        name, _, split = path[3:].partition(":")
        try:
            import datasets
        except ImportError:
            raise ImportError(f"{what} {path}: loading from the hub needs `pip install datasets` "
                              f"(or download the files and pass a local path)") from None
        ds = datasets.load_dataset(name, split=split or "train")
        for n, rec in enumerate(ds):
            yield f"{name}[{n}]", dict(rec)
        return
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    text = p.read_text()
    if p.suffix == ".json" and text.lstrip().startswith("["):  # one JSON list (Education Dialogue's files)
        try:
            recs = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
        for n, rec in enumerate(recs):
            yield f"{path}[{n}]", rec
        return
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                yield f"{path}:{n}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None


DATASET_FORMATS = ("auto", "messages", "ultrainteract", "hh", "education")
EDUCATION_SYSTEM = "You are a teacher. Teach the student about {topic}; adapt to how the student likes to learn."
EDUCATION_OPENING = "Hi! I'm here for today's lesson about {topic}."  # the teacher speaks first in the data


def detect_format(rec) -> str:
    if isinstance(rec, list) or (isinstance(rec, dict) and "messages" in rec):
        return "messages"
    if isinstance(rec, dict) and "trajectory" in rec:
        return "ultrainteract"
    if isinstance(rec, dict) and "background_info" in rec and "conversation" in rec:
        return "education"
    if isinstance(rec, dict) and isinstance(rec.get("chosen"), str) and "Human:" in rec["chosen"]:
        return "hh"
    if isinstance(rec, dict) and isinstance(rec.get("chosen"), list):
        return "messages"
    raise ValueError(f"unrecognised record (keys {sorted(rec) if isinstance(rec, dict) else type(rec).__name__}); "
                     f"expected one of the formats {DATASET_FORMATS[1:]}")


def parse_hh(text: str) -> list[dict]:
    """Anthropic HH's '\\n\\nHuman: ...\\n\\nAssistant: ...' transcript as messages."""
    parts = re.split(r"\n\n(Human|Assistant): ", "\n\n" + text.lstrip("\n")) if text.strip() else []
    return [{"role": "user" if r == "Human" else "assistant", "content": c.strip()}
            for r, c in zip(parts[1::2], parts[2::2])]


def record_to_dialogue(rec, fmt: str) -> dict:
    """{"messages", "alternative" (a rejected last reply or None), "user" (per-dialogue user state)} of one record;
    ValueError when the record does not have the format's shape."""
    if fmt == "auto":
        fmt = detect_format(rec)
    user, alt = {}, None
    if fmt == "messages":
        msgs = rec if isinstance(rec, list) else rec.get("messages", rec.get("chosen"))
        if isinstance(rec, dict):
            user["questions"] = rec.get("questions")
            rej = rec.get("rejected")
            if rej is not None:
                validate_conversation(rej, "rejected")
                if len(rej) != len(msgs) or rej[:-1] != msgs[:-1] or rej[-1]["role"] != "assistant":
                    raise ValueError("'chosen' and 'rejected' must differ only in the last assistant turn")
                alt = rej[-1]["content"]
    elif fmt == "ultrainteract":  # openbmb/UltraInteract_pair: trajectory [{from, value}] + chosen/rejected replies
        roles = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
        try:
            msgs = [{"role": roles[t["from"].lower()], "content": t["value"]} for t in rec["trajectory"]]
        except (KeyError, AttributeError, TypeError):
            raise ValueError("an UltraInteract record needs 'trajectory': [{'from': user|assistant, 'value'}]") \
                from None
        if isinstance(rec.get("chosen"), str) and msgs and msgs[-1]["role"] == "user":
            msgs.append({"role": "assistant", "content": rec["chosen"]})
            alt = rec.get("rejected") if isinstance(rec.get("rejected"), str) else None
    elif fmt == "hh":  # Anthropic/hh-rlhf: chosen/rejected transcripts differing in the last assistant turn
        msgs, rej = parse_hh(rec.get("chosen", "")), parse_hh(rec.get("rejected", ""))
        if rej and len(rej) == len(msgs) and rej[:-1] == msgs[:-1] and rej[-1]["role"] == "assistant":
            alt = rej[-1]["content"]
    elif fmt == "education":  # Education Dialogue: the teacher (our assistant) opens, the student is the user
        info, turns = rec.get("background_info"), rec.get("conversation")
        if not isinstance(info, dict) or "topic" not in info or not isinstance(turns, list):
            raise ValueError("an Education Dialogue record needs background_info.topic and a conversation list")
        msgs = [{"role": "system", "content": EDUCATION_SYSTEM.format(topic=info["topic"])},
                {"role": "user", "content": EDUCATION_OPENING.format(topic=info["topic"])}]
        roles = {"teacher": "assistant", "student": "user"}
        try:
            msgs += [{"role": roles[t["role"].lower()], "content": t["text"]} for t in turns]
        except (KeyError, AttributeError, TypeError):
            raise ValueError("Education Dialogue turns need role Teacher|Student and text") from None
        user = {**info, "questions": None}
    else:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {DATASET_FORMATS}")
    validate_conversation(msgs)
    return {"messages": msgs, "alternative": alt, "user": user, "format": fmt}


def load_dialogues(path: str, fmt: str = "auto", max_turns: Optional[int] = None, max_tokens: Optional[int] = None,
                   tokenizer=None, bad_records: str = "skip", what: str = "dataset") -> list[dict]:
    """Dialogues from a local file or hub dataset in any of DATASET_FORMATS (auto-detected per record), with the
    papers' filters: at most `max_turns` assistant turns (REFUEL paper: 5; Education Dialogue's 10-15-turn lessons
    are cut to max_turns instead, since only their openings and student profiles are used) and at most `max_tokens`
    chat-templated tokens under `tokenizer` (REFUEL paper: 2048). Records that do not parse (roles out of order,
    missing fields) are skipped and counted (bad_records='skip') or raise naming the record ('error')."""
    if fmt not in DATASET_FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}: expected one of {DATASET_FORMATS}")
    if bad_records not in ("skip", "error"):
        raise ValueError(f"bad_records must be 'skip' or 'error', got {bad_records!r}")
    if max_tokens is not None and tokenizer is None:
        raise ValueError("a token limit on dialogues needs the policy's tokenizer")
    out, skipped, first_bad = [], Counter(), None
    for where, rec in read_records(path, what):
        try:
            d = record_to_dialogue(rec, fmt)
        except ValueError as e:
            if bad_records == "error":
                raise ValueError(f"{where}: {e} (pass --bad_records skip to skip such records)") from None
            skipped["malformed"] += 1
            first_bad = first_bad or f"{where}: {e}"
            continue
        msgs, n_turns = d["messages"], sim.assistant_turns(d["messages"])
        if max_turns is not None and n_turns > max_turns:
            if d["format"] != "education":
                skipped[f"more than {max_turns} turns"] += 1
                continue
            d["messages"] = msgs[:sim.assistant_turn_index(msgs, max_turns) + 1]
        if max_tokens is not None and sim.dialogue_token_count(tokenizer, d["messages"]) > max_tokens:
            skipped[f"over {max_tokens} tokens"] += 1
            continue
        out.append(d)
    if skipped:
        print(f"{what} {path}: kept {len(out)} dialogues, skipped " +
              ", ".join(f"{v} {k}" for k, v in skipped.items()) + (f" (first: {first_bad})" if first_bad else ""))
    if not out:
        raise ValueError(f"{what} {path} holds no usable dialogues" +
                         (f" (skipped: {dict(skipped)})" if skipped else ""))
    return out


def split_opening(msgs: Sequence[dict]) -> tuple[list, list]:
    """(the messages up to the first user turn, the contents of the later user turns)."""
    first = next(i for i, m in enumerate(msgs) if m["role"] == "user")
    return list(msgs[:first + 1]), [m["content"] for m in msgs[first + 1:] if m["role"] == "user"]


def is_education(records: Sequence[dict]) -> bool:
    """Whether prompt records come from Education Dialogue (their user state carries the lesson's topic)."""
    return bool(records) and "topic" in (records[0].get("user") or {})


def opening(d: dict) -> dict:
    """A prompt record from a dialogue: the messages up to its first user turn, and the user's state (for setting
    two its later user turns, pre-sampled questions, unless the record brought its own)."""
    msgs = d["messages"]
    if d["format"] == "messages" and msgs[-1]["role"] == "user":
        return {"messages": msgs, "user": dict(d["user"])}  # a prompt file's record is the context as given
    context, later = split_opening(msgs)
    user = dict(d["user"])
    if user.get("questions") is None and d["format"] != "education":
        user["questions"] = later or None
    return {"messages": context, "user": user}


def load_prompts(path: str, fmt: str = "auto", **filters) -> list[dict]:
    """Initial contexts: a prompt file (message lists ending with a user turn) or any dialogue dataset's openings."""
    return [opening(d) for d in load_dialogues(path, fmt, what="prompt file", **filters)]


def load_offline(path: str, fmt: str = "auto", **filters) -> list[dict]:
    """D_off: dialogues cut to end with an assistant turn; the rejected reply is kept only for an uncut last turn."""
    rows = []
    for d in load_dialogues(path, fmt, what="offline dataset", **filters):
        msgs = d["messages"]
        last = max((i for i, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        rows.append({"messages": msgs[:last + 1], "user": d["user"],
                     "alternative": d["alternative"] if last == len(msgs) - 1 else None})
    if not rows:
        raise ValueError(f"offline dataset {path} holds no dialogue with an assistant turn")
    return rows
