"""Turn the ``data`` argument of the data-driven matchers into batches, and run a net on a weight dict."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

from lmc_lightning.weights.data import Data, materialize


def iter_batches(data: Data, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches of ``batch_size`` (``y`` None when unlabelled).

    Args:
        data: Any form :func:`~lmc_lightning.weights.data.materialize` accepts (a tensor of inputs, ``(x, y)``, a
            DataLoader or other iterable of batches, a Dataset, a datamodule's training split); read once into
            tensors, then split in order.
        batch_size: Batch size.
    """
    if data is None:
        raise ValueError("This alignment method needs data: pass data=x (a tensor of inputs), data=(x, y), a "
                         "DataLoader, a Dataset or a datamodule.")
    x, y = materialize(data, "train", what="data", labels=False)
    ys = y.split(batch_size) if y is not None else [None] * math.ceil(len(x) / batch_size)
    yield from zip(x.split(batch_size), ys, strict=True)


@contextlib.contextmanager
def eval_mode(net: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode for the block, then restore each one's own mode."""
    modes = {m: m.training for m in net.modules()}
    net.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.train(training)


def capture_module(net: nn.Module, points: list[str], tracer: fx.Tracer | None = None) -> fx.GraphModule:
    """A traced copy of ``net`` that returns the outputs at ``points`` (fx node names or module names; a suffix
    ``@axis`` or ``@axis[start:stop]`` is ignored here).

    Args:
        net: The network.
        points: Where to capture.
        tracer: The fx tracer whose node names ``points`` use (default ``torch.fx.Tracer``, as ``symbolic_trace``;
            the spec tracer :class:`~lmc_lightning.weights.permutation.trace.LeafTracer` for derived specs).

    Raises:
        ValueError: A point names neither a node of the traced graph nor a called module.
    """
    gm = fx.GraphModule(net, (tracer or fx.Tracer()).trace(net), type(net).__name__)
    by_name = {n.name: n for n in gm.graph.nodes}
    by_module: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            by_module.setdefault(str(n.target), n)
    nodes = []
    for point in points:
        point = point.split("@")[0]  # "name@axis": features on another axis than 1
        node = by_module.get(point) or by_name.get(point)
        if node is None:
            raise ValueError(f"Activation point '{point}' is neither a node of the traced graph nor a called module "
                             f"of {type(net).__name__}; modules are {sorted(by_module)}.")
        nodes.append(node)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (tuple(nodes),)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return gm


def run_with(module: nn.Module, theta: Mapping[str, Tensor], x: Tensor) -> Any:
    """``module(x)`` with the tensors of ``theta`` (keys the module does not hold are ignored)."""
    own = dict(module.state_dict(keep_vars=True))
    return torch.func.functional_call(module, {k: v for k, v in theta.items() if k in own}, (x,))
