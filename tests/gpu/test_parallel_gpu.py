"""GPU checks of the parallel paths (marked ``gpu``; skipped without CUDA; ``tools/gpu_check.sh``
runs them all and treats a skip for a missing package as a failure):

- the tensor-parallel model (megatron-core layers, NCCL, mamba-ssm kernels when installed) at TP=1
  equals the single-device model on CPU;
- Transformer Engine layers (no FP8) equal the reference layers;
- FP8 training (TP=1, first and last layers in bf16) tracks bf16 training over a few steps;
- with two or more GPUs: TP=2 over NCCL (megatron-core layers with and without sequence
  parallelism; Transformer Engine layers) equals one GPU.
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from reference import randomize_
from spawning import free_port, spawn_ranks

from megatron_elastic.model import HybridConfig, HybridLM
from megatron_elastic.model.elastic_state import ElasticState, LayerMask

pytestmark = pytest.mark.gpu

# Every GEMM dimension a multiple of 16 (FP8): in_proj = 2*512 + 2*2*64 + 16 = 1296 = 81 * 16.
CFG = dict(
    pattern="M*-M-M-", vocab_size=1024, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8,
    num_query_groups=2, head_dim=32, mamba_num_heads=16, mamba_head_dim=32, mamba_num_groups=2,
    mamba_state_dim=64, mamba_chunk_size=64,
)  # fmt: skip
STRICT = os.environ.get("MEGATRON_ELASTIC_GPU_STRICT") == "1"


def require(module: str):
    """Import ``module``; a missing GPU package skips (fails under tools/gpu_check.sh)."""
    try:
        return __import__(module, fromlist=["_"])
    except Exception as exc:
        message = f"{module} cannot be imported ({type(exc).__name__}: {exc}); pip install -e '.[gpu]' --no-build-isolation"
        if STRICT:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def group():
    """A one-process NCCL group on this GPU (TP=1)."""
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def _model(dtype=torch.float32, seed=0) -> HybridLM:
    torch.manual_seed(seed)
    return randomize_(HybridLM(HybridConfig(**CFG)), seed=seed).to(dtype)


def _tokens(b=2, L=128, seed=0, device="cuda"):
    return torch.randint(0, CFG["vocab_size"], (b, L + 1), generator=torch.Generator().manual_seed(seed)).to(device)


def _state(config: HybridConfig, device="cuda") -> ElasticState:
    """Hard masks on every axis (half of every width, the last layer dropped)."""
    half = lambda n, groups=1: torch.cat([torch.ones(groups, n // groups // 2), torch.zeros(groups, n // groups // 2)], 1).reshape(-1).to(device)
    layers = []
    for i, kind in enumerate(config.layer_types):
        keep = 0.0 if i == config.num_layers - 1 else 1.0
        if kind == "-":
            layers.append(LayerMask(ffn=half(config.ffn_hidden_size), keep=keep))
        elif kind == "*":
            layers.append(LayerMask(attn_heads=half(config.num_attention_heads, config.num_query_groups), keep=keep))
        else:
            layers.append(LayerMask(mamba_heads=half(config.mamba_num_heads, config.mamba_num_groups),
                                    mamba_head_dim=half(config.mamba_head_dim), keep=keep))  # fmt: skip
    return ElasticState(hidden=half(config.hidden_size), layers=layers)


def test_tp1_on_cuda_equals_cpu_reference(group):
    from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    tokens = _tokens(device="cpu")
    ref = _model()
    state = _state(ref.config, "cpu")
    expected = ref(tokens[:, :-1], elastic=state)
    F.cross_entropy(expected.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    model = apply_tensor_parallel(_model().cuda(), group)  # mamba-ssm kernels when installed
    got = model(tokens[:, :-1].cuda(), elastic=_state(ref.config))
    vocab_parallel_cross_entropy(got, tokens[:, 1:].cuda(), group).backward()
    torch.testing.assert_close(got.cpu(), expected.detach(), rtol=1e-3, atol=2e-3)
    grads = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        g_ref = grads[name].grad
        if g_ref is None:  # the dropped last layer
            assert p.grad is None or p.grad.abs().max() == 0, name
            continue
        torch.testing.assert_close(p.grad.cpu(), g_ref, rtol=1e-2, atol=1e-3, msg=name)


def test_transformer_engine_layers_equal_reference(group):
    require("transformer_engine.pytorch")
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    tokens = _tokens()
    ref = _model().cuda()
    with torch.no_grad():
        expected = ref(tokens[:, :-1])
    te_model = apply_tensor_parallel(_model().cuda(), group, linears="transformer_engine")
    kinds = {type(m.mixer.in_proj).__module__ for m in te_model.layers if m.layer_type == "M"}
    assert all(k.startswith("transformer_engine") for k in kinds), kinds
    with torch.no_grad():
        got = te_model(tokens[:, :-1])
    torch.testing.assert_close(got, expected, rtol=1e-3, atol=5e-3)  # TE may run fp32 GEMMs in TF32


def _fp8_supported() -> tuple[bool, str]:
    te = require("transformer_engine.pytorch")
    check = getattr(te, "is_fp8_available", None)
    if check is not None:
        ok = check()
        return (ok, "") if isinstance(ok, bool) else ok
    from transformer_engine.pytorch.fp8 import check_fp8_support

    return check_fp8_support()


def _train(model, group, steps: int, seed: int = 0) -> list[float]:
    from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        # learnable data: short repeated motifs, so the loss falls within a few steps
        motif = torch.randint(0, CFG["vocab_size"], (4, 16), generator=gen)
        tokens = motif.repeat(1, 17)[:, :257].cuda()
        loss = vocab_parallel_cross_entropy(model(tokens[:, :-1]), tokens[:, 1:], group)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


FP8_STEPS = 12
FP8_REL_TOL = 0.05


def test_fp8_training_tracks_bf16(group, record_property):
    """TP=1, bf16 parameters: the FP8 loss trace stays within 5 % of the bf16 trace, step by step,
    and the first and last layers ran outside FP8."""
    ok, reason = _fp8_supported()
    if not ok:
        pytest.skip(f"this GPU has no FP8 support: {reason}")
    from megatron_elastic.config.schema import FP8Config
    from megatron_elastic.parallel.tensor import apply_tensor_parallel

    bf16 = apply_tensor_parallel(_model(torch.bfloat16).cuda(), group, linears="transformer_engine")
    fp8_model = apply_tensor_parallel(_model(torch.bfloat16).cuda(), group, linears="transformer_engine",
                                      fp8=FP8Config(enabled=True))  # fmt: skip
    base = _train(bf16, group, FP8_STEPS)
    low = _train(fp8_model, group, FP8_STEPS)
    record_property("bf16_losses", base)
    record_property("fp8_losses", low)
    print(f"bf16 losses {[round(v, 4) for v in base]}\nfp8  losses {[round(v, 4) for v in low]}")
    assert base[-1] < base[0] - 0.5, "bf16 training did not learn the motifs; the comparison would be vacuous"
    for step, (a, b) in enumerate(zip(base, low)):
        assert abs(a - b) <= FP8_REL_TOL * a, f"step {step}: fp8 loss {b:.4f} vs bf16 {a:.4f}"
    # TE modules record whether their last forward ran in FP8: only the inner layers did
    n = fp8_model.config.num_layers
    ran = []
    for block in fp8_model.layers:
        te_layers = [m for m in block.mixer.modules() if type(m).__module__.startswith("transformer_engine")]
        assert te_layers, f"layer {block.layer_type}: no Transformer Engine linear"
        flags = {bool(m.fp8) for m in te_layers}
        assert len(flags) == 1, flags  # all GEMMs of one layer in the same precision
        ran.append(flags.pop())
    assert ran == [False] + [True] * (n - 2) + [False], ran


# ----------------------------------------------------------------------------- two GPUs


def _tp2_worker(rank: int, port: int, out_dir: str, sequence_parallel: bool, linears: str) -> None:
    from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy
    from megatron_elastic.parallel.tensor import (
        allreduce_sequence_parallel_grads,
        apply_tensor_parallel,
        merge_tp_state_dicts,
    )

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        group = dist.group.WORLD
        model = apply_tensor_parallel(_model().cuda(), group, sequence_parallel=sequence_parallel, linears=linears)
        tokens = _tokens()
        logits = model(tokens[:, :-1], elastic=_state(model.config))
        vocab_parallel_cross_entropy(logits, tokens[:, 1:], group).backward()
        allreduce_sequence_parallel_grads(model)
        parts = [torch.empty_like(logits) for _ in range(2)]
        dist.all_gather(parts, logits.detach().contiguous())
        grads = {n: (torch.zeros_like(p) if p.grad is None else p.grad).cpu() for n, p in model.named_parameters()}
        shards = [None, None]
        dist.all_gather_object(shards, grads)
        if rank == 0:
            torch.save({"logits": torch.cat(parts, -1).cpu(), "grads": merge_tp_state_dicts(shards, model.config)},
                       os.path.join(out_dir, "tp2.pt"))  # fmt: skip
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("sequence_parallel,linears", [(False, "megatron"), (True, "megatron"), (False, "transformer_engine"),
                                                       (True, "transformer_engine")])
def test_tp2_nccl_equals_one_gpu(tmp_path, sequence_parallel, linears):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    if linears == "transformer_engine":
        require("transformer_engine.pytorch")
    spawn_ranks(_tp2_worker, str(tmp_path), sequence_parallel, linears, world=2, timeout=300)
    ref = _model().cuda()
    tokens = _tokens()
    logits = ref(tokens[:, :-1], elastic=_state(ref.config))
    F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    got = torch.load(tmp_path / "tp2.pt")
    # Transformer Engine may run fp32 GEMMs in TF32
    torch.testing.assert_close(got["logits"], logits.detach().cpu(), rtol=1e-3, atol=5e-3 if linears != "megatron" else 2e-3)
    for name, p in ref.named_parameters():
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(got["grads"][name], g.cpu(), rtol=1e-2, atol=5e-3 if linears != "megatron" else 1e-3,
                                   msg=name)  # fmt: skip
