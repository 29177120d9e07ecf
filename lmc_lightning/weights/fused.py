"""BatchNorm fused with the ReLU (and residual addition) after it, for evaluating many points on a GPU.

Evaluating a path is memory-bound outside the convolutions: every BatchNorm, ReLU and residual ``+`` reads and writes
the whole activation, and the fused batch-norm kernel collects batch statistics at a fraction of the memory bandwidth.
:func:`fuse_norms` traces a net with ``torch.fx`` and replaces each ``BatchNorm2d`` -> ``ReLU`` and ``BatchNorm2d``
-> ``+ z`` -> ``ReLU`` chain (and each lone ``BatchNorm2d``) by one :class:`FusedBatchNorm` call, which on a CUDA
channels_last tensor is two Triton kernels: per-channel statistics when they are being collected (a BN-reset pass, see
:class:`lmc_lightning.weights.renorm._Pass`), then one pass ``relu(a * x + b + z)``. Elsewhere (CPU, other layouts,
no Triton) it computes the same with torch ops.

The fused module shares its parameters and buffers with the traced net, so weights copied into the net are what it
computes with. Semantics are those of the unfused net in eval mode (running statistics) or, inside a statistics pass,
of train-mode BN without buffer updates (batch statistics), up to float rounding: the fused chain rounds once, where
the unfused one rounds after every op.
"""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

try:  # Triton ships with CUDA builds of torch; without it (or on CPU) the torch fallback runs
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the installation
    triton = None

StatsHook = Callable[[Tensor, Tensor, Tensor], None]
"""``hook(x, mean, var)``: receives the batch mean and biased variance of a fused BN's input."""

_STATS_ROWS = 256
_APPLY_BLOCK = 4096


if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, rows, channels, ROWS: tl.constexpr, COLS: tl.constexpr):
        """Per-channel mean and sum of squared deviations of one ``ROWS x COLS`` tile of a ``[rows, channels]``
        row-major matrix (channels_last activations)."""
        pid_r, pid_c = tl.program_id(0), tl.program_id(1)
        r = pid_r * ROWS + tl.arange(0, ROWS)
        c = pid_c * COLS + tl.arange(0, COLS)
        mask = (r[:, None] < rows) & (c[None, :] < channels)
        x = tl.load(x_ptr + r[:, None].to(tl.int64) * channels + c[None, :], mask=mask, other=0.0).to(tl.float32)
        n = tl.minimum(rows - pid_r * ROWS, ROWS).to(tl.float32)
        mean = tl.sum(x, axis=0) / n
        d = tl.where(mask, x - mean[None, :], 0.0)
        tl.store(mean_ptr + pid_r * channels + c, mean, mask=c < channels)
        tl.store(m2_ptr + pid_r * channels + c, tl.sum(d * d, axis=0), mask=c < channels)

    @triton.jit
    def _apply_kernel(x_ptr, z_ptr, out_ptr, a_ptr, b_ptr, numel, channels, HAS_Z: tl.constexpr, RELU: tl.constexpr,
                      BLOCK: tl.constexpr):
        """``out = relu(a[c] * x + b[c] + z)`` over a channels_last tensor (``c = index % channels``)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        c = offs % channels
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(a_ptr + c, mask=mask, other=0.0)
        y += tl.load(b_ptr + c, mask=mask, other=0.0)
        if HAS_Z:
            y += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _nhwc(x: Tensor) -> bool:
    """Whether the Triton kernels can read ``x``: a 4-D channels_last CUDA tensor (channels the fastest dim)."""
    return (triton is not None and x.is_cuda and x.dim() == 4
            and x.is_contiguous(memory_format=torch.channels_last) and x.dtype in (torch.float32, torch.bfloat16,
                                                                                  torch.float16))


def channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel (dim 1) mean and biased variance of ``x`` in float64 (tile partials combined exactly).

    One read of ``x`` with the Triton kernel (CUDA, channels_last); a float32 copy with torch otherwise.
    """
    if not _nhwc(x):
        dims = [0, *range(2, x.dim())]
        var, mean = torch.var_mean(x.double(), dim=dims, correction=0)
        return mean, var
    c = x.shape[1]
    rows = x.numel() // c
    tiles = triton.cdiv(rows, _STATS_ROWS)
    cols = min(triton.next_power_of_2(c), 64)
    mean = torch.empty(tiles, c, device=x.device, dtype=torch.float32)
    m2 = torch.empty_like(mean)
    _stats_kernel[(tiles, triton.cdiv(c, cols))](x, mean, m2, rows, c, ROWS=_STATS_ROWS, COLS=cols, num_warps=8)
    # Chan et al.'s pairwise combination of the tile moments, in float64
    counts = torch.full((tiles, 1), float(_STATS_ROWS), device=x.device, dtype=torch.float64)
    counts[-1] = rows - (tiles - 1) * _STATS_ROWS
    mean, m2 = mean.double(), m2.double()
    total = (counts * mean).sum(0) / rows
    var = (m2.sum(0) + (counts * (mean - total).square()).sum(0)) / rows
    return total, var


def scale_shift(x: Tensor, a: Tensor, b: Tensor, z: Tensor | None = None, relu: bool = False) -> Tensor:
    """``relu?(a * x + b + z)`` with per-channel ``a``, ``b`` (``[C]``), in one pass where possible."""
    if _nhwc(x) and (z is None or (z.shape == x.shape and z.dtype == x.dtype and z.stride() == x.stride())):
        out = torch.empty_like(x)
        numel = x.numel()
        _apply_kernel[(triton.cdiv(numel, _APPLY_BLOCK),)](
            x, x if z is None else z, out, a.float().contiguous(), b.float().contiguous(), numel, x.shape[1],
            HAS_Z=z is not None, RELU=relu, BLOCK=_APPLY_BLOCK, num_warps=8)
        return out
    view = (1, -1, *[1] * (x.dim() - 2))
    dtype = _compute_dtype(x)
    y = x.to(dtype) * a.to(dtype).view(view) + b.to(dtype).view(view)
    if z is not None:
        y = y + z.to(dtype)
    return (y.relu() if relu else y).to(x.dtype)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise (half-precision activations are combined in float32)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class FusedBatchNorm(_BatchNorm):
    """``relu?(bn(x) + z?)`` in one pass; the parameters and buffers are those of the wrapped BatchNorm (shared).

    Args:
        bn: The BatchNorm to fuse (its tensors are shared, not copied).
        add: Whether the forward takes a second input ``z`` added after the normalisation.
        relu: Whether a ReLU follows.

    Attributes:
        stats_hook: When set (a statistics pass), the BN normalises by batch statistics and reports them to this
            :data:`StatsHook`; otherwise it uses its running statistics.
    """

    def __init__(self, bn: _BatchNorm, add: bool, relu: bool) -> None:
        nn.Module.__init__(self)
        for key in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, key, getattr(bn, key))
        self._parameters, self._buffers = bn._parameters, bn._buffers  # shared dicts: one set of tensors
        self.training = bn.training
        self.add, self.relu = add, relu
        self.stats_hook: StatsHook | None = None

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, add={self.add}, relu={self.relu}"

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """The fused chain; ``z`` is required exactly when the module was built with ``add=True``."""
        if (z is not None) != self.add:
            raise ValueError(f"FusedBatchNorm(add={self.add}) called with{'out' if z is None else ''} a residual.")
        if self.stats_hook is not None:
            mean, var = channel_stats(x)
            self.stats_hook(x, mean, var)
        elif self.training:
            raise RuntimeError("FusedBatchNorm evaluates; train with the original (unfused) net.")
        else:
            mean, var = self.running_mean, self.running_var
        dtype = _compute_dtype(x)
        scale = torch.rsqrt(var.to(dtype) + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.to(dtype)
        shift = -mean.to(dtype) * scale
        if self.bias is not None:
            shift = shift + self.bias.to(dtype)
        return scale_shift(x, scale, shift, z, self.relu)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), nn.ReLU)
    if node.op == "call_function":
        return node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace", False)
    return node.op == "call_method" and node.target == "relu"


def _is_add(node: fx.Node) -> bool:
    two = len(node.args) == 2 and not node.kwargs and all(isinstance(a, fx.Node) for a in node.args)
    return two and (node.op == "call_function" and node.target in (operator.add, torch.add)
                    or node.op == "call_method" and node.target == "add")


def fuse_norms(net: nn.Module) -> fx.GraphModule | None:
    """A traced copy of ``net`` with each BatchNorm2d (and the ReLU / residual add after it) fused.

    The copy shares every parameter and buffer with ``net``; ``net`` itself is not changed.

    Returns:
        The fused GraphModule, or None when ``net`` has no BatchNorm2d to fuse or cannot be traced by ``torch.fx``.
    """
    if not any(type(m) is nn.BatchNorm2d and m.track_running_stats for m in net.modules()):
        return None
    try:
        gm = fx.symbolic_trace(net)
    except Exception:  # noqa: BLE001 - any tracing failure means: evaluate the net as it is
        return None
    modules = dict(gm.named_modules())
    graph = gm.graph
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for node in list(graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        if type(bn) is not nn.BatchNorm2d or not bn.track_running_stats or len(node.args) != 1 or node.kwargs \
                or calls[node.target] > 1:
            continue
        users = list(node.users)
        last, z = node, None
        if len(users) == 1 and _is_relu(users[0], modules):
            last = users[0]
        elif len(users) == 1 and _is_add(users[0]) and len(users[0].users) == 1 \
                and _is_relu(next(iter(users[0].users)), modules):
            add = users[0]
            z = add.args[1] if add.args[0] is node else add.args[0]
            last = next(iter(add.users))
        with graph.inserting_before(last):
            fused = graph.call_module(node.target, (node.args[0],) if z is None else (node.args[0], z))
        last.replace_all_uses_with(fused)
        for dead in ([last, last.args[0], node] if z is not None else [last, node] if last is not node else [node]):
            graph.erase_node(dead)
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name,
                FusedBatchNorm(bn, add=z is not None, relu=last is not node))
    graph.lint()
    gm.recompile()
    return gm
