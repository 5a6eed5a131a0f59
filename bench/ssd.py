"""Benchmark: our Mamba-2 stack vs Hugging Face transformers' NemotronH, CPU forward+backward.

What it measures
    A stack of ``--layers`` Mamba-2 residual blocks (``x + mixer(RMSNorm(x))``) run forward and
    backward on a float input ``x`` of shape (batch, seq_len, hidden) that requires grad, with the
    loss ``sum(out * w)`` for a fixed random ``w``. Two implementations, same shapes, same weights:

    * ours:         ``megatron_elastic.model.HybridLM(...).layers`` (chunked SSD scan in
                    ``megatron_elastic/model/ssd.py``, pure PyTorch on CPU);
    * transformers: ``transformers.NemotronHForCausalLM(...).model.layers`` with an all-Mamba
                    pattern, i.e. its pure-torch fallback path (no mamba-ssm / causal-conv1d on CPU).

    Our model is built from the Hugging Face model through the project's converter
    (``config_from_hf`` + ``state_from_hf``), so both hold identical weights. Weights are set to
    realistic non-trivial magnitudes (dt_bias ~ U(-2, 1), A_log ~ U(-1, 1.5), D ~ U(0.5, 1.5),
    random norm weights) so that the SSM state path matters for the numerical comparison.

    Both models are in the same mode (``train()`` by default; ``--eval`` for ``eval()``; in train
    mode transformers first tries its fused kernel, which returns None without mamba-ssm, then
    falls back to torch). After ``--warmup`` untimed rounds, ``--repeats`` rounds are timed with
    ``time.perf_counter``; each round runs both implementations back to back, alternating which
    goes first, so machine noise hits both. The median per implementation is reported.

    Printed: a table (implementation, median fwd+bwd ms, tokens/s), the speedup
    ``transformers time / our time`` (goal >= 2x), and the max absolute difference of the
    forward outputs and of the input gradients between the two.

    Then, unless ``--no-scan``, the same for the selective scan alone (one layer's shapes, dt
    softplus included): ``megatron_elastic.model.kernels.ssd_scan`` (torch backend) against the
    ``mamba2_chunk_scan`` that transformers' mixer calls. The rest of a mixer (in/out projections,
    causal conv1d, gated norm) is the same PyTorch work in both implementations, so the stack
    speedup is the scan speedup diluted by that shared cost.

Shapes
    By default two shape sets run one after the other, and a summary of both speedups ends the output:

    * ``nemotron-12b-group-slice``: hidden 640, 16 heads x head_dim 80, 1 group, state 128, chunk 128,
      batch 2, seq_len 512, 2 layers -- one B/C group's slice of a Nemotron Nano 12B Mamba layer
      (128 heads in 8 groups, head_dim 80, state 128), so the per-head work has the real proportions;
    * ``small``: hidden 256, 8 heads x 64, 2 groups, state 64, chunk 128, batch 4, seq_len 512, 4 layers.

    ``--shapes`` picks among them. Passing any shape flag (``--batch``, ``--seq-len``, ``--hidden``,
    ``--layers``, ``--heads``, ``--head-dim``, ``--groups``, ``--state``, ``--chunk``) runs one custom
    shape instead: the flags given, the ``small`` values for the rest.

How to run (from the repository root)
    .venv/bin/python bench/ssd.py
    .venv/bin/python bench/ssd.py --shapes nemotron-12b-group-slice --repeats 5
    .venv/bin/python bench/ssd.py --batch 2 --seq-len 1024 --layers 2 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

try:
    import megatron_elastic  # noqa: F401
except ImportError:  # running as a script from a checkout without an install
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from torch import nn


SHAPE_KEYS = ("batch", "seq_len", "hidden", "layers", "heads", "head_dim", "groups", "state", "chunk")
SHAPES = {
    "nemotron-12b-group-slice": {"batch": 2, "seq_len": 512, "hidden": 640, "layers": 2, "heads": 16, "head_dim": 80,
                                 "groups": 1, "state": 128, "chunk": 128},
    "small": {"batch": 4, "seq_len": 512, "hidden": 256, "layers": 4, "heads": 8, "head_dim": 64, "groups": 2,
              "state": 64, "chunk": 128},
}  # fmt: skip
CUSTOM_BASE = "small"  # the values a custom shape takes for the flags not given


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    base = SHAPES[CUSTOM_BASE]
    shape = p.add_argument_group("custom shape (giving any of these runs this one shape; the rest take the 'small' values)")
    shape.add_argument("--batch", type=int, default=argparse.SUPPRESS, help=f"sequences per step (small: {base['batch']})")
    shape.add_argument("--seq-len", type=int, default=argparse.SUPPRESS, help=f"tokens per sequence (small: {base['seq_len']})")
    shape.add_argument("--hidden", type=int, default=argparse.SUPPRESS, help=f"residual width (small: {base['hidden']})")
    shape.add_argument("--layers", type=int, default=argparse.SUPPRESS, help=f"number of Mamba-2 blocks in the stack (small: {base['layers']})")
    shape.add_argument("--heads", type=int, default=argparse.SUPPRESS, help=f"Mamba heads (small: {base['heads']})")
    shape.add_argument("--head-dim", type=int, default=argparse.SUPPRESS, help=f"channels per Mamba head (small: {base['head_dim']})")
    shape.add_argument("--groups", type=int, default=argparse.SUPPRESS, help=f"B/C groups (small: {base['groups']})")
    shape.add_argument("--state", type=int, default=argparse.SUPPRESS, help=f"SSM state size N (small: {base['state']})")
    shape.add_argument("--chunk", type=int, default=argparse.SUPPRESS, help=f"SSD chunk size (small: {base['chunk']})")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"comma-separated named shape sets to run when no shape flag is given ({', '.join(SHAPES)})")  # fmt: skip
    p.add_argument("--repeats", type=int, default=10, help="timed rounds (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave torch's default)")
    p.add_argument("--eval", action="store_true", help="run both models in eval() mode instead of train()")
    p.add_argument("--no-scan", action="store_true", help="skip the scan-only comparison")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and inputs")
    a = p.parse_args(argv)
    unknown = [n for n in a.shapes.split(",") if n and n not in SHAPES]
    if unknown:
        p.error(f"unknown shape set(s) {unknown}; known: {list(SHAPES)}")
    return a


def shape_runs(a: argparse.Namespace) -> list[tuple[str, argparse.Namespace]]:
    """(name, namespace with every shape field set) for each shape set to run."""
    given = {k: getattr(a, k) for k in SHAPE_KEYS if getattr(a, k, None) is not None}
    if given:
        return [("custom", argparse.Namespace(**{**vars(a), **SHAPES[CUSTOM_BASE], **given}))]
    names = [n for n in a.shapes.split(",") if n]
    return [(n, argparse.Namespace(**{**vars(a), **SHAPES[n]})) for n in names]


def build_models(a: argparse.Namespace) -> tuple[nn.ModuleList, nn.ModuleList]:
    """(our block stack, transformers' block stack) with identical weights."""
    import transformers
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from megatron_elastic.convert.hf import config_from_hf, state_from_hf
    from megatron_elastic.convert.native import load_state_into
    from megatron_elastic.model import HybridLM

    transformers.logging.set_verbosity_error()
    hf_config = NemotronHConfig(
        vocab_size=64,
        hidden_size=a.hidden,
        layers_block_type=["mamba"] * a.layers,
        mamba_num_heads=a.heads,
        mamba_head_dim=a.head_dim,
        n_groups=a.groups,
        ssm_state_size=a.state,
        chunk_size=a.chunk,
        conv_kernel=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=4 * a.hidden,
        use_bias=False,
        use_conv_bias=True,
        layer_norm_epsilon=1e-5,
        tie_word_embeddings=False,
    )
    torch.manual_seed(a.seed)
    hf = NemotronHForCausalLM(hf_config).float()

    # Realistic, non-trivial weights (the HF init leaves dt_bias = 1, D = 1, unit norms).
    with torch.no_grad():
        for block in hf.model.layers:
            m = block.mixer
            m.dt_bias.uniform_(-2.0, 1.0)
            m.A_log.uniform_(-1.0, 1.5)
            m.D.uniform_(0.5, 1.5)
            m.norm.weight.uniform_(0.5, 1.5)
            block.norm.weight.uniform_(0.5, 1.5)
            nn.init.normal_(m.in_proj.weight, std=1.0 / a.hidden**0.5)
            nn.init.normal_(m.out_proj.weight, std=1.0 / m.out_proj.in_features**0.5)
            m.conv1d.reset_parameters()

    ours_model = HybridLM(config_from_hf(hf_config.to_dict()), init=False).float()
    load_state_into(ours_model, state_from_hf(hf.state_dict(), src="in-memory NemotronHForCausalLM"), "bench")
    return ours_model.layers, hf.model.layers


def run_ours(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)
    return x


def run_hf(layers: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for layer in layers:
        x = layer(x)  # cache=None, attention_mask=None: the full-sequence chunked-scan path
    return x


def fwd_bwd(run, layers, x0: torch.Tensor, w: torch.Tensor) -> tuple[float, torch.Tensor, torch.Tensor]:
    """One forward+backward; returns (seconds, output, input grad)."""
    for p in layers.parameters():
        p.grad = None
    x = x0.detach().clone().requires_grad_(True)
    t0 = time.perf_counter()
    out = run(layers, x)
    (out * w).sum().backward()
    dt = time.perf_counter() - t0
    return dt, out.detach(), x.grad.detach()


def scan_inputs(a: argparse.Namespace, mixer: nn.Module) -> dict[str, torch.Tensor]:
    """Inputs of one layer's scan, with that mixer's dt_bias / A_log / D."""
    g = torch.Generator().manual_seed(a.seed + 2)
    b, L = a.batch, a.seq_len
    with torch.no_grad():
        return {
            "x": torch.randn(b, L, a.heads, a.head_dim, generator=g),
            "dt_raw": torch.randn(b, L, a.heads, generator=g),
            "B": torch.randn(b, L, a.groups, a.state, generator=g),
            "C": torch.randn(b, L, a.groups, a.state, generator=g),
            "w": torch.randn(b, L, a.heads, a.head_dim, generator=g),
            "A": -torch.exp(mixer.A_log.detach().float()),
            "D": mixer.D.detach().clone(),
            "dt_bias": mixer.dt_bias.detach().clone(),
        }


def scan_fwd_bwd(impl: str, t: dict[str, torch.Tensor], chunk: int, dt_min: float):
    """One scan forward+backward; returns (seconds, output, grad of x)."""
    from megatron_elastic.model import kernels
    from transformers.models.nemotron_h import modeling_nemotron_h as hf_mod

    x, dt_raw, B, C = (t[k].detach().clone().requires_grad_(True) for k in ("x", "dt_raw", "B", "C"))
    t0 = time.perf_counter()
    if impl == "ours":
        y = kernels.ssd_scan(x, dt_raw, t["A"], B, C, t["D"], t["dt_bias"], dt_limit=(dt_min, float("inf")),
                             chunk_size=chunk, backend="torch")  # fmt: skip
    else:  # what NemotronHMamba2Mixer calls on its chunked path
        y = hf_mod.mamba2_chunk_scan(x, dt_raw, t["A"], B, C, chunk_size=chunk, D=t["D"], dt_bias=t["dt_bias"],
                                     dt_softplus=True, dt_limit=(dt_min, float("inf")))  # fmt: skip
    (y * t["w"]).sum().backward()
    return time.perf_counter() - t0, y.detach(), x.grad.detach()


def print_table(rows: list[tuple[str, float]], tokens: int) -> None:
    print(f"{'implementation':<26} {'median fwd+bwd ms':>18} {'tokens/s':>12}")
    print(f"{'-' * 26} {'-' * 18} {'-' * 12}")
    for name, sec in rows:
        print(f"{name:<26} {sec * 1e3:>18.1f} {tokens / sec:>12,.0f}")


def run_shape(a: argparse.Namespace) -> dict[str, float]:
    """Benchmark one shape set, print its report; returns {"stack": speedup, "scan": speedup (unless --no-scan)}."""
    speedups = {}
    ours, hf = build_models(a)
    for m in (ours, hf):
        m.train(not a.eval)

    g = torch.Generator().manual_seed(a.seed + 1)
    x0 = torch.randn(a.batch, a.seq_len, a.hidden, generator=g)
    w = torch.randn(a.batch, a.seq_len, a.hidden, generator=g)
    impls = [("ours (megatron_elastic)", run_ours, ours), ("transformers NemotronH", run_hf, hf)]

    times: dict[str, list[float]] = {name: [] for name, _, _ in impls}
    results = {}
    for i in range(a.warmup + a.repeats):
        order = impls if i % 2 == 0 else impls[::-1]  # alternate who goes first
        for name, run, layers in order:
            dt, out, grad = fwd_bwd(run, layers, x0, w)
            if i >= a.warmup:
                times[name].append(dt)
            results[name] = (out, grad)

    (out_o, grad_o), (out_h, grad_h) = results[impls[0][0]], results[impls[1][0]]
    tokens = a.batch * a.seq_len
    med = {name: statistics.median(ts) for name, ts in times.items()}

    print(f"Mamba-2 stack fwd+bwd on CPU ({torch.get_num_threads()} threads, {'eval' if a.eval else 'train'} mode): "
          f"batch={a.batch} seq_len={a.seq_len} hidden={a.hidden} layers={a.layers} heads={a.heads} "
          f"head_dim={a.head_dim} groups={a.groups} state={a.state} chunk={a.chunk}; "
          f"median of {a.repeats} after {a.warmup} warmup")  # fmt: skip
    print()
    print_table([(name, med[name]) for name, _, _ in impls], tokens)
    print()
    speedups["stack"] = med[impls[1][0]] / med[impls[0][0]]
    print(f"speedup (ours / transformers): {speedups['stack']:.2f}x")
    print(f"max |diff| forward: {(out_o - out_h).abs().max().item():.3e}  "
          f"(max |output| {out_h.abs().max().item():.3e})")  # fmt: skip
    print(f"max |diff| input grad: {(grad_o - grad_h).abs().max().item():.3e}  "
          f"(max |grad| {grad_h.abs().max().item():.3e})")  # fmt: skip

    if not a.no_scan:
        dt_min = float(hf[0].mixer.time_step_limit[0])
        t = scan_inputs(a, hf[0].mixer)
        names = {"ours": "ours ssd_scan", "hf": "transformers chunk_scan"}
        stimes: dict[str, list[float]] = {k: [] for k in names}
        sres = {}
        for i in range(a.warmup + a.repeats):
            for impl in (("ours", "hf") if i % 2 == 0 else ("hf", "ours")):
                dt, y, gx = scan_fwd_bwd(impl, t, a.chunk, dt_min)
                if i >= a.warmup:
                    stimes[impl].append(dt)
                sres[impl] = (y, gx)
        smed = {k: statistics.median(v) for k, v in stimes.items()}
        print()
        print("Scan only (one layer, dt softplus included):")
        print()
        print_table([(names[k], smed[k]) for k in names], tokens)
        print()
        speedups["scan"] = smed["hf"] / smed["ours"]
        print(f"scan speedup (ours / transformers): {speedups['scan']:.2f}x")
        (y_o, g_o), (y_h, g_h) = sres["ours"], sres["hf"]
        print(f"scan max |diff| forward: {(y_o - y_h).abs().max().item():.3e}  "
              f"(max |y| {y_h.abs().max().item():.3e})")  # fmt: skip
        print(f"scan max |diff| x grad: {(g_o - g_h).abs().max().item():.3e}  "
              f"(max |grad| {g_h.abs().max().item():.3e})")  # fmt: skip
    return speedups


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    summary = []
    for i, (name, shape) in enumerate(shape_runs(a)):
        if i:
            print()
        print(f"=== {name} ===")
        summary.append((name, run_shape(shape)))
    if len(summary) > 1:
        print()
        print("Summary (transformers time / our time; goal >= 2x for the stack):")
        for name, sp in summary:
            scan = f"   scan {sp['scan']:.2f}x" if "scan" in sp else ""
            print(f"  {name:<26} stack {sp['stack']:.2f}x{scan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
