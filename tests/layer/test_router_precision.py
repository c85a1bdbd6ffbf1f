"""The low-precision router (`moe.router_dtype="bfloat16_full"`) and the router stress knobs.

Under "bfloat16_full" the softmax / sigmoid runs on bfloat16 logits and returns bfloat16, and the
combine weights leave the router in bfloat16; under "float32" (the default) and "bfloat16" (the
matmul only) all of that stays float32. The dtypes are read INSIDE the layer: a spy wraps
jax.nn.softmax / jax.nn.sigmoid as the routing module calls them.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.layer import routing as routing_lib
from moe.layer import sown
from moe.layer.config import MoeConfig
from moe.layer.modules import MoeLayer, Router

BF16, F32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)


class Spy:
  """Records (input dtype, output dtype) of every call of a wrapped function."""

  def __init__(self, fn):
    self.fn, self.calls = fn, []

  def __call__(self, x, *args, **kwargs):
    y = self.fn(x, *args, **kwargs)
    self.calls.append((jnp.dtype(x.dtype), jnp.dtype(y.dtype)))
    return y


def _layer_run(monkeypatch, router_dtype, model_dtype="bfloat16", score_func="softmax",
               router="token_choice", **extra):
  """(y, sown routing dict, spy calls) of one MoE layer on a fixed input."""
  spy = Spy(jax.nn.softmax if score_func == "softmax" else jax.nn.sigmoid)
  monkeypatch.setattr(jax.nn, score_func, spy)
  extra = {"capacity_factor": None, **extra}
  cfg = MoeConfig(num_experts=8, num_selected=2, expert_hidden=16, group_size=None,
                  router_dtype=router_dtype, score_func=score_func, router=router,
                  allow_noncausal_routing=router != "token_choice", **extra)
  layer = MoeLayer(cfg, dtype=jnp.dtype(model_dtype))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 16, 32), jnp.float32)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  spy.calls.clear()
  y, mut = layer.apply({"params": params}, x, mutable=["intermediates"])
  routing = sown.per_layer(mut["intermediates"], sown.ROUTING)
  return y, next(iter(routing.values())), list(spy.calls)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_full_bfloat16_router_computes_in_bfloat16(monkeypatch, score_func):
  _, r, calls = _layer_run(monkeypatch, "bfloat16_full", score_func=score_func)
  assert calls and all(c == (BF16, BF16) for c in calls), calls
  assert r["combine_weights"].dtype == BF16
  for old in ("float32", "bfloat16"):  # bfloat16 = the matmul only: scores stay float32
    _, r, calls = _layer_run(monkeypatch, old, score_func=score_func)
    assert calls and all(c == (F32, F32) for c in calls), (old, calls)
    assert r["combine_weights"].dtype == F32


def test_full_bfloat16_expert_choice(monkeypatch):
  _, r, calls = _layer_run(monkeypatch, "bfloat16_full", router="expert_choice",
                           capacity_factor=2.0)
  assert calls == [(BF16, BF16)] and r["combine_weights"].dtype == BF16


def test_full_bfloat16_router_changes_the_result(monkeypatch):
  """Not a no-op: the bfloat16 routing gives other combine weights and outputs than the
  float32 router and than the matmul-only bfloat16 router, close to them but not equal."""
  y32, r32, _ = _layer_run(monkeypatch, "float32")
  y16, r16, _ = _layer_run(monkeypatch, "bfloat16")
  yfull, rfull, _ = _layer_run(monkeypatch, "bfloat16_full")
  w32, w16, wfull = (np.asarray(r["combine_weights"], np.float32) for r in (r32, r16, rfull))
  np.testing.assert_array_equal(r32["expert_index"], rfull["expert_index"])  # same choices
  assert not np.array_equal(wfull, w32) and not np.array_equal(wfull, w16)
  np.testing.assert_allclose(wfull, w32, atol=2e-2)
  # bfloat16 weights: 8 significant bits, so every weight is a bfloat16 number
  np.testing.assert_array_equal(wfull, np.asarray(wfull.astype(jnp.bfloat16), np.float32))
  assert not np.array_equal(np.asarray(yfull, np.float32), np.asarray(y32, np.float32))


@pytest.mark.parametrize("kw", [{}, {"score_func": "sigmoid"}, {"routed_scale": 2.5},
                                {"renormalize": False}, {"priority": "bpr"},
                                {"num_groups": 2, "groups_selected": 1}])
def test_routing_keeps_the_dtype_it_is_given(kw):
  logits = jax.random.normal(jax.random.PRNGKey(2), (2, 12, 8)) * 3
  r = routing_lib.top_k_routing(logits, num_selected=2, capacity=4, dtype=jnp.bfloat16, **kw)
  assert r.logits.dtype == r.probs.dtype == r.combine_weights.dtype == BF16
  ref = routing_lib.top_k_routing(logits, num_selected=2, capacity=4, **kw)
  assert ref.logits.dtype == ref.probs.dtype == ref.combine_weights.dtype == F32
  # the float32 default routes a bfloat16 input in float32, as before the option existed
  r_in = routing_lib.top_k_routing(logits.astype(jnp.bfloat16), num_selected=2, capacity=4, **kw)
  r_cast = routing_lib.top_k_routing(logits.astype(jnp.bfloat16).astype(jnp.float32),
                                     num_selected=2, capacity=4, **kw)
  for a, b in zip(jax.tree.leaves(r_in), jax.tree.leaves(r_cast)):
    np.testing.assert_array_equal(a, b)
  for k in ("z", "lb"):
    fn = routing_lib.router_z_loss if k == "z" else routing_lib.load_balancing_loss
    assert fn(r).dtype == F32 and np.isfinite(float(fn(r)))
  with pytest.raises(ValueError, match="routing dtype"):
    routing_lib.top_k_routing(logits, num_selected=2, capacity=4, dtype=jnp.float16)


def _router_params_and_logits(**kw):
  router = Router(8, **kw)
  x = jax.random.normal(jax.random.PRNGKey(3), (1, 8, 32))
  params = router.init(jax.random.PRNGKey(0), x, train=False)
  return nn.meta.unbox(params)["params"]["kernel"], router.apply(params, x, train=False)


def test_router_logit_scale_multiplies_the_logits():
  k1, l1 = _router_params_and_logits()
  k3, l3 = _router_params_and_logits(logit_scale=3.0)
  np.testing.assert_array_equal(k1, k3)
  np.testing.assert_array_equal(l3, l1 * 3.0)
  _, lb = _router_params_and_logits(logit_scale=3.0, router_dtype="bfloat16_full")
  assert lb.dtype == BF16
  np.testing.assert_allclose(np.asarray(lb, np.float32), l3, rtol=2e-2, atol=2e-2)


def test_router_init_scale_scales_the_init_variance():
  """Switch Table 3's 0.1x init: the same draws, std x sqrt(0.1)."""
  k1, _ = _router_params_and_logits()
  k01, _ = _router_params_and_logits(init_scale=0.1)
  np.testing.assert_allclose(k01, k1 * np.sqrt(0.1), rtol=1e-5, atol=1e-7)
  assert 0.25 < float(jnp.std(k01) / jnp.std(k1)) < 0.35
