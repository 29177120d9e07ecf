"""Derive a :class:`PermutationSpec` by tracing a network with ``torch.fx``.

Every tensor in the traced graph carries a *feature space*: the units along its channel axis (dim 1). A Linear or
Conv layer reads one space (its weight's input axis) and opens a new one (output axis, bias); normalisation layers,
activations and pooling pass the space through and their per-channel parameters and buffers follow it; an addition
(or any elementwise op of two feature tensors) merges the spaces of its operands with union-find, which ties the
residual stream of a ResNet into one permutation. ``flatten`` keeps the space but makes each channel span ``H*W``
consecutive features, resolved at the Linear that reads it. The input and the output spaces are fixed; every other
space becomes one permutation group.

Beyond CNNs: a tensor's feature axis need not be dim 1 (a ``Linear`` acts on the last axis of a ``[B, T, D]`` token
tensor; ``flatten(2)`` and ``transpose`` move it); ``LayerNorm`` over the last axis keeps the residual stream of a
transformer one group; parameters used directly (a class token, position embeddings) join the space of the tensor
they are added to or concatenated with; ``nn.Embedding`` opens a space; ``torch.cat`` along the feature axis gives
each part its own segment of the reading layer's input axis; splitting the feature axis into heads
(``view(B, T, H, d)``) and ``F.scaled_dot_product_attention`` tie query and key into one group and value/output
into another, both with ``H`` heads moved by one shared head permutation (a fused projection split as
``reshape(B, T, 3, H, d)``, timm's ``qkv``, becomes three row segments of one weight, unbound into query, key and
value); a grouped conv ties its input's and its output's channel groups as heads (the input kept in order within
each group); a depthwise conv passes its space through. Anything else raises :class:`SpecDerivationError` naming
the node.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lmc_lightning.weights.permutation.spec import Axis, Heads, PermutationSpec, Segment


class SpecDerivationError(ValueError):
    """The network contains an op whose effect on hidden units is unknown; pass a spec by hand."""


_HINT = ("Pass spec=PermutationSpec({group: [(key, axis), ...]}) by hand, or build the net from supported ops "
         "(Linear, Conv incl. grouped/depthwise, Embedding, BatchNorm/GroupNorm/LayerNorm, elementwise activations, "
         "pooling, flatten, additions, torch.cat, head split + F.scaled_dot_product_attention).")

_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.ELU, nn.CELU, nn.SELU, nn.Tanh, nn.Sigmoid, nn.Softplus,
    nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AlphaDropout,
)
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_ELEMENTWISE_FUNCS = {
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.gelu, F.silu, F.elu, F.selu, F.softplus,
    F.hardtanh, F.hardswish, F.mish, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, torch.abs, torch.square,
}
_POOL_FUNCS = {
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d, F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
}
_BINARY_FUNCS = {operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
                 operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "float", "double", "half",
                        "detach", "abs", "square", "type_as", "to"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}


@dataclass(frozen=True)
class _Feat:
    """A feature tensor: feature axis ``axis`` (dim 1 unless moved) in ``space``; ``block`` features per unit (None:
    flattened, unknown)."""

    space: int
    block: int | None = 1
    ndim: int | None = None
    axis: int = 1


@dataclass(frozen=True)
class _Param:
    """A parameter or buffer used directly (class token, position embedding); its feature axis is found where it
    meets a feature tensor."""

    key: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Cat:
    """Feature tensors concatenated along their feature axis: ``parts`` are the spaces, in order."""

    parts: tuple[int, ...]
    ndim: int | None
    axis: int


@dataclass(frozen=True)
class _Heads:
    """A feature axis split into ``n_heads`` heads of ``d`` units (heads on ``head_axis``, units on ``unit_axis``)."""

    space: int
    n_heads: int
    d: int
    ndim: int
    head_axis: int
    unit_axis: int


@dataclass(frozen=True)
class _Split:
    """A fused projection's feature axis split into ``len(parts)`` chunks of ``n_heads`` heads of ``d`` units (timm's
    ``qkv(x).reshape(B, N, 3, H, d)``): chunk ``i`` is space ``parts[i]``, on axes ``chunk_axis``, ``head_axis`` and
    ``unit_axis``."""

    parts: tuple[int, ...]
    n_heads: int
    d: int
    ndim: int
    chunk_axis: int
    head_axis: int
    unit_axis: int


_CONST = object()  # sizes, shapes, python scalars: values that carry no units


def _carries_units(value: Any) -> bool:
    """Whether a traced value holds network features (or a tuple of them, as ``unbind`` returns)."""
    if isinstance(value, tuple):
        return any(_carries_units(v) for v in value)
    return isinstance(value, _Feat | _Param | _Cat | _Heads | _Split)


_LEAF_TYPES = (nn.Linear, *_CONVS, nn.Embedding, *_BATCHNORMS, nn.GroupNorm, nn.LayerNorm, *_ELEMENTWISE_MODULES,
               *_POOL_MODULES, nn.Flatten)


class LeafTracer(fx.Tracer):
    """fx tracing that keeps as leaves the modules marked ``channel_norm = True`` (per-position channel norms) or
    ``spatial_only = True`` (ops on the spatial axes alone, such as an input resize), and
    subclasses of the supported module types defined outside ``torch.nn`` (timm's ``LayerNorm``), which compute what
    their base class does (the equivalence check after alignment catches one that does not)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (bool(getattr(m, "channel_norm", False) or getattr(m, "spatial_only", False))
                or isinstance(m, _LEAF_TYPES)
                or super().is_leaf_module(m, module_qualified_name))


class _Tracer:
    """Propagates feature spaces through an fx graph and collects the axes of each space."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.fixed: list[bool] = []
        self.axes: dict[tuple[str, int, int], tuple[int, int, int | None]] = {}  # (key, axis, offset) -> (space,
        # block, length or None)
        self.order: list[tuple[str, int, int]] = []
        self.head_marks: list[tuple[int, int, bool, fx.Node]] = []  # (space, heads, within, node)
        self.ties: list[tuple[int, int, fx.Node]] = []
        self.outputs: dict[int, list[str]] = {}  # space -> producing layer's output points (for unread spaces)
        self.producers: dict[int, list[str]] = {}
        self.points: dict[int, list[str]] = {}
        self.buffers: set[str] = set()
        self.env: dict[fx.Node, Any] = {}
        self.split: dict[int, fx.Node] = {}  # spaces cut into chunks (their axes moved to the chunks' segments)

    # union-find over spaces --------------------------------------------------------------------------------------
    def new(self, size: int | None, fixed: bool = False) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.fixed.append(fixed)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int, node: fx.Node) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        self.not_split(node, a, b)
        if self.size[a] is not None and self.size[b] is not None and self.size[a] != self.size[b]:
            raise SpecDerivationError(f"Node '{node.name}' combines tensors with {self.size[a]} and {self.size[b]} "
                                      f"channels elementwise; cannot tie their units. {_HINT}")
        self.parent[b] = a
        self.size[a] = self.size[a] if self.size[a] is not None else self.size[b]
        self.fixed[a] = self.fixed[a] or self.fixed[b]
        return a

    # helpers -----------------------------------------------------------------------------------------------------
    def fail(self, node: fx.Node, why: str) -> SpecDerivationError:
        where = f"module '{node.target}' ({type(self.root.get_submodule(node.target)).__name__})" \
            if node.op == "call_module" else f"{node.op} {getattr(node.target, '__name__', node.target)!s}"
        return SpecDerivationError(f"Cannot derive a permutation spec at node '{node.name}', {where}: {why}. {_HINT}")

    def feat(self, node: fx.Node, value: Any, what: str = "input") -> _Feat:
        if not isinstance(value, _Feat):
            raise self.fail(node, f"its {what} is not a feature tensor of the network")
        return value

    def units(self, node: fx.Node, value: _Feat, length: int) -> int:
        """Block size for reading ``length`` features from ``value``; sets the space size if unknown."""
        root = self.find(value.space)
        size = self.size[root]
        if value.block is not None and size is None:
            self.size[root] = length // value.block
            return value.block
        if size is None:  # flattened input of unknown channel count: a fixed space, block is irrelevant
            return 1
        block = value.block if value.block is not None else length // size
        if size * block != length:
            raise self.fail(node, f"it reads {length} features from a tensor of {size} channels"
                            + (f" x {value.block}" if value.block not in (None, 1) else ""))
        return block

    def add_axis(self, node: fx.Node, key: str, axis: int, space: int, block: int, buffer: bool = False,
                 offset: int = 0, length: int | None = None) -> None:
        self.not_split(node, space)
        old = self.axes.get((key, axis, offset))
        if old is not None:  # a module called more than once: its axes tie the spaces it sees
            if old[1] != block:
                raise self.fail(node, f"'{key}' is reused with {old[1]} and {block} features per unit")
            self.union(old[0], space, node)
            return
        self.axes[(key, axis, offset)] = (space, block, length)
        self.order.append((key, axis, offset))
        if buffer:
            self.buffers.add(key)

    def per_channel(self, node: fx.Node, module: nn.Module, value: _Feat | _Cat, names: tuple[str, ...],
                    param_axis: int = 0) -> None:
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                key, buffer = f"{node.target}.{name}", name in dict(module.named_buffers(recurse=False))
                if isinstance(value, _Cat):
                    self.segments(node, key, param_axis, value, tensor.shape[param_axis], buffer)
                    continue
                block = self.units(node, value, tensor.shape[param_axis])
                self.add_axis(node, key, param_axis, value.space, block, buffer=buffer)

    def segments(self, node: fx.Node, key: str, axis: int, value: _Cat, length: int, buffer: bool = False) -> None:
        """Axis ``axis`` of ``key`` reads the concatenation ``value``: one segment per part."""
        offset = 0
        for space in value.parts:
            size = self.size[self.find(space)]
            if size is None:
                raise self.fail(node, "it reads a concatenation of tensors of unknown width")
            self.add_axis(node, key, axis, space, 1, buffer=buffer, offset=offset, length=size)
            offset += size
        if offset != length:
            raise self.fail(node, f"it reads {length} features from a concatenation of {offset}")

    def not_split(self, node: fx.Node, *spaces: int) -> None:
        """Fail if a space already cut into chunks is used whole again."""
        for space in spaces:
            cut = self.split.get(self.find(space))
            if cut is not None:
                raise self.fail(node, f"it uses the whole output of a fused projection that node '{cut.name}' "
                                "splits into chunks; only the chunks may be used")

    def split_space(self, node: fx.Node, space: int, chunks: int) -> tuple[int, ...]:
        """Cut the output space of a fused projection (timm's ``qkv``) into ``chunks`` spaces: the producer's
        output axes become one segment per chunk."""
        root = self.find(space)
        size = self.size[root]
        owned = [k for k in self.order if self.find(self.axes[k][0]) == root]
        producer = self.producers.get(root, [])
        if self.fixed[root] or size is None or size % chunks or len(producer) != 1 or self.points.get(root) \
                or any(self.axes[k][1:] != (1, None) or not k[0].startswith(f"{producer[0]}.") for k in owned):
            raise self.fail(node, f"it splits features into {chunks} chunks that are not the output of one layer "
                            "read only through the split")
        length = size // chunks
        parts = tuple(self.new(length) for _ in range(chunks))
        for i, part in enumerate(parts):
            self.producers[part] = [f"{producer[0]}[{i}]"]
            self.outputs[part] = [f"{p if '@' in p else p + '@1'}[{i * length}:{(i + 1) * length}]"
                                  for p in self.outputs.get(root, [])]
        order = []
        for entry in self.order:
            if entry not in owned:
                order.append(entry)
                continue
            del self.axes[entry]
            key, axis, _ = entry
            for i, part in enumerate(parts):
                self.axes[(key, axis, i * length)] = (part, 1, length)
                order.append((key, axis, i * length))
        self.order = order
        self.producers.pop(root, None)
        self.outputs.pop(root, None)
        self.split[root] = node
        return parts

    def mark_heads(self, node: fx.Node, space: int, n_heads: int, within: bool) -> None:
        size = self.size[self.find(space)]
        if size is not None and size % n_heads:
            raise self.fail(node, f"{size} units do not split into {n_heads} heads")
        self.head_marks.append((space, n_heads, within, node))

    def dims(self, node: fx.Node, value: _Feat, dims: Any) -> list[int]:
        dims = [dims] if isinstance(dims, int) else list(dims)
        if any(d < 0 for d in dims):
            if value.ndim is None:
                raise self.fail(node, "negative dims on a tensor of unknown rank")
            dims = [d + value.ndim for d in dims]
        return dims

    # ops ---------------------------------------------------------------------------------------------------------
    def run(self, graph: fx.Graph) -> None:
        self.calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        for node in graph.nodes:
            self.env[node] = getattr(self, f"op_{node.op}")(node)

    def op_placeholder(self, node: fx.Node) -> Any:
        if node.args and not isinstance(node.args[0], torch.Tensor):
            return _CONST  # an optional argument left at its default (timm's attn_mask=None, is_causal=False)
        return _Feat(self.new(None, fixed=True))

    def op_get_attr(self, node: fx.Node) -> Any:
        tensor = operator.attrgetter(node.target)(self.root)
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
            if not tensor.is_floating_point():
                raise self.fail(node, "an integer buffer used outside a supported module")
            return _Param(str(node.target), tuple(tensor.shape))
        return _CONST

    def op_output(self, node: fx.Node) -> None:
        out = self.new(None, fixed=True)

        def close(n: fx.Node) -> None:
            value = self.env[n]
            for space in value.parts if isinstance(value, _Cat) else [getattr(value, "space", None)]:
                if space is not None:
                    self.union(out, space, node)
            if isinstance(value, _Param):
                raise self.fail(node, "the network returns a parameter")

        fx.node.map_arg(node.args, close)

    def op_call_module(self, node: fx.Node) -> Any:
        module = self.root.get_submodule(node.target)
        args = [self.env[a] if isinstance(a, fx.Node) else _CONST for a in node.args]
        if len(args) != 1 or node.kwargs:
            raise self.fail(node, "a module called with more than one argument")
        if isinstance(module, nn.Embedding):
            out = self.new(module.embedding_dim)
            self.producers[out] = [node.target]
            self.add_axis(node, f"{node.target}.weight", 1, out, 1)
            ndim = (getattr(args[0], "ndim", None) or 2) + 1
            return _Feat(out, 1, ndim, ndim - 1)
        if isinstance(args[0], _Cat):
            return self.read_cat(node, module, args[0])
        if isinstance(args[0], _Heads | _Split) and isinstance(module, _ELEMENTWISE_MODULES):
            return args[0]  # e.g. timm's q_norm / k_norm = Identity
        x = self.feat(node, args[0])
        if isinstance(module, nn.Linear):
            if x.ndim is not None and x.axis != x.ndim - 1:
                raise self.fail(node, f"a Linear layer applied to a {x.ndim}-d tensor whose features are on axis "
                                f"{x.axis} (it acts on the last axis)")
            ndim = x.ndim or 2
            return self.layer(node, module, x, module.in_features, module.out_features, 1, 0, ndim, ndim - 1)
        if isinstance(module, (*_CONVS, *_BATCHNORMS, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
                               nn.GroupNorm)) and x.axis != 1:
            raise self.fail(node, f"{type(module).__name__} applied to a tensor whose features are on axis {x.axis}")
        if isinstance(module, _CONVS) and module.groups == 1:
            self.no_flat(node, x)
            return self.layer(node, module, x, module.in_channels, module.out_channels, 1, 0, module.weight.ndim)
        if isinstance(module, nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d) and module.groups == 1:
            self.no_flat(node, x)
            return self.layer(node, module, x, module.in_channels, module.out_channels, 0, 1, module.weight.ndim)
        if isinstance(module, _CONVS) and module.groups == module.in_channels == module.out_channels:
            self.no_flat(node, x)  # depthwise: channel c reads only channel c
            self.per_channel(node, module, x, ("weight", "bias"))
            return x
        if isinstance(module, _CONVS):
            return self.grouped(node, module, x)
        if isinstance(module, _BATCHNORMS):
            self.per_channel(node, module, x, ("weight", "bias", "running_mean", "running_var"))
            return x
        if isinstance(module, nn.GroupNorm):
            if module.num_groups not in (1, module.num_channels):
                raise self.fail(node, f"GroupNorm with {module.num_groups} groups of {module.num_channels} channels "
                                "(only 1 group or one per channel are invariant to permuting channels)")
            self.no_flat(node, x)
            self.per_channel(node, module, x, ("weight", "bias"))
            return x
        if getattr(module, "channel_norm", False):  # normalises over the channels at each position (ChannelLayerNorm)
            self.no_flat(node, x)
            self.per_channel(node, module, x, ("weight", "bias"))
            return x
        if isinstance(module, nn.LayerNorm):
            self.layer_norm(node, x, module.normalized_shape)
            last = x.ndim is not None and x.axis == x.ndim - 1 and x.ndim > 2
            self.per_channel(node, module, x, ("weight", "bias"), len(module.normalized_shape) - 1 if last else 0)
            return x
        if isinstance(module, _ELEMENTWISE_MODULES):
            return x
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return x
        if isinstance(module, _POOL_MODULES) or getattr(module, "spatial_only", False):
            self.no_flat(node, x)
            return x
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        raise self.fail(node, "unsupported module type")

    def no_flat(self, node: fx.Node, x: _Feat) -> None:
        if x.block != 1:
            raise self.fail(node, "it reads a flattened feature map")

    def read_cat(self, node: fx.Node, module: nn.Module, x: _Cat) -> Any:
        """A module reading a concatenation along the feature axis."""
        if isinstance(module, (*_ELEMENTWISE_MODULES, *_POOL_MODULES)):
            return x
        if isinstance(module, _BATCHNORMS) and x.axis == 1:
            self.per_channel(node, module, x, ("weight", "bias", "running_mean", "running_var"))
            return x
        linear = isinstance(module, nn.Linear) and (x.ndim is None or x.axis == x.ndim - 1)
        if linear or (isinstance(module, _CONVS) and module.groups == 1 and x.axis == 1):
            n_in = module.in_features if linear else module.in_channels
            self.segments(node, f"{node.target}.weight", 1, x, n_in)
            ndim = x.ndim or 2
            return self.layer(node, module, None, n_in, module.out_features if linear else module.out_channels,
                              1, 0, ndim if linear else module.weight.ndim, ndim - 1 if linear else 1)
        raise self.fail(node, f"{type(module).__name__} reading a concatenation along the feature axis")

    def grouped(self, node: fx.Node, module: nn.Module, x: _Feat) -> _Feat:
        """A grouped conv: input and output channel groups are heads moved together; the input stays in order
        within each group (the weight's input axis is indexed within a group)."""
        self.no_flat(node, x)
        self.units(node, x, module.in_channels)
        self.mark_heads(node, x.space, module.groups, within=False)
        point = self.point_name(node.args[0])
        if point not in self.points.setdefault(x.space, []):
            self.points[x.space].append(point)
        out = self.new(module.out_channels)
        self.producers[out] = [node.target]
        self.outputs[out] = [self.point_name(node)]
        self.add_axis(node, f"{node.target}.weight", 0, out, 1)
        if module.bias is not None:
            self.add_axis(node, f"{node.target}.bias", 0, out, 1)
        self.mark_heads(node, out, module.groups, within=True)
        self.ties.append((x.space, out, node))
        return _Feat(out, 1, module.weight.ndim, 1)

    def layer_norm(self, node: fx.Node, x: _Feat, shape: tuple[int, ...]) -> None:
        if x.ndim is not None and x.ndim > 2 and x.axis == x.ndim - 1:
            return  # token tensor: LayerNorm over the last axis (and maybe more) normalises the features together
        covers = len(shape) == x.ndim - 1 if x.ndim is not None else None
        if covers is None:
            size = self.size[self.find(x.space)]
            covers = size is None or (shape[0] % size == 0 and (x.block is None or shape[0] == size * x.block))
        if not covers:
            raise self.fail(node, f"LayerNorm over {tuple(shape)} does not span the channel axis")

    def layer(self, node: fx.Node, module: nn.Module, x: _Feat | None, n_in: int, n_out: int, in_axis: int,
              out_axis: int, ndim: int, axis: int = 1) -> _Feat:
        """A layer mixing units: reads space ``x`` on ``in_axis`` of its weight (None: already recorded as
        segments), opens a new space on ``out_axis``."""
        if x is not None:
            block = self.units(node, x, n_in)
            self.add_axis(node, f"{node.target}.weight", in_axis, x.space, block)
            point = self.point_name(node.args[0], x)
            if point not in self.points.setdefault(x.space, []):
                self.points[x.space].append(point)
        out = self.new(n_out)
        self.producers[out] = [node.target]
        self.outputs[out] = [self.point_name(node, _Feat(out, 1, ndim, axis))]
        self.add_axis(node, f"{node.target}.weight", out_axis, out, 1)
        if getattr(module, "bias", None) is not None:
            self.add_axis(node, f"{node.target}.bias", 0, out, 1)
        return _Feat(out, 1, ndim, axis)

    def point_name(self, node: fx.Node, value: _Feat | None = None) -> str:
        """Readable name of an activation point: the module's name if it is called once, else the node's name;
        ``@axis`` is appended when the features are not on dim 1."""
        name = str(node.target) if node.op == "call_module" and self.calls[node.target] == 1 else node.name
        if value is not None and value.ndim is not None and value.axis != 1:
            name += f"@{value.axis}"
        return name

    def flatten(self, node: fx.Node, x: _Feat, start: int, end: int) -> _Feat:
        if x.ndim is not None:
            start, end = start % x.ndim, end % x.ndim
            if x.axis < start or x.axis > end:  # flattening other axes (e.g. spatial ones) keeps the features
                axis = x.axis if x.axis < start else x.axis - (end - start)
                return _Feat(x.space, x.block, x.ndim - (end - start), axis)
        if x.axis != 1 or start != 1 or end not in (-1, (x.ndim or 0) - 1):
            raise self.fail(node, f"flatten(start_dim={start}, end_dim={end}); only flattening from dim 1 to the "
                            "end keeps channels in blocks")
        return x if x.ndim == 2 else _Feat(x.space, None, 2)

    def align_param(self, node: fx.Node, p: _Param, x: _Feat) -> None:
        """Parameter ``p`` meets feature tensor ``x`` under broadcasting: its matching axis joins ``x``'s space."""
        if x.ndim is None:
            raise self.fail(node, f"parameter '{p.key}' combined with a tensor of unknown rank")
        axis = x.axis - (x.ndim - len(p.shape))
        if axis < 0 or p.shape[axis] == 1:
            return  # the same value for every unit: nothing to permute
        block = self.units(node, x, p.shape[axis])
        self.add_axis(node, p.key, axis, x.space, block)

    def elementwise(self, node: fx.Node, values: list[Any]) -> Any:
        feats = [v for v in values if isinstance(v, _Feat)]
        params = [v for v in values if isinstance(v, _Param)]
        if any(isinstance(v, _Cat | _Heads | _Split) for v in values):
            cats = [v for v in values if isinstance(v, _Cat | _Heads | _Split)]
            if len(cats) == 1 and not feats and not params:
                return cats[0]
            raise self.fail(node, "it combines a concatenation or a head-split tensor elementwise")
        if not feats:
            if params:
                raise self.fail(node, "arithmetic on parameters before they meet the network's features")
            return _CONST
        first = feats[0]
        for other in feats[1:]:
            if other.block != first.block or (None not in (other.ndim, first.ndim) and other.axis != first.axis):
                raise self.fail(node, "it combines tensors flattened differently")
            self.union(first.space, other.space, node)
        ndims = [f.ndim for f in feats if f.ndim is not None]
        ndim = max(ndims) if ndims else None
        result = _Feat(first.space, first.block, ndim, first.axis + (ndim - first.ndim if first.ndim else 0))
        for p in params:
            self.align_param(node, p, result)
        return result

    def reduce(self, node: fx.Node, x: _Feat, dims: Any, keepdim: bool) -> _Feat:
        if dims is None:
            raise self.fail(node, "a reduction over all axes mixes channels")
        dims = self.dims(node, x, dims)
        if x.axis in dims or 0 in dims:
            raise self.fail(node, f"a reduction over dims {dims} (only dims other than the batch and the feature "
                            f"axis {x.axis} keep channels apart)")
        ndim = None if x.ndim is None else x.ndim if keepdim else x.ndim - len(dims)
        axis = x.axis if keepdim else x.axis - sum(d < x.axis for d in dims)
        return _Feat(x.space, x.block, ndim, axis)

    def moved(self, node: fx.Node, x: Any, order: list[int]) -> Any:
        """``x`` with its axes reordered (``order[i]`` = old axis now at ``i``)."""
        if isinstance(x, _Feat):
            if x.ndim is None:
                raise self.fail(node, "a transpose of a tensor of unknown rank")
            return _Feat(x.space, x.block, x.ndim, order.index(x.axis))
        if isinstance(x, _Heads):
            return _Heads(x.space, x.n_heads, x.d, x.ndim, order.index(x.head_axis), order.index(x.unit_axis))
        if isinstance(x, _Split):
            return _Split(x.parts, x.n_heads, x.d, x.ndim, order.index(x.chunk_axis), order.index(x.head_axis),
                          order.index(x.unit_axis))
        raise self.fail(node, "a transpose of a concatenation or a parameter")

    def chunks(self, node: fx.Node, x: _Split, dim: int) -> tuple[_Heads, ...]:
        """``x.unbind(dim)`` along the chunk axis: one head-split tensor per chunk."""
        if dim % x.ndim != x.chunk_axis:
            raise self.fail(node, f"it unbinds dim {dim}, not the chunk axis {x.chunk_axis} of a fused projection")
        head, unit = (a - (a > x.chunk_axis) for a in (x.head_axis, x.unit_axis))
        return tuple(_Heads(part, x.n_heads, x.d, x.ndim - 1, head, unit) for part in x.parts)

    def reshape(self, node: fx.Node, x: Any, shape: list[Any]) -> Any:
        """Splitting the last (feature) axis into heads, merging heads back, or flattening ``(batch, -1)``."""
        if isinstance(x, _Feat) and len(shape) == 2 and shape[1] == -1:
            return self.flatten(node, x, 1, -1)
        ints = [v for v in shape[-2:] if isinstance(v, int)]
        if isinstance(x, _Feat) and x.ndim is not None and x.axis == x.ndim - 1 and len(shape) == x.ndim + 1 \
                and len(ints) == 2 and x.block == 1:
            size = self.size[self.find(x.space)]
            n_heads, d = ints
            n_heads = size // d if n_heads == -1 and size else n_heads
            d = size // n_heads if d == -1 and size else d
            if size is not None and n_heads * d != size:
                raise self.fail(node, f"it splits {size} features into {n_heads} x {d}")
            return _Heads(x.space, n_heads, d, x.ndim + 1, x.ndim - 1, x.ndim)
        last3 = shape[-3:]
        if isinstance(x, _Feat) and x.ndim is not None and x.axis == x.ndim - 1 and len(shape) == x.ndim + 2 \
                and x.block == 1 and all(isinstance(v, int) and v > 0 for v in last3):
            size = self.size[self.find(x.space)]
            if size is not None and math.prod(last3) != size:
                raise self.fail(node, f"it splits {size} features into {' x '.join(map(str, last3))}")
            parts = self.split_space(node, x.space, last3[0])
            return _Split(parts, last3[1], last3[2], x.ndim + 2, x.ndim - 1, x.ndim, x.ndim + 1)
        if isinstance(x, _Heads) and len(shape) == x.ndim - 1 and x.unit_axis == x.ndim - 1 \
                and x.head_axis == x.ndim - 2 and shape[-1] in (-1, x.n_heads * x.d):
            return _Feat(x.space, 1, x.ndim - 1, x.ndim - 2)
        shown = ["?" if v is _CONST else v for v in shape]
        raise self.fail(node, f"a reshape to {shown} (only (batch, -1), splitting the last feature axis into "
                        "(heads, units) or (chunks, heads, units) and merging heads back are understood)")

    def attention(self, node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> _Heads:
        """``F.scaled_dot_product_attention(q, k, v)``: q and k share a space; q/k and v heads are tied."""
        q, k, v = (args + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
        extra = [a for a in list(args[3:]) + [val for key, val in kwargs.items() if key not in ("query", "key",
                 "value")] if isinstance(a, _Feat | _Heads | _Cat | _Param)]
        if extra:
            raise self.fail(node, "an attention mask computed from the network's features")
        if not all(isinstance(t, _Heads) for t in (q, k, v)):
            raise self.fail(node, "attention on tensors not split into heads with view(B, T, heads, -1)")
        if len({(t.n_heads, t.head_axis, t.unit_axis, t.ndim) for t in (q, k, v)}) != 1 or q.d != k.d \
                or q.unit_axis != q.ndim - 1:
            raise self.fail(node, "query, key and value with different head layouts")
        qk = self.union(q.space, k.space, node)
        self.mark_heads(node, qk, q.n_heads, within=True)
        self.mark_heads(node, v.space, v.n_heads, within=True)
        self.ties.append((qk, v.space, node))
        return v

    def index_chunk(self, node: fx.Node, x: _Split, index: Any) -> _Heads:
        """``qkv[0]``: one chunk of a fused projection (an int on the chunk axis, full slices before it)."""
        index = index if isinstance(index, tuple) else (index,)
        if len(index) != x.chunk_axis + 1 or not isinstance(index[-1], int) \
                or any(i != slice(None) for i in index[:-1]):
            raise self.fail(node, "indexing a fused projection other than by one chunk")
        return self.chunks(node, x, x.chunk_axis)[index[-1]]

    def index(self, node: fx.Node, x: Any, index: Any) -> Any:
        """``x[...]`` selecting along axes other than the feature axis."""
        if not isinstance(x, _Feat) or x.ndim is None:
            raise self.fail(node, "indexing a feature tensor")
        index = index if isinstance(index, tuple) else (index,)
        if any(not isinstance(i, int | slice) for i in index) or len(index) > x.ndim:
            raise self.fail(node, "indexing a feature tensor other than with ints and slices")
        if x.axis < len(index) and index[x.axis] != slice(None):
            raise self.fail(node, "indexing the feature axis")
        dropped = [d for d, i in enumerate(index) if isinstance(i, int)]
        if 0 in dropped:
            raise self.fail(node, "indexing the batch axis")
        return _Feat(x.space, x.block, x.ndim - len(dropped), x.axis - sum(d < x.axis for d in dropped))

    def cat(self, node: fx.Node, values: list[Any], dim: int) -> Any:
        feats = [v for v in values if isinstance(v, _Feat | _Cat)]
        if not feats:
            raise self.fail(node, "a concatenation without feature tensors")
        ref = feats[0]
        ndim = ref.ndim
        if ndim is None and dim < 0:
            raise self.fail(node, "a concatenation along a negative dim of a tensor of unknown rank")
        dim = dim % ndim if ndim is not None else dim
        if dim != ref.axis:
            return self.elementwise(node, values)  # along tokens or space: the parts share their units
        parts: list[int] = []
        for v, source in zip(values, node.args[0], strict=True):
            if isinstance(v, _Cat):
                parts.extend(v.parts)
            elif isinstance(v, _Feat) and v.block == 1 and v.axis == ref.axis:
                parts.append(v.space)
                point = self.point_name(source, v)
                if point not in self.points.setdefault(v.space, []):
                    self.points[v.space].append(point)
            else:
                raise self.fail(node, "a concatenation along the feature axis of parameters or flattened maps")
        return _Cat(tuple(parts), ndim, ref.axis)

    def generic(self, node: fx.Node, target: Any, is_method: bool) -> Any:
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        name = target if is_method else getattr(target, "__name__", "")
        if (is_method and name in ("size", "dim", "numel")) or target in (getattr, len):
            return _CONST
        inputs: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(self.env[n]))
        if not any(_carries_units(v) for v in inputs):
            return _CONST  # arithmetic on sizes and constants
        if target in (torch.cat, torch.concat):
            values = [self.env[n] if isinstance(n, fx.Node) else n for n in node.args[0]]
            return self.cat(node, values, node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0))
        if target is F.scaled_dot_product_attention:
            return self.attention(node, args, kwargs)
        if isinstance(args[0], _Split):
            if (is_method and name == "unbind") or target is torch.unbind:
                return self.chunks(node, args[0], args[1] if len(args) > 1 else kwargs.get("dim", 0))
            if (is_method and name == "permute") or target is torch.permute:
                dims = args[1:] if is_method else list(args[1])
                dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else list(dims)
                return self.moved(node, args[0], [d % len(dims) for d in dims])
            raise self.fail(node, "an operation on a fused projection split into chunks other than permute, "
                            "unbind or indexing a chunk")
        if is_method and name in ("expand", "repeat") and isinstance(args[0], _Param):
            return args[0]
        if (is_method and name in _ELEMENTWISE_METHODS) or target in _ELEMENTWISE_FUNCS:
            return args[0] if isinstance(args[0], _Cat | _Heads | _Split) else self.feat(node, args[0])
        if target in _POOL_FUNCS:
            x = self.feat(node, args[0])
            self.no_flat(node, x)
            return x
        if (is_method and name in _BINARY_METHODS) or target in _BINARY_FUNCS:
            return self.elementwise(node, [*args, *kwargs.values()])
        if target is torch.flatten or (is_method and name == "flatten"):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            if isinstance(args[0], _Heads):
                return self.reshape(node, args[0], [None] * (args[0].ndim - 2) + [-1])
            return self.flatten(node, self.feat(node, args[0]), start, end)
        if (is_method and name in ("view", "reshape")) or target is torch.reshape:
            shape = args[1:] if is_method else list(args[1])
            if len(shape) == 1 and isinstance(shape[0], tuple | list):
                shape = list(shape[0])
            return self.reshape(node, args[0], list(shape))
        if (is_method and name == "transpose") or target is torch.transpose:
            x = args[0]
            ndim = x.ndim if x.ndim is not None else -1
            a, b = (d % ndim for d in args[1:3]) if ndim > 0 else args[1:3]
            order = list(range(ndim))
            if ndim > 0:
                order[a], order[b] = order[b], order[a]
            return self.moved(node, x, order)
        if (is_method and name == "permute") or target is torch.permute:
            dims = args[1:] if is_method else list(args[1])
            dims = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], tuple | list) else list(dims)
            return self.moved(node, args[0], [d % len(dims) for d in dims])
        if (is_method and name in _REDUCE) or target in (torch.mean, torch.sum, torch.amax, torch.amin):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return self.reduce(node, self.feat(node, args[0]), dims, keep)
        raise self.fail(node, "unsupported operation")

    def op_call_function(self, node: fx.Node) -> Any:
        if node.target is operator.getitem:
            value = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else _CONST
            if isinstance(value, tuple) and isinstance(node.args[1], int):  # a chunk of unbind
                return value[node.args[1]]
            if isinstance(value, _Split):
                return self.index_chunk(node, value, node.args[1])
            if isinstance(value, _Feat | _Cat | _Heads | _Param):
                return self.index(node, value, node.args[1])
            return _CONST
        return self.generic(node, node.target, is_method=False)

    def op_call_method(self, node: fx.Node) -> Any:
        return self.generic(node, node.target, is_method=True)

    # result ------------------------------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        groups: dict[int, list] = {}
        for key, axis, offset in self.order:
            space, block, length = self.axes[(key, axis, offset)]
            root = self.find(space)
            if not self.fixed[root]:
                groups.setdefault(root, []).append(Axis(key, axis, block) if length is None
                                                   else Segment(key, axis, block, offset, length))
        producers: dict[int, list[str]] = {}
        points: dict[int, list[str]] = {}
        for space, names in self.producers.items():
            producers.setdefault(self.find(space), []).extend(names)
        read = {self.find(space) for space, names in self.points.items() if names}
        for source in (self.points, self.outputs):
            for space, names in source.items():
                root = self.find(space)
                if source is self.outputs and root in read:  # outputs only for units no layer reads (q and k)
                    continue
                merged = points.setdefault(root, [])
                merged.extend(n for n in names if n not in merged)
        names: dict[int, str] = {}
        for i, root in enumerate(groups):
            prods = producers.get(root, [])
            names[root] = (f"P_{prods[0]}" if len(prods) == 1 else f"P_res_{prods[0]}") if prods else f"P_{i}"
        heads = self.heads_of(names)
        named = {names[root]: axes for root, axes in groups.items()}
        activations = {names[root]: points[root] for root in groups if points.get(root)}
        keys = {a.key for axes in named.values() for a in axes}
        return PermutationSpec(named, activations, frozenset(self.buffers & keys), heads)

    def heads_of(self, names: dict[int, str]) -> dict[str, Heads]:
        """Head structure of every group: marks per root, ties by union-find over roots."""
        marks: dict[int, tuple[int, bool]] = {}
        for space, n_heads, within, node in self.head_marks:
            root = self.find(space)
            if self.fixed[root]:  # never permuted, which satisfies any head structure
                continue
            old = marks.get(root)
            if old is not None and old[0] != n_heads:
                raise self.fail(node, f"its units are split into {n_heads} heads elsewhere into {old[0]}")
            marks[root] = (n_heads, within and (old is None or old[1]))
        parent = {r: r for r in marks}

        def find(r: int) -> int:
            while parent[r] != r:
                r = parent[r]
            return r

        for a, b, node in self.ties:
            ra, rb = self.find(a), self.find(b)
            if self.fixed[ra] != self.fixed[rb]:
                raise self.fail(node, "its heads are tied to the network's input or output, which cannot move")
            if ra in parent and rb in parent:
                parent[find(rb)] = find(ra)
        return {names[r]: Heads(f"T_{names[find(r)]}", n, within) for r, (n, within) in marks.items() if r in names}


def derive_spec(net: nn.Module) -> PermutationSpec:
    """Derive the permutation spec of a network by tracing it with ``torch.fx``.

    Hidden units of Linear/Conv layers, the normalisation parameters and running buffers that follow them, residual
    streams (one permutation per stream, found by union-find over additions) and a classifier's flattened input are
    all covered. The input and the output of the network are never permuted.

    Args:
        net: The network (any ``nn.Module`` built from the supported ops; its forward must be fx-traceable).

    Returns:
        The spec; group names start with ``P_`` and name the layer that produces the units (``P_res_`` for a residual
        stream, named after its first layer).

    Raises:
        SpecDerivationError: The net cannot be traced, or an op's effect on hidden units is unknown (the message
            names the node and module).
    """
    try:
        graph = LeafTracer().trace(net)
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "not traceable"
        raise SpecDerivationError(f"torch.fx could not trace {type(net).__name__}: {err}. {_HINT}") from err
    tracer = _Tracer(net)
    tracer.run(graph)
    return tracer.spec()
