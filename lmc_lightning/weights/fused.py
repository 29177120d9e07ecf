"""BatchNorm fused with the ReLU (and residual addition) after it, for evaluating many points on a GPU.

Evaluating a path is memory-bound outside the convolutions: every BatchNorm, ReLU and residual ``+`` reads and writes
the whole activation, and the fused batch-norm kernel collects batch statistics at a fraction of the memory bandwidth.
:func:`fuse_norms` traces a net with ``torch.fx`` and replaces each ``BatchNorm2d`` -> ``ReLU`` and ``BatchNorm2d``
-> ``+ z`` -> ``ReLU`` chain (and each lone ``BatchNorm2d``) by one :class:`FusedBatchNorm` call, which on a CUDA
channels_last tensor runs Triton kernels: when statistics are being collected (a BN-reset pass, see
:class:`lmc_lightning.weights.renorm._Pass`), one read of the activation for per-channel moments and a small kernel
merging them into the batch-norm affine map; then one pass ``relu(a * x + b + z)``. A statistics pass may forward
several batches as one (``FusedBatchNorm.stats_groups``): each keeps its own statistics and affine map, in the same
kernels. Elsewhere (CPU, other layouts, no Triton) it computes the same with torch ops. Used by
:func:`~lmc_lightning.weights.evaluate.evaluate_path` on CUDA (``fuse_norms``).

The fused module shares its parameters and buffers with the traced net, so weights copied into the net are what it
computes with. Semantics are those of the unfused net in eval mode (running statistics) or, inside a statistics pass,
of train-mode BN without buffer updates (batch statistics), up to float rounding: the fused chain rounds once, where
the unfused one rounds after every op.
"""

from __future__ import annotations

import functools
import operator
import os
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

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
"""Triton's CPU interpreter is on (kernel tests on machines without a GPU)."""

_STATS_ROWS = 256
_STATS_PROGRAMS = 1024  # per call (split among groups); 256 and 4096 were 0-20% slower on an H100
_COMBINE_CHUNK = 64
_APPLY_BLOCK = 4096


if triton is not None:

    @triton.jit
    def _stats_kernel(x_ptr, mean_ptr, m2_ptr, group_rows, channels, rows_per_program, blocks, group_programs,
                      ROWS: tl.constexpr, COLS: tl.constexpr):
        """Per-channel mean and sum of squared deviations of one program's rows of a ``[rows, channels]`` row-major
        matrix (channels_last activations), whose rows form groups of ``group_rows`` (a program stays in its group):
        tile moments merged with Chan et al.'s update, in float32."""
        pid, pid_c = tl.program_id(0), tl.program_id(1)
        c = pid_c * COLS + tl.arange(0, COLS)
        group_start = (pid // group_programs) * group_rows
        start = group_start + (pid % group_programs) * rows_per_program
        stop = tl.minimum(start + rows_per_program, group_start + group_rows)
        n_acc = 0.0
        mean_acc = tl.zeros([COLS], dtype=tl.float32)
        m2_acc = tl.zeros([COLS], dtype=tl.float32)
        for j in range(0, blocks):
            r = start + j * ROWS + tl.arange(0, ROWS)
            mask = (r[:, None] < stop) & (c[None, :] < channels)
            x = tl.load(x_ptr + r[:, None].to(tl.int64) * channels + c[None, :], mask=mask, other=0.0)
            x = x.to(tl.float32)
            n = tl.minimum(tl.maximum(stop - start - j * ROWS, 0), ROWS).to(tl.float32)
            mean = tl.sum(x, axis=0) / tl.maximum(n, 1.0)
            d = tl.where(mask, x - mean[None, :], 0.0)
            total = n_acc + n
            delta = mean - mean_acc
            frac = n / tl.maximum(total, 1.0)
            mean_acc += delta * frac
            m2_acc += tl.sum(d * d, axis=0) + delta * delta * n_acc * frac
            n_acc = total
        tl.store(mean_ptr + pid * channels + c, mean_acc, mask=c < channels)
        tl.store(m2_ptr + pid * channels + c, m2_acc, mask=c < channels)

    @triton.jit
    def _combine_kernel(mean_ptr, m2_ptr, w_ptr, b_ptr, out_mean_ptr, out_var_ptr, scale_ptr, shift_ptr,
                        programs, rows, rows_per_program, channels, eps, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                        CHUNK: tl.constexpr, COLS: tl.constexpr):
        """Merge one group's ``programs`` moments (float64) into its batch mean and biased variance, and the BN's
        ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` (float32); the group is
        ``program_id(1)``, with ``rows`` rows."""
        c = tl.program_id(0) * COLS + tl.arange(0, COLS)
        cm = c < channels
        group = tl.program_id(1)
        mean_ptr += group * programs * channels
        m2_ptr += group * programs * channels
        out_mean_ptr += group * channels
        out_var_ptr += group * channels
        scale_ptr += group * channels
        shift_ptr += group * channels
        total = tl.zeros([COLS], dtype=tl.float64)
        for p0 in range(0, programs, CHUNK):
            p = p0 + tl.arange(0, CHUNK)
            n = tl.minimum(tl.maximum(rows - p * rows_per_program, 0), rows_per_program).to(tl.float64)
            m = tl.load(mean_ptr + p[:, None] * channels + c[None, :], mask=(p[:, None] < programs) & cm[None, :],
                        other=0.0).to(tl.float64)
            total += tl.sum(n[:, None] * m, axis=0)
        mean = total / rows
        m2 = tl.zeros([COLS], dtype=tl.float64)
        for p0 in range(0, programs, CHUNK):
            p = p0 + tl.arange(0, CHUNK)
            n = tl.minimum(tl.maximum(rows - p * rows_per_program, 0), rows_per_program).to(tl.float64)
            mask = (p[:, None] < programs) & cm[None, :]
            m = tl.load(mean_ptr + p[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float64)
            q = tl.load(m2_ptr + p[:, None] * channels + c[None, :], mask=mask, other=0.0).to(tl.float64)
            d = tl.where(mask, m - mean[None, :], 0.0)
            m2 += tl.sum(q + n[:, None] * d * d, axis=0)
        var = m2 / rows
        tl.store(out_mean_ptr + c, mean, mask=cm)
        tl.store(out_var_ptr + c, var, mask=cm)
        scale = 1.0 / tl.sqrt(var + eps)
        if HAS_W:
            scale = scale * tl.load(w_ptr + c, mask=cm, other=1.0).to(tl.float64)
        shift = -mean * scale
        if HAS_B:
            shift = shift + tl.load(b_ptr + c, mask=cm, other=0.0).to(tl.float64)
        tl.store(scale_ptr + c, scale.to(tl.float32), mask=cm)
        tl.store(shift_ptr + c, shift.to(tl.float32), mask=cm)

    @triton.jit
    def _apply_kernel(x_ptr, z_ptr, out_ptr, a_ptr, b_ptr, numel, channels, group_numel, HAS_Z: tl.constexpr,
                      RELU: tl.constexpr, GROUPED: tl.constexpr, BLOCK: tl.constexpr):
        """``out = relu(a[g, c] * x + b[g, c] + z)`` over a channels_last tensor (``c = index % channels``; with
        ``GROUPED``, group ``g = index // group_numel``, else ``g = 0``)."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < numel
        c = offs % channels
        if GROUPED:
            c += (offs // group_numel) * channels
        y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32) * tl.load(a_ptr + c, mask=mask, other=0.0)
        y += tl.load(b_ptr + c, mask=mask, other=0.0)
        if HAS_Z:
            y += tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if RELU:
            y = tl.maximum(y, 0.0)
        tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


@functools.cache
def supported(device: torch.device) -> bool:
    """Whether the Triton kernels run on ``device``: Triton installed and a CUDA GPU of compute capability 8.0 or
    newer (bf16 loads), or any device under Triton's CPU interpreter."""
    if triton is None:
        return False
    if _INTERPRET:
        return True
    return device.type == "cuda" and torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)


def _nhwc(x: Tensor) -> bool:
    """Whether the Triton kernels can read ``x``: a 4-D channels_last tensor (channels the fastest dim) on a
    :func:`supported` device."""
    return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and supported(x.device))


def _affine(var: Tensor, mean: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, dtype: torch.dtype
            ) -> tuple[Tensor, Tensor]:
    scale = torch.rsqrt(var.to(dtype) + eps)
    if weight is not None:
        scale = scale * weight.to(dtype)
    shift = -mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def channel_stats(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
                  groups: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-channel (dim 1) batch statistics of ``x`` and the batch-norm affine map they give.

    One read of ``x`` and two small kernels with Triton (CUDA, channels_last); torch ops (a float64 copy) otherwise.

    Args:
        x: Activations ``[N, C, ...]``.
        weight: The BN's scale ``[C]`` (None: ones).
        bias: The BN's shift ``[C]`` (None: zeros).
        eps: Added to the variance.
        groups: ``x`` holds this many batches of ``N / groups`` samples along dim 0, each with its own statistics
            (as if each were normalised on its own).

    Returns:
        ``(mean, var, scale, shift)``, each ``[C]`` (``[groups, C]`` when ``groups > 1``): float64 mean and biased
        variance; ``scale = weight / sqrt(var + eps)`` and ``shift = bias - mean * scale`` (float32 on the Triton
        path, else float32 or float64 like ``x``), so that ``scale * x + shift`` is train-mode batch norm.
    """
    if groups < 1 or len(x) % groups:
        raise ValueError(f"Cannot split a batch of {len(x)} into {groups} equal groups.")
    if not _nhwc(x):
        xg = x.double().unflatten(0, (groups, -1))
        var, mean = torch.var_mean(xg, dim=[1, *range(3, xg.dim())], correction=0)
        out = mean, var, *_affine(var, mean, weight, bias, eps, _compute_dtype(x))
    else:
        out = _triton_stats(x, weight, bias, eps, groups)
    return tuple(t[0] for t in out) if groups == 1 else out


def _triton_stats(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, groups: int
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`channel_stats` on the Triton path: ``(mean, var, scale, shift)``, each ``[groups, C]``."""
    c = x.shape[1]
    rows = x.numel() // c // groups  # rows of the [N * H * W, C] matrix per group
    per = triton.cdiv(triton.cdiv(rows, max(1, _STATS_PROGRAMS // groups)), _STATS_ROWS) * _STATS_ROWS
    programs = triton.cdiv(rows, per)  # per group
    cols = min(triton.next_power_of_2(c), 64)
    part = torch.empty(2, groups * programs, c, device=x.device, dtype=torch.float32)
    _stats_kernel[(groups * programs, triton.cdiv(c, cols))](
        x, part[0], part[1], rows, c, per, per // _STATS_ROWS, programs, ROWS=_STATS_ROWS, COLS=cols, num_warps=8)
    moments = torch.empty(2, groups, c, device=x.device, dtype=torch.float64)
    affine = torch.empty(2, groups, c, device=x.device, dtype=torch.float32)
    combine_cols = min(triton.next_power_of_2(c), 32)
    _combine_kernel[(triton.cdiv(c, combine_cols), groups)](
        part[0], part[1], weight if weight is not None else affine, bias if bias is not None else affine,
        moments[0], moments[1], affine[0], affine[1], programs, rows, per, c, eps,
        HAS_W=weight is not None, HAS_B=bias is not None, CHUNK=_COMBINE_CHUNK, COLS=combine_cols, num_warps=4)
    return moments[0], moments[1], affine[0], affine[1]


def scale_shift(x: Tensor, a: Tensor, b: Tensor, z: Tensor | None = None, relu: bool = False) -> Tensor:
    """``relu?(a * x + b + z)`` with per-channel ``a``, ``b`` in one pass where possible.

    ``a`` and ``b`` are ``[C]``, or ``[G, C]`` for ``x`` holding ``G`` equal groups along dim 0 (one map each).
    """
    groups = a.shape[0] if a.dim() == 2 else 1
    if _nhwc(x) and (z is None or (z.shape == x.shape and z.dtype == x.dtype and z.stride() == x.stride())):
        out = torch.empty_like(x)
        numel = x.numel()
        _apply_kernel[(triton.cdiv(numel, _APPLY_BLOCK),)](
            x, x if z is None else z, out, a.float().contiguous(), b.float().contiguous(), numel, x.shape[1],
            numel // groups, HAS_Z=z is not None, RELU=relu, GROUPED=groups > 1, BLOCK=_APPLY_BLOCK, num_warps=8)
        return out
    dtype = _compute_dtype(x)
    view = (groups, 1, -1, *[1] * (x.dim() - 2))
    y = x.to(dtype).unflatten(0, (groups, -1)) * a.to(dtype).view(view) + b.to(dtype).view(view)
    y = y.flatten(0, 1)
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
        stats_groups: In a statistics pass, the input holds this many equal batches along dim 0, each normalised by
            its own statistics (the hook then receives ``[groups, C]`` moments when ``groups > 1``).
    """

    def __init__(self, bn: _BatchNorm, add: bool, relu: bool) -> None:
        nn.Module.__init__(self)
        for key in ("num_features", "eps", "momentum", "affine", "track_running_stats"):
            setattr(self, key, getattr(bn, key))
        self._parameters, self._buffers = bn._parameters, bn._buffers  # shared dicts: one set of tensors
        self.training = bn.training
        self.add, self.relu = add, relu
        self.stats_hook: StatsHook | None = None
        self.stats_groups = 1

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, add={self.add}, relu={self.relu}"

    def forward(self, x: Tensor, z: Tensor | None = None) -> Tensor:
        """The fused chain; ``z`` is required exactly when the module was built with ``add=True``."""
        if (z is not None) != self.add:
            raise ValueError(f"FusedBatchNorm(add={self.add}) called with{'out' if z is None else ''} a residual.")
        if self.stats_hook is not None:
            mean, var, scale, shift = channel_stats(x, self.weight, self.bias, self.eps, self.stats_groups)
            self.stats_hook(x, mean, var)
        elif self.training:
            raise RuntimeError("FusedBatchNorm evaluates; train with the original (unfused) net.")
        else:
            scale, shift = self._eval_affine(_compute_dtype(x))
        return scale_shift(x, scale, shift, z, self.relu)

    def _eval_affine(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Scale and shift from the running statistics, recomputed only when a tensor they depend on changed."""
        tensors = [t for t in (self.running_mean, self.running_var, self.weight, self.bias) if t is not None]
        key = (dtype, *((t.data_ptr(), t._version) for t in tensors))
        if self.__dict__.get("_cache_key") != key:
            self._cache = _affine(self.running_var, self.running_mean, self.weight, self.bias, self.eps, dtype)
            self._cache_key = key
        return self._cache


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


def _fusable(module: nn.Module | None) -> bool:
    """A BatchNorm2d with running statistics (what :class:`FusedBatchNorm` replaces)."""
    return type(module) is nn.BatchNorm2d and module.track_running_stats


def has_fusable(net: nn.Module) -> bool:
    """Whether :func:`fuse_norms` has a BatchNorm2d to fuse in ``net``."""
    return any(_fusable(m) for m in net.modules())


def fuse_norms(net: nn.Module) -> fx.GraphModule | None:
    """A traced copy of ``net`` with each BatchNorm2d (and the ReLU / residual add after it) fused.

    The copy shares every parameter and buffer with ``net``; ``net`` itself is not changed.

    Returns:
        The fused GraphModule, or None when ``net`` has no BatchNorm2d to fuse or cannot be traced by ``torch.fx``.
    """
    if not has_fusable(net):
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
        if not _fusable(bn) or len(node.args) != 1 or node.kwargs or calls[node.target] > 1:
            continue
        users = list(node.users)
        chain, z = [node], None  # the nodes the fused call replaces, in execution order
        if len(users) == 1 and _is_relu(users[0], modules):
            chain.append(users[0])
        elif len(users) == 1 and _is_add(users[0]) and len(users[0].users) == 1 \
                and _is_relu(next(iter(users[0].users)), modules):
            add = users[0]
            z = add.args[1] if add.args[0] is node else add.args[0]
            chain += [add, next(iter(add.users))]
        with graph.inserting_before(chain[-1]):
            fused = graph.call_module(node.target, (node.args[0],) if z is None else (node.args[0], z))
        chain[-1].replace_all_uses_with(fused)
        for dead in reversed(chain):
            graph.erase_node(dead)
        parent, _, name = node.target.rpartition(".")
        setattr(gm.get_submodule(parent) if parent else gm, name,
                FusedBatchNorm(bn, add=z is not None, relu=len(chain) > 1))
    graph.lint()
    gm.recompile()
    return gm
