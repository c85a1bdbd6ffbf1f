"""moe.trees: flatten/unflatten round trips, key names of every key kind, array leaves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.core import FrozenDict

from moe import trees

NESTED = {"block_0": {"attn": {"q": np.ones((2, 3))}, "mlp": {"w_in": np.zeros(4)}},
          "scale": 1.5, "name": "x", "empty": {}}


def test_flatten_tuple_and_joined_keys():
  flat = trees.flatten(NESTED)
  assert set(flat) == {("block_0", "attn", "q"), ("block_0", "mlp", "w_in"), ("scale",),
                       ("name",)}  # an empty dict holds no leaf
  assert flat[("scale",)] == 1.5 and flat[("name",)] == "x"
  joined = trees.flatten(NESTED, sep="/")
  assert set(joined) == {"block_0/attn/q", "block_0/mlp/w_in", "scale", "name"}
  assert joined["block_0/attn/q"] is NESTED["block_0"]["attn"]["q"]


def test_round_trips_also_through_frozen_dicts():
  want = {k: v for k, v in NESTED.items() if k != "empty"}
  for sep in (None, "/", "."):
    assert jax.tree.all(jax.tree.map(np.array_equal,
                                     trees.unflatten(trees.flatten(NESTED, sep), sep), want))
  frozen = FrozenDict({"a": FrozenDict({"b": jnp.arange(3)}), "c": {"d": jnp.ones(2)}})
  back = trees.unflatten(trees.flatten(frozen, sep="."), sep=".")
  assert type(back) is dict and type(back["a"]) is dict  # plain dicts come back
  assert set(trees.flatten(frozen)) == {("a", "b"), ("c", "d")}
  np.testing.assert_array_equal(back["a"]["b"], frozen["a"]["b"])


@dataclasses.dataclass
class _Attr:
  w: jax.Array


jax.tree_util.register_dataclass(_Attr, data_fields=["w"], meta_fields=[])


def test_key_names_of_dict_attr_and_sequence_keys():
  tree = {"a": [_Attr(w=jnp.ones(2)), (jnp.zeros(3),)]}
  paths = [trees.key_names(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
  assert paths == [["a", "0", "w"], ["a", "1", "0"]]
  assert trees.key_names(()) == []


def test_array_leaves_of_an_optax_state():
  params = {"dense": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros(2)}}
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  state = tx.init(params)
  leaves = trees.array_leaves(state)
  paths = [p for p, _ in leaves]
  # jax's flattening order: chain index, then the state's fields (count, mu, nu), dict keys sorted.
  assert paths == [("1", "0", "count"),
                   ("1", "0", "mu", "dense", "bias"), ("1", "0", "mu", "dense", "kernel"),
                   ("1", "0", "nu", "dense", "bias"), ("1", "0", "nu", "dense", "kernel")]
  assert [leaf.shape for _, leaf in leaves] == [(), (2,), (3, 2), (2,), (3, 2)]
  joined = trees.array_leaves(state, sep="/")
  assert [p for p, _ in joined] == ["/".join(p) for p in paths]
  # Non-array leaves (a string, a float) are skipped; ShapeDtypeStructs count as arrays.
  abstract = jax.eval_shape(lambda: {"x": jnp.ones(3)})
  assert trees.array_leaves({"s": abstract["x"], "f": 1.0, "n": "a"}) == [(("s",), abstract["x"])]
