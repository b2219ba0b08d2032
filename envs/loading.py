"""envs/loading.py: models by name. The policy every script loads (--model_name_or_path: 'tutor' = the tutor task's
mu, else an HF hub name or local folder, or a LoRA run's adapter folder on top of its base), tokenizers once per
process, and load errors that say what was looked for.

    python -m envs.loading merge runs/<run>/checkpoint/policy merged/   # a LoRA checkpoint -> a plain HF model
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
    """(model, tokenizer) for a policy: 'tutor' = the embedded base policy, else an HF hub name or local path; a
    LoRA run's checkpoint/policy (adapter_config.json) is its base model (by the name the run was given) with the
    adapters on top, a PEFT model."""
    from plumbing import lora

    if lora.is_adapter_folder(name):
        base, tok = load_policy(lora.adapter_base_name(name), dtype)
        return lora.load_adapters(base, name), tok
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


def main(argv=None) -> None:
    """python -m envs.loading merge ADAPTER_FOLDER OUT_FOLDER [--dtype bfloat16]: a LoRA run's adapters merged into
    its base model, written as a plain save_pretrained model (what --merge_on_save writes at the end of a run)."""
    import argparse

    from plumbing import lora

    parser = argparse.ArgumentParser(prog="python -m envs.loading", description=main.__doc__)
    parser.add_argument("command", choices=["merge"])
    parser.add_argument("adapter_folder", help="a LoRA run's runs/<run>/checkpoint/policy")
    parser.add_argument("out_folder", help="where the merged model goes")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    a = parser.parse_args(argv)
    if not lora.is_adapter_folder(a.adapter_folder):
        raise SystemExit(f"{a.adapter_folder} has no adapter_config.json: not a LoRA run's checkpoint/policy")
    model, tokenizer = load_policy(a.adapter_folder, getattr(torch, a.dtype))
    print(f"merged {a.adapter_folder} into {lora.save_merged(model, tokenizer, a.out_folder)}")


if __name__ == "__main__":
    main()
