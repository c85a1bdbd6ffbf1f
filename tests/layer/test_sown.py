"""moe.layer.sown: what MoeLayer sows (its metrics and its routing) and the per-layer walker, on a
bare layer, an unscanned and a scanned Transformer, and hand-made trees."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moe.layer import routing as routing_lib
from moe.layer import sown
from moe.layer.config import MoeConfig
from moe.layer.modules import MoeLayer, Router
from moe.model.transformer import Transformer
from tiny_models import dropless_moe, init, run, stack_blocks, tiny, tokens


def test_sown_routing_is_the_layers_routing_and_changes_nothing():
  cfg = MoeConfig(num_experts=5, num_selected=2, expert_hidden=6, capacity_factor=None,
                  eval_capacity_factor=None)
  layer = MoeLayer(cfg, causal=False)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 8), jnp.float32)
  mask = np.random.default_rng(0).random((2, 7)) > 0.25
  variables = layer.init(jax.random.PRNGKey(1), x, padding_mask=mask)
  y, st = layer.apply(variables, x, padding_mask=mask, mutable=["intermediates"],
                      capture_intermediates=lambda mdl, _: isinstance(mdl, Router))
  (got,) = st["intermediates"][sown.ROUTING]
  assert set(got) == set(sown.ROUTING_KEYS)
  logits = st["intermediates"]["router"]["__call__"][0]
  want = routing_lib.top_k_routing(logits, num_selected=2, capacity=None,
                                   padding_mask=mask.reshape(1, -1))
  want_entry = {k: getattr(want, k) for k in sown.ROUTING_KEYS if k != "selected"}
  want_entry["selected"] = routing_lib.selected_mask(want)  # every slot of every real token
  assert np.asarray(want_entry["selected"]).sum() == 2 * mask.sum()
  for k in sown.ROUTING_KEYS:
    np.testing.assert_array_equal(got[k], want_entry[k], err_msg=k)
  # Not collecting the intermediates leaves the output bit for bit the same.
  np.testing.assert_array_equal(layer.apply(variables, x, padding_mask=mask), y)


def test_per_layer_on_an_unscanned_and_a_scanned_model():
  cfg = tiny(moe=dropless_moe())
  variables = init(cfg)
  scanned = dataclasses.replace(cfg, scan_layers=True)
  stacked = {"params": stack_blocks(variables["params"], cfg.num_layers)}
  toks = tokens()
  logits, st = run(cfg, variables, toks, mutable=("intermediates",))
  logits_s, st_s = run(scanned, stacked, toks, mutable=("intermediates",))
  np.testing.assert_allclose(logits_s, logits, rtol=1e-5, atol=1e-5)
  assert "blocks" in st_s["intermediates"] and "block_1" in st["intermediates"]
  got = {}
  for name in (sown.STATS, sown.ROUTING):
    one = got[name] = sown.per_layer(st["intermediates"], name)
    stack = sown.per_layer(st_s["intermediates"], name)
    assert list(one) == list(stack) == ["layer_0", "layer_1"], name
    for layer in one:
      assert list(one[layer]) == list(stack[layer])
      for k, v in one[layer].items():
        assert stack[layer][k].shape == v.shape, (name, layer, k)
        np.testing.assert_allclose(stack[layer][k], v, rtol=1e-5, atol=1e-6,
                                   err_msg=f"{name} {layer} {k}")
  assert got[sown.ROUTING]["layer_1"]["expert_index"].shape == (1, toks.size, 2)  # [G, T, K]
  stats = got[sown.STATS]["layer_1"]
  assert stats["load"].shape == (4,) and stats["aux_loss"].shape == ()


def test_per_layer_names_blocks_of_a_mixed_model():
  cfg = tiny(num_layers=5, moe_interval=2, first_moe_layer=1, moe=dropless_moe())
  got = {}

  def apply():
    model = Transformer(cfg)
    logits, st = model.apply(model.init(jax.random.PRNGKey(0), tokens()), tokens(),
                             mutable=["intermediates"])
    got.update({n: list(sown.per_layer(st["intermediates"], n)) for n in (sown.STATS,
                                                                          sown.ROUTING)})
    return logits

  jax.eval_shape(apply)  # traced only: the names are all this test looks at
  assert got == {sown.STATS: ["layer_1", "layer_3"], sown.ROUTING: ["layer_1", "layer_3"]}


def test_per_layer_on_hand_made_trees():
  one = lambda v: {"aux_loss": np.float32(v), "load": np.full((3,), v)}
  tree = {"block_10": {"moe": {"moe": (one(10.0),)}}, "block_2": {"moe": {"moe": (one(2.0),)}},
          "block_1": {"mlp": {}}, "deep": {"x": {"block_4": {"moe": {"moe": (one(4.0),)}}}}}
  layers = sown.per_layer(tree, sown.STATS)
  assert list(layers) == ["layer_2", "layer_4", "layer_10"]  # natural block order
  assert [float(d["aux_loss"]) for d in layers.values()] == [2.0, 4.0, 10.0]
  assert sown.per_layer(tree, sown.ROUTING) == {}
  # A scanned stack: its leading axis is the layer axis.
  stacked = {"blocks": {"moe": {"moe": ({"aux_loss": np.arange(3.0), "load": np.ones((3, 3))},)}}}
  layers = sown.per_layer(stacked, sown.STATS)
  assert list(layers) == ["layer_0", "layer_1", "layer_2"]
  assert layers["layer_2"]["load"].shape == (3,) and float(layers["layer_2"]["aux_loss"]) == 2.0
  # No block index in the path: positions; so too when names would repeat (two stacks).
  bare = {sown.ROUTING: ({k: np.zeros((1, 4, 2)) for k in sown.ROUTING_KEYS},)}
  assert list(sown.per_layer(bare, sown.ROUTING)) == ["layer_0"]
  two = {"a": stacked["blocks"], "b": stacked["blocks"]}
  assert list(sown.per_layer(two, sown.STATS)) == [f"layer_{i}" for i in range(6)]
  assert sown.per_layer({}, sown.STATS) == {}
