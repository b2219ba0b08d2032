"""LLAMA3_TEMPLATE: Llama-3's chat format in a few lines, for the tiny random-init models of the tests and of
benchmarks/gpu_check.py (real tokenizers ship their own templates: tests/real_models.py). No imports, so a benchmark
can read it without the tests' fixtures."""
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
