"""The memory model against the CUDA allocator (marked ``gpu``; skipped without CUDA).

A small hybrid model trains one micro-batch on one GPU in bf16 autocast with fp32 weights; what the
allocator holds at its peak beyond the weights (``torch.cuda.max_memory_allocated``) is compared with
the memory model's prediction of the same items (activations kept for backward, the autocast weight
copies, logits and the recompute working set), in every recompute mode. The model runs our PyTorch
scan and the math attention path, the paths the model's activation fit was measured on (the fused
kernels keep less: the model is an upper bound for them, see docs/scale.md).
"""

import pytest
import torch

from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.model.hybrid import set_recompute
from megatron_elastic.parallel.memory import MemoryLayout, estimate_stage

pytestmark = pytest.mark.gpu

CFG = dict(pattern="M*-M-M-", vocab_size=4096, hidden_size=512, ffn_hidden_size=2048, num_attention_heads=8,
           num_query_groups=2, head_dim=64, mamba_num_heads=16, mamba_head_dim=64, mamba_num_groups=2,
           mamba_state_dim=64, mamba_chunk_size=128)  # fmt: skip
BATCH, SEQ = 2, 1024
# Items that exist during the forward/backward of a plain (non-elastic) step besides the static weights.
TRANSIENT = ("autocast weight cache", "activations", "recompute working set", "student logits")


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
def test_peak_cuda_memory_matches_the_memory_model(mode, monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    monkeypatch.setenv("MEGATRON_ELASTIC_SSM_BACKEND", "torch")
    from torch.nn.attention import SDPBackend, sdpa_kernel

    config = HybridConfig(**CFG)
    torch.manual_seed(0)
    model = HybridLM(config).cuda()
    set_recompute(model, mode)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ), device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with sdpa_kernel(SDPBackend.MATH), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(tokens)
    loss = logits.float().logsumexp(-1).mean()  # the logits' own backward, no loss buffers of the trainer
    loss.backward()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated() - base
    layout = MemoryLayout(micro_batch_size=BATCH, seq_len=SEQ, recompute=mode, params_dtype="float32",
                          compute_dtype="bfloat16", teacher_dtype=None, elastic=False)  # fmt: skip
    est = estimate_stage(config, layout)
    predicted = sum(est.item(name) for name in TRANSIENT) + est.item("gradients")  # gradients appear in backward
    print(f"recompute={mode}: measured {measured / 2**20:.1f} MiB, predicted {predicted / 2**20:.1f} MiB")
    assert abs(measured - predicted) <= 0.10 * predicted, (measured, predicted)
