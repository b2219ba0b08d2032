"""plumbing: what the scripts and simulator.py run on, none of it an equation or the environment contract.

    distributed.py     launch (make_accelerator, DeepSpeed configs), per-rank reductions, gathered weights
    run_io.py          run folders, metrics.jsonl / W&B logging, atomic checkpoints and --resume
    vllm_engine.py     the optional vLLM engine that samples the policy's turns (--vllm)
    fast_decode.py     the sampler's static-cache compiled decode step (CUDA)
    logprob_memory.py  log-probs at a 128k vocabulary: chunked log-softmax, token-budget micro-batches

Nothing here imports simulator.py, the environments or a script.
"""
