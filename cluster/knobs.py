"""Knobs: dataclass fields that carry their own help text, and the CLI flags and value checks
derived from them.

A knob is a ``dataclasses.field`` whose metadata holds its help text, its flag group and,
where they apply, its choices, bounds and metavar; ``knob()`` writes one. ``add_flags``
makes every knob of a dataclass a flag (``--field-name``; type, choices and help from the
field, the default appended to the help), ``given_flags`` reads back the ones given on the
command line, and ``check_values`` refuses a value of the wrong type, outside its choices or
out of its bounds, naming the field.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Mapping, Sequence
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")

FLAG_TYPES: tuple[type, ...] = (bool, int, float, str)


def knob(
    default: T,
    help: str,
    group: str,
    *,
    choices: Sequence[T] = (),
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    metavar: str | None = None,
) -> T:
    """A field with its default, its help text and the flag group it is listed under;
    ``minimum``/``maximum`` are inclusive bounds, ``above`` an exclusive lower one."""
    metadata = {"help": help, "group": group, "choices": tuple(choices), "minimum": minimum,
                "above": above, "maximum": maximum, "metavar": metavar}
    return dataclasses.field(default=default, metadata=metadata)


def knobs(cls: type) -> list[tuple[dataclasses.Field[Any], type]]:
    """The knob fields of dataclass ``cls``, in declaration order, with their types."""
    hints = get_type_hints(cls)
    out = [(f, hints[f.name]) for f in dataclasses.fields(cls) if "help" in f.metadata]
    for f, kind in out:
        if kind not in FLAG_TYPES:
            raise TypeError(f"knob {f.name}: type {kind} is none of bool, int, float, str")
    return out


def _shown(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def add_flags(
    parser: argparse.ArgumentParser, cls: type, groups: Mapping[str, str | None],
    only: Collection[str] | None = None,
) -> None:
    """A flag for every knob of ``cls`` (or for those named in ``only``), under the argument
    group its ``group`` names; ``groups`` lists each group's title (in the order of the
    help) and description. Flags default to None, so that ``given_flags`` sees only the
    ones on the command line."""
    chosen = [(f, kind) for f, kind in knobs(cls) if only is None or f.name in only]
    used = {f.metadata["group"] for f, _ in chosen}
    made = {title: parser.add_argument_group(title, text) for title, text in groups.items()
            if title in used}
    for f, kind in chosen:
        meta = f.metadata
        text = f"{meta['help']} (default {_shown(f.default)})".replace("%", "%%")
        flag = "--" + f.name.replace("_", "-")
        group = made[meta["group"]]
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, help=text)
        else:
            group.add_argument(flag, type=kind, choices=meta["choices"] or None,
                               metavar=meta["metavar"], help=text)


def given_flags(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The knobs of ``cls`` given on the command line, by field name."""
    return {f.name: v for f, _ in knobs(cls) if (v := getattr(args, f.name, None)) is not None}


def check_values(obj: object) -> None:
    """Refuse a knob of dataclass instance ``obj`` whose value has the wrong type (an int
    passes for a float), is none of its choices or is out of its bounds."""
    for f, kind in knobs(type(obj)):
        value = getattr(obj, f.name)
        meta = f.metadata
        ok = (int, float) if kind is float else kind
        if not isinstance(value, ok) or (kind is not bool and isinstance(value, bool)):
            raise ValueError(f"{f.name} must be {kind.__name__}, got {value!r}")
        if meta["choices"] and value not in meta["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, "
                             f"got {value!r}")
        if meta["minimum"] is not None and value < meta["minimum"]:
            raise ValueError(f"{f.name} must be >= {meta['minimum']}, got {value}")
        if meta["above"] is not None and not value > meta["above"]:
            raise ValueError(f"{f.name} must be > {meta['above']}, got {value}")
        if meta["maximum"] is not None and value > meta["maximum"]:
            raise ValueError(f"{f.name} must be <= {meta['maximum']}, got {value}")
