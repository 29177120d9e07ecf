"""Derive a :class:`PermutationSpec` by tracing a network with ``torch.fx``.

Every tensor in the traced graph carries a *feature space*: the units along its channel axis (dim 1). A Linear or
Conv layer reads one space (its weight's input axis) and opens a new one (output axis, bias); normalisation layers,
activations and pooling pass the space through and their per-channel parameters and buffers follow it; an addition
(or any elementwise op of two feature tensors) merges the spaces of its operands with union-find, which ties the
residual stream of a ResNet into one permutation. ``flatten`` keeps the space but makes each channel span ``H*W``
consecutive features, resolved at the Linear that reads it. The input and the output spaces are fixed; every other
space becomes one permutation group.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from lmc_lightning.weights.permutation.spec import Axis, PermutationSpec


class SpecDerivationError(ValueError):
    """The network contains an op whose effect on hidden units is unknown; pass a spec by hand."""


_HINT = ("Pass spec=PermutationSpec({group: [(key, axis), ...]}) by hand, or build the net from supported ops "
         "(Linear, Conv, BatchNorm/GroupNorm/LayerNorm, elementwise activations, pooling, flatten, additions).")

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
                        "detach", "abs", "square"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"}
_REDUCE = {"mean", "sum", "amax", "amin"}


@dataclass(frozen=True)
class _Feat:
    """A feature tensor: channel axis (dim 1) in ``space``; ``block`` features per unit (None: flattened, unknown)."""

    space: int
    block: int | None = 1
    ndim: int | None = None


_CONST = object()  # sizes, shapes, python scalars: values that carry no units


class _LeafTracer(fx.Tracer):
    """fx tracing that keeps modules marked ``channel_norm = True`` (per-position channel norms) as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return bool(getattr(m, "channel_norm", False)) or super().is_leaf_module(m, module_qualified_name)


class _Tracer:
    """Propagates feature spaces through an fx graph and collects the axes of each space."""

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.parent: list[int] = []
        self.size: list[int | None] = []
        self.fixed: list[bool] = []
        self.axes: dict[tuple[str, int], tuple[int, int]] = {}  # (key, axis) -> (space, block)
        self.order: list[tuple[str, int]] = []
        self.producers: dict[int, list[str]] = {}
        self.points: dict[int, list[str]] = {}
        self.buffers: set[str] = set()
        self.env: dict[fx.Node, Any] = {}

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

    def add_axis(self, node: fx.Node, key: str, axis: int, space: int, block: int, buffer: bool = False) -> None:
        old = self.axes.get((key, axis))
        if old is not None:  # a module called more than once: its axes tie the spaces it sees
            if old[1] != block:
                raise self.fail(node, f"'{key}' is reused with {old[1]} and {block} features per unit")
            self.union(old[0], space, node)
            return
        self.axes[(key, axis)] = (space, block)
        self.order.append((key, axis))
        if buffer:
            self.buffers.add(key)

    def per_channel(self, node: fx.Node, module: nn.Module, value: _Feat, names: tuple[str, ...]) -> None:
        for name in names:
            tensor = getattr(module, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                block = self.units(node, value, tensor.shape[0])
                self.add_axis(node, f"{node.target}.{name}", 0, value.space, block,
                              buffer=name in dict(module.named_buffers(recurse=False)))

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

    def op_placeholder(self, node: fx.Node) -> _Feat:
        return _Feat(self.new(None, fixed=True))

    def op_get_attr(self, node: fx.Node) -> Any:
        tensor = operator.attrgetter(node.target)(self.root)
        if isinstance(tensor, torch.Tensor) and tensor.numel() > 1:
            raise self.fail(node, "a parameter or buffer used outside a supported module")
        return _CONST

    def op_output(self, node: fx.Node) -> None:
        out = self.new(None, fixed=True)
        fx.node.map_arg(node.args, lambda n: self.union(out, self.env[n].space, node)
                        if isinstance(self.env[n], _Feat) else None)

    def op_call_module(self, node: fx.Node) -> Any:
        module = self.root.get_submodule(node.target)
        args = [self.env[a] if isinstance(a, fx.Node) else _CONST for a in node.args]
        if len(args) != 1 or node.kwargs:
            raise self.fail(node, "a module called with more than one argument")
        x = self.feat(node, args[0])
        if isinstance(module, nn.Linear):
            if x.ndim not in (None, 2):
                raise self.fail(node, f"a Linear layer applied to a {x.ndim}-d tensor (it acts on the last axis)")
            return self.layer(node, module, x, module.in_features, module.out_features, 1, 0, 2)
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
            self.per_channel(node, module, x, ("weight", "bias"))
            return x
        if isinstance(module, _ELEMENTWISE_MODULES):
            return x
        if isinstance(module, nn.PReLU) and module.num_parameters == 1:
            return x
        if isinstance(module, _POOL_MODULES):
            self.no_flat(node, x)
            return x
        if isinstance(module, nn.Flatten):
            return self.flatten(node, x, module.start_dim, module.end_dim)
        raise self.fail(node, "unsupported module type")

    def no_flat(self, node: fx.Node, x: _Feat) -> None:
        if x.block != 1:
            raise self.fail(node, "it reads a flattened feature map")

    def layer_norm(self, node: fx.Node, x: _Feat, shape: tuple[int, ...]) -> None:
        covers = len(shape) == x.ndim - 1 if x.ndim is not None else None
        if covers is None:
            size = self.size[self.find(x.space)]
            covers = size is None or (shape[0] % size == 0 and (x.block is None or shape[0] == size * x.block))
        if not covers:
            raise self.fail(node, f"LayerNorm over {tuple(shape)} does not span the channel axis")

    def layer(self, node: fx.Node, module: nn.Module, x: _Feat, n_in: int, n_out: int, in_axis: int,
              out_axis: int, ndim: int) -> _Feat:
        """A layer mixing units: reads space ``x`` on ``in_axis`` of its weight, opens a new space on ``out_axis``."""
        block = self.units(node, x, n_in)
        self.add_axis(node, f"{node.target}.weight", in_axis, x.space, block)
        point = self.point_name(node.args[0])
        if point not in self.points.setdefault(x.space, []):
            self.points[x.space].append(point)
        out = self.new(n_out)
        self.producers[out] = [node.target]
        self.add_axis(node, f"{node.target}.weight", out_axis, out, 1)
        if getattr(module, "bias", None) is not None:
            self.add_axis(node, f"{node.target}.bias", 0, out, 1)
        return _Feat(out, 1, ndim)

    def point_name(self, node: fx.Node) -> str:
        """Readable name of an activation point: the module's name if it is called once, else the node's name."""
        if node.op == "call_module" and self.calls[node.target] == 1:
            return str(node.target)
        return node.name

    def flatten(self, node: fx.Node, x: _Feat, start: int, end: int) -> _Feat:
        if start != 1 or end not in (-1, (x.ndim or 0) - 1):
            raise self.fail(node, f"flatten(start_dim={start}, end_dim={end}); only flattening from dim 1 to the "
                            "end keeps channels in blocks")
        return x if x.ndim == 2 else _Feat(x.space, None, 2)

    def elementwise(self, node: fx.Node, values: list[Any]) -> Any:
        feats = [v for v in values if isinstance(v, _Feat)]
        if not feats:
            return _CONST
        first = feats[0]
        for other in feats[1:]:
            if other.block != first.block:
                raise self.fail(node, "it combines tensors flattened differently")
            self.union(first.space, other.space, node)
        ndims = [f.ndim for f in feats if f.ndim is not None]
        return _Feat(first.space, first.block, max(ndims) if ndims else None)

    def reduce(self, node: fx.Node, x: _Feat, dims: Any, keepdim: bool) -> _Feat:
        if dims is None:
            raise self.fail(node, "a reduction over all axes mixes channels")
        dims = self.dims(node, x, dims)
        if 1 in dims or 0 in dims:
            raise self.fail(node, f"a reduction over dims {dims} (only spatial dims >= 2 keep channels apart)")
        ndim = None if x.ndim is None else x.ndim if keepdim else x.ndim - len(dims)
        return _Feat(x.space, x.block, ndim)

    def generic(self, node: fx.Node, target: Any, is_method: bool) -> Any:
        args = [self.env[a] if isinstance(a, fx.Node) else a for a in node.args]
        kwargs = {k: self.env[v] if isinstance(v, fx.Node) else v for k, v in node.kwargs.items()}
        name = target if is_method else getattr(target, "__name__", "")
        if (is_method and name in ("size", "dim", "numel")) or target in (getattr, len):
            return _CONST
        inputs: list[Any] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: inputs.append(self.env[n]))
        if not any(isinstance(v, _Feat) for v in inputs):
            return _CONST  # arithmetic on sizes and constants
        if (is_method and name in _ELEMENTWISE_METHODS) or target in _ELEMENTWISE_FUNCS:
            return self.feat(node, args[0])
        if target in _POOL_FUNCS:
            x = self.feat(node, args[0])
            self.no_flat(node, x)
            return x
        if (is_method and name in _BINARY_METHODS) or target in _BINARY_FUNCS:
            return self.elementwise(node, [*args, *kwargs.values()])
        if target is torch.flatten or (is_method and name == "flatten"):
            start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
            end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
            return self.flatten(node, self.feat(node, args[0]), start, end)
        if (is_method and name in ("view", "reshape")) or target is torch.reshape:
            shape = args[1:] if is_method else list(args[1])
            if len(shape) == 1 and isinstance(shape[0], tuple | list):
                shape = list(shape[0])
            if len(shape) == 2 and shape[1] == -1:
                return self.flatten(node, self.feat(node, args[0]), 1, -1)
            raise self.fail(node, "a reshape other than (batch, -1)")
        if (is_method and name in _REDUCE) or target in (torch.mean, torch.sum, torch.amax, torch.amin):
            dims = args[1] if len(args) > 1 else kwargs.get("dim")
            keep = args[2] if len(args) > 2 else kwargs.get("keepdim", False)
            return self.reduce(node, self.feat(node, args[0]), dims, keep)
        raise self.fail(node, "unsupported operation")

    def op_call_function(self, node: fx.Node) -> Any:
        if node.target is operator.getitem:
            value = self.env[node.args[0]] if isinstance(node.args[0], fx.Node) else _CONST
            if isinstance(value, _Feat):
                raise self.fail(node, "indexing a feature tensor")
            return _CONST
        return self.generic(node, node.target, is_method=False)

    def op_call_method(self, node: fx.Node) -> Any:
        return self.generic(node, node.target, is_method=True)

    # result ------------------------------------------------------------------------------------------------------
    def spec(self) -> PermutationSpec:
        groups: dict[int, list[Axis]] = {}
        for key, axis in self.order:
            space, block = self.axes[(key, axis)]
            root = self.find(space)
            if not self.fixed[root]:
                groups.setdefault(root, []).append(Axis(key, axis, block))
        producers: dict[int, list[str]] = {}
        points: dict[int, list[str]] = {}
        for space, names in self.producers.items():
            producers.setdefault(self.find(space), []).extend(names)
        for space, names in self.points.items():
            merged = points.setdefault(self.find(space), [])
            merged.extend(n for n in names if n not in merged)
        named: dict[str, list[Axis]] = {}
        activations: dict[str, list[str]] = {}
        for i, (root, axes) in enumerate(groups.items()):
            prods = producers.get(root, [])
            name = (f"P_{prods[0]}" if len(prods) == 1 else f"P_res_{prods[0]}") if prods else f"P_{i}"
            named[name] = axes
            if points.get(root):
                activations[name] = points[root]
        keys = {a.key for axes in named.values() for a in axes}
        return PermutationSpec(named, activations, frozenset(self.buffers & keys))


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
        graph = _LeafTracer().trace(net)
    except Exception as err:  # noqa: BLE001 - fx raises many types; all mean "not traceable"
        raise SpecDerivationError(f"torch.fx could not trace {type(net).__name__}: {err}. {_HINT}") from err
    tracer = _Tracer(net)
    tracer.run(graph)
    return tracer.spec()
