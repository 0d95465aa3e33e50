"""One checker for every file simsteer reads back: a dataclass's field annotations say
what each JSON value must be.

:func:`check` walks the parsed JSON against the annotations of a dataclass and raises
:class:`SchemaError` naming the first field (dotted: ``sims.sampling.top_k``) whose value
is not what the field says, so that a hand-edited or damaged file is refused in one line
before it is used (a text score in a format string, a NaN passed on).

What an annotation allows:

- ``int``: an integer in the signed 64-bit range (``true`` is not an integer);
- ``float``: a finite number (an integer is one too); non-finite values (and ``null``, how
  JSON writes them) only where the field is annotated :data:`UndefinedFloat`;
- ``str``, ``bool``, ``None``; ``X | None`` (``Optional``); ``Any`` (anything);
- ``list[X]``, ``tuple[X, ...]``, ``tuple[X, Y]`` (a JSON list; a fixed tuple has that many
  entries), ``dict[str, X]`` (a JSON object);
- a nested dataclass (a JSON object checked the same way);
- ``Annotated[X, Rule(...)]``: X within bounds (:class:`Rule`).

A field without a default must be present; one with a default may be missing. Keys that
name no field are refused, unless the class says ``schema_open = True`` (a row that also
carries other records' keys).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Union

from .errors import SimsError

#: Integers a file may hold (what numpy, torch and the samplers take as a seed or a count).
INT_LIMIT = 2**63


class SchemaError(SimsError, TypeError):
    """A value of a file read back is not what its record declares (one line, naming the
    file when the caller says which, and the field)."""


@dataclass(frozen=True)
class Rule:
    """Bounds on an annotated value.

    Attributes:
        low, high: inclusive bounds of a number.
        undefined: a ``float`` that may be undefined (NaN in memory, ``null`` in the file).
        nonempty: a list that must have at least one entry.
    """

    low: float | None = None
    high: float | None = None
    undefined: bool = False
    nonempty: bool = False

    def says(self) -> str:
        parts = []
        if self.low is not None and self.high is not None:
            parts.append(f"in [{self.low:g}, {self.high:g}]")
        elif self.low is not None:
            parts.append(f">= {self.low:g}")
        elif self.high is not None:
            parts.append(f"<= {self.high:g}")
        if self.nonempty:
            parts.append("non-empty")
        return " ".join(parts)


#: An integer >= 0 (an iteration, a count).
NonNegativeInt = Annotated[int, Rule(low=0)]
#: A probability (a preference).
Probability = Annotated[float, Rule(low=0.0, high=1.0)]
#: A metric that may be undefined (the perplexity of answers without tokens): NaN, or null.
UndefinedFloat = Annotated[float, Rule(undefined=True)]


def check(cls: type, data: Any, where: str = "", prefix: str = "") -> None:
    """Raise :class:`SchemaError` unless ``data`` is what the dataclass ``cls`` declares.

    Args:
        cls: a dataclass whose field annotations describe the JSON object.
        data: the parsed JSON.
        where: what is read (a file and row), the message's first words.
        prefix: the dotted path of ``data`` inside the file (for nested records).
    """
    if not isinstance(data, dict):
        raise _error(where, f"{prefix or 'the top level'} must be a JSON object, got {_show(data)}")
    hints = _fields(cls)
    for name, (kind, required) in hints.items():
        if name in data:
            _check_value(kind, data[name], where, _join(prefix, name))
        elif required:
            raise _error(where, f"field {_join(prefix, name)!r} is missing")
    if not getattr(cls, "schema_open", False):
        unknown = sorted(str(key) for key in data if key not in hints)
        if unknown:
            raise _error(where, f"unknown field {_join(prefix, unknown[0])!r}")


def check_value(kind: Any, value: Any, where: str = "", name: str = "value") -> None:
    """Raise :class:`SchemaError` unless ``value`` is what the annotation ``kind`` allows
    (the same rules as :func:`check`, for a value outside a record)."""
    _check_value(kind, value, where, name)


def expected(kind: Any, value: Any) -> str | None:
    """What ``value`` should be to be allowed by the annotation ``kind`` (``"an integer"``,
    ``"a finite number"``, ...), or ``None`` when it is allowed."""
    try:
        return _problem(kind, value, "", "value")
    except SchemaError as exc:
        return str(exc)


def undefined_fields(cls: type) -> frozenset[str]:
    """The fields of ``cls`` annotated :data:`UndefinedFloat` (``null`` in the file is NaN)."""
    return frozenset(
        name for name, (kind, _) in _fields(cls).items() if any(r.undefined for r in _rules(kind))
    )


@dataclass(frozen=True)
class Leaf:
    """One value a record's JSON holds (:func:`leaves`).

    Attributes:
        name: its dotted path (``held_out.ci95``).
        kind: its annotation, ``Optional`` and ``Annotated`` taken off.
        required: whether it must be present.
        nullable: whether ``null`` is allowed.
        rules: the :class:`Rule` bounds on it.
    """

    name: str
    kind: Any
    required: bool
    nullable: bool
    rules: tuple[Rule, ...]


def leaves(cls: type, prefix: str = "") -> list[Leaf]:
    """Every value a JSON object of the dataclass ``cls`` may hold, nested records walked
    into (the field table the checker reads: what a test of bad inputs enumerates)."""
    out: list[Leaf] = []
    for name, (kind, required) in _fields(cls).items():
        path = _join(prefix, name)
        nullable = False
        if typing.get_origin(kind) in (Union, types.UnionType):
            options = [a for a in typing.get_args(kind) if a is not type(None)]
            nullable = len(options) < len(typing.get_args(kind))
            if len(options) != 1:
                out.append(Leaf(path, kind, required, nullable, ()))
                continue
            kind = options[0]
        rules = tuple(_rules(kind))
        if rules:
            kind = typing.get_args(kind)[0]
        if dataclasses.is_dataclass(kind):
            out.extend(leaves(kind, path))  # type: ignore[arg-type]
        else:
            out.append(Leaf(path, kind, required, nullable, rules))
    return out


# -- the walk -------------------------------------------------------------------------
@functools.cache
def _fields(cls: type) -> dict[str, tuple[Any, bool]]:
    """Field name -> (resolved annotation, whether the field has no default)."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls, include_extras=True)
    return {
        f.name: (
            hints[f.name],
            f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING,
        )
        for f in dataclasses.fields(cls)
        if f.init
    }


def _rules(kind: Any) -> list[Rule]:
    if typing.get_origin(kind) is Annotated:
        return [r for r in kind.__metadata__ if isinstance(r, Rule)]
    return []


def _check_value(kind: Any, value: Any, where: str, name: str) -> None:
    problem = _problem(kind, value, where, name)
    if problem is not None:
        raise _error(where, f"field {name!r} must be {problem}, got {_show(value)}")


def _problem(kind: Any, value: Any, where: str, name: str) -> str | None:
    """What ``value`` should have been (``None``: it is fine); nested records and list
    entries raise with their own path."""
    rules = _rules(kind)
    if rules:
        kind = typing.get_args(kind)[0]
    undefined = any(r.undefined for r in rules)
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return None
    if origin in (Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if value is None and len(options) < len(args):
            return None
        if len(options) == 1:
            problem = _problem(Annotated[(options[0], *rules)] if rules else options[0], value, where, name)
            return None if problem is None else f"{problem} or null"
        said = []
        for option in options:
            try:
                if _problem(option, value, where, name) is None:
                    return None
            except SchemaError:
                pass
            said.append(_describe(option))
        return " or ".join(said)
    if kind is type(None):
        return None if value is None else "null"
    if kind is bool:
        return None if isinstance(value, bool) else "true or false"
    if kind is int:
        if not (isinstance(value, int) and not isinstance(value, bool) and -INT_LIMIT <= value < INT_LIMIT):
            return _with_rules("an integer", rules)
        return _bounds(value, rules, "an integer")
    if kind is float:
        if undefined and (value is None or (isinstance(value, float) and math.isnan(value))):
            return None
        if not (isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)):
            return _with_rules("a finite number" + (" or null" if undefined else ""), rules)
        return _bounds(value, rules, "a finite number")
    if kind is str:
        return None if isinstance(value, str) else "text"
    if origin in (list, tuple) or kind in (list, tuple):
        if not isinstance(value, list):
            return _describe(kind)
        if any(r.nonempty for r in rules) and not value:
            return f"a non-empty {_describe(kind).removeprefix('a ')}"
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                return f"a list of {len(args)} entries"
            for i, (item_kind, item) in enumerate(zip(args, value, strict=True)):
                _check_value(item_kind, item, where, f"{name}[{i}]")
            return None
        item_kind = args[0] if args else Any
        for i, item in enumerate(value):
            _check_value(item_kind, item, where, f"{name}[{i}]")
        return None
    if origin is dict or kind is dict:
        if not isinstance(value, dict):
            return "an object"
        item_kind = args[1] if len(args) == 2 else Any
        for key, item in value.items():
            _check_value(item_kind, item, where, f"{name}.{key}")
        return None
    if dataclasses.is_dataclass(kind):
        if not isinstance(value, dict):
            return "an object"
        check(kind, value, where, name)  # type: ignore[arg-type]
        return None
    return None  # a type the checker does not know: left to the record's constructor


def _bounds(value: float, rules: list[Rule], what: str) -> str | None:
    for rule in rules:
        if (rule.low is not None and value < rule.low) or (rule.high is not None and value > rule.high):
            return _with_rules(what, [rule])
    return None


def _with_rules(what: str, rules: list[Rule]) -> str:
    said = " ".join(r.says() for r in rules if r.says())
    return f"{what} {said}" if said else what


def _describe(kind: Any) -> str:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is Annotated:
        return _with_rules(_describe(args[0]), _rules(kind))
    if kind is int:
        return "an integer"
    if kind is float:
        return "a finite number"
    if kind is str:
        return "text"
    if kind is bool:
        return "true or false"
    if kind is type(None):
        return "null"
    if origin in (list, tuple) or kind in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} entries"
        item = args[0] if args else Any
        if item is Any:
            return "a list"
        return f"a list of {_plural(_describe(item))}"
    if origin is dict or kind is dict or dataclasses.is_dataclass(kind):
        return "an object"
    return getattr(kind, "__name__", str(kind))


def _plural(said: str) -> str:
    words = {"an integer": "integers", "a finite number": "finite numbers", "text": "texts"}
    for one, many in words.items():
        if said.startswith(one):
            return many + said[len(one) :]
    return said


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _show(value: Any) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _error(where: str, message: str) -> SchemaError:
    return SchemaError(f"{where}: {message}" if where else message)
