"""Loading endpoint networks from Lightning checkpoints or plain state dicts."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.paths import check_finite

NetSpec = dict[str, Any]


def _read(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Checkpoint not found: {path}. Train one with `lmc fit` or pass an existing file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for corrupt / foreign pickles
        raise ValueError(
            f"Could not read checkpoint {path}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}. "
            "Expected a Lightning .ckpt written by lmc_lightning or a torch.save'd state dict of tensors."
        ) from err


def load_weights(path: str | os.PathLike, prefix: str = "net", index: int | None = None
                 ) -> tuple[dict[str, Tensor], NetSpec | None]:
    """Read the network weights stored in a checkpoint.

    Args:
        path: A Lightning ``.ckpt`` of an lmc_lightning module, or a plain state dict file.
        prefix: Submodule holding the network inside a Lightning checkpoint (``"net"``; ``"net_a"``/``"net_b"`` for
            a ``PairModule``).
        index: Member of a zoo checkpoint (``EndpointModule(num_models=K)``) to read; required for one, must be
            None (or 0) for a single network.

    Returns:
        The state dict and the net spec (``{"name": ..., "num_classes": ..., ...}``), None for a plain state dict.

    Raises:
        ValueError: The file is not a checkpoint, holds no weights under ``prefix``, or holds NaN/Inf weights
            (naming the file and the tensor).
    """
    obj = _read(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or Lightning checkpoint.")
    if "state_dict" not in obj:
        if not all(isinstance(v, Tensor) for v in obj.values()):
            raise ValueError(f"{path} is neither a Lightning checkpoint nor a state dict of tensors.")
        check_finite(obj, f"Checkpoint {path}")
        return dict(obj), None
    head = prefix.rstrip(".") + "."
    state = {k[len(head):]: v for k, v in obj["state_dict"].items() if k.startswith(head)}
    if not state:
        found = sorted({k.split(".")[0] for k in obj["state_dict"]})
        raise ValueError(f"{path} has no weights under '{prefix}'; its top-level modules are {found}.")
    check_finite(state, f"Checkpoint {path} ({prefix})")
    hp = obj.get("hyper_parameters", {})
    state = _select_member(state, int(hp.get("num_models", 1) or 1), index, path)
    spec = None
    if isinstance(hp.get("net"), str):
        shape = hp.get("input_shape", (3, 32, 32))
        spec = {"name": hp["net"], "num_classes": hp.get("num_classes", 10), "in_channels": shape[0],
                "input_size": shape[1], **(hp.get("net_kwargs") or {})}
    return state, spec


def _select_member(state: dict[str, Tensor], num_models: int, index: int | None, path: Any) -> dict[str, Tensor]:
    """Member ``index`` of a zoo's stacked weights; the state itself for a single network."""
    from lmc_lightning.weights.stacked import unstack_state

    if num_models <= 1:
        if index not in (None, 0):
            raise ValueError(f"{path} holds a single network; index={index} asks for a zoo member (use index=None).")
        return state
    if index is None:
        raise ValueError(f"{path} is a zoo checkpoint of {num_models} networks: pass index=k (0..{num_models - 1}), "
                         "e.g. load_net(path, index=3), or load the member's own file model_03/last.ckpt.")
    if not -num_models <= index < num_models:
        raise ValueError(f"index {index} is out of range for the zoo of {num_models} networks in {path}.")
    return {k: v.clone() for k, v in unstack_state(state, index).items()}


def check_state_matches(net: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Raise a ValueError naming the first tensor whose name or shape differs between ``net`` and ``state``."""
    expected = net.state_dict()
    for key, value in expected.items():
        if key not in state:
            raise ValueError(f"{source} lacks tensor '{key}' (shape {tuple(value.shape)}) that the architecture has; "
                             "pick the net name and arguments the checkpoint was trained with.")
        if state[key].shape != value.shape:
            raise ValueError(f"{source} does not match the architecture at '{key}': checkpoint shape "
                             f"{tuple(state[key].shape)}, architecture shape {tuple(value.shape)}. "
                             "Pick the net name and arguments (width, depth, classes) it was trained with.")
    for key in state:
        if key not in expected:
            raise ValueError(f"{source} has tensor '{key}' that the architecture lacks; "
                             "pick the net name and arguments the checkpoint was trained with.")


def load_net(path: str | os.PathLike, net: str | None = None, prefix: str = "net", index: int | None = None,
             **net_kwargs: Any) -> nn.Module:
    """Load a trained network as a plain ``nn.Module`` in eval mode.

    Args:
        path: An ``EndpointModule`` ``.ckpt`` (architecture read from it) or a plain state dict file.
        net: Registry name; required for a plain state dict, overrides the checkpoint's otherwise.
        prefix: Submodule name inside a Lightning checkpoint.
        index: Member of a zoo checkpoint (``EndpointModule(num_models=K)``); each member is also written on its own
            as ``model_kk/last.ckpt``, which loads without it.
        **net_kwargs: Architecture arguments (``num_classes``, ``in_channels``, ``input_size``, ``width``, ...),
            overriding those stored in the checkpoint.

    Raises:
        ValueError: Unreadable file, unknown architecture, or a tensor mismatch (named, with both shapes).
    """
    state, spec = load_weights(path, prefix, index)
    if net is None and spec is None:
        raise ValueError(f"{path} is a plain state dict: pass the architecture, e.g. load_net(path, net='mlp', ...).")
    spec = dict(spec or {})
    if net is not None:
        spec["name"] = net
    spec.update(net_kwargs)
    name = spec.pop("name")
    module = get_net(name, **spec)
    check_state_matches(module, state, source=str(path))
    module.load_state_dict(state)
    return module.eval()


def save_net(path: str | os.PathLike, state_dict: Mapping[str, Tensor], spec: NetSpec) -> Path:
    """Write weights as a checkpoint that :func:`load_net` reads (the ``EndpointModule`` layout), atomically.

    Args:
        path: Destination ``.ckpt``.
        state_dict: The network's weights.
        spec: Net spec as returned by :func:`load_weights` (``name``, ``num_classes``, ``in_channels``,
            ``input_size`` and architecture arguments).
    """
    from lmc_lightning.io import atomic_torch_save

    spec = dict(spec)
    name = spec.pop("name")
    num_classes = spec.pop("num_classes", 10)
    shape = [spec.pop("in_channels", 3), spec.pop("input_size", 32), 0]
    shape[2] = shape[1]
    hparams = {"net": name, "num_classes": num_classes, "input_shape": shape, "net_kwargs": spec}
    state = {f"net.{k}": v.detach().cpu() for k, v in state_dict.items()}
    return atomic_torch_save({"state_dict": state, "hyper_parameters": hparams}, path)
