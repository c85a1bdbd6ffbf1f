"""User errors and the value checks every config group shares.

A user mistake is a `ConfigError` whose message is one line naming the field and the allowed
values; `launch.py` prints it as `error: ...` and exits 2, before anything is compiled. The
checks below are the only spelling of "an integer >= 1", "a number in [a, b]" and "one of ..."
in the project, so every group words its errors alike.

Numbers are finite: `check_number` and `check_positive` refuse nan and inf (an upper bound of
`math.inf` reads "no upper bound"; inf itself is never a setting). Integers that reach the device
are bounded by what it holds: `INT32_MAX` (the step counter and token ids are int32) and
`SEED_MAX` (`jax.random.PRNGKey` keeps 32 bits of a seed; larger seeds alias smaller ones).
"""

from __future__ import annotations

import dataclasses
import functools
import math

INT32_MAX = 2**31 - 1
SEED_MAX = 2**32 - 1


class ConfigError(ValueError):
  """A user mistake in a config: one line naming the field and what is allowed."""


def check_choice(name: str, value, allowed) -> None:
  """ConfigError (one line) unless `value` is one of `allowed`."""
  if value not in allowed:
    raise ConfigError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _is_number(value) -> bool:
  """A finite int or float (not a bool)."""
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def check_bool(name: str, value) -> None:
  """ConfigError unless `value` is True or False."""
  if not isinstance(value, bool):
    raise ConfigError(f"{name} must be True or False, got {value!r}")


def check_str(name: str, value, *, nonempty: bool = False) -> None:
  """ConfigError unless `value` is a string (non-empty when asked)."""
  if not isinstance(value, str) or (nonempty and not value):
    raise ConfigError(f"{name} must be a {'non-empty ' if nonempty else ''}string, got {value!r}")


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
  """ConfigError unless `value` is a finite number > 0 (or None when allowed)."""
  if value is None and allow_none:
    return
  if not _is_number(value) or value <= 0:
    extra = " or None" if allow_none else ""
    raise ConfigError(f"{name} must be a finite number > 0{extra}, got {value!r}")


def check_number(name: str, value, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
  """ConfigError unless `value` is a finite number in the interval [low, high] (ends as given;
  `high=math.inf`: no upper bound)."""
  ok = _is_number(value) and (value > low if low_open else value >= low) and (
      value < high if high_open else value <= high)
  if not ok:
    lo, hi = "(" if low_open else "[", ")" if high_open or math.isinf(high) else "]"
    raise ConfigError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")


def check_fields(group: str, given, cls) -> None:
  """ConfigError naming the keys of `given` that are not fields of the dataclass `cls`."""
  allowed = {f.name for f in dataclasses.fields(cls)}
  unknown = set(given) - allowed
  if unknown:
    raise ConfigError(f"{group}: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")


def once_per_config(check):
  """Runs `check(*args, **kwargs)` once per distinct (hashable) arguments; later calls with the
  same frozen config return at once. A failing check raises every time (nothing is cached), and
  unhashable arguments are simply checked again. Arguments are told apart by their repr too, as
  equality would not: a config with `remat=0` or `renormalize=1` equals (and hashes like) the one
  with False or True, but is not the one that passed. This lets a module guard the config it is
  given at trace time without repeating the work the entry point already did."""
  passed = set()

  @functools.wraps(check)
  def wrapper(*args, **kwargs):
    try:
      key = (args, tuple(sorted(kwargs.items())))
      hash(key)
    except TypeError:
      return check(*args, **kwargs)
    key = (key, repr(key))
    if key not in passed:
      check(*args, **kwargs)
      passed.add(key)

  return wrapper
