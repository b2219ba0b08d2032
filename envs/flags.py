"""envs/flags.py: the environment a script's flags name. `EnvArgs` holds the --env flags every script shares (each
script's Args extends it); `make_env_from_args` builds what they name: the tutor task, the chat world, or an
Environment subclass of your own (`--env package.module:ClassName` or `--env path/to/file.py:ClassName`,
docs/your_environment.md).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch

import simulator as sim


@dataclass
class EnvArgs:
    """The environment's flags, shared by every script (whose Args extend this class, so the flags stay flat:
    --env, --prompts_path, --user_model, ...). --max_turns stays in each script: H means something else in each."""
    env: str = "tutor"
    """'tutor': the embedded task; 'gift': a real-language task for a real chat model (docs/gift_task.md); 'chat':
    prompts or dialogues from a dataset, a prompted user model (or the dataset's pre-sampled questions), an HF
    reward model; 'package.module:ClassName' or 'path/to/file.py:ClassName': an Environment subclass of your own
    (docs/your_environment.md)"""
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
    tutor_judge: Literal["reward", "majority"] = "reward"
    """tutor: the judge of two conversations. 'reward': sigmoid(4 (r(a) - r(b))) on the lessons learned; 'majority':
    a vote of three criteria (more lessons, fewer questions, an earlier first lesson) that cycles, so no reward
    represents it; the reward is then the judge's Bradley-Terry reward (envs/tutor_judge.py, docs/mtpo.md)"""
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
    """make_env with a script's parsed flags (an EnvArgs); `extra` passes what only some scripts have (offline_path).
    A 'module:ClassName' --env is built by its class's `Environment.from_flags`, which reads the flags it wants."""
    set_chat_templates(args)
    if ":" in args.env or args.env in NAMED_ENVIRONMENTS:
        if args.tutor_judge != "reward":
            raise ValueError(f"--tutor_judge is the tutor task's: --env {args.env} has its own judge")
        cls = environment_class(NAMED_ENVIRONMENTS.get(args.env, args.env))
        env = cls.from_flags(args, max_turns=max_turns, tokenizer=tokenizer, device=device, dtype=dtype, **extra)
        if not isinstance(env, sim.Environment):
            raise TypeError(f"--env {args.env}: from_flags returned a {type(env).__name__}, not an Environment")
        return env
    names = [f.name for f in dataclasses.fields(EnvArgs)
             if f.name not in ("reward_trust_remote_code", "chat_template_kwargs", "chat_template_date")]
    return make_env(max_turns=max_turns, device=device, dtype=dtype, tokenizer=tokenizer, **extra,
                    trust_remote_code=args.reward_trust_remote_code, **{k: getattr(args, k) for k in names})


NAMED_ENVIRONMENTS = {"gift": "envs.gift_task:GiftEnv"}  # built like your own: by their from_flags


def environment_class(spec: str) -> type:
    """The Environment subclass --env names: 'package.module:ClassName' (importable from here: the working directory
    or PYTHONPATH) or 'path/to/file.py:ClassName' (loaded from the file)."""
    where, _, name = spec.rpartition(":")
    if not where or not name.isidentifier():
        raise ValueError(f"--env {spec!r}: expected 'tutor', 'gift', 'chat', 'package.module:ClassName' or "
                         f"'path/to/file.py:ClassName'")
    try:
        if where.endswith(".py"):
            path = Path(where).expanduser().resolve()
            if not path.is_file():
                raise FileNotFoundError(f"no file {path}")
            name_here = f"env_file_{path.stem}"  # not the file's bare name: a file called envs.py or simulator.py
            module_spec = importlib.util.spec_from_file_location(name_here, path)  # must not replace those modules
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name_here] = module  # what dataclasses and pickling look a class's module up by
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except (ImportError, FileNotFoundError) as e:
        raise ValueError(f"--env {spec!r}: could not load {where!r}: {e}") from None
    cls = getattr(module, name, None)
    if not (isinstance(cls, type) and issubclass(cls, sim.Environment)):
        found = "nothing" if cls is None else repr(cls)
        raise ValueError(f"--env {spec!r}: {where} has {found} named {name!r}, not a subclass of "
                         f"simulator.Environment")
    return cls


def make_env(env: str = "tutor", prompts_path: Optional[str] = None, user_model: Optional[str] = None,
             reward_model: Optional[str] = None, max_turns: int = 5, device: str = "cpu",
             dtype=torch.float32, trust_remote_code: bool = False, offline_path: Optional[str] = None,
             user_api_base: Optional[str] = None, user_prompt_path: Optional[str] = None,
             dataset_format: str = "auto", bad_records: str = "skip", max_dialogue_tokens: Optional[int] = None,
             tokenizer=None, reward_device: Optional[str] = None, user_device: Optional[str] = None,
             reward_max_length: int = 4096, user_max_concurrency: int = 32, user_timeout: float = 120.0,
             user_retries: int = 3, user_max_new_tokens: int = 128,
             tutor_judge: str = "reward") -> sim.Environment:
    """The environment named by the scripts' flags (`EnvArgs` documents each). The user: --user_model
    in-process, or served at --user_api_base (an OpenAI-compatible endpoint), or, with neither, the dataset's
    pre-sampled questions. Education Dialogue records make the user a student who knows the record's hidden
    learning preferences. envs/chat_env.make_chat_env builds the chat world; sizing the endpoint: OpenAIChatClient."""
    if env == "tutor":
        from envs.tutor_task import TutorEnv, TutorRules

        ignored = [f"--{name}" for name, value in (("prompts_path", prompts_path), ("user_model", user_model),
                   ("user_api_base", user_api_base), ("user_prompt_path", user_prompt_path),
                   ("reward_model", reward_model), ("offline_path", offline_path)) if value is not None]
        if ignored:  # else a run meant for a chat model's user or reward would train on the tutor, silently
            raise ValueError(f"--env tutor has its own prompts, user and reward: {', '.join(ignored)} would be "
                             f"ignored (pass --env chat to use them)")
        if tutor_judge == "majority":
            from envs.tutor_judge import MajorityTutorEnv  # exact machinery, loaded only when asked for

            return MajorityTutorEnv(TutorRules(max_turns=max_turns))
        return TutorEnv(TutorRules(max_turns=max_turns))
    if tutor_judge != "reward":
        raise ValueError(f"--tutor_judge is the tutor task's: --env {env} has its own judge")
    if env != "chat":
        raise ValueError(f"unknown env {env!r}: expected 'tutor', 'chat' or 'module:ClassName' (an Environment "
                         f"subclass of your own: docs/your_environment.md)")
    from envs.chat_env import make_chat_env

    return make_chat_env(prompts_path, user_model, reward_model, max_turns, device, dtype, trust_remote_code,
                         offline_path, user_api_base, user_prompt_path, dataset_format, bad_records,
                         max_dialogue_tokens, tokenizer, reward_device, user_device, reward_max_length,
                         user_max_concurrency, user_timeout, user_retries, user_max_new_tokens)
