"""Equivalence check: a permuted net must compute the same function as the original.

After an alignment, both weight dicts run on one probe batch in float64 (eval mode). If the outputs differ, the check
looks for the culprit: each permutation group is applied alone (every group is a symmetry on its own, so a group
that changes the output alone is wrongly specified), and the modules of the net are compared in execution order up to
a permutation of their channel axis (dim 1 or the last dim) to find the first layer where the outputs diverge.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lmc_lightning.weights.data import Data
from lmc_lightning.weights.permutation.apply import apply_permutation
from lmc_lightning.weights.permutation.batches import eval_mode, iter_batches
from lmc_lightning.weights.permutation.spec import PermutationSpec

_PROBE_SIZES = (32, 28, 16, 8, 4, 64, 224, 12, 24, 2, 1)


class EquivalenceError(RuntimeError):
    """A permuted net does not compute the same function as the original (the spec is wrong for this net)."""


def _first_layer(net: nn.Module) -> nn.Module | None:
    for module in net.modules():
        if isinstance(module, nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Embedding):
            return module
    return None


def probe_input(net: nn.Module, data: Data | None = None, n: int = 4, seed: int = 0) -> Tensor:
    """A small probe batch for ``net``: the first ``n`` inputs of ``data``, else seeded random inputs.

    Without data the input shape is guessed from the first layer (``Linear``: ``[n, in_features]``; ``Conv``:
    images of ``in_channels`` channels at the first size that runs, 32, 28, 16, 8, 4, 64, 224, ... pixels;
    ``Embedding``: token ids of length 16).

    Raises:
        ValueError: No input shape runs; pass ``probe=`` (a tensor of inputs) or ``check=False``.
    """
    if data is not None:
        for x, _ in iter_batches(data, n):
            return x[:n]
    gen = torch.Generator().manual_seed(seed)
    first = _first_layer(net)
    candidates: list[Tensor] = []
    if isinstance(first, nn.Embedding):
        candidates = [torch.randint(first.num_embeddings, (n, 16), generator=gen)]
    elif isinstance(first, nn.Linear):
        candidates = [torch.randn(n, first.in_features, generator=gen)]
        side = round((first.in_features / 3) ** 0.5)
        candidates += [torch.randn(n, c, s, s, generator=gen) for c in (1, 3) for s in _PROBE_SIZES + (side,)
                       if c * s * s == first.in_features]
    elif first is not None:
        dims = first.weight.ndim - 2
        candidates = [torch.randn(n, first.in_channels, *(s,) * dims, generator=gen) for s in _PROBE_SIZES]
    param = next((p for p in net.parameters() if p.is_floating_point()), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    with eval_mode(net), torch.no_grad():
        for x in candidates:
            x = (x.to(dtype) if x.is_floating_point() else x).to(device)
            try:
                net(x)
            except Exception:  # noqa: BLE001, S112 - any failure means "not this shape"
                continue
            return x
    raise ValueError(f"Cannot guess an input shape for {type(net).__name__} to check that alignment preserves its "
                     "function; pass probe=<a tensor of a few inputs> or data=..., or check=False to skip the check.")


def _outputs(net: nn.Module, theta: Mapping[str, Tensor], x: Tensor) -> tuple[Tensor, list[tuple[str, Tensor]]]:
    """Float64 output of ``net`` with ``theta`` on ``x`` and every leaf module's output in execution order."""
    records: list[tuple[str, Tensor]] = []
    hooks = []
    for name, module in net.named_modules():
        if name and not any(True for _ in module.children()):
            hooks.append(module.register_forward_hook(
                lambda m, i, o, name=name: records.append((name, o.detach())) if isinstance(o, Tensor) else None))
    try:
        out = torch.func.functional_call(net, {k: v.detach().double() if v.is_floating_point() else v
                                               for k, v in theta.items()}, (x,))
    finally:
        for h in hooks:
            h.remove()
    return out, records


def _tolerance(ref: Tensor, rtol: float) -> float:
    return rtol * (1.0 + ref.abs().max().item())


def _same_up_to_channels(a: Tensor, b: Tensor, rtol: float) -> bool:
    if a.shape != b.shape or not a.is_floating_point():
        return a.shape == b.shape and torch.equal(a, b)
    tol = _tolerance(a, rtol)
    if (a - b).abs().max().item() <= tol:
        return True
    dims = {1, a.ndim - 1} if a.ndim > 1 else {0}
    return any((a.sort(d).values - b.sort(d).values).abs().max().item() <= tol for d in dims)


def _first_divergence(net: nn.Module, theta: Mapping[str, Tensor], permuted: Mapping[str, Tensor], x: Tensor,
                      rtol: float) -> str | None:
    _, ref = _outputs(net, theta, x)
    _, new = _outputs(net, permuted, x)
    for (name, a), (_, b) in zip(ref, new, strict=False):
        if not _same_up_to_channels(a, b, rtol):
            return name
    return None


def check_equivalence(net: nn.Module, theta: Mapping[str, Tensor], spec: PermutationSpec,
                      perm: Mapping[str, Tensor], probe: Tensor, rtol: float = 1e-6) -> float:
    """Check that ``apply_permutation(theta, spec, perm)`` computes the same function as ``theta`` on ``probe``.

    Both run in float64 and eval mode on a copy of ``net``; the outputs must agree to ``rtol * (1 + max|output|)``.

    Args:
        net: Any instance of the architecture.
        theta: The original weights (full state dict).
        spec: Permutation spec used for the alignment.
        perm: Group name -> index tensor.
        probe: A few inputs.
        rtol: Tolerance relative to the output scale.

    Returns:
        The largest absolute difference of the outputs.

    Raises:
        EquivalenceError: The outputs differ; the message names the permutation group(s) that change the function
            on their own and the first module whose output diverges.
    """
    ref_net = copy.deepcopy(net).double()
    x = probe.double() if probe.is_floating_point() else probe
    theta = {k: v.detach().cpu() for k, v in theta.items()}
    perm = {g: torch.as_tensor(p).cpu() for g, p in perm.items()}
    with eval_mode(ref_net), torch.no_grad():
        permuted = apply_permutation(theta, spec, perm)
        ref, _ = _outputs(ref_net, theta, x.cpu())
        out, _ = _outputs(ref_net, permuted, x.cpu())
        err = (out - ref).abs().max().item()
        if err <= _tolerance(ref, rtol):
            return err
        bad = []
        for group in spec.groups:
            alone = {g: p if g == group else torch.arange(len(p)) for g, p in perm.items()}
            single = apply_permutation(theta, spec, alone)
            single_out, _ = _outputs(ref_net, single, x.cpu())
            if (single_out - ref).abs().max().item() > _tolerance(ref, rtol):
                bad.append(group)
        culprit = bad[0] if bad else None
        probe_theta = apply_permutation(theta, spec, {g: p if g == culprit else torch.arange(len(p))
                                                      for g, p in perm.items()}) if culprit else permuted
        layer = _first_divergence(ref_net, theta, probe_theta, x.cpu(), rtol)
    groups = f"permutation group(s) {bad}" if bad else "no single group (only their combination)"
    where = f"; outputs first diverge at module '{layer}'" if layer else ""
    raise EquivalenceError(
        f"The aligned {type(net).__name__} does not compute the same function as the original (max output "
        f"difference {err:.3g} in float64): {groups} change(s) the function{where}. The permutation spec is wrong "
        "for this net: fix the spec (or the op the tracer misread), or pass check=False to skip this check.")
