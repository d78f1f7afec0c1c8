"""The validation rules every setting uses: one message naming the key, the bad value and a valid
example. A rule takes `(value, key)` and returns the value to use (a boolean written `no` becomes
False) or raises a ConfigError."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

from transfer_cases.utils.errors import ConfigError

Rule = Callable[[Any, str], Any]


def positive_int(value: Any, key: str, *, example: str, why: dict[int, str] | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        note = (why or {}).get(value, "") if isinstance(value, int) and not isinstance(value, bool) else ""
        raise ConfigError(f"{key}={value!r} is not a whole number >= 1{note}; e.g. {example}")
    return int(value)


def positive_number(value: Any, key: str, *, example: str) -> float:
    if not is_number(value) or not value > 0:
        raise ConfigError(f"{key}={value!r} is not a number > 0; e.g. {example}")
    return float(value)


def number_in(value: Any, key: str, low: float, high: float | None, example: str) -> float:
    """`low <= value` (and `value < high` when given)."""
    if not is_number(value) or value < low or (high is not None and value >= high):
        bounds = f">= {low}" + (f" and < {high}" if high is not None else "")
        raise ConfigError(f"{key}={value!r} must be a number {bounds}; e.g. {key}{example}")
    return float(value)


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value  # not NaN


_TRUE, _FALSE = ("true", "yes", "on"), ("false", "no", "off")


def boolean(value: Any, key: str) -> bool:
    """true/false, yes/no, on/off (any case). Any other string would be truthy where it is used
    (`cache.enabled=no` kept the cache on), so it is refused."""
    if isinstance(value, bool):
        return value
    word = value.strip().lower() if isinstance(value, str) else None
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ConfigError(
        f"{key}={value!r} is not a boolean: use true or false (yes/no and on/off work too); e.g. {key}=false"
    )


def whole(
    low: int = 1, high: int | None = None, *, example: int, optional: bool = False, why: str = ""
) -> Rule:
    """A whole number (not a boolean) in [low, high]; null too when `optional`. `why` says what the
    setting means, in the message."""
    bounds = (f">= {low}" if high is None else f"from {low} to {high}") + (" or null" if optional else "")
    note = f" ({why})" if why else ""

    def rule(value: Any, key: str) -> Any:
        if value is None and optional:
            return value
        integral = isinstance(value, numbers.Integral) and not isinstance(value, bool)
        if not integral or value < low or (high is not None and value > high):
            raise ConfigError(f"{key}={value!r} is not a whole number {bounds}{note}; e.g. {key}={example}")
        return value

    return rule


def number(
    low: float, high: float | None = None, *, example: float, why: str = "", top: float | None = None
) -> Rule:
    """A finite number (not a boolean): `low <= value`, and `value < high` or `value <= top` if given."""
    note = f" ({why})" if why else ""

    def rule(value: Any, key: str) -> Any:
        if (
            not is_number(value)
            or not math.isfinite(value)
            or value < low
            or (high is not None and value >= high)
            or (top is not None and value > top)
        ):
            bounds = f">= {low}" + (f" and < {high}" if high is not None else "")
            bounds += f" and <= {top}" if top is not None else ""
            raise ConfigError(f"{key}={value!r} must be a number {bounds}{note}; e.g. {key}={example}")
        return value

    return rule


def one_of(*choices: Any, example: Any = None) -> Rule:
    def rule(value: Any, key: str) -> Any:
        if isinstance(value, bool) or value not in choices:
            names = ", ".join(str(c) for c in choices)
            raise ConfigError(f"{key}={value!r} is not one of: {names}; e.g. {key}={example or choices[0]}")
        return value

    return rule
