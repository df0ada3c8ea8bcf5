"""Hyper-parameter domains, declared once: construction errors and run-time guards.

Private. Each numeric argument of a transform has a domain (``>= 0``;
``>= 0, finite``; ``in [0, 1]``; ...). A transform declares its arguments
with :func:`declare`; from that one declaration:

* a concrete value outside its domain raises ``ValueError`` at construction,
  naming the argument and the value (a wrong type raises ``TypeError``);
* a traced value (under :func:`optax.inject_hyperparams`), which cannot be
  checked when the transform is built, is checked at run time by
  :meth:`Hypers.valid`, a boolean scalar that the transform uses to turn its
  output into NaN: a traced bad value never gives a plausible-looking update;
* a value may also be an optax schedule where the declaration allows it
  (``schedule=True``): :meth:`Hypers.at` evaluates it at a step count, and
  the value it returns is guarded like a traced one.

Relations between arguments (``min_value <= max_value``) are declared the
same way, with :func:`Hypers.require`.

Sizes that fix the shape of a state (a history length, a window) are not
numbers a tracer can carry: :func:`size` requires a Python int.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from norm_optax._types import Scalar

__all__ = [
    "COUNT",
    "FINITE_NONNEGATIVE",
    "FINITE_POSITIVE",
    "NONNEGATIVE",
    "OPEN_UNIT",
    "PERCENT",
    "POSITIVE",
    "POSITIVE_COUNT",
    "UNIT_INTERVAL",
    "Domain",
    "Hypers",
    "concrete_value",
    "declare",
    "poison",
    "size",
]


@dataclasses.dataclass(frozen=True)
class Domain:
    """A set of valid values: ``holds(value, xp)`` with ``xp`` NumPy or jax.numpy."""

    text: str
    holds: Callable[[Any, Any], Any]


NONNEGATIVE = Domain(">= 0 and not NaN", lambda v, xp: v >= 0)
FINITE_NONNEGATIVE = Domain("finite and >= 0", lambda v, xp: xp.isfinite(v) & (v >= 0))
POSITIVE = Domain("> 0", lambda v, xp: v > 0)
FINITE_POSITIVE = Domain("finite and > 0", lambda v, xp: xp.isfinite(v) & (v > 0))
UNIT_INTERVAL = Domain("in [0, 1]", lambda v, xp: (v >= 0) & (v <= 1))
OPEN_UNIT = Domain("in (0, 1)", lambda v, xp: (v > 0) & (v < 1))
PERCENT = Domain("in (0, 100]", lambda v, xp: (v > 0) & (v <= 100))
COUNT = Domain(
    "an integer >= 0", lambda v, xp: (v >= 0) & (xp.floor(v) == v) & xp.isfinite(v)
)
POSITIVE_COUNT = Domain(
    "an integer >= 1",
    lambda v, xp: (v >= 1) & (xp.floor(v) == v) & xp.isfinite(v),
)


def concrete_value(value: Any, name: str) -> float | None:
    """The float value of a concrete scalar, or ``None`` if it is traced.

    Raises:
      TypeError: ``value`` is not a real number or a scalar array.
    """
    if isinstance(value, jax.core.Tracer):
        return None
    if isinstance(value, (bool, str)) or value is None:
        raise TypeError(f"{name} must be a real number, got {value!r}.")
    try:
        array = np.asarray(value)
    except Exception as error:
        raise TypeError(f"{name} must be a real number, got {value!r}.") from error
    if array.ndim != 0 or not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(f"{name} must be a real scalar, got {value!r}.")
    return float(array)


def _is_schedule(value: Any) -> bool:
    return callable(value) and not isinstance(value, (jax.Array, np.ndarray))


@dataclasses.dataclass(frozen=True)
class _Relation:
    names: tuple[str, ...]
    text: str
    holds: Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Hypers:
    """Validated hyper-parameters: their values and their domains."""

    values: Mapping[str, Any]
    domains: Mapping[str, Domain]
    relations: tuple[_Relation, ...] = ()

    @property
    def has_schedule(self) -> bool:
        """Whether a value is a schedule (the transform then counts steps)."""
        return any(_is_schedule(v) for v in self.values.values())

    def require(self, text: str, holds: Callable[..., Any], *names: str) -> Hypers:
        """Adds a relation ``holds(*values)``; raises now if concrete and false."""
        relation = _Relation(names, text, holds)
        concrete = [self.values[n] for n in names]
        if not any(_is_schedule(v) for v in concrete):
            numbers = [
                concrete_value(v, n) for v, n in zip(concrete, names, strict=True)
            ]
            if all(x is not None for x in numbers) and not holds(*numbers):
                shown = ", ".join(
                    f"{n}={v!r}" for n, v in zip(names, concrete, strict=True)
                )
                raise ValueError(f"{text}, got {shown}.")
        return dataclasses.replace(self, relations=(*self.relations, relation))

    def at(self, count: jax.Array | None) -> dict[str, Any]:
        """The values, schedules evaluated at ``count`` (required if any)."""
        out = {}
        for name, value in self.values.items():
            if _is_schedule(value):
                if count is None:
                    raise ValueError(f"{name} is a schedule and needs a step count.")
                value = value(count)
            out[name] = value
        return out

    def valid(self, values: Mapping[str, Any]) -> jax.Array | bool:
        """Whether every value (as given by :meth:`at`) is in its domain.

        ``True`` (a Python bool, so nothing is traced) when every value is a
        concrete number, already checked at construction.
        """
        checks: list[Any] = []
        for name, domain in self.domains.items():
            value = values[name]
            if not isinstance(value, jax.core.Tracer) and not _is_schedule(
                self.values[name]
            ):
                continue
            checks.append(domain.holds(jnp.asarray(value), jnp))
        for relation in self.relations:
            args = [values[n] for n in relation.names]
            if any(isinstance(a, jax.core.Tracer) for a in args) or any(
                _is_schedule(self.values[n]) for n in relation.names
            ):
                checks.append(relation.holds(*[jnp.asarray(a) for a in args]))
        if not checks:
            return True
        ok = checks[0]
        for check in checks[1:]:
            ok = ok & check
        return ok


def declare(
    *, schedules: tuple[str, ...] = (), **arguments: tuple[Scalar, Domain]
) -> Hypers:
    """Checks concrete arguments against their domains; the :class:`Hypers`.

    Args:
      schedules: names of the arguments that may also be optax schedules.
      **arguments: ``name=(value, domain)``.

    Raises:
      ValueError: a concrete value is outside its domain (naming both).
      TypeError: a value is not a real number (nor an allowed schedule).
    """
    values, domains = {}, {}
    for name, (value, domain) in arguments.items():
        if _is_schedule(value):
            if name not in schedules:
                raise TypeError(
                    f"{name} must be a real number, got the callable {value!r}."
                )
        else:
            number = concrete_value(value, name)
            if number is not None and not bool(domain.holds(number, np)):
                raise ValueError(f"{name} must be {domain.text}, got {value!r}.")
        values[name], domains[name] = value, domain
    return Hypers(values, domains)


def poison(x: jax.Array, valid: jax.Array | bool) -> jax.Array:
    """``x`` where ``valid``, NaN elsewhere (``x`` itself if ``valid is True``)."""
    if valid is True:
        return x
    return jnp.where(valid, x, jnp.nan)


def size(value: Any, name: str, minimum: int) -> int:
    """A Python int ``>= minimum`` that fixes a state shape.

    Raises:
      TypeError: not a Python int (a tracer cannot fix a shape).
      ValueError: smaller than ``minimum``.
    """
    if isinstance(value, (bool, jax.core.Tracer)):
        raise TypeError(
            f"{name} must be a Python int (it fixes the shape of the state; "
            f"under optax.inject_hyperparams list it in static_args), "
            f"got {value!r}."
        )
    try:
        number = operator.index(value)
    except TypeError as error:
        raise TypeError(f"{name} must be an int, got {value!r}.") from error
    if number < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}.")
    return number
