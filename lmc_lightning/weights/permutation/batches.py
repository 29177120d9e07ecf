"""Turn the ``data`` argument of the data-driven matchers into batches, and run a net on a weight dict."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, fx, nn

Data = Tensor | tuple[Tensor, Tensor] | Iterable[Any]


def _is_xy(data: Any) -> bool:
    return (isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, Tensor) for t in data)
            and data[1].ndim == 1 and len(data[0]) == len(data[1]) and not data[1].is_floating_point())


def iter_batches(data: Data, batch_size: int = 256) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Yield ``(x, y)`` batches (``y`` None when unlabelled).

    Args:
        data: A tensor of inputs, an ``(x, y)`` pair of tensors (both split into batches of ``batch_size``), or an
            iterable of batches (a DataLoader, a list), each a tensor or a tuple/list/dict ``(x, y, ...)``.
        batch_size: Batch size used to split tensors.
    """
    if data is None:
        raise ValueError("This alignment method needs data: pass data=x (a tensor of inputs), data=(x, y), or an "
                         "iterable of batches such as a DataLoader.")
    if isinstance(data, Tensor):
        yield from ((x, None) for x in data.split(batch_size))
        return
    if _is_xy(data):
        yield from zip(data[0].split(batch_size), data[1].split(batch_size), strict=True)
        return
    for batch in data:
        if isinstance(batch, Tensor):
            yield batch, None
        elif isinstance(batch, Mapping):
            x = batch.get("x", batch.get("input", batch.get("image")))
            if x is None:
                raise ValueError(f"Cannot find the inputs in a dict batch with keys {list(batch)}; use key 'x'.")
            yield x, batch.get("y", batch.get("target", batch.get("label")))
        elif isinstance(batch, tuple | list) and batch and isinstance(batch[0], Tensor):
            yield batch[0], batch[1] if len(batch) > 1 else None
        else:
            raise TypeError(f"A batch must be a tensor or a tuple (x, y, ...), got {type(batch).__name__}.")


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


def capture_module(net: nn.Module, points: list[str]) -> fx.GraphModule:
    """A traced copy of ``net`` that returns the outputs at ``points`` (fx node names or module names).

    Raises:
        ValueError: A point names neither a node of the traced graph nor a called module.
    """
    gm = fx.symbolic_trace(net)
    by_name = {n.name: n for n in gm.graph.nodes}
    by_module: dict[str, fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "call_module":
            by_module.setdefault(str(n.target), n)
    nodes = []
    for point in points:
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
