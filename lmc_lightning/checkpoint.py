"""Loading endpoint networks from Lightning checkpoints, plain state dicts and the seeds' checkpoint formats.

Besides lmc_lightning's own ``.ckpt`` files and plain state dicts, :func:`load_weights` unwraps the dicts other code
saves around a state dict (``{'model_state_dict': ...}`` as MCSurface's ``find_modes.py``, ``{'model_state': ...}`` as
the distribution-connector's ``train.py``, ``{'state_dict': ...}``, ``{'model': ...}``, ``{'net': ...}``), strips
``DataParallel``'s ``module.`` prefix, and renames keys through a key map: a dict of regular expressions to
replacements (applied in order, with :func:`re.sub`), a function, or the name of a registered map
(:func:`register_key_map`, :func:`key_maps`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmc_lightning.nets import get_net
from lmc_lightning.weights.paths import check_finite

NetSpec = dict[str, Any]
StateDict = dict[str, Tensor]
KeyMap = str | Mapping[str, str] | Callable[[StateDict], StateDict]
"""A registered map's name, ``{regex: replacement}`` rules applied in order to every key, or a function."""

WRAPPER_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "net_state_dict")
"""Keys under which other code stores a state dict inside a checkpoint dict, tried in this order."""

_KEY_MAPS: dict[str, tuple[KeyMap, str]] = {}


def register_key_map(name: str, key_map: Mapping[str, str] | Callable[[StateDict], StateDict], doc: str,
                     overwrite: bool = False) -> None:
    """Register a key map under ``name`` for ``load_weights(..., key_map=name)`` and ``--model.key_map name``.

    Args:
        name: Registry name.
        key_map: ``{regex: replacement}`` rules (applied in order to every key) or a function of the state dict.
        doc: One line saying which checkpoints it converts into which library net.
        overwrite: Replace an existing map of that name.
    """
    if name in _KEY_MAPS and not overwrite:
        raise ValueError(f"A key map named '{name}' is already registered; pass overwrite=True to replace it.")
    _KEY_MAPS[name] = (dict(key_map) if isinstance(key_map, Mapping) else key_map, doc)


def key_maps() -> dict[str, str]:
    """Registered key maps: ``{name: what it converts}``."""
    return {name: doc for name, (_, doc) in sorted(_KEY_MAPS.items())}


def _linear_base_to_mlp(state: StateDict) -> StateDict:
    """Distribution-connector LinearBase keys ``linear_layers.{i}.*`` -> mlp keys ``hidden.{2i}.*``/``classifier.*``."""
    pattern = re.compile(r"^linear_layers\.(\d+)\.(.+)$")
    found = [pattern.match(k) for k in state]
    last = max((int(m.group(1)) for m in found if m), default=-1)
    out = {}
    for key, m in zip(state, found, strict=True):
        if m is None:
            out[key] = state[key]
        elif int(m.group(1)) == last:
            out[f"classifier.{m.group(2)}"] = state[key]
        else:
            out[f"hidden.{2 * int(m.group(1))}.{m.group(2)}"] = state[key]
    return out


register_key_map("dataparallel", {r"^module\.": ""}, "strip DataParallel/DDP's 'module.' prefix")
register_key_map("dc_linear_one_layer", {r"^fc\.0\.": "hidden.0.", r"^fc\.2\.": "classifier."},
                 "distribution-connector LinearOneLayer* (fc.0, fc.2) -> mlp(depth=1, width=...)")
register_key_map("dc_linear", _linear_base_to_mlp,
                 "distribution-connector LinearBase nets (linear_layers.i) -> mlp (hidden.2i, classifier)")
register_key_map("mcsurface_vit", {r"^": "model."},
                 "MCSurface's timm vit_small_patch16_224 -> timm_vit_small_patch16_224 (inputs resized to 224)")


def apply_key_map(state: Mapping[str, Tensor], key_map: KeyMap | None) -> StateDict:
    """Rename the keys of ``state`` with ``key_map`` (see :data:`KeyMap`); ``None`` returns a copy.

    Raises:
        ValueError: Unknown map name (the message lists the registered ones), or two keys renamed to the same name.
    """
    if key_map is None:
        return dict(state)
    if isinstance(key_map, str):
        if key_map not in _KEY_MAPS:
            raise ValueError(f"Unknown key map '{key_map}'. Registered: {key_maps()}; or pass a dict of "
                             "{regex: replacement} rules.")
        key_map = _KEY_MAPS[key_map][0]
    if callable(key_map):
        return dict(key_map(dict(state)))
    out: StateDict = {}
    for key, value in state.items():
        new = key
        for pattern, repl in key_map.items():
            new = re.sub(pattern, repl, new)
        if new in out:
            raise ValueError(f"key_map renames two keys to '{new}'; make the rules one-to-one.")
        out[new] = value
    return out


def _unwrap(obj: Mapping[str, Any], prefix: str) -> StateDict | None:
    """The state dict inside a foreign checkpoint dict (``None`` when ``obj`` is not one)."""
    if all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj)
    for key in WRAPPER_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and all(isinstance(v, Tensor) for v in inner.values()):
            return dict(inner)
    return None


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


def load_weights(path: str | os.PathLike, prefix: str = "net", index: int | None = None,
                 key_map: KeyMap | None = None) -> tuple[dict[str, Tensor], NetSpec | None]:
    """Read the network weights stored in a checkpoint.

    Args:
        path: A Lightning ``.ckpt`` of an lmc_lightning module, a plain state dict file, or a dict wrapping a state
            dict under one of :data:`WRAPPER_KEYS` (the seeds' formats).
        prefix: Submodule holding the network inside a Lightning checkpoint (``"net"``; ``"net_a"``/``"net_b"`` for
            a ``PairModule``).
        key_map: Rename the keys (see :func:`apply_key_map`); DataParallel's ``module.`` prefix is stripped anyway
            when every key carries it.
        index: Member of a zoo checkpoint (``EndpointModule(num_models=K)``) to read; required for one, must be
            None (or 0) for a single network.

    Returns:
        The state dict and the net spec (``{"name": ..., "num_classes": ..., ...}``), None for a foreign or plain
        state dict.

    Raises:
        ValueError: The file is not a checkpoint, holds no weights under ``prefix``, or holds NaN/Inf weights
            (naming the file and the tensor).
    """
    obj = _read(path)
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or Lightning checkpoint.")
    head = prefix.rstrip(".") + "."
    lightning = isinstance(obj.get("state_dict"), Mapping) and (
        "hyper_parameters" in obj or "pytorch-lightning_version" in obj
        or any(k.startswith(head) for k in obj["state_dict"]))
    if not lightning:
        state = _unwrap(obj, prefix)
        if state is None:
            raise ValueError(f"{path} is neither a Lightning checkpoint nor a state dict of tensors, and holds no "
                             f"state dict under {list(WRAPPER_KEYS)}; its top-level keys are {sorted(obj)[:10]}.")
        if state and all(k.startswith("module.") for k in state):
            state = apply_key_map(state, "dataparallel")
        check_finite(state, f"Checkpoint {path}")
        return apply_key_map(state, key_map), None
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
    return apply_key_map(state, key_map), spec


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
    """Raise a ValueError listing every tensor whose name or shape differs between ``net`` and ``state``."""
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"'{k}': checkpoint {tuple(state[k].shape)}, architecture {tuple(v.shape)}"
              for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if not (missing or unexpected or shapes):
        return
    lines = [f"{source} does not match the architecture:"]
    if shapes:
        more = " ..." if len(shapes) > 8 else ""
        lines.append(f"  {len(shapes)} shape mismatch(es): " + "; ".join(shapes[:8]) + more)
    if missing:
        lines.append(f"  {len(missing)} architecture tensor(s) not in the checkpoint: {_listing(missing, expected)}")
    if unexpected:
        lines.append(f"  {len(unexpected)} checkpoint tensor(s) the architecture lacks: {_listing(unexpected, state)}")
    if missing and unexpected:
        lines.append("  The names differ: pass a key map (--model.key_map NAME or {regex: replacement}; registered: "
                     f"{sorted(_KEY_MAPS)}), or pick the net the checkpoint was trained with.")
    else:
        lines.append("  Pick the net name and arguments (width, depth, classes) the checkpoint was trained with.")
    raise ValueError("\n".join(lines))


def _listing(keys: list[str], tensors: Mapping[str, Tensor], limit: int = 8) -> str:
    shown = ", ".join(f"'{k}' {tuple(tensors[k].shape)}" for k in keys[:limit])
    return shown + (f" ... (+{len(keys) - limit} more)" if len(keys) > limit else "")


def load_net(path: str | os.PathLike, net: str | None = None, prefix: str = "net", index: int | None = None,
             key_map: KeyMap | None = None, **net_kwargs: Any) -> nn.Module:
    """Load a trained network as a plain ``nn.Module`` in eval mode.

    Args:
        path: An ``EndpointModule`` ``.ckpt`` (architecture read from it) or a plain state dict file.
        net: Registry name; required for a plain state dict, overrides the checkpoint's otherwise.
        prefix: Submodule name inside a Lightning checkpoint.
        index: Member of a zoo checkpoint (``EndpointModule(num_models=K)``); each member is also written on its own
            as ``model_kk/last.ckpt``, which loads without it.
        key_map: Rename the checkpoint's keys to the net's (a registered name, rules or a function; see
            :func:`apply_key_map`).
        **net_kwargs: Architecture arguments (``num_classes``, ``in_channels``, ``input_size``, ``width``, ...),
            overriding those stored in the checkpoint.

    Raises:
        ValueError: Unreadable file, unknown architecture, or mismatching tensors (listed, with their shapes).
    """
    state, spec = load_weights(path, prefix, index, key_map)
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
