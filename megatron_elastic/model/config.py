"""The hybrid model's configuration: one validated dataclass, plus named presets.

The layer pattern has one symbol per layer: ``M`` Mamba-2 mixer, ``*`` self-attention, ``-`` MLP,
``E`` mixture of experts (megatron-core's hybrid symbols). ``|`` marks a pipeline-stage boundary and
is not a layer. Field names follow megatron-core where it
has a name for the thing (``ffn_hidden_size``, ``num_attention_heads``, ``num_query_groups``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from megatron_elastic.errors import ConfigError, shown

MAMBA, ATTENTION, MLP, MOE = "M", "*", "-", "E"
LAYER_SYMBOLS = (MAMBA, ATTENTION, MLP, MOE)
STAGE_SEPARATOR = "|"
LAYER_NAMES = {MAMBA: "mamba", ATTENTION: "attention", MLP: "mlp", MOE: "moe"}
# Activation recomputation modes (see model.hybrid.set_recompute): what backward recomputes instead of keeping.
RECOMPUTE_MODES = ("none", "selective", "full")
# The mixture-of-experts fields (used by 'E' layers; left out of to_dict when the pattern has none).
MOE_FIELDS = ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
              "moe_router_num_groups", "moe_router_group_topk", "moe_router_topk_scaling_factor",
              "moe_norm_topk_prob", "moe_latent_size")  # fmt: skip
# Largest size of any one dimension (a tensor extent kernels index with 32-bit integers); the memory
# check before a model is built catches what is smaller but still does not fit.
MAX_DIM = 2**31 - 1


def parse_pattern(pattern: str) -> tuple[list[str], list[int]]:
    """Split a hybrid pattern into its layer symbols and the layer counts of its pipeline stages.

    ``"M-M*|M-M-"`` -> (``['M','-','M','*','M','-','M','-']``, ``[4, 4]``).
    """
    if not isinstance(pattern, str):
        raise ConfigError(f"layer pattern {shown(pattern)} is invalid; it must be a string with one symbol per "
                          "layer, e.g. 'M-M*-' (M = Mamba-2, * = attention, - = MLP, | = pipeline-stage "
                          "boundary)")  # fmt: skip
    if not pattern:
        raise ConfigError(
            f"layer pattern {shown(pattern)} is empty; give one symbol per layer, e.g. 'M-M*-' "
            "(M = Mamba-2, * = attention, - = MLP, | = pipeline-stage boundary)"
        )
    layers: list[str] = []
    stages: list[int] = []
    current = 0
    for pos, symbol in enumerate(pattern):
        if symbol in LAYER_SYMBOLS:
            layers.append(symbol)
            current += 1
        elif symbol == STAGE_SEPARATOR:
            if current == 0:
                raise ConfigError(
                    f"layer pattern {shown(pattern)} has an empty pipeline stage at position {pos}; "
                    "put at least one layer between '|' separators and none at the ends"
                )
            stages.append(current)
            current = 0
        else:
            raise ConfigError(
                f"layer pattern {shown(pattern)} has unknown symbol {symbol!r} at position {pos}; "
                "use only M (Mamba-2), * (attention), - (MLP), E (mixture of experts) and | (pipeline-stage boundary)"
            )
    if current == 0:
        raise ConfigError(
            f"layer pattern {shown(pattern)} ends with '|' (an empty pipeline stage); remove the trailing '|'"
        )
    stages.append(current)
    return layers, stages


_PER_LAYER_FIELDS = {
    "ffn_hidden_size_per_layer": MLP,
    "num_attention_heads_per_layer": ATTENTION,
    "mamba_num_heads_per_layer": MAMBA,
    "mamba_head_dim_per_layer": MAMBA,
    "num_moe_experts_per_layer": MOE,
    "moe_ffn_hidden_size_per_layer": MOE,
    "moe_shared_expert_intermediate_size_per_layer": MOE,
    "moe_router_topk_per_layer": MOE,
}


@dataclass(frozen=True)
class LayerDims:
    """The sizes one layer is built with (see :meth:`HybridConfig.layer_dims`)."""

    kind: str
    ffn_hidden_size: int
    num_attention_heads: int
    mamba_num_heads: int
    mamba_head_dim: int
    mamba_num_groups: int
    mamba_state_dim: int
    num_moe_experts: int = 0
    moe_ffn_hidden_size: int = 0
    moe_shared_expert_intermediate_size: int = 0
    moe_router_topk: int = 0

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_num_heads * self.mamba_head_dim

    @property
    def mamba_conv_dim(self) -> int:
        # conv1d covers [x, B, C] = [d_inner, G*N, G*N]
        return self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim

    @property
    def mamba_in_proj_dim(self) -> int:
        # in_proj -> [z, x, B, C, dt] = [d_inner, d_inner, G*N, G*N, H]
        return 2 * self.mamba_d_inner + 2 * self.mamba_num_groups * self.mamba_state_dim + self.mamba_num_heads


@dataclass(kw_only=True)
class HybridConfig:
    """Shape and numerics of a Nemotron-H style hybrid Mamba-2 / attention / MLP language model."""

    pattern: str
    """Layer pattern, one symbol per layer: M Mamba-2, * attention, - MLP, E mixture of experts; | = stage boundary."""
    vocab_size: int
    """Number of token ids (rows of the embedding and of the output layer)."""
    hidden_size: int
    """Width of the residual stream."""
    ffn_hidden_size: int
    """Intermediate width of each MLP (squared-ReLU, no gate)."""
    num_attention_heads: int
    """Query heads per attention layer."""
    num_query_groups: int
    """Key/value heads per attention layer (GQA); must divide num_attention_heads."""
    head_dim: int
    """Channels per attention head (need not equal hidden_size / num_attention_heads)."""
    mamba_num_heads: int
    """Mamba-2 heads per Mamba layer; d_inner = mamba_num_heads * mamba_head_dim."""
    mamba_head_dim: int
    """Channels per Mamba-2 head."""
    mamba_num_groups: int
    """B/C groups per Mamba layer; must divide mamba_num_heads (heads split evenly over groups)."""
    mamba_state_dim: int
    """SSM state size N per group."""
    mamba_conv_kernel: int = 4
    """Width of the causal depthwise convolution over [x, B, C]."""
    mamba_chunk_size: int = 128
    """Chunk length of the chunked SSD scan (numerics do not depend on it beyond rounding)."""
    mamba_dt_min: float = 0.001
    """Lower end of the log-uniform dt initialisation range."""
    mamba_dt_max: float = 0.1
    """Upper end of the log-uniform dt initialisation range."""
    mamba_dt_init_floor: float = 1e-4
    """Smallest dt at initialisation."""
    mamba_dt_limit: tuple[float, float] = (0.001, math.inf)
    """Clamp applied to softplus(dt + dt_bias) in the forward pass (NemotronH: (dt_min, inf))."""
    mamba_conv_bias: bool = True
    """Bias on the depthwise convolution."""
    mamba_proj_bias: bool = False
    """Bias on the Mamba in_proj and out_proj."""
    mlp_bias: bool = False
    """Bias on the MLP up/down projections."""
    norm_eps: float = 1e-5
    """Epsilon of every RMSNorm (block norms, final norm, Mamba gated norm)."""
    init_std: float = 0.02
    """Standard deviation of the normal initialisation of linear and embedding weights."""
    rescale_prenorm_residual: bool = True
    """Initialise Mamba out_proj with kaiming-uniform / sqrt(num_layers), as NemotronH does."""
    tie_embeddings: bool = False
    """Share the embedding matrix with the output layer."""
    num_moe_experts: int = 0
    """Routed experts per mixture-of-experts ('E') layer (required with 'E' layers)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int = 0
    """Intermediate width of each routed expert (squared-ReLU, no gate; required with 'E' layers)."""
    moe_shared_expert_intermediate_size: int = 0
    """Intermediate width of the shared expert every token passes through (required with 'E' layers)."""
    moe_router_num_groups: int = 1
    """Expert groups of group-limited routing (experts split evenly; 1 = no grouping)."""
    moe_router_group_topk: int = 1
    """Groups a token may pick its experts from (by the sum of each group's two best scores)."""
    moe_router_topk_scaling_factor: float = 1.0
    """Multiplier of the routing weights (nemotron_h's routed_scaling_factor)."""
    moe_norm_topk_prob: bool = True
    """Normalise each token's top-k sigmoid scores to sum to one (before the scaling factor)."""
    moe_latent_size: int = 0
    """Routed experts work in a latent space of this width (projections in and out); 0 = hidden size."""
    ffn_hidden_size_per_layer: list[int] | None = None
    """Heterogeneous models: one FFN size per MLP ('-') layer, in pattern order (else ffn_hidden_size)."""
    num_attention_heads_per_layer: list[int] | None = None
    """Heterogeneous models: query heads per attention ('*') layer, in pattern order."""
    mamba_num_heads_per_layer: list[int] | None = None
    """Heterogeneous models: Mamba heads per Mamba ('M') layer, in pattern order."""
    mamba_head_dim_per_layer: list[int] | None = None
    """Heterogeneous models: Mamba head_dim per Mamba ('M') layer, in pattern order."""
    num_moe_experts_per_layer: list[int] | None = None
    """Heterogeneous models: routed experts per MoE ('E') layer, in pattern order."""
    moe_ffn_hidden_size_per_layer: list[int] | None = None
    """Heterogeneous models: expert FFN width per MoE ('E') layer, in pattern order."""
    moe_shared_expert_intermediate_size_per_layer: list[int] | None = None
    """Heterogeneous models: shared-expert width per MoE ('E') layer, in pattern order."""
    moe_router_topk_per_layer: list[int] | None = None
    """Heterogeneous models: top-k per MoE ('E') layer, in pattern order."""
    _layers: list[str] = field(init=False, repr=False, compare=False)
    _stages: list[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        limit = self.mamba_dt_limit
        if isinstance(limit, (str, bytes)) or not isinstance(limit, (list, tuple)) or len(limit) != 2 or \
                any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in limit):  # fmt: skip
            raise ConfigError(f"model.mamba_dt_limit={shown(limit)} is invalid; give [low, high] with 0 <= low < high "
                              "(high may be inf)")  # fmt: skip
        self.mamba_dt_limit = tuple(float(v) for v in limit)  # YAML/JSON give lists
        self._layers, self._stages = parse_pattern(self.pattern)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        positive = [
            "vocab_size", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "head_dim", "mamba_num_heads", "mamba_head_dim", "mamba_num_groups", "mamba_state_dim",
            "mamba_conv_kernel", "mamba_chunk_size",
        ]  # fmt: skip
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={shown(value)} is invalid; it must be a positive integer")
            if value > MAX_DIM:
                raise ConfigError(f"model.{name}={shown(value)} is out of range; it must be at most {MAX_DIM:,}")
        for name in ("mamba_conv_bias", "mamba_proj_bias", "mlp_bias", "rescale_prenorm_residual", "tie_embeddings"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name}={shown(getattr(self, name))} is invalid; it must be true or false")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"model.num_attention_heads={self.num_attention_heads} is not divisible by "
                f"model.num_query_groups={self.num_query_groups}; pick KV heads that divide the query heads"
            )
        if self.mamba_num_heads % self.mamba_num_groups:
            raise ConfigError(
                f"model.mamba_num_heads={self.mamba_num_heads} is not divisible by "
                f"model.mamba_num_groups={self.mamba_num_groups}; heads are split evenly over groups, "
                "so pick a group count that divides the head count"
            )
        for name in ("norm_eps", "init_std", "mamba_dt_min", "mamba_dt_max", "mamba_dt_init_floor"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < math.inf:
                raise ConfigError(f"model.{name}={shown(value)} is invalid; it must be a positive finite number")
        if self.mamba_dt_min > self.mamba_dt_max:
            raise ConfigError(
                f"model.mamba_dt_min={self.mamba_dt_min} exceeds model.mamba_dt_max={self.mamba_dt_max}; "
                "swap them"
            )
        for name, symbol in _PER_LAYER_FIELDS.items():
            values = getattr(self, name)
            if values is None:
                continue
            count = self._layers.count(symbol)
            if not isinstance(values, (list, tuple)) or len(values) != count:
                raise ConfigError(
                    f"model.{name} has {len(values) if isinstance(values, (list, tuple)) else shown(values)} "
                    f"entries but the pattern has {count} {LAYER_NAMES[symbol]} layers; give one per layer"
                )
            for v in values:
                if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= MAX_DIM:
                    raise ConfigError(f"model.{name} contains {shown(v)}; every entry must be a positive integer "
                                      f"(at most {MAX_DIM:,})")  # fmt: skip
            setattr(self, name, list(values))
        for i in range(len(self._layers)):
            dims = self.layer_dims(i)
            if dims.kind == MAMBA and dims.mamba_num_heads % self.mamba_num_groups:
                raise ConfigError(
                    f"layer {i}: {dims.mamba_num_heads} Mamba heads are not divisible by "
                    f"model.mamba_num_groups={self.mamba_num_groups}; keep the same number of heads in every group"
                )
            if dims.kind == ATTENTION and dims.num_attention_heads % self.num_query_groups:
                raise ConfigError(
                    f"layer {i}: {dims.num_attention_heads} query heads are not divisible by "
                    f"model.num_query_groups={self.num_query_groups}; keep the same number per KV group"
                )
        if MOE in self._layers:
            self._validate_moe()
        lo, hi = self.mamba_dt_limit if len(self.mamba_dt_limit) == 2 else (None, None)
        if lo is None or not (0.0 <= lo < hi):
            raise ConfigError(
                f"model.mamba_dt_limit={list(self.mamba_dt_limit)} is invalid; give [low, high] with "
                "0 <= low < high (high may be inf)"
            )

    def _validate_moe(self) -> None:
        for name in ("num_moe_experts", "moe_router_topk", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
                     "moe_router_num_groups", "moe_router_group_topk"):  # fmt: skip
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"model.{name}={value!r} is invalid; the pattern has MoE ('E') layers, "
                                  "so it must be a positive integer")  # fmt: skip
        latent = self.moe_latent_size
        if isinstance(latent, bool) or not isinstance(latent, int) or latent < 0:
            raise ConfigError(f"model.moe_latent_size={latent!r} is invalid; give 0 (no latent space) or a positive width")
        scale = self.moe_router_topk_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
            raise ConfigError(f"model.moe_router_topk_scaling_factor={scale!r} is invalid; it must be a positive number")
        if not isinstance(self.moe_norm_topk_prob, bool):
            raise ConfigError(f"model.moe_norm_topk_prob={self.moe_norm_topk_prob!r} is invalid; use true or false")
        groups = self.moe_router_num_groups
        if self.moe_router_group_topk > groups:
            raise ConfigError(f"model.moe_router_group_topk={self.moe_router_group_topk} exceeds "
                              f"model.moe_router_num_groups={groups}; pick at most {groups}")  # fmt: skip
        for i in (i for i, kind in enumerate(self._layers) if kind == MOE):
            d = self.layer_dims(i)
            at = f"layer {i}: " if self.is_heterogeneous else ""
            experts, topk = d.num_moe_experts, d.moe_router_topk
            if experts % groups or experts // groups < 2:
                raise ConfigError(f"{at}model.moe_router_num_groups={groups} does not split {experts} routed experts "
                                  "(model.num_moe_experts) into equal groups of at least 2 experts; pick a group "
                                  "count that does")  # fmt: skip
            reachable = self.moe_router_group_topk * (experts // groups)
            if topk > reachable:
                raise ConfigError(f"{at}model.moe_router_topk={topk} exceeds the {reachable} experts of the "
                                  f"{self.moe_router_group_topk} group(s) a token may use; lower the top-k or raise "
                                  "model.moe_router_group_topk")  # fmt: skip

    @property
    def moe_expert_input_size(self) -> int:
        """Width the routed experts read and write: the latent size, else the hidden size."""
        return self.moe_latent_size or self.hidden_size

    # ------------------------------------------------------------------ derived shapes
    @property
    def layer_types(self) -> list[str]:
        """One symbol per layer, pipeline separators removed."""
        return list(self._layers)

    @property
    def stage_layer_counts(self) -> list[int]:
        """Layers per pipeline stage as written with '|' in the pattern (one stage if none)."""
        return list(self._stages)

    @property
    def num_layers(self) -> int:
        return len(self._layers)

    @property
    def is_heterogeneous(self) -> bool:
        """True when some layer has its own size (the per-layer lists are set)."""
        return any(getattr(self, name) is not None for name in _PER_LAYER_FIELDS)

    def layer_dims(self, index: int) -> "LayerDims":
        """The sizes of layer ``index`` (per-layer lists override the model-wide sizes)."""
        kind = self._layers[index]
        nth = self._layers[:index].count(kind)

        def pick(name: str, default: int) -> int:
            values = getattr(self, name)
            return values[nth] if values is not None and _PER_LAYER_FIELDS[name] == kind else default

        return LayerDims(
            kind=kind,
            ffn_hidden_size=pick("ffn_hidden_size_per_layer", self.ffn_hidden_size),
            num_attention_heads=pick("num_attention_heads_per_layer", self.num_attention_heads),
            mamba_num_heads=pick("mamba_num_heads_per_layer", self.mamba_num_heads),
            mamba_head_dim=pick("mamba_head_dim_per_layer", self.mamba_head_dim),
            mamba_num_groups=self.mamba_num_groups,
            mamba_state_dim=self.mamba_state_dim,
            num_moe_experts=pick("num_moe_experts_per_layer", self.num_moe_experts),
            moe_ffn_hidden_size=pick("moe_ffn_hidden_size_per_layer", self.moe_ffn_hidden_size),
            moe_shared_expert_intermediate_size=pick("moe_shared_expert_intermediate_size_per_layer",
                                                     self.moe_shared_expert_intermediate_size),
            moe_router_topk=pick("moe_router_topk_per_layer", self.moe_router_topk),
        )

    def _model_wide_dims(self) -> "LayerDims":
        return LayerDims(kind=MAMBA, ffn_hidden_size=self.ffn_hidden_size, num_attention_heads=self.num_attention_heads,
                         mamba_num_heads=self.mamba_num_heads, mamba_head_dim=self.mamba_head_dim,
                         mamba_num_groups=self.mamba_num_groups, mamba_state_dim=self.mamba_state_dim)  # fmt: skip

    @property
    def mamba_d_inner(self) -> int:
        """Model-wide Mamba width (a heterogeneous layer's own: ``layer_dims(i).mamba_d_inner``)."""
        return self._model_wide_dims().mamba_d_inner

    @property
    def mamba_conv_dim(self) -> int:
        return self._model_wide_dims().mamba_conv_dim

    @property
    def mamba_in_proj_dim(self) -> int:
        return self._model_wide_dims().mamba_in_proj_dim

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}
        out["mamba_dt_limit"] = list(self.mamba_dt_limit)
        for name in _PER_LAYER_FIELDS:  # omitted when unset, so homogeneous configs stay short
            if out[name] is None:
                del out[name]
            else:
                out[name] = list(out[name])
        if MOE not in self._layers:  # and dense models keep the keys they always had
            for name in MOE_FIELDS:
                del out[name]
        return out

    @classmethod
    def from_dict(cls, data: dict, *, where: str = "model config") -> "HybridConfig":
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            import difflib

            hints = [difflib.get_close_matches(k, known, n=1) for k in unknown]
            hint = "; ".join(f"{k!r} (did you mean {h[0]!r}?)" if h else repr(k) for k, h in zip(unknown, hints))
            raise ConfigError(f"{where}: unknown key(s) {hint}; valid keys: {', '.join(sorted(known))}")
        required = {f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{where}: missing required key(s) {', '.join(missing)}")
        return cls(**data)


def num_parameters(config: HybridConfig) -> dict[str, int]:
    """Parameter count per component, computed from the shapes alone (no model is built).

    Keys: ``embedding``, ``output_layer`` (0 when tied), ``final_norm`` and ``layer{i}`` for each
    layer (its pre-norm included). Equal to the ``numel`` of a built :class:`HybridLM`.
    """
    c = config
    d = c.hidden_size
    counts = {"embedding": c.vocab_size * d}
    for i, kind in enumerate(c.layer_types):
        L = c.layer_dims(i)
        n = d  # pre-norm weight
        if kind == MAMBA:
            n += d * L.mamba_in_proj_dim + (L.mamba_in_proj_dim if c.mamba_proj_bias else 0)
            n += L.mamba_conv_dim * c.mamba_conv_kernel + (L.mamba_conv_dim if c.mamba_conv_bias else 0)
            n += 3 * L.mamba_num_heads  # dt_bias, A_log, D
            n += L.mamba_d_inner  # gated norm weight
            n += L.mamba_d_inner * d + (d if c.mamba_proj_bias else 0)
        elif kind == ATTENTION:
            q = L.num_attention_heads * c.head_dim
            kv = c.num_query_groups * c.head_dim
            n += d * (q + 2 * kv) + q * d
        elif kind == MOE:
            n += moe_parameters(c, i)["total"]
        else:
            f = L.ffn_hidden_size
            n += 2 * d * f + ((f + d) if c.mlp_bias else 0)
        counts[f"layer{i}"] = n
    counts["final_norm"] = d
    counts["output_layer"] = 0 if c.tie_embeddings else c.vocab_size * d
    return counts


def moe_parameters(config: HybridConfig, layer: int | None = None) -> dict[str, int]:
    """Parameters of one MoE mixer (its block's pre-norm excluded) of layer ``layer`` (None: the model-wide
    sizes): ``router`` (its weight rows), ``experts`` (all routed experts), ``expert`` (one of them),
    ``shared``, ``latent`` (both projections), ``total`` and ``active`` (what one token uses: router, shared
    expert, latent projections and top-k experts)."""
    c = config
    if layer is None:
        n_exp, f, s, topk = (c.num_moe_experts, c.moe_ffn_hidden_size, c.moe_shared_expert_intermediate_size,
                             c.moe_router_topk)  # fmt: skip
    else:
        L = c.layer_dims(layer)
        n_exp, f, s, topk = L.num_moe_experts, L.moe_ffn_hidden_size, L.moe_shared_expert_intermediate_size, L.moe_router_topk
    d, din, bias = c.hidden_size, c.moe_expert_input_size, c.mlp_bias
    expert = 2 * din * f
    shared = 2 * d * s + ((s + d) if bias else 0)
    latent = (2 * d * c.moe_latent_size + ((c.moe_latent_size + d) if bias else 0)) if c.moe_latent_size else 0
    router = n_exp * d
    counts = {"router": router, "experts": n_exp * expert, "expert": expert, "shared": shared, "latent": latent}
    counts["total"] = router + counts["experts"] + shared + latent
    counts["active"] = router + topk * expert + shared + latent
    return counts


def active_parameters(config: HybridConfig) -> int:
    """Parameters one token uses: the total of :func:`num_parameters` minus, in every MoE ('E')
    layer, the routed experts beyond its top-k (see ``moe_parameters``'s ``active``)."""
    unused = 0
    for i, kind in enumerate(config.layer_types):
        if kind == MOE:
            counts = moe_parameters(config, i)
            unused += counts["total"] - counts["active"]
    return sum(num_parameters(config).values()) - unused


# ---------------------------------------------------------------------- presets
def _tiny() -> HybridConfig:
    # ~0.85M parameters: trains in seconds on 2 CPU cores; every axis of the parent is non-trivial
    # (2 Mamba groups, GQA, head_dim != hidden/heads) so that later elastic tests exercise them.
    return HybridConfig(
        pattern="M-M*-M-",
        vocab_size=512,
        hidden_size=128,
        ffn_hidden_size=384,
        num_attention_heads=4,
        num_query_groups=2,
        head_dim=48,
        mamba_num_heads=8,
        mamba_head_dim=32,
        mamba_num_groups=2,
        mamba_state_dim=32,
        mamba_chunk_size=64,
    )


def _tiny_moe() -> HybridConfig:
    # The tiny parent with two of its MLP layers made mixture-of-experts ('E'): 8 routed experts in 2 routing
    # groups (top 2 from the best group), a shared expert; for the CPU MoE demo and tests.
    return dataclasses.replace(_tiny(), pattern="M-ME*ME", num_moe_experts=8, moe_router_topk=2,
                               moe_ffn_hidden_size=128, moe_shared_expert_intermediate_size=192,
                               moe_router_num_groups=2, moe_router_group_topk=1)  # fmt: skip


def _nemotron_nano_12b_v2() -> HybridConfig:
    # Nemotron Nano V2 12B (PAPER.md): 62 layers (28 M, 6 *, 28 -).
    pattern = "M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M*-M-M-M-M-"
    return HybridConfig(
        pattern=pattern,
        vocab_size=131072,
        hidden_size=5120,
        ffn_hidden_size=20480,
        num_attention_heads=40,
        num_query_groups=8,
        head_dim=128,
        mamba_num_heads=128,
        mamba_head_dim=80,
        mamba_num_groups=8,
        mamba_state_dim=128,
        mamba_chunk_size=128,
    )


def _nemotron_3_nano_30b_a3b() -> HybridConfig:
    # Nemotron 3 Nano 30B-A3B: 52 layers (23 M, 23 E, 6 *), 128 routed experts (top 6) + a shared expert;
    # the published shape (Megatron-LM's post-training recipe for the BF16 checkpoint).
    return HybridConfig(
        pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME",
        vocab_size=131072,
        hidden_size=2688,
        ffn_hidden_size=1856,
        num_attention_heads=32,
        num_query_groups=2,
        head_dim=128,
        mamba_num_heads=64,
        mamba_head_dim=64,
        mamba_num_groups=8,
        mamba_state_dim=128,
        mamba_chunk_size=128,
        init_std=0.0173,
        num_moe_experts=128,
        moe_router_topk=6,
        moe_ffn_hidden_size=1856,
        moe_shared_expert_intermediate_size=3712,
        moe_router_topk_scaling_factor=2.5,
    )


PRESETS = {"tiny": _tiny, "tiny-moe": _tiny_moe, "nemotron-nano-12b-v2": _nemotron_nano_12b_v2,
           "nemotron-3-nano-30b-a3b": _nemotron_3_nano_30b_a3b}  # fmt: skip


def preset(name: str) -> HybridConfig:
    """A named model shape: ``tiny`` and ``tiny-moe`` (CPU demos and tests), ``nemotron-nano-12b-v2`` or
    ``nemotron-3-nano-30b-a3b``."""
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
