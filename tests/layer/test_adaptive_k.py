"""Adaptive k (top-p routing, docs/semantics.md "Adaptive k"): a slow loop reference of the rule,
its invariants, gradients, every dispatch strategy, the controller and the config errors."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import one_line_error
from moe.layer import dispatch
from moe.layer import grouped
from moe.layer import rows
from moe.layer import routing as R
from moe.layer import sown
from moe.layer.config import MoeConfig, planned_k, validate_moe
from moe.layer.modules import MoeLayer, expert_flops

G, T, E, K = 3, 29, 7, 4


def loop_routing(logits, mask, *, k_max, top_p, k_min=1, capacity=None, bias=None,
                 priority="choice_major", renormalize=True):
  """Per token, in plain Python: sort the experts by (biased) prob, take them while the probs
  taken so far sum to < top_p (at least k_min, at most k_max; all when top_p >= 1); then fill
  each expert's buffer choice-major, tokens in priority order. Returns numpy
  (expert [G,T,K], chosen [G,T,K], slot [G,T,K], weight [G,T,K])."""
  logits = np.asarray(logits, np.float64)
  g_n, t_n, e_n = logits.shape
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert = np.zeros((g_n, t_n, k_max), np.int32)
  chosen = np.zeros((g_n, t_n, k_max), bool)
  slot = np.full((g_n, t_n, k_max), -1, np.int32)
  weight = np.zeros((g_n, t_n, k_max))
  for g in range(g_n):
    for t in range(t_n):
      score = probs[g, t] + (0.0 if bias is None else np.asarray(bias, np.float64))
      order = sorted(range(e_n), key=lambda e: (-score[e], e))[:k_max]
      expert[g, t] = order
      taken = 0.0
      for j, e in enumerate(order):
        if not (j < k_min or top_p >= 1.0 or taken < top_p):
          break
        chosen[g, t, j] = mask[g, t]
        taken += probs[g, t, e]
      gate = np.where(chosen[g, t], probs[g, t, order], 0.0)
      weight[g, t] = gate / gate.sum() if renormalize and gate.sum() > 0 else gate
    tokens = list(range(t_n))
    if priority == "bpr":
      tokens = sorted(tokens, key=lambda t: (-probs[g, t].max(), t))
    fill = np.zeros(e_n, np.int64)
    for j in range(k_max):
      for t in tokens:
        if chosen[g, t, j]:
          e = expert[g, t, j]
          if capacity is None or fill[e] < capacity:
            slot[g, t, j] = fill[e]
          fill[e] += 1
  weight = np.where(slot >= 0, weight, 0.0)
  return expert, chosen, slot, weight


def _problem(seed, pad=0.2, scale=1.5):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  logits = jax.random.normal(k1, (G, T, E)) * scale
  mask = jax.random.uniform(k2, (G, T)) >= pad
  return logits, mask


LOOP_CASES = [
    dict(top_p=0.5, capacity=None),
    dict(top_p=0.7, capacity=4, k_min=2),
    dict(top_p=0.35, capacity=3, priority="bpr", renormalize=False),
    dict(top_p=0.6, capacity=5, bias=np.linspace(-0.2, 0.3, E)),
    dict(top_p=1.0, capacity=None),
]


@pytest.mark.parametrize("case", range(len(LOOP_CASES)))
def test_matches_the_loop_reference(case):
  kw = dict(LOOP_CASES[case])
  for seed in (0, 1):
    logits, mask = _problem(seed + 10 * case)
    r = R.top_k_routing(logits, num_selected=K, padding_mask=mask, **kw)
    expert, chosen, slot, weight = loop_routing(logits, np.asarray(mask), k_max=K, **kw)
    np.testing.assert_array_equal(np.asarray(r.expert_index), expert)
    np.testing.assert_array_equal(np.asarray(r.selected), chosen)
    np.testing.assert_array_equal(np.asarray(R.selected_mask(r)), chosen)
    np.testing.assert_array_equal(np.asarray(r.slot), slot)
    np.testing.assert_allclose(np.asarray(r.combine_weights), weight, atol=2e-6)
    k_T = chosen.sum(-1)[np.asarray(mask)]
    if kw["top_p"] < 1.0:
      assert len(set(k_T.tolist())) > 1  # tokens really took different k
    if kw.get("capacity"):
      assert (chosen & (slot < 0)).any()  # and some choices were dropped
    m = R.routing_metrics(r)
    assert float(m["mean_k"]) == pytest.approx(k_T.mean(), rel=1e-6)
    n_sel, n_drop = chosen.sum(), (chosen & (slot < 0)).sum()
    assert float(m["dropped_fraction"]) == pytest.approx(n_drop / n_sel, rel=1e-6)
    hist = np.bincount(k_T, minlength=K + 1) / k_T.size
    np.testing.assert_allclose(np.asarray(m["k_hist"]), hist, atol=1e-6)
    load = np.bincount(expert[chosen], minlength=E) / n_sel
    np.testing.assert_allclose(np.asarray(m["load"]), load, atol=1e-6)


def test_invariants():
  logits, mask = _problem(3, pad=0.0, scale=1.0)
  probs = np.asarray(jax.nn.softmax(logits), np.float64)
  for p in (0.2, 0.5, 0.8):
    for k_min in (1, 2):
      r = R.top_k_routing(logits, num_selected=K, capacity=None, top_p=p, k_min=k_min)
      sel = np.asarray(r.selected)
      k_T = sel.sum(-1)
      assert (k_T >= k_min).all() and (k_T <= K).all()
      # A prefix of the K slots.
      np.testing.assert_array_equal(sel, np.arange(K) < k_T[..., None])
      cum = np.cumsum(np.take_along_axis(probs, np.asarray(r.expert_index), -1), -1)
      cum = np.concatenate([np.zeros(cum.shape[:-1] + (1,)), cum], -1)  # cum[..., j]: first j
      before = np.take_along_axis(cum, (k_T - 1)[..., None], -1)[..., 0]
      at = np.take_along_axis(cum, k_T[..., None], -1)[..., 0]
      # Took slot k-1 by the rule unless k_min forced it; stopped at k by the rule unless K did.
      assert (before[k_T > k_min] < p).all() and (at[k_T < K] >= p - 1e-6).all()
      if p >= 0.5:
        assert ((k_T > k_min) & (k_T < K)).any()  # cases neither clamp decided
      w = np.asarray(r.combine_weights)
      np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
      assert (w[~sel] == 0).all()
  all_k = R.top_k_routing(logits, num_selected=K, capacity=None, top_p=1.0)
  assert np.asarray(all_k.selected).all()
  fixed = R.top_k_routing(logits, num_selected=K, capacity=None)
  np.testing.assert_allclose(np.asarray(all_k.combine_weights),
                             np.asarray(fixed.combine_weights), atol=1e-7)
  for k_min in (1, 3):
    tiny = R.top_k_routing(logits, num_selected=K, capacity=None, top_p=1e-6, k_min=k_min)
    assert (np.asarray(tiny.selected).sum(-1) == k_min).all()


def test_combine_weight_gradients_match_the_loop_routing():
  """d(sum w * c)/d logits through `top_k_routing` == through weights rebuilt with jnp from the
  loop's choices and slots (selection is piecewise constant; the weights are not)."""
  logits, mask = _problem(5)
  c = jax.random.normal(jax.random.PRNGKey(6), (G, T, K))
  for renorm, cap in ((True, 4), (False, None)):
    expert, chosen, slot, _ = loop_routing(logits, np.asarray(mask), k_max=K, top_p=0.6,
                                           capacity=cap, renormalize=renorm)

    def ours(lg):
      r = R.top_k_routing(lg, num_selected=K, capacity=cap, padding_mask=mask, top_p=0.6,
                          renormalize=renorm)
      return jnp.sum(r.combine_weights * c)

    def ref(lg):
      gate = jnp.take_along_axis(jax.nn.softmax(lg), jnp.asarray(expert), -1)
      gate = jnp.where(chosen, gate, 0.0)
      if renorm:
        gate = gate / jnp.maximum(gate.sum(-1, keepdims=True), 1e-30)
      return jnp.sum(jnp.where(slot >= 0, gate, 0.0) * c)

    assert float(ours(logits)) == pytest.approx(float(ref(logits)), rel=1e-5)
    g_ours, g_ref = jax.grad(ours)(logits), jax.grad(ref)(logits)
    assert float(jnp.abs(g_ref).max()) > 1e-3
    np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=1e-6)


@pytest.mark.parametrize("capacity", [5, None])
def test_every_strategy_matches_reference_and_skips_unselected_rows(capacity):
  d, f = 10, 12
  logits, mask = _problem(7)
  r = R.top_k_routing(logits, num_selected=K, capacity=capacity, padding_mask=mask, top_p=0.55)
  kx, ki, kg, ko, kq = jax.random.split(jax.random.PRNGKey(8), 5)
  x = jax.random.normal(kx, (G, T, d))
  w_in = jax.random.normal(ki, (E, d, f)) / np.sqrt(d)
  w_gate = jax.random.normal(kg, (E, d, f)) / np.sqrt(d)
  w_out = jax.random.normal(ko, (E, f, d)) / np.sqrt(f)
  proj = jax.random.normal(kq, x.shape)

  def loss(x, w_in, w_gate, w_out, cw, strategy):
    y = dispatch.apply_experts(x, r.replace(combine_weights=cw), w_in, w_gate, w_out,
                               activation="swiglu", strategy=strategy)
    return jnp.sum(y * proj), y

  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True),
                 static_argnums=5)
  args = (x, w_in, w_gate, w_out, r.combine_weights)
  (_, y_ref), g_ref = grad(*args, "reference")
  assert float(jnp.abs(y_ref).max()) > 0.1
  for strategy in dispatch.STRATEGIES:
    if capacity is None and strategy in dispatch.CAPACITY_ONLY:
      continue
    (_, y), g = grad(*args, strategy)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y_ref), atol=1e-5, err_msg=strategy)
    for a, b in zip(g, g_ref):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, err_msg=strategy)
  # The sorted-row layouts hold only the selected (and kept) assignments.
  used = np.asarray(r.selected) & (np.asarray(r.slot) >= 0)
  counts = np.bincount(np.asarray(r.expert_index)[used], minlength=E)
  assert used.sum() < 0.75 * used.size  # far fewer than G*T*K
  _, packed = rows.packed_layout(r.expert_index, r.slot, E)
  np.testing.assert_array_equal(np.asarray(packed), counts)
  tile = 8
  for bulk in (0, grouped.plan(used.sum() / E)[0]):
    _, _, num_tiles = rows.tiled_layout(r.expert_index, r.slot, E, tile, bulk)
    assert int(num_tiles) == int(sum(-(-max(c - bulk, 0) // tile) for c in counts))
  _, _, num_tiles = rows.tiled_layout(r.expert_index, r.slot, E, tile)
  if capacity is None:  # dropless: fewer tiles of the loop run than fixed top-K would need
    fixed = R.top_k_routing(logits, num_selected=K, capacity=None, padding_mask=mask)
    _, _, fixed_tiles = rows.tiled_layout(fixed.expert_index, fixed.slot, E, tile)
    assert int(num_tiles) < int(fixed_tiles)


# ----------------------------------------------------------------------------- the layer


def _layer(seed=0, b=4, l=9, d=8, **kw):
  cfg = MoeConfig(num_experts=6, num_selected=3, expert_hidden=10, group_size=12,
                  capacity_factor=None, **kw)
  x = jax.random.normal(jax.random.PRNGKey(seed), (b, l, d))
  layer = MoeLayer(cfg)
  return cfg, layer, x, layer.init(jax.random.PRNGKey(1), x, train=True)


def test_layer_stats_and_fixed_k_reports_them_too():
  cfg, layer, x, v = _layer(k_rule="top_p", top_p=0.5, router_entropy_weight=0.1,
                            router_logit_scale=4.0)
  y, mut = layer.apply(v, x, train=True, mutable=["intermediates"])
  stats = sown.per_layer(mut["intermediates"], sown.STATS)["layer_0"]
  routing = sown.per_layer(mut["intermediates"], sown.ROUTING)["layer_0"]
  k_T = np.asarray(routing["selected"]).sum(-1).reshape(-1)
  assert 1.0 <= float(stats["mean_k"]) < 3.0 and float(stats["mean_k"]) == pytest.approx(
      k_T.mean())
  assert np.asarray(stats["k_hist"]).shape == (4,) and float(stats["k_hist"][0]) == 0
  assert float(stats["top_p"]) == 0.5
  assert float(stats["active_expert_flops_per_token"]) == pytest.approx(
      k_T.mean() * 6 * 8 * 10, rel=1e-6)
  # The entropy loss is part of aux_loss.
  aux0 = float(cfg.load_balance_weight * stats["load_balance_loss"]
               + cfg.z_loss_weight * stats["z_loss"])
  assert float(stats["aux_loss"]) == pytest.approx(aux0 + 0.1 * float(stats["router_entropy"]),
                                                   rel=1e-5)
  assert "moe_bias" not in v  # a fixed threshold has no state
  _, layer_f, _, v_f = _layer(expert_mlp="gelu")
  _, mut = layer_f.apply(v_f, x, train=True, mutable=["intermediates"])
  stats = sown.per_layer(mut["intermediates"], sown.STATS)["layer_0"]
  assert float(stats["mean_k"]) == 3.0 and float(stats["top_p"]) == 1.0
  np.testing.assert_array_equal(np.asarray(stats["k_hist"]), [0, 0, 0, 1])
  assert float(stats["active_expert_flops_per_token"]) == 3 * 4 * 8 * 10 == 3 * expert_flops(
      layer_f.config, 8)


def test_controller_moves_mean_k_to_target():
  for start, target in ((0.2, 2.2), (0.95, 1.3)):
    cfg, layer, x, v = _layer(k_rule="top_p_target", top_p=start, target_k=target,
                              top_p_rate=0.05)
    assert float(nn.unbox(v["moe_bias"])["top_p"]) == pytest.approx(start)
    step = jax.jit(lambda v: layer.apply(v, x, train=True,
                                         mutable=["intermediates", "moe_bias"])[1])
    ks = []
    for _ in range(25):
      mut = step(v)
      ks.append(float(mut["intermediates"]["moe"][0]["mean_k"]))
      v = {"params": v["params"], "moe_bias": mut["moe_bias"]}
    assert abs(ks[-1] - target) < 0.5 * abs(ks[0] - target), ks
    assert abs(np.mean(ks[-5:]) - target) < 0.4, ks
    # Evaluation reads the threshold and leaves it alone.
    _, mut = layer.apply(v, x, train=False, mutable=["intermediates", "moe_bias"])
    assert float(nn.unbox(mut["moe_bias"])["top_p"]) == float(nn.unbox(v["moe_bias"])["top_p"])


def test_capacity_uses_target_k_for_the_controlled_rule():
  base = MoeConfig(num_experts=8, num_selected=4, capacity_factor=1.0)
  assert planned_k(base) == 4
  assert planned_k(dataclasses.replace(base, k_rule="top_p")) == 4
  assert planned_k(dataclasses.replace(base, k_rule="top_p_target", target_k=1.5)) == 1.5
  assert R.capacity_for(64, 8, 1.5, 1.0) == 12


@pytest.mark.parametrize("change, needles", [
    (dict(k_rule="topp"), ["moe.k_rule", "top_p_target"]),
    (dict(k_rule="top_p", top_p=0.0), ["moe.top_p", "(0.0, 1.0]"]),
    (dict(k_rule="top_p", top_p=1.5), ["moe.top_p"]),
    (dict(k_rule="top_p", k_min=3), ["moe.k_min", "[1, 2]"]),
    (dict(k_rule="top_p_target"), ["moe.target_k", "None"]),
    (dict(k_rule="top_p_target", target_k=2.5), ["moe.target_k", "[1, 2]"]),
    (dict(k_rule="top_p_target", target_k=1.5, top_p_rate=-1.0), ["moe.top_p_rate"]),
    (dict(router_entropy_weight=float("nan")), ["moe.router_entropy_weight"]),
    (dict(k_rule="top_p", router="expert_choice", allow_noncausal_routing=True),
     ["moe.k_rule='top_p'", "token_choice"]),
])
def test_config_errors_are_one_line(change, needles):
  with one_line_error(*needles):
    validate_moe(MoeConfig(**change))
