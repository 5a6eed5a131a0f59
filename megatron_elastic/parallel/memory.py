"""Per-GPU memory of a training run: what each rank holds, item by item, for a model and a layout.

Two kinds of items:

* **static** (weights, gradients, optimizer state, the frozen teacher, the autocast weight cache, the
  data-parallel all-reduce buffer): parameters per rank are *counted* on a model built on the meta
  device (no allocation), each parameter cut by the tensor-parallel partition rules of
  :mod:`megatron_elastic.model.layout` and kept only on its pipeline stage
  (:func:`~megatron_elastic.parallel.pipeline.stage_layer_ranges`);
* **activations** (saved for backward) and the logits and loss buffers: *measured* with
  ``torch.autograd.graph.saved_tensors_hooks`` on real forwards of small single-device layers, fitted
  by least squares to an explicit scaling law per layer kind, recompute mode, precision and masking,
  then evaluated at the target shapes.

The scaling law (:data:`FEATURES`): the bytes a layer saves are ``sum_j c_j * phi_j`` where every
feature ``phi_j`` is the micro-batch size times a token count times one width of the layer as one
tensor-parallel rank holds it (a TP rank's mixer *is* the single-device mixer at its local widths:
heads / tp, FFN / tp, ...; the residual width d is never split). Mamba-2 adds the chunked scan's
per-chunk terms (``H * Q`` per token, ``H*P*N`` per chunk, the ``(chunks + 1)^2`` decay matrix). The
coefficients ``c_j`` are bytes per element (near-integer where one tensor of that size is kept; the
fit's worst residual is kept with it); sequence lengths are rounded up to whole scan chunks.

Each layer's bytes are split into the mixer's part and the rest of the block (pre-norm, residual,
masks). Under sequence parallelism the rest sees this rank's positions only (divided by tp); the
mixer gathers the whole sequence first and its linears keep that gathered input (this project's
sequence parallelism does not re-gather in backward), so the mixer part is not divided.

The training step (see :mod:`megatron_elastic.parallel.trainer`): per (micro-batch, budget) item one
student forward + backward; the teacher runs once per micro-batch under ``no_grad`` and its logits
stay until the micro-batch's budgets are done (with pp > 1, for every micro-batch of the step: they
are computed before the 1F1B schedule). 1F1B keeps up to ``pp`` items' activations on the first stage.
After backward the data-parallel all-reduce flattens every gradient into one buffer (replicated
optimizer); the distributed optimizer reduce-scatters its contiguous buffer in place instead.
Checkpoints (dist_checkpointing) write views of the live tensors and copy each shard to host memory
as it is written: no GPU staging.

Not modelled: the teacher's transient per-layer working set (no_grad: one layer's temporaries at a
time), allocator fragmentation, CUDA/NCCL workspaces, the optimizer step's temporaries, and the
mamba-ssm / flash kernels' own (smaller) saved tensors: the measured layers run the PyTorch paths.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from megatron_elastic.errors import ConfigError
from megatron_elastic.model.config import ATTENTION, MAMBA, MLP, RECOMPUTE_MODES, HybridConfig
from megatron_elastic.model.elastic_state import ElasticState, LayerMask
from megatron_elastic.model.hybrid import HybridLM, set_recompute
from megatron_elastic.model.layout import param_partition
from megatron_elastic.parallel.pipeline import stage_layer_ranges

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GB = 1e9
EMBEDDING, HEAD = "embedding", "head"
"""The parts outside the layers: the embedding (and its hidden mask) on the first stage; the final
norm and the output layer's input on the last."""

# ----------------------------------------------------------------------------- the scaling law

FEATURES: dict[str, tuple[str, ...]] = {
    MLP: ("b*L*d", "b*L*f"),
    ATTENTION: ("b*L*d", "b*L*heads*hd", "b*L*kv*hd", "b*L*heads"),
    MAMBA: ("b*L*d", "b*L*H*P", "b*L*G*N", "b*L*H", "b*L*H*Q", "b*chunks*H*P*N", "b*H*P*N", "b*H*(chunks+1)^2"),
    EMBEDDING: ("b*L", "b*L*d"),
    HEAD: ("b*L", "b*L*d"),
}
"""Per layer kind, the terms saved-for-backward bytes are linear in (widths are one TP rank's)."""
LOSS_FEATURES = ("b*L*V", "b*L")
"""Terms of the KD + CE loss's saved bytes (V: this rank's vocabulary shard)."""


@dataclass(frozen=True)
class Widths:
    """One layer's sizes as one tensor-parallel rank holds them (``d`` is never split)."""

    d: int
    f: int = 0
    heads: int = 0
    kv: int = 0
    hd: int = 0
    H: int = 0
    P: int = 0
    G: int = 0
    N: int = 0
    Q: int = 1


def layer_widths(config: HybridConfig, layer: int, tp: int = 1) -> Widths:
    """Layer ``layer``'s widths on one rank of a ``tp``-way split (heads, groups, FFN neurons / tp)."""
    c, dims = config, config.layer_dims(layer)
    return Widths(d=c.hidden_size, f=dims.ffn_hidden_size // tp, heads=dims.num_attention_heads // tp,
                  kv=c.num_query_groups // tp, hd=c.head_dim, H=dims.mamba_num_heads // tp, P=dims.mamba_head_dim,
                  G=c.mamba_num_groups // tp, N=c.mamba_state_dim, Q=c.mamba_chunk_size)  # fmt: skip


def features(kind: str, w: Widths, batch: int, seq_len: int) -> list[float]:
    """The values of ``FEATURES[kind]`` for one micro-batch of ``batch`` x ``seq_len`` tokens."""
    b, L = batch, seq_len
    if kind == MLP:
        return [b * L * w.d, b * L * w.f]
    if kind == ATTENTION:
        return [b * L * w.d, b * L * w.heads * w.hd, b * L * w.kv * w.hd, b * L * w.heads]
    if kind == MAMBA:
        nc = math.ceil(L / w.Q)
        Lp = nc * w.Q  # the scan pads to whole chunks
        hpn = w.H * w.P * w.N
        return [b * Lp * w.d, b * Lp * w.H * w.P, b * Lp * w.G * w.N, b * Lp * w.H, b * Lp * w.H * w.Q,
                b * nc * hpn, b * hpn, b * w.H * (nc + 1) ** 2]  # fmt: skip
    if kind in (EMBEDDING, HEAD):
        return [b * L, b * L * w.d]
    raise KeyError(kind)


# ----------------------------------------------------------------------------- measurement


class SavedBytes:
    """Distinct storages autograd keeps for backward, each counted once, in the bucket it was first
    saved in (see :func:`count_saved`)."""

    def __init__(self):
        self.storages: dict[int, tuple[str, int]] = {}
        """storage address -> (bucket, bytes)"""
        self.phase = "activations"
        """The bucket storages saved from now on are counted in."""

    def bytes(self, bucket: str = "activations") -> int:
        return sum(n for b, n in self.storages.values() if b == bucket)


_VIEWS = ("TBackward0", "TransposeBackward0", "ViewBackward0", "UnsafeViewBackward0", "ReshapeAliasBackward0",
          "PermuteBackward0", "ExpandBackward0", "UnsqueezeBackward0", "SqueezeBackward0", "SqueezeBackward1",
          "AliasBackward0")  # fmt: skip


def _is_weight_copy(t: torch.Tensor, params: set[int]) -> bool:
    """A cast of a parameter, or a view of one (autocast's bf16 weight copies, a norm's ``weight.float()``)."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _VIEWS and fn.next_functions:
        fn = fn.next_functions[0][0]
    if fn is None or type(fn).__name__ != "ToCopyBackward0" or not fn.next_functions:
        return False
    nxt = fn.next_functions[0][0]
    return type(nxt).__name__ == "AccumulateGrad" and id(nxt.variable) in params


@contextlib.contextmanager
def count_saved(params, *, exclude=()):
    """Count, under ``with count_saved(model.parameters()) as saved:``, the bytes of the distinct
    non-parameter storages autograd saves for backward: ``saved.bytes()`` (activations; bucket
    ``saved.phase`` names where they are counted) and ``saved.bytes("weight_copies")``."""
    params = list(params)
    ids = {id(p) for p in params}
    skip = {p.untyped_storage().data_ptr() for p in params} | {t.untyped_storage().data_ptr() for t in exclude}
    saved = SavedBytes()

    def pack(t: torch.Tensor):
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr not in skip and ptr not in saved.storages:
            saved.storages[ptr] = ("weight_copies" if _is_weight_copy(t, ids) else saved.phase, s.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield saved


def _precision(params_dtype: str, compute_dtype: str):
    """(parameter dtype, autocast context): bf16 compute on fp32 parameters runs under autocast."""
    if params_dtype not in DTYPES or compute_dtype not in DTYPES:
        raise ValueError(f"dtypes must be one of {', '.join(DTYPES)}; got params {params_dtype!r}, "
                         f"compute {compute_dtype!r}")  # fmt: skip
    if params_dtype == compute_dtype:
        return DTYPES[params_dtype], contextlib.nullcontext()
    return DTYPES[params_dtype], torch.autocast("cpu", dtype=DTYPES[compute_dtype])


def elastic_masks(config: HybridConfig, *, generator: torch.Generator | None = None) -> ElasticState:
    """Soft masks on every axis that carry a gradient (as the router's do): an elastic student forward."""
    g = generator or torch.Generator().manual_seed(0)

    def soft(n: int) -> torch.Tensor:
        return torch.rand(n, generator=g).add_(0.5).clamp_(max=1.0).requires_grad_()

    layers = []
    for i, kind in enumerate(config.layer_types):
        dims = config.layer_dims(i)
        layers.append(LayerMask(ffn=soft(dims.ffn_hidden_size) if kind == MLP else None,
                                attn_heads=soft(dims.num_attention_heads) if kind == ATTENTION else None,
                                mamba_heads=soft(dims.mamba_num_heads) if kind == MAMBA else None,
                                mamba_head_dim=soft(dims.mamba_head_dim) if kind == MAMBA else None,
                                keep=torch.tensor(0.9, requires_grad=True)))  # fmt: skip
    return ElasticState(hidden=soft(config.hidden_size), layers=layers)


def measure_layer(model: HybridLM, layer: int, mode: str, batch: int, seq_len: int, *, masked: bool,
                  params_dtype: str = "float32", compute_dtype: str = "bfloat16",
                  state: ElasticState | None = None) -> tuple[int, int]:  # fmt: skip
    """(mixer bytes, rest-of-block bytes) one block of ``model`` saves for backward on a forward of
    ``batch`` x ``seq_len`` tokens (its input counted in the rest: the pre-norm keeps it)."""
    dtype, autocast = _precision(params_dtype, compute_dtype)
    set_recompute(model, mode)
    block = model.layers[layer]
    if masked and state is None:
        state = elastic_masks(model.config)
    x = torch.randn(batch, seq_len, model.config.hidden_size, dtype=dtype, requires_grad=True)
    with count_saved(model.parameters()) as saved:
        # a one-off statistic: the mixer's hooks only say in which part a saved tensor is counted
        pre = block.mixer.register_forward_pre_hook(lambda *_: setattr(saved, "phase", "mixer"))
        post = block.mixer.register_forward_hook(lambda *_: setattr(saved, "phase", "activations"))
        try:
            with autocast:
                out = block(x, None if state is None else state.hidden, None if state is None else state.layer(layer))
        finally:
            pre.remove()
            post.remove()
    del out
    set_recompute(model, "none")
    return saved.bytes("mixer"), saved.bytes()


def measure_ends(model: HybridLM, batch: int, seq_len: int, *, masked: bool, params_dtype: str = "float32",
                 compute_dtype: str = "bfloat16") -> tuple[int, int]:  # fmt: skip
    """(embedding bytes, head bytes) saved for backward: the embedding and its hidden mask; the final
    norm and the output layer (logits excluded: they are their own item). The embedding's output stands
    in for the last block's output that the final norm keeps."""
    _, autocast = _precision(params_dtype, compute_dtype)
    hidden = elastic_masks(model.config).hidden if masked else None
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with count_saved(model.parameters()) as saved, autocast:
        saved.phase = EMBEDDING
        h = model.embedding(tokens)
        if hidden is not None:
            h = h * hidden.to(h.dtype)
        saved.phase = HEAD
        logits = model.head(model.final_norm(h, hidden), model.output_weight())
    del logits
    return saved.bytes(EMBEDDING), saved.bytes(HEAD)


def measure_loss(kd: Callable, ce: Callable, batch: int, seq_len: int, vocab: int, *, kd_weight: float = 1.0,
                 ce_weight: float = 1.0) -> int:  # fmt: skip
    """Bytes KD(student, teacher) + CE(student, labels) save for backward, student logits excluded
    (they are their own item); ``vocab``: the logits' last dimension (this rank's shard)."""
    g = torch.Generator().manual_seed(0)
    student = torch.randn(batch, seq_len, vocab, generator=g, requires_grad=True)
    teacher = torch.randn(batch, seq_len, vocab, generator=g)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    with count_saved((), exclude=(student, teacher)) as saved:
        loss = kd_weight * kd(student, teacher) + ce_weight * ce(student, labels)
    del loss
    return saved.bytes()


# ----------------------------------------------------------------------------- the fit

# Small shapes whose widths vary independently (every sequence a whole number of scan chunks):
# (d, ffn, heads, kv, head_dim, mamba heads, mamba head_dim, groups, state, chunk, batch, seq).
FIT_SHAPES = (
    (32, 48, 4, 2, 8, 4, 8, 2, 8, 16, 1, 32),
    (48, 48, 4, 2, 8, 4, 8, 2, 8, 16, 1, 32),
    (32, 80, 8, 2, 8, 4, 8, 2, 8, 16, 1, 32),
    (32, 48, 4, 4, 8, 8, 8, 2, 8, 16, 1, 32),
    (32, 48, 4, 2, 16, 4, 16, 2, 8, 16, 1, 32),
    (32, 48, 4, 2, 8, 4, 8, 4, 8, 16, 1, 32),
    (32, 48, 4, 2, 8, 4, 8, 2, 16, 16, 1, 32),
    (32, 48, 4, 2, 8, 4, 8, 2, 8, 8, 1, 32),
    (32, 48, 4, 2, 8, 4, 8, 2, 8, 16, 2, 32),
    (32, 48, 4, 2, 8, 4, 8, 2, 8, 16, 1, 64),
    (32, 48, 4, 2, 8, 4, 8, 2, 8, 16, 1, 96),
    (40, 64, 6, 3, 12, 6, 12, 3, 12, 32, 2, 64),
)


def fit_config(shape: tuple[int, ...], pattern: str = "M*-") -> HybridConfig:
    d, f, nh, kv, hd, mh, p, g, n, q, _, _ = shape
    return HybridConfig(pattern=pattern, vocab_size=64, hidden_size=d, ffn_hidden_size=f, num_attention_heads=nh,
                        num_query_groups=kv, head_dim=hd, mamba_num_heads=mh, mamba_head_dim=p, mamba_num_groups=g,
                        mamba_state_dim=n, mamba_chunk_size=q)  # fmt: skip


@dataclass(frozen=True)
class Fit:
    """Bytes per feature of one (layer kind, recompute mode) and how well they reproduce the measurements."""

    kind: str
    mode: str
    mixer: tuple[float, ...]
    rest: tuple[float, ...]
    max_rel_residual: float
    """Largest |fit - measured| / measured over the fitted shapes."""

    def predict(self, phi: list[float], *, rest_divisor: int = 1) -> float:
        mixer = sum(c * x for c, x in zip(self.mixer, phi))
        rest = sum(c * x for c, x in zip(self.rest, phi))
        return mixer + rest / rest_divisor


def _lstsq(rows: list[list[float]], values: list[float]) -> tuple[list[float], float]:
    A = torch.tensor(rows, dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)
    scale = A.abs().amax(0).clamp(min=1.0)  # columns of very different size: solve on a normalised basis
    coef = torch.linalg.lstsq(A / scale, y[:, None], driver="gelsd").solution[:, 0] / scale
    coef = torch.where(coef.abs() < 1e-6, torch.zeros_like(coef), coef)
    resid = ((A @ coef - y).abs() / y.clamp(min=1.0)).max().item() if len(values) else 0.0
    return coef.tolist(), resid


@dataclass(frozen=True)
class ActivationModel:
    """Fitted saved-for-backward bytes per (layer kind, recompute mode) for one precision and masking."""

    params_dtype: str
    compute_dtype: str
    masked: bool
    fits: dict
    """(kind, mode) -> :class:`Fit`; EMBEDDING and HEAD under mode 'none' (no mode recomputes them)."""

    def layer_bytes(self, kind: str, mode: str, w: Widths, batch: int, seq_len: int, *, tp: int = 1,
                    sequence_parallel: bool = False) -> float:  # fmt: skip
        fit = self.fits[(kind, "none" if kind in (EMBEDDING, HEAD) else mode)]
        return fit.predict(features(kind, w, batch, seq_len), rest_divisor=tp if sequence_parallel else 1)


@contextlib.contextmanager
def _one_thread():
    """Tiny shapes run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.lru_cache(maxsize=8)
def fit_activation_model(params_dtype: str = "float32", compute_dtype: str = "bfloat16", masked: bool = True,
                         shapes: tuple = FIT_SHAPES) -> ActivationModel:  # fmt: skip
    """Measure every layer kind in every recompute mode on ``shapes`` and fit :data:`FEATURES` (about 2 s)."""
    with _one_thread(), torch.random.fork_rng():
        torch.manual_seed(0)
        rows = _measure_fit_shapes(params_dtype, compute_dtype, masked, shapes)
    return _fit_rows(params_dtype, compute_dtype, masked, rows)


def _measure_fit_shapes(params_dtype: str, compute_dtype: str, masked: bool, shapes) -> dict:
    dtype, _ = _precision(params_dtype, compute_dtype)
    rows: dict = {}
    for shape in shapes:
        b, L = shape[-2], shape[-1]
        model = HybridLM(fit_config(shape)).to(dtype)
        state = elastic_masks(model.config) if masked else None
        for i, kind in enumerate(model.config.layer_types):
            phi = features(kind, layer_widths(model.config, i), b, L)
            for mode in RECOMPUTE_MODES:
                mixer, rest = measure_layer(model, i, mode, b, L, masked=masked, params_dtype=params_dtype,
                                            compute_dtype=compute_dtype, state=state)  # fmt: skip
                rows.setdefault((kind, mode), []).append((phi, mixer, rest))
        phi = features(HEAD, layer_widths(model.config, 0), b, L)
        ends = measure_ends(model, b, L, masked=masked, params_dtype=params_dtype, compute_dtype=compute_dtype)
        for kind, value in zip((EMBEDDING, HEAD), ends):
            rows.setdefault((kind, "none"), []).append((phi, 0, value))
    return rows


def _fit_rows(params_dtype, compute_dtype, masked, rows) -> ActivationModel:
    fits = {}
    for (kind, mode), data in rows.items():
        phis = [r[0] for r in data]
        mixer, _ = _lstsq(phis, [r[1] for r in data])
        rest, _ = _lstsq(phis, [r[2] for r in data])
        total = [sum(c * x for c, x in zip(mixer + rest, p + p)) for p in phis]
        measured = [r[1] + r[2] for r in data]
        worst = max(abs(t - m) / max(m, 1) for t, m in zip(total, measured))
        fits[(kind, mode)] = Fit(kind, mode, tuple(mixer), tuple(rest), worst)
    return ActivationModel(params_dtype, compute_dtype, masked, fits)


def measure_model(model: HybridLM, mode: str, batch: int, seq_len: int, *, masked: bool,
                  params_dtype: str = "float32", compute_dtype: str = "bfloat16") -> tuple[int, int]:  # fmt: skip
    """(activation bytes, weight-copy bytes) a whole single-device forward saves for backward (the
    reference the fitted model is checked against; logits are not saved by the model itself)."""
    _, autocast = _precision(params_dtype, compute_dtype)
    set_recompute(model, mode)
    state = elastic_masks(model.config) if masked else None
    tokens = torch.randint(0, model.config.vocab_size, (batch, seq_len))
    with _one_thread(), count_saved(model.parameters()) as saved, autocast:
        logits = model(tokens, elastic=state)
    del logits
    set_recompute(model, "none")
    return saved.bytes(), saved.bytes("weight_copies")


def predict_model(config: HybridConfig, mode: str, batch: int, seq_len: int, *, masked: bool,
                  params_dtype: str = "float32", compute_dtype: str = "bfloat16", tp: int = 1,
                  sequence_parallel: bool = False) -> float:  # fmt: skip
    """Predicted activation bytes of one whole forward (every layer, embedding and head) on one rank."""
    acts = fit_activation_model(params_dtype, compute_dtype, masked)
    total = sum(acts.layer_bytes(kind, mode, layer_widths(config, i, tp), batch, seq_len, tp=tp,
                                 sequence_parallel=sequence_parallel)
                for i, kind in enumerate(config.layer_types))  # fmt: skip
    ends = layer_widths(config, 0, tp)
    return total + sum(acts.layer_bytes(kind, "none", ends, batch, seq_len) for kind in (EMBEDDING, HEAD))


def _dense_losses(temperature: float = 1.0):
    from megatron_elastic.distill.losses import cross_entropy, forward_kl

    return (lambda s, t: forward_kl(s, t, temperature=temperature)), cross_entropy


@contextlib.contextmanager
def _one_rank_group():
    """A one-rank gloo group for measuring the vocab-parallel losses in a lone process."""
    import torch.distributed as dist

    if dist.is_initialized():
        if dist.get_world_size() > 1:  # a collective over other ranks would wait for them
            raise RuntimeError("the vocab-parallel losses are measured in a lone process; call fit_loss_model "
                               "before torch.distributed is initialised, or from a one-process run")  # fmt: skip
        yield dist.group.WORLD
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


@functools.lru_cache(maxsize=4)
def fit_loss_model(vocab_parallel: bool = False, temperature: float = 1.0) -> tuple[tuple[float, ...], float]:
    """(bytes per :data:`LOSS_FEATURES` term, max relative residual) of the KD + CE loss the trainer
    uses: the dense losses (tp = 1) or the vocab-parallel ones (tp > 1; measured on a one-rank group,
    each rank's buffers being those of its (tokens, V / tp) shard)."""
    shapes = ((1, 16, 64), (2, 16, 64), (1, 32, 96), (2, 24, 128))
    rows, values = [], []
    with contextlib.ExitStack() as stack:
        if vocab_parallel:
            from functools import partial

            from megatron_elastic.parallel.losses import vocab_parallel_cross_entropy, vocab_parallel_kl

            group = stack.enter_context(_one_rank_group())
            kd = partial(vocab_parallel_kl, tp_group=group, temperature=temperature)
            ce = partial(vocab_parallel_cross_entropy, tp_group=group)
        else:
            kd, ce = _dense_losses(temperature)
        for b, L, V in shapes:
            rows.append([b * L * V, b * L])
            values.append(measure_loss(kd, ce, b, L, V))
    coef, resid = _lstsq(rows, values)
    return tuple(coef), resid


# ----------------------------------------------------------------------------- static parts


def meta_model(config: HybridConfig) -> HybridLM:
    """The single-device model on the meta device: shapes and names, no storage."""
    with torch.device("meta"):
        return HybridLM(config, init=False)


def local_numel(config: HybridConfig, name: str, shape: torch.Size, tp: int) -> int:
    """Elements of parameter ``name`` (global ``shape``) one rank of a ``tp``-way split holds: the
    partition rules of :func:`~megatron_elastic.model.layout.param_partition` (packed components are
    each cut into ``tp`` chunks, so a sharded axis holds 1/tp of its rows or columns)."""
    _, axis = param_partition(config, name)
    numel = math.prod(shape)
    if axis is None or tp == 1:
        return numel
    assert shape[axis] % tp == 0, (name, shape, tp)
    return numel // tp


def _stage_params(config: HybridConfig, pp: int, pp_rank: int, model: HybridLM | None = None):
    """(name, parameter) of the meta model that pipeline stage ``pp_rank`` of ``pp`` holds."""
    model = meta_model(config) if model is None else model
    layers = stage_layer_ranges(config, pp)[pp_rank]
    first, last = pp_rank == 0, pp_rank == pp - 1
    for name, p in model.named_parameters():
        head, _, rest = name.partition(".")
        if head == "layers":
            keep = int(rest.partition(".")[0]) in layers
        elif head == "embedding":
            keep = first
        else:  # final_norm, output_layer
            keep = last
        if keep:
            yield name, p


def rank_parameter_counts(config: HybridConfig, *, tp: int = 1, pp: int = 1, pp_rank: int = 0) -> dict[str, int]:
    """Parameter name -> elements one rank of stage ``pp_rank`` holds in a ``tp`` x ``pp`` split."""
    from megatron_elastic.parallel.tensor import check_tp_divisibility

    check_tp_divisibility(config, tp)
    return {n: local_numel(config, n, p.shape, tp) for n, p in _stage_params(config, pp, pp_rank)}


def cached_weight_names(config: HybridConfig, mode: str = "none", model: HybridLM | None = None) -> set[str]:
    """Parameters whose compute-dtype copies autocast keeps for backward (measured: the linears' weights,
    the conv's cast is not kept); under full recomputation only the output layer's (the blocks cast
    theirs again in backward)."""
    model = meta_model(config) if model is None else model
    out = "embedding.weight" if config.tie_embeddings else "output_layer.weight"
    if mode == "full":
        return {out}
    names = {f"{m}.weight" for m, mod in model.named_modules() if isinstance(mod, nn.Linear)}
    return names | {out}


# ----------------------------------------------------------------------------- the estimate


@dataclass(frozen=True, kw_only=True)
class MemoryLayout:
    """A run's layout and the memory features that are on or off."""

    tp: int = 1
    """Tensor-parallel size."""
    pp: int = 1
    """Pipeline-parallel size."""
    dp: int = 1
    """Data-parallel size (the distributed optimizer shards its state over it)."""
    sequence_parallel: bool = False
    """Block-level activations (norms, residual, masks) split over the TP ranks by position."""
    micro_batch_size: int = 1
    """Samples per forward/backward on one rank."""
    seq_len: int = 8192
    """Tokens per sample."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on one data-parallel rank (global batch / (micro batch x dp))."""
    recompute: str = "none"
    """Activation recomputation: none | selective | full (see model.hybrid.set_recompute)."""
    params_dtype: str = "float32"
    """Dtype of the student's parameters (float32, or bfloat16 with fp32 main weights in the optimizer)."""
    compute_dtype: str = "bfloat16"
    """Dtype the GEMMs run in (autocast when it differs from params_dtype)."""
    distributed_optimizer: bool = False
    """Optimizer state (fp32 main weights, Adam moments) sharded over the data-parallel ranks."""
    teacher_dtype: str | None = "bfloat16"
    """Dtype of the frozen teacher's weights; None = no teacher (plain pre-training)."""
    elastic: bool = True
    """Student forwards carry the router's soft masks (elastic budgets); False = the plain model."""
    budgets_per_micro_batch: int = 1
    """Student forwards (budgets) per micro-batch; each runs forward and backward before the next."""

    def validate(self, config: HybridConfig) -> None:
        from megatron_elastic.parallel.tensor import check_tp_divisibility

        for name in ("tp", "pp", "dp", "micro_batch_size", "seq_len", "grad_accum", "budgets_per_micro_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name}={v!r} is invalid; it must be a positive integer")
        if self.recompute not in RECOMPUTE_MODES:
            raise ConfigError(f"recompute={self.recompute!r} is invalid; use one of {', '.join(RECOMPUTE_MODES)}")
        for name in ("params_dtype", "compute_dtype") + (("teacher_dtype",) if self.teacher_dtype else ()):
            if getattr(self, name) not in DTYPES:
                raise ConfigError(f"{name}={getattr(self, name)!r} is invalid; use one of {', '.join(DTYPES)}")
        if self.sequence_parallel and self.tp == 1:
            raise ConfigError("sequence_parallel=true needs tp > 1; raise tp or turn it off")
        if self.sequence_parallel and self.seq_len % self.tp:
            raise ConfigError(f"seq_len={self.seq_len} is not a multiple of tp={self.tp} as sequence parallelism "
                              "needs; pad the sequences or change tp")  # fmt: skip
        check_tp_divisibility(config, self.tp)
        stage_layer_ranges(config, self.pp)

    @classmethod
    def from_run_config(cls, cfg, *, dp: int = 1, seq_len: int | None = None, params_dtype: str | None = None,
                        distributed_optimizer: bool | None = None, teacher_dtype: str | None = None,
                        **overrides) -> MemoryLayout:  # fmt: skip
        """The layout of a :class:`~megatron_elastic.config.schema.RunConfig` run over ``dp`` GPU replicas.
        ``params_dtype`` / ``distributed_optimizer`` default to the run's (``train.params_dtype`` resolved
        on CUDA: 'auto' is bfloat16); ``teacher_dtype`` to what the elastic trainer holds it in (bf16 when the
        weights or the compute are: ``ElasticTrainer.teacher_dtype``)."""
        from megatron_elastic.training.trainer import resolve_params_dtype

        t, p = cfg.train, cfg.parallel
        if params_dtype is None:
            params_dtype = str(resolve_params_dtype(t.params_dtype, torch.device("cuda"))).removeprefix("torch.")
        if distributed_optimizer is None:
            distributed_optimizer = p.distributed_optimizer
        elastic = cfg.elastic is not None
        per = cfg.distill.budgets_per_micro_batch if elastic and cfg.distill else 0
        budgets = per or (len(cfg.elastic.budgets) if elastic else 1)
        if t.global_batch_size % (t.micro_batch_size * dp):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of micro_batch_size "
                              f"x dp = {t.micro_batch_size * dp}; change one of them")  # fmt: skip
        fields = dict(tp=p.tp, pp=p.pp, dp=dp, sequence_parallel=p.sequence_parallel,
                      micro_batch_size=t.micro_batch_size, seq_len=seq_len or cfg.data.seq_len,
                      grad_accum=t.global_batch_size // (t.micro_batch_size * dp), recompute=t.recompute,
                      params_dtype=params_dtype, compute_dtype="float32" if t.precision == "fp32" else "bfloat16",
                      distributed_optimizer=distributed_optimizer,
                      teacher_dtype=(teacher_dtype or _teacher_dtype(params_dtype, t.precision)) if elastic else None,
                      elastic=elastic,
                      budgets_per_micro_batch=budgets)  # fmt: skip
        fields.update(overrides)
        return cls(**fields)


def _teacher_dtype(params_dtype: str, precision: str) -> str:
    """The frozen teacher's dtype on a GPU, as ``ElasticTrainer.teacher_dtype`` picks it: bf16 when the weights
    are bf16 or the run computes in bf16 (``train.precision`` auto or bf16 on CUDA), else fp32."""
    return "bfloat16" if params_dtype == "bfloat16" or precision != "fp32" else "float32"


@dataclass(frozen=True)
class MemoryItem:
    """One thing a rank holds."""

    name: str
    bytes: float
    """Per GPU."""
    phase: str
    """'static' (held the whole run), 'fwd/bwd' (during a forward/backward) or 'step' (after backward)."""
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    """What one rank (of pipeline stage ``pp_rank``) holds."""

    layout: MemoryLayout
    pp_rank: int
    items: tuple[MemoryItem, ...]
    parameters: int
    """Parameters this rank holds (student; the teacher holds as many)."""

    def phase_bytes(self, phase: str) -> float:
        return sum(i.bytes for i in self.items if i.phase == phase)

    @property
    def total(self) -> float:
        """The peak: static + the larger of the forward/backward and the after-backward parts."""
        return self.phase_bytes("static") + max(self.phase_bytes("fwd/bwd"), self.phase_bytes("step"))

    def item(self, name: str) -> float:
        return next(i.bytes for i in self.items if i.name == name)

    def fits(self, capacity: float = 80 * GB, margin: float = 0.10) -> bool:
        """Whether the total fits ``capacity`` bytes with ``margin`` to spare."""
        return self.total <= capacity * (1 - margin)


def _bytes(dtype: str) -> int:
    return torch.finfo(DTYPES[dtype]).bits // 8


def estimate_stage(config: HybridConfig, layout: MemoryLayout, pp_rank: int = 0, *,
                   model: HybridLM | None = None) -> MemoryEstimate:  # fmt: skip
    """Per-rank bytes of every item on pipeline stage ``pp_rank`` (see the module docstring);
    ``model``: the meta model of ``config`` when the caller has it already."""
    L = layout
    L.validate(config)
    model = meta_model(config) if model is None else model
    params = dict(_stage_params(config, L.pp, pp_rank, model))
    counts = {n: local_numel(config, n, p.shape, L.tp) for n, p in params.items()}
    n = sum(counts.values())
    cached = sum(v for k, v in counts.items() if k in cached_weight_names(config, L.recompute, model))
    first, last = pp_rank == 0, pp_rank == L.pp - 1
    b, s = L.micro_batch_size, L.seq_len
    items = [MemoryItem("student weights", n * _bytes(L.params_dtype), "static",
                        f"{n / 1e9:.3f}B params x {L.params_dtype}")]  # fmt: skip
    items.append(MemoryItem("gradients", n * 4, "static", "fp32 accumulation"))
    per_param = 8 + (4 if L.params_dtype != "float32" else 0)  # Adam moments (+ fp32 main weights)
    shard = L.dp if L.distributed_optimizer else 1
    what = "fp32 main weights + 2 Adam moments" if per_param == 12 else "2 Adam moments (fp32 weights: main)"
    items.append(MemoryItem("optimizer", n * per_param / shard, "static",
                            what + (f", sharded over dp={L.dp}" if shard > 1 else ", replicated")))  # fmt: skip
    if L.teacher_dtype:
        items.append(MemoryItem("frozen teacher", n * _bytes(L.teacher_dtype), "static",
                                f"{L.teacher_dtype}, TP/PP-sharded"))  # fmt: skip
    cache = cached * _bytes(L.compute_dtype) if L.params_dtype != L.compute_dtype else 0
    note = f"{L.compute_dtype} copies of {cached / 1e9:.3f}B linear weights" if cache else "none"
    items.append(MemoryItem("autocast weight cache", cache, "fwd/bwd", note))
    acts = fit_activation_model(L.params_dtype, L.compute_dtype, L.elastic)
    per_micro, working = 0.0, 0.0
    for i in stage_layer_ranges(config, L.pp)[pp_rank]:
        kind, w = config.layer_types[i], layer_widths(config, i, L.tp)
        kept = acts.layer_bytes(kind, L.recompute, w, b, s, tp=L.tp, sequence_parallel=L.sequence_parallel)
        per_micro += kept
        # backward recomputes one layer at a time and holds what it would have kept without recomputation
        full = acts.layer_bytes(kind, "none", w, b, s, tp=L.tp, sequence_parallel=L.sequence_parallel)
        working = max(working, full - kept)
    for kind, here in ((EMBEDDING, first), (HEAD, last)):
        if here:
            per_micro += acts.layer_bytes(kind, "none", layer_widths(config, 0, L.tp), b, s)
    items_per_step = L.grad_accum * L.budgets_per_micro_batch
    in_flight = min(L.pp - pp_rank, items_per_step)  # 1F1B: stage r holds up to pp - r forwards
    items.append(MemoryItem("activations", per_micro * in_flight, "fwd/bwd",
                            f"recompute={L.recompute}, sequence_parallel={L.sequence_parallel}, "
                            f"{in_flight} micro-batch(es) in flight"))  # fmt: skip
    items.append(MemoryItem("recompute working set", working, "fwd/bwd",
                            "one layer's recomputed intermediates during backward" if working else "none"))  # fmt: skip
    if last:
        v = config.vocab_size // L.tp
        logit = b * s * v * 4
        if L.teacher_dtype:
            # one micro-batch's at a time, also under pp > 1 (the teacher runs inside the students' schedule)
            items.append(MemoryItem("teacher logits", logit, "fwd/bwd", "fp32 (tokens x V/tp), one micro-batch"))
        items.append(MemoryItem("student logits", logit, "fwd/bwd", "fp32 (tokens x V/tp)"))
        coef, _ = fit_loss_model(vocab_parallel=L.tp > 1)
        loss = sum(c * x for c, x in zip(coef, (b * s * v, b * s)))
        items.append(MemoryItem("KD + CE buffers", loss, "fwd/bwd", "saved for backward by the losses"))
    buf = n * 4 if L.dp > 1 and not L.distributed_optimizer else 0
    items.append(MemoryItem("DP all-reduce buffer", buf, "step",
                            "flat copy of the gradients" if buf else "none (in place / dp=1)"))  # fmt: skip
    items.append(MemoryItem("checkpoint staging", 0, "step", "shards copied to host as they are written"))
    return MemoryEstimate(L, pp_rank, tuple(items), n)


def estimate_memory(config: HybridConfig, layout: MemoryLayout) -> MemoryEstimate:
    """The rank that needs the most: the largest total over the pipeline stages."""
    layout.validate(config)
    model = meta_model(config)
    return max((estimate_stage(config, layout, r, model=model) for r in range(layout.pp)), key=lambda e: e.total)


def feature_variants(layout: MemoryLayout) -> dict[str, tuple[MemoryLayout, MemoryLayout]]:
    """Each memory feature's (on, off) layouts around ``layout``."""
    r = dataclasses.replace
    return {
        "bf16 params": (r(layout, params_dtype="bfloat16"), r(layout, params_dtype="float32")),
        "distributed optimizer": (r(layout, distributed_optimizer=True), r(layout, distributed_optimizer=False)),
        "recompute selective": (r(layout, recompute="selective"), r(layout, recompute="none")),
        "recompute full": (r(layout, recompute="full"), r(layout, recompute="none")),
        "sequence parallel": (r(layout, sequence_parallel=layout.tp > 1), r(layout, sequence_parallel=False)),
        "bf16 teacher": (r(layout, teacher_dtype="bfloat16"), r(layout, teacher_dtype="float32")),
    }


def format_table(columns: dict[str, MemoryEstimate], *, capacity: float = 80 * GB, margin: float = 0.10) -> str:
    """Items (rows) x estimates (columns) in GB, with the peak total and whether it fits ``capacity``
    with ``margin`` to spare."""
    names: list[str] = []
    for est in columns.values():
        names += [i.name for i in est.items if i.name not in names]
    widths = [max(8, len(k)) + 2 for k in columns]
    head = f"{'item (GB per GPU)':<24}{'phase':<9}" + "".join(f"{k:>{w}}" for k, w in zip(columns, widths))
    lines = [head, "-" * len(head)]
    for name in names:
        phase = next(i.phase for e in columns.values() for i in e.items if i.name == name)
        cells = []
        for est, w in zip(columns.values(), widths):
            found = [i.bytes for i in est.items if i.name == name]
            cells.append(f"{found[0] / GB:>{w}.2f}" if found else f"{'-':>{w}}")
        lines.append(f"{name:<24}{phase:<9}" + "".join(cells))
    lines.append("-" * len(head))
    lines.append(f"{'peak total':<33}" + "".join(f"{e.total / GB:>{w}.2f}" for e, w in zip(columns.values(), widths)))
    verdict = ["fits" if e.fits(capacity, margin) else "NO FIT" for e in columns.values()]
    label = f"vs {capacity / GB:.0f} GB - {margin:.0%}"
    lines.append(f"{label:<33}" + "".join(f"{v:>{w}}" for v, w in zip(verdict, widths)))
    return "\n".join(lines)
