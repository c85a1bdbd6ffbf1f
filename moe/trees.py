"""Key paths of parameter trees: the one place that turns a pytree into names and back.

    flat = flatten(params)             # {("block_0", "moe", "router", "kernel"): array, ...}
    flat = flatten(params, sep="/")    # {"block_0/moe/router/kernel": array, ...}
    params = unflatten(flat)           # the nested dicts again (plain dicts)
    names = key_names(path)            # a jax key path -> ["block_0", "moe", "router", "kernel"]
    leaves = array_leaves(opt_state)   # [(("1", "0", "mu", "block_0", ...), array), ...]

Nested dicts (and Flax's FrozenDicts) go through `flax.traverse_util`; any other pytree (an
Orbax metadata tree, an optimizer state) through `jax.tree_util` key paths, where dict keys,
attribute names and sequence indices all become plain strings.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
from flax import traverse_util


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def key_names(path) -> list[str]:
  """A jax key path as plain names: dict keys, attribute names, sequence indices."""
  return [_key_name(k) for k in path]


def _is_array(x) -> bool:
  return hasattr(x, "shape") and not isinstance(x, Mapping)


def flatten(tree, sep: str | None = None) -> dict:
  """{path: leaf} of a nested-dict tree; path a tuple of keys, or the keys joined by `sep`.

  Leaves are whatever is not a dict (arrays, ShapeDtypeStructs, numbers, strings); empty dicts
  hold no leaf and vanish.
  """
  return traverse_util.flatten_dict(dict(tree), sep=sep)


def unflatten(flat: Mapping, sep: str | None = None) -> dict:
  """The inverse of `flatten`, as plain nested dicts."""
  return traverse_util.unflatten_dict(dict(flat), sep=sep)


def array_leaves(tree, sep: str | None = None) -> list[tuple[Any, Any]]:
  """[(path, leaf)] for the array-like leaves (anything with a shape) of any pytree, in jax's
  flattening order; path a tuple of names, or the names joined by `sep`."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array)[0]
  out = [(tuple(key_names(path)), leaf) for path, leaf in leaves if _is_array(leaf)]
  return out if sep is None else [(sep.join(path), leaf) for path, leaf in out]
