"""Two real gloo processes: averaging gradients over data-parallel ranks equals the full-batch gradient.

This pins down that the reference model has no hidden cross-sample state, the property the
data-parallel trainer relies on.
"""

import os

import torch
import torch.distributed as dist
from spawning import spawn_ranks

from megatron_elastic.model import HybridLM, preset

WORLD = 2


def _batch():
    return torch.randint(0, 512, (4, 25), generator=torch.Generator().manual_seed(7))


def _loss(model, tokens):
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        model = HybridLM(preset("tiny"))
        shard = _batch().chunk(WORLD)[rank]
        _loss(model, shard).backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
        if rank == 0:
            torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


def test_dp_gradient_average_equals_full_batch(tmp_path):
    spawn_ranks(_worker, str(tmp_path), world=WORLD, timeout=240)

    torch.manual_seed(0)
    model = HybridLM(preset("tiny"))
    _loss(model, _batch()).backward()
    dp_grads = torch.load(tmp_path / "grads.pt")
    for name, p in model.named_parameters():
        torch.testing.assert_close(dp_grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)

