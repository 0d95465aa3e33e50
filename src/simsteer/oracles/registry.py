"""The oracle registry: each kind of oracle registers itself, in its own module, with
:func:`register_oracle`, in one table that :func:`simsteer.oracles.get_oracle` reads.

A kind of oracle is a builder function and what a name needs to find it::

    @register_oracle("brevity", settings=("temperature",))
    def _build(name, settings, device, lm):
        return BrevityOracle(**settings)

``names`` are how the kind is listed in help and errors (``reward-model:PATH``; default:
the kind itself). A listed name without ``:`` is matched by its whole text (``self-rank``);
one with ``:`` by the part before it (``reward-model:PATH`` matches ``reward-model``,
``reward-model:./rm``); ``aliases`` add more such prefixes (``rm``). ``settings`` are the
spec keys (besides ``name``) the builder takes.
``needs_model`` marks oracles that judge with the loaded backbone (``lm``). ``name_spec``
turns a name into its spec when the name carries settings (``judge:MODEL@BASE_URL``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .base import Oracle

#: ``build(name, settings, device, lm)``: the oracle that a spec's ``name`` and its other
#: keys (``settings``) stand for.
OracleBuilder = Callable[[str, dict[str, Any], "str | None", Any], Oracle]
#: ``name_spec(name, options)``: the spec a name stands for (``options``: the caller's
#: extra settings for kinds that take them, such as ``judge_options``).
NameSpec = Callable[[str, dict[str, Any]], dict[str, Any]]


def plain_name_spec(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The spec of a name that carries no settings: just the name."""
    return {"name": name}


@dataclass(frozen=True)
class OracleKind:
    """One registered kind of oracle (see the module docstring)."""

    kind: str
    build: OracleBuilder
    names: tuple[str, ...]
    settings: tuple[str, ...]
    needs_model: bool = False
    name_spec: NameSpec = plain_name_spec


_ORACLES: dict[str, OracleKind] = {}
_BY_NAME: dict[str, OracleKind] = {}  # whole names: "self-rank"
_BY_PREFIX: dict[str, OracleKind] = {}  # the part before ":": "reward-model", "rm"


def register_oracle(
    kind: str,
    *,
    settings: tuple[str, ...] = ("temperature",),
    names: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
    needs_model: bool = False,
    name_spec: NameSpec = plain_name_spec,
) -> Callable[[OracleBuilder], OracleBuilder]:
    """Decorator adding a builder to the registry under ``kind`` (see the module docstring)."""

    def register(build: OracleBuilder) -> OracleBuilder:
        listed = names or (kind,)
        entry = OracleKind(kind, build, listed, settings, needs_model, name_spec)
        whole = [n for n in listed if ":" not in n]
        prefixes = [*(n.partition(":")[0] for n in listed if ":" in n), *aliases]
        for table, keys in ((_BY_NAME, whole), (_BY_PREFIX, prefixes)):
            for key in keys:
                if key in table and table[key].kind != kind:
                    raise TypeError(f"oracle name {key!r} is already registered by {table[key].kind!r}")
                table[key] = entry
        _ORACLES[kind] = entry
        return build

    return register


def registered_oracles() -> list[OracleKind]:
    """Every registered kind, in registration order."""
    return list(_ORACLES.values())


def find_oracle(name: str) -> OracleKind | None:
    """The kind a name builds (``None``: no such oracle); see the module docstring."""
    return _BY_NAME.get(name) or _BY_PREFIX.get(name.partition(":")[0])
