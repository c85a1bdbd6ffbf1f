"""User errors and the value checks every config group shares.

A user mistake is a `ConfigError` whose message is one line naming the field and the allowed
values; `launch.py` prints it as `error: ...` and exits 2, before anything is compiled. The
checks below are the only spelling of "an integer >= 1", "a number in [a, b]" and "one of ..."
in the project, so every group words its errors alike.
"""

from __future__ import annotations

import dataclasses
import functools


class ConfigError(ValueError):
  """A user mistake in a config: one line naming the field and what is allowed."""


def check_choice(name: str, value, allowed) -> None:
  """ConfigError (one line) unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(name: str, value, low: int, *, high: int | None = None,
              allow_none: bool = False) -> None:
  """ConfigError unless `value` is an integer >= `low` (and <= `high` when given; or None when
  allowed)."""
  if value is None and allow_none:
    return
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
  if not ok or (high is not None and value > high):
    bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
    extra = " or None" if allow_none else ""
    raise ConfigError(f"{name} must be an integer {bounds}{extra}, got {value!r}")


def check_positive(name: str, value, *, allow_none: bool = False) -> None:
  """ConfigError unless `value` is a number > 0 (or None when allowed)."""
  if value is None and allow_none:
    return
  if not _is_number(value) or value <= 0:
    extra = " or None" if allow_none else ""
    raise ConfigError(f"{name} must be > 0{extra}, got {value!r}")


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  """ConfigError unless `value` is a number in the interval [low, high] (ends as given)."""
  ok = _is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open else "]"
    raise ConfigError(f"{name} must be a number in {lo}{low}, {high}{hi}, got {value!r}")


def check_fields(group: str, given, cls) -> None:
  """ConfigError naming the keys of `given` that are not fields of the dataclass `cls`."""
  allowed = {f.name for f in dataclasses.fields(cls)}
  unknown = set(given) - allowed
  if unknown:
    raise ConfigError(f"{group}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def once_per_config(check):
  """Runs `check(*args, **kwargs)` once per distinct (hashable) arguments; later calls with the
  same frozen config return at once. A failing check raises every time (nothing is cached), and
  unhashable arguments are simply checked again. This lets a module guard the config it is given
  at trace time without repeating the work the entry point already did."""
  passed = set()

  @functools.wraps(check)
  def wrapper(*args, **kwargs):
    try:
      key = (args, tuple(sorted(kwargs.items())))
      hash(key)
    except TypeError:
      return check(*args, **kwargs)
    if key not in passed:
      check(*args, **kwargs)
      passed.add(key)

  return wrapper
