"""A zoo's forward pass as one wide network: K members' channels side by side, convolutions grouped by member.

For a zoo of ``K`` members of one architecture, activations ``[B, C, ...]`` of every member are laid side by side as
``[B, K * C, ...]`` (member-major). A convolution then is one convolution with ``K`` times the groups, BatchNorm and
GroupNorm one call over ``K * C`` channels (running statistics updated in place, per member), a linear layer one
batched matrix product; ReLU, pooling, residual additions and ``Flatten(1)`` act on the wide tensor as they act on
each member. The architecture's own ``forward`` runs unchanged on the wide tensor: only its layers are swapped. A
channel LayerNorm (``channel_norm`` layers, the rethink-re-basin seed's LN) normalises each member's channels apart,
and any other leaf layer without tensors of its own (an option-A padded shortcut, a reshape) runs once on the
members folded into the batch, ``[B * K, C, ...]``.

This is what ``torch.func.vmap`` does for these layers, without its per-call host work, and it runs under
``bf16-mixed`` autocast on CUDA (where vmap's BatchNorm rule rejects bfloat16 inputs with float32 statistics) and in
``channels_last``. :func:`wide_twin` accepts only architectures whose parameters and buffers all sit in these layers;
the caller checks the twin against the members run alone once before using it (``StackedNets``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Tensors = Callable[[str], Tensor | None]
"""Looks a member-stacked tensor up by its state-dict name (``[K, *shape]``), None when the layer has none."""

PASS_THROUGH = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Identity, nn.Dropout, nn.MaxPool1d,
                nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
                nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Sequential, nn.ModuleList, nn.ModuleDict)
"""Layers that act on each channel (or element) alone, so on the wide tensor as on each member (and empty
containers: an identity shortcut)."""


class _Wide(nn.Module):
    """A layer of the wide network: reads the zoo's stacked tensors under ``prefix`` through ``tensors``."""

    def __init__(self, layer: nn.Module, prefix: str, tensors: Tensors, members: int) -> None:
        super().__init__()
        self.layer, self.prefix, self.members = layer, prefix, members
        self.__dict__["tensors"] = tensors  # not a submodule or parameter: the zoo owns the storage

    def get(self, name: str) -> Tensor | None:
        return self.tensors(self.prefix + name)

    def flat(self, name: str) -> Tensor | None:
        """The stacked tensor with the member axis merged into the first one (a view)."""
        t = self.get(name)
        return None if t is None else t.flatten(0, 1)


class WideConv(_Wide):
    """``Conv1d`` / ``Conv2d`` of every member: one convolution with ``members x groups`` groups."""

    def forward(self, x: Tensor) -> Tensor:
        c = self.layer
        conv = F.conv1d if isinstance(c, nn.Conv1d) else F.conv2d
        return conv(x, self.flat("weight"), self.flat("bias"), c.stride, c.padding, c.dilation,
                    c.groups * self.members)


class WideLinear(_Wide):
    """``Linear`` of every member on ``[..., K * in]``: one batched matrix product, ``[..., K * out]``."""

    def forward(self, x: Tensor) -> Tensor:
        weight, bias = self.get("weight"), self.get("bias")  # [K, out, in], [K, out]
        lead = x.shape[:-1]
        x = x.reshape(-1, self.members, weight.shape[-1]).transpose(0, 1)  # [K, N, in]
        out = torch.bmm(x, weight.transpose(1, 2)) if bias is None else torch.baddbmm(bias.unsqueeze(1), x,
                                                                                      weight.transpose(1, 2))
        return out.transpose(0, 1).reshape(*lead, -1)


class WideBatchNorm(_Wide):
    """``BatchNorm1d`` / ``BatchNorm2d`` of every member: one call over ``K * C`` channels, as ``nn.BatchNorm``
    computes it (momentum, cumulative averages, ``track_running_stats``); running statistics are views of the
    zoo's stacked buffers, updated in place."""

    def forward(self, x: Tensor) -> Tensor:
        bn = self.layer
        mean, var, count = self.flat("running_mean"), self.flat("running_var"), self.get("num_batches_tracked")
        factor = 0.0 if bn.momentum is None else bn.momentum
        if self.training and bn.track_running_stats and count is not None:
            count.add_(1)
            if bn.momentum is None:
                factor = 1.0 / float(count[0])  # every member has taken the same number of steps
        use_batch = self.training or mean is None
        return F.batch_norm(x, mean if not self.training or bn.track_running_stats else None,
                            var if not self.training or bn.track_running_stats else None,
                            self.flat("weight"), self.flat("bias"), use_batch, factor, bn.eps)


class WideGroupNorm(_Wide):
    """``GroupNorm`` of every member: ``K x groups`` groups over ``K * C`` channels."""

    def forward(self, x: Tensor) -> Tensor:
        gn = self.layer
        return F.group_norm(x, gn.num_groups * self.members, self.flat("weight"), self.flat("bias"), gn.eps)


class WideChannelNorm(_Wide):
    """A channel LayerNorm (``channel_norm = True``: ``LayerNorm(C)`` over the channels at each position) of every
    member: each member's ``C`` channels normalised apart, then its own affine weight and bias."""

    def forward(self, x: Tensor) -> Tensor:
        ln = self.layer
        y = x.unflatten(1, (self.members, -1)).movedim(2, -1)  # [B, K, ..., C]
        y = F.layer_norm(y, y.shape[-1:], eps=ln.eps)
        weight, bias = self.get("weight"), self.get("bias")  # [K, C]
        view = (self.members,) + (1,) * (y.dim() - 3) + (y.shape[-1],)
        if weight is not None:
            y = y * weight.reshape(view)
        if bias is not None:
            y = y + bias.reshape(view)
        return y.movedim(-1, 2).flatten(1, 2)


class WideMemberwise(_Wide):
    """A leaf layer without tensors that is not channel-wise (e.g. a zero-padded shortcut): run once with the
    members folded into the batch, ``[B, K * C, ...] -> [B * K, C, ...]`` and back (right for any layer that treats
    samples independently; the zoo's check against the members alone guards the rest)."""

    def forward(self, x: Tensor) -> Tensor:
        batch = x.shape[0]
        out = self.layer(x.unflatten(1, (self.members, -1)).flatten(0, 1))
        return out.unflatten(0, (batch, self.members)).flatten(1, 2)


WIDE: dict[type, type[_Wide]] = {nn.Conv1d: WideConv, nn.Conv2d: WideConv, nn.Linear: WideLinear,
                                 nn.BatchNorm1d: WideBatchNorm, nn.BatchNorm2d: WideBatchNorm,
                                 nn.GroupNorm: WideGroupNorm}


def _wide_kind(module: nn.Module) -> type[_Wide] | None:
    """The wide layer that replaces ``module``; None for layers that act on the wide tensor as they are (pass-through
    and containers) and for layers with tensors the wide forward does not know."""
    if type(module) in WIDE:
        return WIDE[type(module)]
    if isinstance(module, nn.LayerNorm) and getattr(module, "channel_norm", False):
        return WideChannelNorm
    own = next(iter(module.parameters(recurse=False)), None) is not None or next(
        iter(module.buffers(recurse=False)), None) is not None
    passes = isinstance(module, PASS_THROUGH) or (type(module) is nn.Flatten and module.start_dim == 1
                                                  and module.end_dim == -1)
    if own or passes or list(module.children()):
        return None
    return WideMemberwise


def unsupported(net: nn.Module) -> str | None:
    """Why ``net`` has no wide twin (the first offending layer), or None when it has one."""
    for name, module in net.named_modules():
        kind = type(module)
        if kind in (nn.Conv1d, nn.Conv2d) and module.padding_mode != "zeros":
            return f"{name}: padding_mode={module.padding_mode!r}"
        if _wide_kind(module) is not None:
            continue
        own = [n for n, _ in module.named_parameters(recurse=False)] + [
            n for n, _ in module.named_buffers(recurse=False)]
        if own:
            return f"{name or 'the network'} ({kind.__name__}) holds tensors of its own: {own[:3]}"
    return None


def wide_twin(template: nn.Module, members: int, tensors: Tensors) -> nn.Module | None:
    """A copy of ``template`` whose layers compute all ``members`` at once on wide tensors; None if unsupported.

    Args:
        template: The architecture (any device, e.g. ``meta``: its tensors are not used).
        members: Zoo size K.
        tensors: Look-up of the zoo's stacked tensors by state-dict name.
    """
    if unsupported(template) is not None:
        return None
    twin = copy.deepcopy(template)
    swaps: list[tuple[nn.Module, str, nn.Module]] = []
    for name, module in twin.named_modules():
        for child_name, child in module.named_children():
            wide = _wide_kind(child)
            if wide is not None:
                prefix = f"{name}.{child_name}." if name else f"{child_name}."
                swaps.append((module, child_name, wide(child, prefix, tensors, members)))
    whole = _wide_kind(twin)
    if whole is not None:  # the architecture is a single layer
        return whole(twin, "", tensors, members)
    for parent, child_name, wide in swaps:
        setattr(parent, child_name, wide)
    return twin


def to_wide(x: Tensor, members: int, shared: bool) -> Tensor:
    """``[K, B, C, ...]`` (or ``[B, C, ...]`` fed to every member when ``shared``) as ``[B, K * C, ...]``."""
    if shared:
        return x.unsqueeze(1).expand(x.shape[0], members, *x.shape[1:]).flatten(1, 2)
    return x.movedim(0, 1).flatten(1, 2)


def from_wide(out: Tensor, members: int) -> Tensor:
    """``[B, K * classes]`` logits as ``[K, B, classes]``."""
    return out.unflatten(1, (members, -1)).movedim(1, 0)

