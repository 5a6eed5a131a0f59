"""Every budget of a many-in-one checkpoint served from one copy of the parent's weights.

``ElasticModel.load(CKPT).at_budget(0.5)`` returns a runnable :class:`~megatron_elastic.model.HybridLM`
whose parameters are *views* of the parent's tensors: after importance permutation a budget keeps
a prefix of every axis (inside each group for grouped axes), so each kept block of a weight matrix
is a strided view of the parent's matrix. Holding all budgets costs the parent's memory plus a few
module objects.

How a child is laid out (the slice plan :func:`megatron_elastic.elastic.space.slice_plan` that
:func:`megatron_elastic.elastic.extract` copies with):

* a matrix whose kept rows and columns are each one contiguous range (embedding, output layer,
  MLP up/down with a prefix of neurons) is a single 2-D view in an ``nn.Linear``;
* a matrix whose kept rows or columns fall into several ranges (Mamba ``in_proj`` packs
  ``[z, x, B, C, dt]``; heads kept inside each group; trimmed Mamba head channels) becomes a
  :class:`ViewLinear`: a grid of 2-D views, outputs of row blocks concatenated, products of
  column blocks summed;
* vectors and the depthwise conv kernel (O(width) numbers) are views when their kept entries are
  one range and small gathered copies otherwise (``copied_bytes`` reports them);
* an MoE layer's stacked ``(experts, out, in)`` expert tensors are one 3-D view when the kept
  experts are one range (``experts[:k]`` of a layer without routing groups), else a list of
  per-expert 2-D views (a prefix inside every group); the router's rows and its correction bias
  follow the experts (small gathered copies where the experts are not one range).

``at_budget(B, contiguous=True)`` returns the extracted copy instead (one GEMM per projection,
the fastest layout; costs the child's memory).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from megatron_elastic.errors import CheckpointError
from megatron_elastic.model.layout import Index, Take, as_index, is_all, take


def index_runs(idx: torch.Tensor | list[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive indices, in order: [0,1,2,5,6] -> [(0, 3), (5, 7)]."""
    values = idx.tolist() if torch.is_tensor(idx) else list(idx)
    out, start, prev = [], values[0], values[0]
    for i in values[1:]:
        if i != prev + 1:
            out.append((start, prev + 1))
            start = i
        prev = i
    out.append((start, prev + 1))
    return out


class ViewLinear(nn.Module):
    """``y = x W[rows][:, cols]^T + b[rows]`` computed from 2-D views of ``W``, without gathering it.

    ``W[rows][:, cols]`` is cut into blocks at the breaks of ``rows`` and ``cols``; block (i, j) is
    ``W[r_i, c_j]``, a strided view. The input is split at the column breaks; each output row block
    is the sum over column blocks of ``F.linear(x_j, block_ij)``; row blocks are concatenated.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: torch.Tensor, cols: torch.Tensor):
        super().__init__()
        self.row_runs, self.col_runs = index_runs(rows), index_runs(cols)
        self.out_features, self.in_features = len(rows), len(cols)
        self.col_sizes = [b - a for a, b in self.col_runs]
        self.blocks = nn.ParameterList(
            nn.Parameter(weight[r0:r1, c0:c1], requires_grad=False) for r0, r1 in self.row_runs for c0, c1 in self.col_runs
        )  # fmt: skip
        self.biases = None
        if bias is not None:
            self.biases = nn.ParameterList(nn.Parameter(bias[r0:r1], requires_grad=False) for r0, r1 in self.row_runs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.split(self.col_sizes, dim=-1) if len(self.col_sizes) > 1 else (x,)
        nc = len(xs)
        outs = []
        for i in range(len(self.row_runs)):
            acc = None
            for j, xj in enumerate(xs):
                bias = self.biases[i] if self.biases is not None and j == 0 else None
                y = F.linear(xj, self.blocks[i * nc + j], bias)
                acc = y if acc is None else acc.add_(y)
            outs.append(acc)
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, blocks={len(self.row_runs)}x{len(self.col_runs)}"


class _MetaSkeleton(TorchFunctionMode):
    """Build modules on the meta device without running their initialisers. In-place init ops on
    meta tensors compute nothing anyway, but ``normal_`` has no C++ meta kernel and its Python
    decomposition imports ~800 modules (~75 MB of RSS) the first time it runs."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):  # in place: nn.init.normal_(tensor=...), w.zero_()
            target = args[0] if args else kwargs.get("tensor")
            if torch.is_tensor(target) and target.is_meta:
                return target
        with torch.device("meta"):
            return func(*args, **kwargs)


def _runs(idx: Index, n: int) -> list[tuple[int, int]]:
    """:func:`index_runs` of ``idx`` on an axis of size ``n``."""
    if isinstance(idx, slice):
        start, stop, _ = idx.indices(n)
        return [(start, stop)]
    return index_runs(idx)


class _Builder:
    """Fills a child skeleton (built on the meta device) with views of the parent's tensors."""

    def __init__(self):
        self.copied_bytes = 0

    def pick(self, t: torch.Tensor, idx: Index, dim: int = 0) -> torch.Tensor:
        """``t`` indexed by ``idx`` along ``dim``: a view when ``idx`` is one range, else a gathered copy."""
        runs = _runs(idx, t.shape[dim])
        if len(runs) == 1:
            return take(t, slice(*runs[0]), dim)
        out = t.index_select(dim, idx.to(t.device))
        self.copied_bytes += out.numel() * out.element_size()
        return out

    def cut(self, t: torch.Tensor, plan: Take) -> torch.Tensor:
        """``t`` cut along every dimension of ``plan`` (rows and columns; experts first for stacked tensors)."""
        out = t
        for idx, dim in plan.dims:
            if not is_all(idx):
                out = self.pick(out, idx, dim)
        return out

    def set(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = module._parameters[name]
        assert tuple(old.shape) == tuple(value.shape), (name, tuple(old.shape), tuple(value.shape))
        module._parameters[name] = nn.Parameter(value, requires_grad=False)

    def stacked(self, module: nn.Module, name: str, t: torch.Tensor, plan: Take) -> None:
        """A stacked ``(experts, out, in)`` parameter: one 3-D view when the kept experts are one range, else
        a list of per-expert 2-D views (``module.name[e]`` is expert ``e``'s matrix either way)."""
        experts = _runs(plan.experts, t.shape[0])
        if len(experts) == 1:
            return self.set(module, name, self.cut(t, plan))
        old = module._parameters.pop(name)
        rows_cols = Take(plan.rows, plan.cols)
        views = nn.ParameterList(nn.Parameter(self.cut(t[e], rows_cols), requires_grad=False)
                                 for e in as_index(plan.experts, t.shape[0]).tolist())  # fmt: skip
        assert (len(views), *views[0].shape) == tuple(old.shape), (name, tuple(old.shape))
        setattr(module, name, views)

    def set_buffer(self, module: nn.Module, name: str, value: torch.Tensor) -> None:
        old = module._buffers[name]
        assert tuple(old.shape) == tuple(value.shape), (name, tuple(old.shape), tuple(value.shape))
        module._buffers[name] = value

    def linear(self, parent: nn.Module, name: str, weight, bias, plan: Take) -> None:
        old = getattr(parent, name)
        row_runs, col_runs = _runs(plan.rows, weight.shape[0]), _runs(plan.cols, weight.shape[1])
        if len(row_runs) == 1 and len(col_runs) == 1:
            (r0, r1), (c0, c1) = row_runs[0], col_runs[0]
            self.set(old, "weight", weight[r0:r1, c0:c1])  # the skeleton's nn.Linear, now backed by a view
            if bias is not None:
                self.set(old, "bias", bias[r0:r1])
            new = old
        else:
            new = ViewLinear(weight, bias, as_index(plan.rows, weight.shape[0]), as_index(plan.cols, weight.shape[1]))
        assert (new.out_features, new.in_features) == (old.out_features, old.in_features), name
        setattr(parent, name, new)


@torch.no_grad()
def view_child(model, arch):
    """The child of ``model`` (a permuted parent ``HybridLM``) for ``arch`` with its parameters as views
    of ``model``'s tensors. Computes what ``extract(model, arch)`` computes.

    Returns ``(child, copied_bytes)``: the bytes of the few small tensors that had to be gathered.
    """
    from megatron_elastic.elastic.space import child_config, child_name, slice_plan
    from megatron_elastic.model.hybrid import HybridLM

    cfg = model.config
    with _MetaSkeleton():
        child = HybridLM(child_config(cfg, arch), init=False)
    b = _Builder()
    p = {k: v.detach() for k, v in model.state_dict(keep_vars=True).items()}
    device = next(iter(p.values())).device
    plan = slice_plan(cfg, arch)
    parent_name = {child_name(arch, name): name for name in plan}  # child parameter -> the parent's
    for name, module in list(child.named_modules()):
        prefix = f"{name}." if name else ""
        if isinstance(module, nn.Linear):
            owner, _, attr = name.rpartition(".")
            weight, bias = parent_name[prefix + "weight"], parent_name.get(prefix + "bias")
            b.linear(child.get_submodule(owner), attr, p[weight], None if bias is None else p[bias], plan[weight])
        elif not isinstance(module, ViewLinear):
            for attr in [a for a, t in module._parameters.items() if t is not None]:
                src = parent_name[prefix + attr]
                if plan[src].experts is None:
                    b.set(module, attr, b.cut(p[src], plan[src]))
                else:
                    b.stacked(module, attr, p[src], plan[src])
            for attr, t in [(a, t) for a, t in module._buffers.items() if t is not None]:
                src = parent_name.get(prefix + attr)
                if src is not None:  # a saved buffer (an MoE router's correction bias): cut like a parameter
                    b.set_buffer(module, attr, b.cut(p[src], plan[src]))
                else:  # a training-only counter (not saved): fresh zeros of the child's size
                    b.set_buffer(module, attr, torch.zeros(t.shape, dtype=t.dtype, device=device))
    left = [n for n, t in list(child.named_parameters()) + list(child.named_buffers()) if t.is_meta]
    assert not left, f"view child left unset: {left[:5]}"
    return child.eval(), b.copied_bytes


def budget_architecture(metadata: dict, budget: float | str):
    """The architecture a many-in-one checkpoint's ``elastic.json`` (``metadata``) resolved for ``budget``."""
    from megatron_elastic.elastic.manyinone import budget_key
    from megatron_elastic.elastic.space import Architecture

    archs = metadata["architectures"]
    try:
        key = budget_key(float(budget))
    except (TypeError, ValueError):
        raise CheckpointError(f"budget {budget!r} is not a number; give one of {', '.join(archs)}") from None
    if key not in archs:
        raise CheckpointError(f"budget {budget} is not in this checkpoint; it holds {', '.join(archs)}")
    return Architecture.from_dict(archs[key])


class ElasticModel:
    """A many-in-one checkpoint in memory: the parent once, any budget on demand.

    ``ElasticModel.load(path)`` reads the parent and the resolved architecture of every budget;
    ``at_budget(B)`` returns a view child (``contiguous=True``: an extracted copy). The parent is
    frozen (no gradients): this is for inference.
    """

    def __init__(self, parent, metadata: dict, path: str | Path | None = None):
        self.parent = parent.eval().requires_grad_(False)
        self.metadata = metadata
        self.path = None if path is None else Path(path)

    @classmethod
    def load(cls, path: str | Path, *, dtype: torch.dtype | None = torch.float32, device: str | torch.device | None = None):
        """Load a many-in-one checkpoint (``RUN_DIR/many-in-one``). ``dtype=None`` keeps the stored dtype."""
        from megatron_elastic.api import load_pretrained
        from megatron_elastic.elastic.manyinone import read_metadata

        path = Path(path)
        if not path.is_dir():
            raise CheckpointError(f"many-in-one checkpoint {str(path)!r} is not a directory; give RUN_DIR/many-in-one of an elastic run")
        meta = read_metadata(path)  # before reading weights
        parent = load_pretrained(path, dtype=dtype)
        if device is not None:
            parent = parent.to(device)
        return cls(parent, meta, path)

    @property
    def budgets(self) -> list[float]:
        return [float(k) for k in self.metadata["architectures"]]

    def architecture(self, budget: float | str):
        """The resolved :class:`~megatron_elastic.elastic.Architecture` of ``budget`` (a fraction, e.g. 0.5)."""
        return budget_architecture(self.metadata, budget)

    def at_budget(self, budget: float | str, contiguous: bool = False):
        """A runnable child ``HybridLM`` for ``budget``: its parameters are views of the parent's tensors
        (``contiguous=False``) or a standalone extracted copy (``contiguous=True``)."""
        arch = self.architecture(budget)
        if contiguous:
            from megatron_elastic.elastic.slicing import extract

            return extract(self.parent, arch).eval().requires_grad_(False)
        child, _ = view_child(self.parent, arch)
        return child

    def __repr__(self) -> str:
        where = f" from {self.path}" if self.path else ""
        return f"ElasticModel({self.parent.num_parameters():,} parameters, budgets {self.budgets}{where})"
