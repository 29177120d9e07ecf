"""K copies of one architecture with stacked weights, run together through ``torch.func.vmap``."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, stack_module_state, vmap

from lmc_lightning.nets.mlp import MLP
from lmc_lightning.weights.grouped import from_wide, to_wide, wide_twin

SEP = ":"  # stands for "." in registered names (never part of a Python attribute name)


class StackedNets(nn.Module):
    """A zoo of ``K`` networks of one architecture held as stacked tensors (``[K, *shape]`` per weight).

    Every parameter and buffer of the architecture is one tensor with a leading model axis, registered under its
    state-dict name with ``"."`` replaced by ``":"`` (``layers:0:weight``). The forward pass runs all members at once
    with ``vmap(functional_call(...))`` over those tensors; matrix products become batched ones and convolutions
    grouped ones. BatchNorm keeps per-member running statistics (updated in place, per member, in train mode).
    Networks built only from convolutions, linear layers, BatchNorm/GroupNorm/channel LayerNorm and layers without
    tensors (ReLU, pooling, ``Flatten``, padded shortcuts; residual additions in their ``forward``) run instead as
    one wide network
    (:mod:`~lmc_lightning.weights.grouped`): the same grouped convolutions without ``vmap``'s host work, usable under
    bf16 autocast on CUDA and in ``channels_last``; the first forward pass in each of train and eval mode checks it
    against the members run alone on two samples each (the weights' dtype, no TF32, outputs within 1e-4) and falls
    back to ``vmap`` for good if they differ. ``path`` says which one runs. Networks that are a chain of ``Flatten``,
    ``Linear`` and ``ReLU`` layers (the registry's ``mlp``, or an ``nn.Sequential`` of them) skip ``vmap``: each
    layer is one broadcast ``matmul`` plus the bias, the operations ``vmap`` itself runs for them (same results bit
    for bit, tested), with a fraction of its per-call host work. An
    element-wise optimiser (SGD, Adam, AdamW) over the stacked tensors updates each member exactly as its own
    optimiser would; anything that couples parameters (gradient clipping by global norm) couples the members.

    Args:
        nets: The members' initial networks (same architecture); their tensors are copied.
    """

    fast_chain: bool = True
    """Class setting: False runs Linear/ReLU chains through ``vmap`` as well (for comparisons)."""
    wide: bool = True
    """Class setting: False runs networks with a wide twin through ``vmap`` as well (for comparisons)."""
    channels_last: bool = False
    """Run the wide network's 4-D activations in channels-last layout (instance setting)."""

    def __init__(self, nets: Sequence[nn.Module]) -> None:
        super().__init__()
        if len(nets) < 1:
            raise ValueError("StackedNets needs at least one network.")
        keys = list(nets[0].state_dict())
        for i, net in enumerate(nets[1:], 1):
            if list(net.state_dict()) != keys:
                raise ValueError(f"network {i} has a different architecture from network 0 (state-dict keys differ).")
        params, buffers = stack_module_state(list(nets))
        self.num_models = len(nets)
        self.keys = keys
        self.param_names = list(params)
        self.buffer_names = list(buffers)
        for name, value in params.items():
            self.register_parameter(name.replace(".", SEP), nn.Parameter(value.detach().clone()))
        for name, value in buffers.items():
            self.register_buffer(name.replace(".", SEP), value.clone())
        # The architecture without storage: functional_call supplies every tensor. Not a registered submodule.
        self.__dict__["template"] = copy.deepcopy(nets[0]).to("meta")
        self._chain = linear_chain(self.template)
        self.__dict__["twin"] = None if self._chain is not None else wide_twin(self.template, self.num_models,
                                                                                 self._lookup)
        self._override: dict[str, Tensor] | None = None  # tensors the twin reads instead of ours (its check)
        self._twin_ok: dict[bool, bool] = {}  # train mode -> the twin matched vmap in that mode

    def _lookup(self, name: str) -> Tensor | None:
        if self._override is not None and name in self._override:
            return self._override[name]
        return getattr(self, name.replace(".", SEP), None)

    @property
    def path(self) -> str:
        """How the forward pass runs: ``chain`` (broadcast matmuls), ``wide`` (the wide twin; ``wide?`` before its
        check in this mode), or ``vmap``."""
        if self._chain is not None and self.fast_chain:
            return "chain"
        if self.twin is None or not self.wide or self._twin_ok.get(self.training) is False:
            return "vmap"
        return "wide" if self._twin_ok.get(self.training) else "wide?"

    def train(self, mode: bool = True) -> StackedNets:
        """Set train/eval mode of the members."""
        super().train(mode)
        self.template.train(mode)
        if self.twin is not None:
            self.twin.train(mode)
        return self

    def _tensors(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        params = {n: getattr(self, n.replace(".", SEP)) for n in self.param_names}
        buffers = {n: getattr(self, n.replace(".", SEP)) for n in self.buffer_names}
        return params, buffers

    def forward(self, x: Tensor, shared: bool = False) -> Tensor:
        """Logits of every member: ``x`` is ``[K, B, ...]`` (one batch per member), or ``[B, ...]`` fed to all
        members when ``shared`` (then convolutions of all members run as one). Returns ``[K, B, classes]``."""
        if not shared and x.shape[0] != self.num_models:
            raise ValueError(f"expected one batch per member, [{self.num_models}, B, ...]; got {tuple(x.shape)}. "
                             "Pass shared=True to feed one batch to every member.")
        if self._chain is not None and self.fast_chain:
            return self._chain_forward(x, shared)
        if self.path == "wide?":
            self._twin_ok[self.training] = self._check_twin(x, shared)
        if self.path == "wide":
            return self._wide_forward(x, shared)
        return self._vmap_forward(*self._tensors(), x, shared)

    def _vmap_forward(self, params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, shared: bool) -> Tensor:
        def member(p: dict[str, Tensor], b: dict[str, Tensor], inputs: Tensor) -> Tensor:
            return functional_call(self.template, (p, b), (inputs,))

        return vmap(member, in_dims=(0, 0, None if shared else 0), randomness="different")(params, buffers, x)

    def _wide_forward(self, x: Tensor, shared: bool) -> Tensor:
        x = to_wide(x, self.num_models, shared)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return from_wide(self.twin(x), self.num_models)

    @torch.no_grad()
    def _check_twin(self, x: Tensor, shared: bool) -> bool:
        """Whether the wide twin gives the logits of each member run alone (a copy, as :meth:`member` builds it) on
        two samples per member: in the weights' dtype, autocast and TF32 off, dropout off, running statistics
        untouched."""
        params, buffers = self._tensors()
        dtype = next(iter(params.values())).dtype if params else torch.float32
        probe = (x[:2] if shared else x[:, :2]).to(dtype if dtype.is_floating_point else torch.float32)
        dropouts = [m for m in self.twin.modules() if isinstance(m, nn.modules.dropout._DropoutNd) and m.training]
        try:  # in full float32 (no TF32: channels-last and plain convolutions may pick different algorithms)
            with torch.autocast(x.device.type, enabled=False), _no_tf32():
                ref = []
                for k in range(self.num_models):
                    net = self.member(k)
                    for m in net.modules():
                        if isinstance(m, nn.modules.dropout._DropoutNd):
                            m.eval()
                    ref.append(net(probe if shared else probe[k]))
                ref = torch.stack(ref)
                for m in dropouts:
                    m.eval()
                self._override = {n: b.clone() for n, b in buffers.items()}
                out = self._wide_forward(probe, shared)
        except (RuntimeError, ValueError, TypeError, IndexError):  # an architecture the wide layout breaks
            return False
        finally:
            self._override = None
            for m in dropouts:
                m.train()
        scale = float(ref.abs().max()) if ref.numel() else 0.0
        return out.shape == ref.shape and bool(torch.allclose(out, ref, rtol=1e-4, atol=1e-5 * max(scale, 1.0)))

    def _chain_forward(self, x: Tensor, shared: bool) -> Tensor:
        """The forward pass of a :func:`linear_chain` net without ``vmap`` (member axis first, or broadcast)."""
        lead = 1 if shared else 2  # dimensions before a member's features: (B,) or (K, B)
        for kind, name in self._chain:
            if kind == "flatten":
                start, end = name
                x = x.flatten(start + lead - 1, end if end < 0 else end + lead - 1)
            elif kind == "relu":
                x = torch.relu(x)
            else:
                weight, bias = name
                x = torch.matmul(x, getattr(self, weight).transpose(1, 2))
                if bias is not None:
                    x = x + getattr(self, bias).unsqueeze(1)
                lead = 2
        return x

    def member_state(self, index: int) -> dict[str, Tensor]:
        """Member ``index``'s state dict (views of the stacked tensors), in the architecture's key order."""
        if not -self.num_models <= index < self.num_models:
            raise IndexError(f"member index {index} out of range for a zoo of {self.num_models}.")
        return {k: getattr(self, k.replace(".", SEP))[index] for k in self.keys}

    def member(self, index: int) -> nn.Module:
        """Member ``index`` as a plain network (a copy, with the zoo's device and dtypes, in its train/eval mode)."""
        net = copy.deepcopy(self.template)
        net.load_state_dict({k: v.detach().clone() for k, v in self.member_state(index).items()}, assign=True)
        return net.train(self.training)

    @torch.no_grad()
    def load_member(self, index: int, state: dict[str, Tensor]) -> None:
        """Copy a plain network's state dict into member ``index``."""
        for k in self.keys:
            getattr(self, k.replace(".", SEP))[index].copy_(state[k])


@contextlib.contextmanager
def _no_tf32() -> Iterator[None]:
    """Convolutions and matrix products in full float32 on CUDA inside the block (TensorFloat-32 off)."""
    matmul = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled,
                                        benchmark=torch.backends.cudnn.benchmark,
                                        deterministic=torch.backends.cudnn.deterministic, allow_tf32=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul


def linear_chain(net: nn.Module) -> list[tuple[str, Any]] | None:
    """The layers of ``net`` as ``("flatten", (start_dim, end_dim))``, ``("linear", (weight name, bias name or
    None))`` (registered ``":"``-joined names) and ``("relu", None)`` steps, when its forward pass is exactly their
    chain; else None.

    Recognised: :class:`~lmc_lightning.nets.mlp.MLP` (``flatten -> hidden -> classifier``) and ``nn.Sequential``
    (nested too) of ``Flatten`` (not over the batch axis), ``Linear`` and ``ReLU``; anything else (another layer
    type, a subclass that may override ``forward``) runs through ``vmap``.
    """
    steps: list[tuple[str, Any]] = []

    def walk(module: nn.Module, prefix: str) -> bool:
        kind = type(module)
        if kind is MLP or kind is nn.Sequential:
            names = ["flatten", "hidden", "classifier"] if kind is MLP else [n for n, _ in module.named_children()]
            return all(walk(getattr(module, name), f"{prefix}{name}{SEP}") for name in names)
        if kind is nn.Flatten and module.start_dim >= 1 and (module.end_dim < 0 or module.end_dim >= module.start_dim):
            steps.append(("flatten", (module.start_dim, module.end_dim)))
        elif kind is nn.Linear:
            steps.append(("linear", (f"{prefix}weight", None if module.bias is None else f"{prefix}bias")))
        elif kind is nn.ReLU:
            steps.append(("relu", None))
        else:
            return False
        return True

    return steps if walk(net, "") and any(kind == "linear" for kind, _ in steps) else None


def unstack_state(stacked: dict[str, Tensor], index: int) -> dict[str, Tensor]:
    """Member ``index`` of a :class:`StackedNets` state dict (``":"``-joined names), with ``"."`` names."""
    return {k.replace(SEP, "."): v[index] for k, v in stacked.items()}
