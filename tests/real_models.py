"""Real tokenizers and a real small pretrained model for the tests, fetched beforehand by `.ci/fetch_real_models`.

Nothing here reaches the network: a test that needs a part that was not fetched is skipped.

    from real_models import FAMILIES, load_tokenizer, smollm2_dir
    tok = load_tokenizer("qwen3")           # transformers.AutoTokenizer with the model's real chat template
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir())   # SmolLM2-135M-Instruct, float32

Families: llama3_1, llama3_2, qwen2_5, qwen3, gemma2 (its template raises "System role not supported" on a system
message), gemma3, mistral_v3 (Mistral-7B-Instruct-v0.3: the system message goes into the last user message).
"""

import os
from pathlib import Path

import pytest

REAL_MODELS_DIR = Path(os.environ.get("REAL_MODELS_DIR") or Path.home() / ".cache" / "multiturn-rlhf" / "real_models")
FAMILIES = ("llama3_1", "llama3_2", "qwen2_5", "qwen3", "gemma2", "gemma3", "mistral_v3")


def _present(path: Path, what: str) -> Path:
    """`path` if the fetch script finished it (its `.complete` marker exists), else skip the calling test."""
    if not (path / ".complete").is_file():
        pytest.skip(f"{what} absent: run .ci/fetch_real_models")
    return path


def tokenizer_dir(family: str) -> Path:
    """The folder of one family's tokenizer (an AutoTokenizer folder)."""
    if family not in FAMILIES:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {FAMILIES}")
    return _present(REAL_MODELS_DIR / "tokenizers" / family, f"real tokenizer {family}")


def smollm2_dir() -> Path:
    """The folder of SmolLM2-135M-Instruct (LlamaForCausalLM safetensors + tokenizer with its ChatML template)."""
    return _present(REAL_MODELS_DIR / "smollm2-135m-instruct", "SmolLM2-135M-Instruct")


def load_tokenizer(family: str):
    """The family's tokenizer, loaded offline with transformers.AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir(family), local_files_only=True)
