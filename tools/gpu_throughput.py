"""Training throughput on one GPU (tokens/s), printed and written as JSON; run by tools/gpu_check.sh.

Four variants of the same ~70M-parameter hybrid model, bf16 parameters, AdamW, one process (TP=1):

- ``torch_ssm``   reference layers, our pure-PyTorch Mamba scan (MEGATRON_ELASTIC_SSM_BACKEND=torch)
- ``mamba_ssm``   reference layers, mamba-ssm / causal-conv1d kernels
- ``te_bf16``     megatron tensor-parallel model with Transformer Engine linears, bf16
- ``te_fp8``      the same with FP8 GEMMs (first and last layers in bf16)

Usage: python tools/gpu_throughput.py --out throughput.json [--steps 10 --batch 4 --seq 2048]
Importable on CPU; running it without CUDA is an error.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time

import torch

# FP8-friendly shapes (every GEMM dimension a multiple of 16; in_proj = 2*2048 + 2*4*128 + 32 = 5152).
CONFIG = dict(
    pattern="M-M*-M-M-", vocab_size=32768, hidden_size=1024, ffn_hidden_size=4096, num_attention_heads=16,
    num_query_groups=4, head_dim=64, mamba_num_heads=32, mamba_head_dim=64, mamba_num_groups=4,
    mamba_state_dim=128, mamba_chunk_size=128,
)  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure(model, loss_fn, *, steps: int, batch: int, seq: int, vocab: int) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    gen = torch.Generator(device="cuda").manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), device="cuda", generator=gen)

    def step():
        loss = loss_fn(model(tokens[:, :-1]), tokens[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(3):  # warm-up: kernel autotuning, FP8 amax history, allocator
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"tokens_per_s": batch * seq * steps / elapsed, "step_s": elapsed / steps, "loss": float(loss),
            "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_throughput: CUDA is not available; run this on a GPU machine", file=sys.stderr)
        return 2
    import torch.distributed as dist
    import torch.nn.functional as F

    from megatron_elastic.model import HybridConfig, HybridLM, kernels
    from megatron_elastic.config.schema import FP8Config
    from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    group = dist.group.WORLD
    config = HybridConfig(**CONFIG)
    shape = dict(steps=args.steps, batch=args.batch, seq=args.seq, vocab=config.vocab_size)

    def build():
        torch.manual_seed(0)
        return HybridLM(config).to(device="cuda", dtype=torch.bfloat16)

    def dense_ce(logits, labels):
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    def tp_ce(logits, labels):
        return vocab_parallel_cross_entropy(logits, labels, group)

    results = {}
    variants = [
        ("torch_ssm", "torch", build, dense_ce),
        ("mamba_ssm", "mamba_ssm", build, dense_ce),
        ("te_bf16", "auto", lambda: apply_tensor_parallel(build(), group, linears="transformer_engine"), tp_ce),
        ("te_fp8", "auto", lambda: apply_tensor_parallel(build(), group, linears="transformer_engine",
                                                            fp8=FP8Config(enabled=True)), tp_ce),
    ]  # fmt: skip
    try:
        for name, backend, make, loss_fn in variants:
            os.environ[kernels.ENV_VAR] = backend
            torch.cuda.reset_peak_memory_stats()
            model = make()
            r = _measure(model, loss_fn, **shape)
            del model
            torch.cuda.empty_cache()
            results[name] = r
            print(f"tokens/s {name:10s} {r['tokens_per_s']:12.0f}   step {r['step_s'] * 1e3:8.1f} ms   "
                  f"peak {r['peak_mem_gib']:6.2f} GiB   loss {r['loss']:.4f}", flush=True)  # fmt: skip
    finally:
        os.environ.pop(kernels.ENV_VAR, None)
        dist.destroy_process_group()
    ratios = {
        "mamba_ssm / torch_ssm": results["mamba_ssm"]["tokens_per_s"] / results["torch_ssm"]["tokens_per_s"],
        "te_fp8 / te_bf16": results["te_fp8"]["tokens_per_s"] / results["te_bf16"]["tokens_per_s"],
    }
    for k, v in ratios.items():
        print(f"ratio {k}: {v:.2f}x")
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "config": CONFIG,
              "batch": args.batch, "seq": args.seq, "steps": args.steps, "results": results, "ratios": ratios}  # fmt: skip
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
