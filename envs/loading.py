"""envs/loading.py: models by name. The policy every script loads (--model_name_or_path: 'tutor' = the tutor task's
mu, else an HF hub name or local folder), tokenizers once per process, and load errors that say what was looked for.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

import simulator as sim


def model_load_error(kind: str, name: str, e: Exception) -> ValueError:
    """A load failure that says whether `name` was taken for a local folder that is not there."""
    local = name.startswith((".", "/", "~")) or name.count("/") > 1 or ("/" in name and Path(name).parent.is_dir())
    where = f" (no local folder {name!r} either; check the path)" if local and not Path(name).exists() else ""
    return ValueError(f"could not load {kind} {name!r}{where}: {e}")


@functools.lru_cache(maxsize=None)
def load_tokenizer(name: str):
    """AutoTokenizer.from_pretrained(name), once per process: a script loads the policy, its reference copies and
    the reward model, and a 150k-vocabulary tokenizer.json takes a second to parse each time. Shared, not copied."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name)


def load_policy(name: str, dtype=torch.float32):
    """(model, tokenizer) for a policy: 'tutor' = the embedded base policy, else an HF hub name or local path."""
    if name == "tutor":
        from envs.tutor_task import load_tutor_base_policy

        return load_tutor_base_policy()
    from transformers import AutoModelForCausalLM

    try:
        tok = load_tokenizer(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    except (OSError, ValueError) as e:  # ValueError: a name that is neither a folder nor a valid hub id
        raise model_load_error("policy model", name, e) from None
    if not getattr(tok, "chat_template", None):
        raise sim.ChatTemplateError(f"{name} has no chat template; use an instruct/chat model or set one")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok
