"""Name -> architecture registry: ``get_net``, ``available`` and the ``register`` decorator."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from torch import nn

F = TypeVar("F", bound=Callable[..., nn.Module])

#: Arguments every registered factory receives from ``get_net``.
COMMON_ARGS = ("num_classes", "in_channels", "input_size")


@dataclass(frozen=True)
class _Entry:
    factory: Callable[..., nn.Module]
    preset: dict[str, Any] = field(default_factory=dict)

    def options(self) -> list[str] | None:
        """Keyword arguments a user may pass (None when the factory takes ``**kwargs``)."""
        params = inspect.signature(self.factory).parameters.values()
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return [p.name for p in params if p.name not in COMMON_ARGS and p.name not in self.preset
                and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)]


_REGISTRY: dict[str, _Entry] = {}


def _check_factory(name: str, factory: Callable[..., nn.Module], preset: dict[str, Any]) -> None:
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError) as err:
        raise TypeError(f"Cannot register '{name}': {factory!r} has no inspectable signature.") from err
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [a for a in (*COMMON_ARGS, *preset) if a not in params]
    if missing:
        raise TypeError(f"Cannot register '{name}': {getattr(factory, '__name__', factory)} must accept keyword "
                        f"argument(s) {missing}; every factory is called as factory(num_classes=..., "
                        "in_channels=..., input_size=..., **kwargs).")


def register(name: str | Callable[..., nn.Module] | None = None, *, overwrite: bool = False,
             **preset: Any) -> Any:
    """Register a network factory (function or ``nn.Module`` class) under a name.

    The factory is called as ``factory(num_classes=..., in_channels=..., input_size=..., **kwargs)`` and must return
    an ``nn.Module``. Use it bare (``@register``: the function's name), with a name (``@register("mynet")``), or
    with fixed keyword arguments to add a preset of an existing factory (``register("vgg11_bn", norm="bn")(vgg)``).

    Args:
        name: Registry name (stored lower-case); defaults to the factory's ``__name__``.
        overwrite: Replace an existing entry of the same name instead of raising.
        **preset: Keyword arguments fixed for this name; users cannot override them through ``get_net``.

    Returns:
        The decorator, which returns the factory unchanged (so one factory can carry several names).

    Raises:
        ValueError: The name is taken and ``overwrite`` is False.
        TypeError: The factory cannot take the common arguments or the preset ones.
    """
    if callable(name):  # bare @register
        return register(overwrite=overwrite, **preset)(name)

    def decorator(factory: F) -> F:
        key = (name or factory.__name__).lower()
        if key in _REGISTRY and not overwrite:
            raise ValueError(f"A net named '{key}' is already registered; pick another name or pass overwrite=True.")
        _check_factory(key, factory, preset)
        _REGISTRY[key] = _Entry(factory, dict(preset))
        return factory

    return decorator


def available() -> list[str]:
    """Sorted names of all registered networks."""
    return sorted(_REGISTRY)


def get_net(name: str, num_classes: int = 10, in_channels: int = 3, input_size: int = 32, **kwargs: Any) -> nn.Module:
    """Build a registered network.

    Args:
        name: Registry name (case-insensitive), one of ``available()``.
        num_classes: Output size of the classifier.
        in_channels: Channels of the input images.
        input_size: Height (= width) of the input images; used by nets whose layer sizes depend on it (``mlp``).
        **kwargs: Architecture arguments of that net (e.g. ``width``, ``depth``, ``norm``).

    Returns:
        A freshly initialised ``nn.Module`` mapping ``[B, in_channels, input_size, input_size]`` to
        ``[B, num_classes]``.

    Raises:
        ValueError: Unknown name (the message lists the available ones), or a preset argument was overridden.
        TypeError: An argument the net does not take (the message lists those it takes).
    """
    key = str(name).lower()
    if key not in _REGISTRY:
        close = difflib.get_close_matches(key, _REGISTRY, n=3)
        hint = f" Did you mean {close}?" if close else ""
        raise ValueError(f"Unknown net '{name}'.{hint} Available: {', '.join(available())}.")
    entry = _REGISTRY[key]
    fixed = sorted(set(kwargs) & set(entry.preset))
    if fixed:
        raise ValueError(f"'{key}' fixes {', '.join(f'{k}={entry.preset[k]!r}' for k in fixed)}; drop the argument "
                         "or use the base name (e.g. 'vgg11' with norm=...) to choose it.")
    options = entry.options()
    if options is not None:
        unknown = sorted(set(kwargs) - set(options))
        if unknown:
            raise TypeError(f"Net '{key}' got unexpected argument(s) {unknown}; it accepts "
                            f"{sorted(options) or 'none besides num_classes, in_channels, input_size'}.")
    net = entry.factory(num_classes=num_classes, in_channels=in_channels, input_size=input_size,
                        **entry.preset, **kwargs)
    if not isinstance(net, nn.Module):
        raise TypeError(f"Factory of '{key}' returned {type(net).__name__}, expected an nn.Module.")
    return net
