"""Latency objectives: the server's named SLO classes, and a request's objectives as the
router schedules and judges them.

Plain dataclasses: validation (the protobuf edge) resolves a ``GenerateRequest``'s ``slo``
field against the ``SloClasses`` into a ``ValidSlo``; the request state machine, the
scheduler and the metrics take it without knowing the wire format.

A classes file (``pdserve serve --slo-classes FILE``, YAML or JSON) reads::

    default: standard            # the class of a request that names none (optional)
    classes:
      interactive: {ttft_ms: 500, tpot_ms: 50, priority: 2}
      standard:    {ttft_ms: 2000, tpot_ms: 100, priority: 1}
      batch:       {priority: 0, best_effort: true}

Without one, the server has one class, ``default``: no objectives, priority 0 (a request's
own objectives still apply).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

DEFAULT_CLASS = "default"
CLASS_KEYS = ("ttft_ms", "tpot_ms", "priority", "best_effort")


@dataclass(frozen=True)
class ValidSlo:
    """A request's objectives in milliseconds (None = no objective), and the class whose
    priority and admission rule it is scheduled by."""

    ttft_ms: float | None
    tpot_ms: float | None
    class_name: str = DEFAULT_CLASS
    priority: int = 0
    best_effort: bool = False


@dataclass(frozen=True)
class SloClass:
    """A named set of objectives; higher ``priority`` is served first; a ``best_effort``
    class is admitted even when predicted to miss its TTFT objective."""

    name: str
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    priority: int = 0
    best_effort: bool = False

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"SLO class name must be letters, digits, - or _: {self.name!r}")
        for key in ("ttft_ms", "tpot_ms"):
            v = getattr(self, key)
            if v is not None and not (isinstance(v, int | float) and math.isfinite(v)
                                      and v > 0):
                raise ValueError(f"SLO class {self.name}: {key} must be a number > 0, got {v!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise ValueError(f"SLO class {self.name}: priority must be an integer, "
                             f"got {self.priority!r}")
        if not isinstance(self.best_effort, bool):
            raise ValueError(f"SLO class {self.name}: best_effort must be true or false, "
                             f"got {self.best_effort!r}")

    def objectives(self, ttft_ms: float | None, tpot_ms: float | None) -> ValidSlo:
        """This class's objectives, each overridden by the request's own where it sets one."""
        return ValidSlo(ttft_ms if ttft_ms is not None else self.ttft_ms,
                        tpot_ms if tpot_ms is not None else self.tpot_ms,
                        self.name, self.priority, self.best_effort)


@dataclass(frozen=True)
class SloClasses:
    """The server's SLO classes and the default one."""

    classes: tuple[SloClass, ...] = (SloClass(DEFAULT_CLASS),)
    default: str = DEFAULT_CLASS

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        if not names:
            raise ValueError("at least one SLO class is needed")
        if len(set(names)) != len(names):
            raise ValueError(f"SLO class names must be unique: {names}")
        if self.default not in names:
            raise ValueError(f"default SLO class {self.default!r} is none of {', '.join(names)}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.classes)

    def get(self, name: str) -> SloClass | None:
        """The class ``name`` ('' = the default), or None if there is none of that name."""
        name = name or self.default
        return next((c for c in self.classes if c.name == name), None)

    def with_default(self, name: str) -> SloClasses:
        """The same classes with ``name`` as the default ('' keeps the current one)."""
        return SloClasses(self.classes, name or self.default)

    @classmethod
    def from_mapping(cls, raw: Mapping[str, Any], where: str = "SLO classes") -> SloClasses:
        """From a classes file's contents (see the module docstring)."""
        if not isinstance(raw, Mapping) or set(raw) - {"default", "classes"}:
            raise ValueError(f"{where}: expected a mapping with keys 'classes' and optionally "
                             f"'default', got {sorted(raw) if isinstance(raw, Mapping) else raw!r}")
        body = raw.get("classes")
        if not isinstance(body, Mapping) or not body:
            raise ValueError(f"{where}: 'classes' must map each class name to its objectives")
        out = []
        for name, spec in body.items():
            spec = spec or {}
            if not isinstance(spec, Mapping) or set(spec) - set(CLASS_KEYS):
                raise ValueError(f"{where}: class {name!r} takes only the keys "
                                 f"{', '.join(CLASS_KEYS)}, got {spec!r}")
            out.append(SloClass(str(name), **spec))
        default = raw.get("default", out[0].name if len(out) == 1 else DEFAULT_CLASS)
        if len(out) > 1 and "default" not in raw and DEFAULT_CLASS not in [c.name for c in out]:
            raise ValueError(f"{where}: with several classes, name the default one "
                             "('default: NAME')")
        return cls(tuple(out), str(default))
