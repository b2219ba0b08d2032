"""FSDP2 sampling: distributed.sampling_copy gathers a sharded policy into a plain copy once per collection. accelerate's
FSDP path needs a GPU, so this runs torch's own fully_shard on two CPU processes (gloo), which is what accelerate
calls under configs/fsdp.yaml."""
import subprocess
import sys

from conftest import ROOT, subprocess_env

SCRIPT = r'''
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from plumbing import distributed
import simulator as sim
from envs import tutor_task
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
dist.init_process_group("gloo")
tok = tutor_task.build_tutor_tokenizer()
torch.manual_seed(0)
from transformers import LlamaForCausalLM
plain = LlamaForCausalLM(tutor_task.tutor_model_config(tok)).eval()
sharded = LlamaForCausalLM(tutor_task.tutor_model_config(tok))
sharded.load_state_dict(plain.state_dict())
for layer in sharded.model.layers:
    fully_shard(layer)
fully_shard(sharded)
assert isinstance(next(sharded.parameters()), DTensor)
convs = [[{"role": "user", "content": "hello teacher , teach me fractions ."}]] * 3
copy = distributed.sampling_copy(sharded)
a = sim.sample_turns(copy, tok, convs, 8, temperature=0.0).texts
b = sim.sample_turns(plain, tok, convs, 8, temperature=0.0).texts
assert a == b, (a, b)
# an update to the shards reaches the copy at the next refresh, which reuses the same copy
opt = torch.optim.SGD(sharded.parameters(), lr=0.1)
ids = torch.tensor([tok.encode("hello teacher")])
sharded(input_ids=ids, labels=ids).loss.backward()
opt.step()
again = distributed.sampling_copy(sharded)
assert again is copy
for n, p in again.named_parameters():
    assert torch.equal(p, distributed.full_tensor(dict(sharded.named_parameters())[n].detach())), n
assert any(not torch.equal(p, q) for p, q in zip(again.parameters(), plain.parameters()))
open(f"rank{dist.get_rank()}.ok", "w").write("ok")
del sharded, copy, again, opt  # the DTensors' device mesh holds the gloo group
import gc, os; gc.collect()
dist.barrier()  # ranks tear the group down together (one leaving early made the other abort at exit)
dist.destroy_process_group()
# gloo's worker threads can still be joinable during interpreter finalisation and abort the process ("terminate
# called without an active exception", pytorch/pytorch#179291); every check above has passed, so skip finalisation.
sys.stdout.flush(); sys.stderr.flush(); os._exit(0)
'''


def test_sampling_copy_of_an_fsdp2_sharded_policy(tmp_path):
    script = tmp_path / "fsdp_copy.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script),
                          str(ROOT)], capture_output=True, text=True, env=subprocess_env(), timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (tmp_path / "rank0.ok").exists() and (tmp_path / "rank1.ok").exists()
