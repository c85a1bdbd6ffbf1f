"""DeepSeek / Qwen2-MoE router options against a slow per-token reference: sigmoid scores, the
selection-only correction bias, group-limited top-K, routed scale; invariants, gradients, config
errors, and the MoeLayer with every dispatch strategy (capacity and dropless)."""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.errors import ConfigError
from moe.layer import dispatch
from moe.layer import routing as R
from moe.layer.config import MoeConfig, validate_moe
from moe.layer.modules import MoeLayer

T, E, NG, GS, K = 13, 12, 4, 2, 3  # odd sizes: 13 tokens, 12 experts in 4 groups keep 2, K=3


def ref_route(logits_TE, *, k, score_func, bias, num_groups, groups_selected, group_score,
              renormalize, scale, capacity=None, mask_T=None):
  """One group with Python loops over tokens (float64), as HF deepseek_v3 / deepseek_v2 /
  qwen2_moe route: (expert [T,K] in choice order, weight [T,K], slot [T,K])."""
  t, e = logits_TE.shape
  x = logits_TE.astype(np.float64)
  mask_T = np.ones(t, bool) if mask_T is None else mask_T
  per = e // num_groups
  experts, weights = [], []
  for i in range(t):
    if score_func == "sigmoid":
      s = [1.0 / (1.0 + math.exp(-v)) for v in x[i]]
    else:
      z = [math.exp(v - max(x[i])) for v in x[i]]
      s = [v / sum(z) for v in z]
    sel = [s[j] + (0.0 if bias is None else float(bias[j])) for j in range(e)]
    allowed = set(range(e))
    if num_groups > 1:
      gscore = []
      for gi in range(num_groups):
        members = sorted(sel[gi * per:(gi + 1) * per], reverse=True)
        gscore.append(members[0] if group_score == "max" else members[0] + members[1])
      keep = sorted(range(num_groups), key=lambda gi: (-gscore[gi], gi))[:groups_selected]
      allowed = {j for j in range(e) if j // per in keep}
    chosen = sorted(allowed, key=lambda j: (-sel[j], j))[:k]
    w = [s[j] for j in chosen]
    if renormalize:
      total = sum(w) + (1e-20 if score_func == "sigmoid" else 0.0)
      w = [v / total for v in w]
    experts.append(chosen)
    weights.append([v * scale for v in w])
  slot = -np.ones((t, k), np.int64)
  counts = [0] * e
  for kk in range(k):
    for i in range(t):
      if mask_T[i] and (capacity is None or counts[experts[i][kk]] < capacity):
        slot[i, kk] = counts[experts[i][kk]]
        counts[experts[i][kk]] += 1
  return np.array(experts), np.array(weights), slot


@functools.partial(jax.jit, static_argnames=("k", "capacity", "score_func", "num_groups",
                                             "groups_selected", "group_score", "renormalize",
                                             "scale"))
def _route(logits, bias, mask, *, k, capacity, score_func, num_groups, groups_selected,
           group_score, renormalize, scale):
  return R.top_k_routing(logits, num_selected=k, capacity=capacity, bias=bias, padding_mask=mask,
                         renormalize=renormalize, score_func=score_func, routed_scale=scale,
                         num_groups=num_groups, groups_selected=groups_selected,
                         group_score=group_score)


def _logits(seed, *shape, scale=1.5):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape) * scale, np.float32)


REF_CASES = {  # (score_func, group_score, with bias, renormalize, routed scale, capacity)
    "deepseek_v3": ("sigmoid", "top2_sum", True, True, 2.5, None),
    "deepseek_v3_capacity": ("sigmoid", "top2_sum", True, True, 2.5, 3),
    "sigmoid_max_no_renorm": ("sigmoid", "max", True, False, 1.0, 4),
    "deepseek_v2": ("softmax", "max", False, False, 16.0, None),
    "softmax_bias_top2": ("softmax", "top2_sum", True, True, 1.0, 3),
}


@pytest.mark.parametrize("case", sorted(REF_CASES))
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_per_token_reference(case, seed):
  score_func, group_score, with_bias, renorm, scale, cap = REF_CASES[case]
  g = 2
  logits = _logits(seed, g, T, E)
  bias = (np.asarray(jax.random.normal(jax.random.PRNGKey(seed + 50), (E,)) * 0.3, np.float32)
          if with_bias else None)
  mask = np.random.default_rng(seed).random((g, T)) > 0.2
  r = _route(logits, bias, mask, k=K, capacity=cap, score_func=score_func, num_groups=NG,
             groups_selected=GS, group_score=group_score, renormalize=renorm, scale=scale)
  for gi in range(g):
    want_e, want_w, want_slot = ref_route(
        logits[gi], k=K, score_func=score_func, bias=bias, num_groups=NG, groups_selected=GS,
        group_score=group_score, renormalize=renorm, scale=scale, capacity=cap, mask_T=mask[gi])
    np.testing.assert_array_equal(np.asarray(r.expert_index[gi]), want_e)
    np.testing.assert_array_equal(np.asarray(r.slot[gi]), want_slot)
    kept = want_slot >= 0
    np.testing.assert_allclose(np.asarray(r.combine_weights[gi]), np.where(kept, want_w, 0.0),
                               rtol=2e-6, atol=1e-7)
  if cap is not None:
    assert int((np.asarray(r.slot) < 0).sum()) > int((~mask).sum()) * K  # drops were covered
  # Routing.probs: softmax, or the sigmoid scores normalised per token.
  s = jax.nn.sigmoid(logits) if score_func == "sigmoid" else jax.nn.softmax(logits, -1)
  want_p = s / s.sum(-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(r.probs), np.asarray(want_p), rtol=1e-6)


def test_group_limit_changes_the_choice():
  """The reference comparison must be able to fail: without the group limit the choices differ."""
  logits = _logits(3, T, E)
  kw = dict(k=K, capacity=None, score_func="sigmoid", groups_selected=GS, group_score="top2_sum",
            renormalize=True, scale=1.0)
  grouped = _route(logits, None, None, num_groups=NG, **kw)
  flat = _route(logits, None, None, num_groups=1, **kw)
  assert not np.array_equal(np.asarray(grouped.expert_index), np.asarray(flat.expert_index))


@pytest.mark.parametrize("group_score", ["max", "top2_sum"])
def test_invariants_groups_and_bias(group_score):
  logits = _logits(4, 3, T, E)
  bias = np.asarray(jax.random.normal(jax.random.PRNGKey(9), (E,)), np.float32)
  kw = dict(k=K, capacity=None, score_func="sigmoid", num_groups=NG, groups_selected=GS,
            group_score=group_score, renormalize=True, scale=1.7)
  plain = _route(logits, None, None, **kw)
  biased = _route(logits, bias, None, **kw)
  for r in (plain, biased):
    idx = np.asarray(r.expert_index)
    assert (np.sort(idx, -1)[..., 1:] != np.sort(idx, -1)[..., :-1]).all()  # K distinct
    assert (np.array([len(set(row // (E // NG))) for row in idx.reshape(-1, K)]) <= GS).all()
    # weights: sigmoid of the chosen experts (no bias), normalised, times the scale
    s = np.take_along_axis(np.asarray(jax.nn.sigmoid(logits)), idx, -1)
    np.testing.assert_allclose(np.asarray(r.combine_weights), 1.7 * s / s.sum(-1, keepdims=True),
                               rtol=2e-6)
    np.testing.assert_allclose(np.asarray(r.combine_weights).sum(-1), 1.7, rtol=2e-6)
  assert not np.array_equal(np.asarray(plain.expert_index), np.asarray(biased.expert_index))
  np.testing.assert_array_equal(np.asarray(plain.logits), np.asarray(biased.logits))
  np.testing.assert_array_equal(np.asarray(plain.probs), np.asarray(biased.probs))


def _jnp_weights(logits, idx, scale):
  """A direct jnp formula for the combine weights at fixed choices (for gradients)."""
  s = jnp.take_along_axis(jax.nn.sigmoid(logits), idx, -1)
  return scale * s / (s.sum(-1, keepdims=True) + 1e-20)


def test_gradients_finite_and_match_jnp_reference():
  logits = jnp.asarray(_logits(5, 2, T, E))
  bias = jnp.asarray(_logits(6, E, scale=0.2))
  proj = jnp.asarray(_logits(7, 2, T, K))

  def loss(lg):
    r = R.top_k_routing(lg, num_selected=K, capacity=None, bias=bias, score_func="sigmoid",
                        routed_scale=2.0, num_groups=NG, groups_selected=GS,
                        group_score="top2_sum")
    return (jnp.sum(r.combine_weights * proj) + R.load_balancing_loss(r)
            + R.router_z_loss(r)), r.expert_index

  (_, idx), grad = jax.jit(jax.value_and_grad(loss, has_aux=True))(logits)

  def ref_loss(lg):
    r = R.Routing(expert_index=idx, combine_weights=_jnp_weights(lg, idx, 2.0),
                  slot=jnp.zeros_like(idx), probs=jax.nn.sigmoid(lg) / jax.nn.sigmoid(lg).sum(
                      -1, keepdims=True), logits=lg, token_mask=jnp.ones(lg.shape[:2], bool))
    return (jnp.sum(r.combine_weights * proj) + R.load_balancing_loss(r)
            + R.router_z_loss(r))

  want = jax.grad(ref_loss)(logits)
  assert np.isfinite(np.asarray(grad)).all()
  assert float(jnp.abs(want).max()) > 0
  np.testing.assert_allclose(np.asarray(grad), np.asarray(want), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- config


BASE = dict(num_experts=12, num_selected=3, expert_hidden=6)


@pytest.mark.parametrize("kw,match", [
    (dict(score_func="tanh"), r"moe.score_func"),
    (dict(routed_scale=0.0), r"moe.routed_scale"),
    (dict(routed_scale=float("inf")), r"moe.routed_scale"),
    (dict(num_groups=5), r"moe.num_groups \(5\) must divide"),
    (dict(num_groups=4, groups_selected=5), r"moe.groups_selected"),
    (dict(num_groups=6, groups_selected=1), r"moe.num_selected \(K=3\) must be <="),
    (dict(num_groups=12, groups_selected=6, group_score="top2_sum"), r"moe.group_score"),
    (dict(group_score="sum"), r"moe.group_score"),
    (dict(shared_expert_hidden=0, num_shared_experts=1), r"moe.shared_expert_hidden"),
    (dict(shared_expert_gate=True), r"moe.shared_expert_gate=True needs"),
    (dict(shared_expert_gate=1, num_shared_experts=1), r"moe.shared_expert_gate"),
    (dict(router="expert_choice", score_func="sigmoid", allow_noncausal_routing=True),
     r"moe.score_func='sigmoid' needs moe.router='token_choice'"),
])
def test_config_errors(kw, match):
  with pytest.raises(ConfigError, match=match) as info:
    validate_moe(MoeConfig(**{**BASE, **kw}))
  assert "\n" not in str(info.value)


# ----------------------------------------------------------------------------- the layer

B, L, D = 2, 7, 8
DEEPSEEK = dict(num_experts=12, num_selected=3, expert_hidden=6, score_func="sigmoid",
                routed_scale=2.5, num_groups=4, groups_selected=2, group_score="top2_sum",
                bias_balancing=True, num_shared_experts=2, shared_expert_hidden=5,
                shared_expert_gate=True, min_capacity=1)


def _variables(layer, x, seed):
  shapes = jax.eval_shape(lambda: layer.init(jax.random.PRNGKey(0), x))
  rng = np.random.default_rng(seed)

  def fill(path, s):
    scale = 0.3 if "moe_bias" in jax.tree_util.keystr(path) else 1 / math.sqrt(s.shape[-2])
    return jnp.asarray(rng.standard_normal(s.shape) * scale, s.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def manual_layer(variables, x_BLD, cfg):
  """One group (no padding), per-token loops over the reference router, float64."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                             nn.meta.unbox(variables["params"]))
  bias = np.asarray(nn.meta.unbox(variables["moe_bias"])["bias"], np.float64)
  x = np.asarray(x_BLD, np.float64).reshape(B * L, D)
  experts, weights, _ = ref_route(
      x @ p["router"]["kernel"], k=cfg.num_selected, score_func=cfg.score_func, bias=bias,
      num_groups=cfg.num_groups, groups_selected=cfg.groups_selected,
      group_score=cfg.group_score, renormalize=cfg.renormalize, scale=cfg.routed_scale)
  silu = lambda v: v / (1 + np.exp(-v))
  y = np.zeros_like(x)
  for i in range(B * L):
    for e, w in zip(experts[i], weights[i]):
      ex = p["experts"]
      y[i] += w * (silu(x[i] @ ex["w_gate"][e]) * (x[i] @ ex["w_in"][e])) @ ex["w_out"][e]
  sh = p["shared"]
  assert sh["w_in"].shape == (D, cfg.num_shared_experts * cfg.shared_expert_hidden)
  shared = (silu(x @ sh["w_gate"]) * (x @ sh["w_in"])) @ sh["w_out"]
  y += shared / (1 + np.exp(-(x @ sh["gate"])))
  return y.reshape(B, L, D)


def test_layer_matches_manual_deepseek_qwen_options():
  cfg = MoeConfig(**DEEPSEEK, capacity_factor=None, eval_capacity_factor=None,
                  dispatch="reference")
  x = jax.random.normal(jax.random.PRNGKey(1), (B, L, D))
  layer = MoeLayer(cfg, causal=True)
  variables = _variables(layer, x, 0)
  y = jax.jit(lambda v, x: layer.apply(v, x))(variables, x)
  np.testing.assert_allclose(np.asarray(y), manual_layer(variables, x, cfg), rtol=2e-5,
                             atol=2e-5)


@functools.lru_cache(maxsize=None)
def _layer_value_and_grad(cfg):
  layer = MoeLayer(cfg, causal=True)

  def loss(params, variables, x, mask):
    y, st = layer.apply({**variables, "params": params}, x, padding_mask=mask, train=True,
                        mutable=["intermediates", "moe_bias"])
    stats = st["intermediates"]["moe"][0]
    return jnp.sum(jnp.sin(y) * y) + stats["aux_loss"], (y, stats, st["moe_bias"])

  return layer, jax.jit(jax.value_and_grad(loss, has_aux=True))


@pytest.mark.parametrize("capacity_factor", [0.7, None])
def test_every_dispatch_strategy_matches_reference(capacity_factor):
  base = MoeConfig(**DEEPSEEK, capacity_factor=capacity_factor, group_size=7)
  x = jax.random.normal(jax.random.PRNGKey(2), (B, L, D))
  mask = jnp.asarray(np.random.default_rng(2).random((B, L)) > 0.2)
  layer, ref = _layer_value_and_grad(dataclasses.replace(base, dispatch="reference"))
  variables = _variables(layer, x, 1)
  (_, (y_ref, st_ref, bias_ref)), g_ref = ref(variables["params"], variables, x, mask)
  if capacity_factor is not None:
    assert float(st_ref["dropped_fraction"]) > 0
  strategies = [s for s in dispatch.STRATEGIES if s != "reference" and (
      capacity_factor is not None or s not in dispatch.CAPACITY_ONLY)]
  assert strategies
  for strategy in strategies:
    _, fn = _layer_value_and_grad(dataclasses.replace(base, dispatch=strategy))
    (_, (y, st, bias)), g = fn(variables["params"], variables, x, mask)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), rtol=1e-5, atol=1e-6,
                               err_msg=strategy)
    for a, b in zip(jax.tree.leaves((g, st, bias)), jax.tree.leaves((g_ref, st_ref, bias_ref))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6,
                                 err_msg=strategy)
  for path, leaf in jax.tree_util.tree_leaves_with_path(nn.meta.unbox(g_ref)):
    assert np.isfinite(np.asarray(leaf)).all() and np.abs(np.asarray(leaf)).max() > 0, path
