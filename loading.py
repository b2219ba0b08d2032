"""loading.py: what the scripts' flags name, loaded: the policy (--policy) and the environment (--env and the
chat flags every script shares, `EnvArgs`). `make_env` itself is in simulator.py.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

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
        from tutor_task import load_tutor_base_policy

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


@dataclass
class EnvArgs:
    """The environment's flags, shared by every script (whose Args extend this class, so the flags stay flat:
    --env, --prompts_path, --user_model, ...). --max_turns stays in each script: H means something else in each."""
    env: Literal["tutor", "chat"] = "tutor"
    """'tutor': the embedded task; 'chat': prompts or dialogues from a dataset, a prompted user model (or the
    dataset's pre-sampled questions), an HF reward model"""
    prompts_path: Optional[str] = None
    """chat: dataset of prompts or dialogues (JSONL/JSON, any --dataset_format; later user turns are the
    pre-sampled questions of setting two)"""
    user_model: Optional[str] = None
    """chat: HF model prompted as the user (REFUEL paper, App. C.2); None = pre-sampled questions (setting two)"""
    user_api_base: Optional[str] = None
    """chat: serve the user from an OpenAI-compatible endpoint (vLLM/TGI, e.g. http://host:8000/v1; --user_model
    names the served model; key from $OPENAI_API_KEY)"""
    user_prompt_path: Optional[str] = None
    """chat: a text file replacing the user's prompt template (must contain {dialogue})"""
    user_max_concurrency: int = 32
    """chat, endpoint user: requests in flight per process (the server sees ranks x this many)"""
    user_timeout: float = 120.0
    """chat, endpoint user: seconds per request, time queued at the server included (raise it, or lower the
    concurrency, when ranks x concurrency x prompt tokens exceed what the server prefills in that time)"""
    user_retries: int = 3
    """chat, endpoint user: tries per request (exponential backoff on timeouts and 5xx)"""
    user_max_new_tokens: int = 128
    """chat, prompted user: the most tokens of one user reply (its justification line and the question)"""
    reward_model: Optional[str] = None
    """chat: HF sequence-classification reward model scoring the whole conversation"""
    reward_trust_remote_code: bool = False
    """chat: load the reward model's own code (ArmoRM-style models whose output has a .score)"""
    reward_max_length: int = 4096
    """chat: the reward model sees at most this many tokens of a conversation, its end (cut from the left,
    counted as charts/reward_truncated)"""
    dataset_format: Literal["auto", "messages", "ultrainteract", "hh", "education"] = "auto"
    """chat: format of the dataset files (auto = detected per record); a path `hf:NAME[:SPLIT]` loads from the hub"""
    bad_records: Literal["skip", "error"] = "skip"
    """chat: dataset records that do not parse (roles out of order, missing fields): skip and count, or stop"""
    max_dialogue_tokens: Optional[int] = None
    """chat: drop dataset dialogues (and, in REFUEL and the baselines, generated pairs) longer than this many
    chat-templated tokens (REFUEL paper, Sec. 4.1: 2048)"""
    reward_device: Optional[str] = None
    """chat: the reward model's device (None = the policy's; 'cuda:+4' = 4 GPUs after it; 'auto' = sharded)"""
    user_device: Optional[str] = None
    """chat: an in-process user model's device (as --reward_device)"""
    chat_template_kwargs: Optional[str] = None
    """a JSON object passed to every apply_chat_template of the policy, the user, the reward model and the judge,
    e.g. '{"enable_thinking": false}' for Qwen3 (docs/implementation_notes.md#chat-templates)"""
    chat_template_date: Optional[str] = None
    """the date_string a template that prints today's date reads (Llama-3.2); None = the day the run started,
    kept in runs/<run>/args.json and reused by --resume"""


def set_chat_templates(args: EnvArgs) -> None:
    """--chat_template_kwargs and the run's date, for every chat template the run renders."""
    try:
        kwargs = json.loads(args.chat_template_kwargs or "{}")
    except json.JSONDecodeError as e:
        raise ValueError(f"--chat_template_kwargs must be a JSON object, e.g. '{{\"enable_thinking\": false}}': "
                         f"{e}") from None
    if not isinstance(kwargs, dict):
        raise ValueError(f"--chat_template_kwargs must be a JSON object, got {args.chat_template_kwargs!r}")
    sim.set_chat_template_kwargs(kwargs, args.chat_template_date or time.strftime("%d %b %Y"))


def make_env_from_args(args: EnvArgs, max_turns: int, device: str, dtype=torch.float32, tokenizer=None,
                       **extra) -> sim.Environment:
    """make_env with a script's parsed flags (an EnvArgs); `extra` passes what only some scripts have (offline_path)."""
    set_chat_templates(args)
    names = [f.name for f in dataclasses.fields(EnvArgs)
             if f.name not in ("reward_trust_remote_code", "chat_template_kwargs", "chat_template_date")]
    return sim.make_env(max_turns=max_turns, device=device, dtype=dtype, tokenizer=tokenizer, **extra,
                        trust_remote_code=args.reward_trust_remote_code, **{k: getattr(args, k) for k in names})
