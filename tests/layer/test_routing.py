"""Routing functions against a slow pure-Python reference, plus invariants, losses and metrics."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.layer import routing as R


# ----------------------------------------------------------------------------------------------
# Slow references (plain Python loops over numpy arrays)


def ref_top_k(probs_TE, k, capacity, priority, bias=None, mask_T=None):
  """Expected (expert_index [T,K], slot [T,K]) for one group, straight from docs/semantics.md."""
  t, e = probs_TE.shape
  bias = np.zeros(e) if bias is None else np.asarray(bias, np.float64)
  mask_T = np.ones(t, bool) if mask_T is None else mask_T
  scores = probs_TE.astype(np.float64) + bias
  choices = [sorted(range(e), key=lambda j: (-scores[i, j], j))[:k] for i in range(t)]
  if priority == "bpr":
    order = sorted(range(t), key=lambda i: (-probs_TE[i].max(), i))
  else:
    order = list(range(t))
  counts = [0] * e
  slot = -np.ones((t, k), np.int64)
  for kk in range(k):
    for i in order:
      if not mask_T[i]:
        continue
      ex = choices[i][kk]
      if capacity is None or counts[ex] < capacity:
        slot[i, kk] = counts[ex]
        counts[ex] += 1
  return np.array(choices), slot


@functools.partial(jax.jit, static_argnames=("k", "capacity", "priority", "renormalize"))
def _route(logits, bias, mask, *, k, capacity, priority="choice_major", renormalize=True):
  return R.top_k_routing(logits, num_selected=k, capacity=capacity, priority=priority,
                         bias=bias, padding_mask=mask, renormalize=renormalize)


def _logits(seed, *shape, scale=1.5):
  return np.asarray(jax.random.normal(jax.random.PRNGKey(seed), shape) * scale, np.float32)


CASES = [  # (G, T, E, K, C, priority)
    (1, 7, 3, 1, 2, "choice_major"),
    (2, 11, 5, 2, 3, "choice_major"),
    (3, 9, 4, 3, 5, "choice_major"),
    (2, 13, 6, 2, None, "choice_major"),
    (2, 11, 5, 2, 3, "bpr"),
    (1, 10, 3, 1, 2, "bpr"),
]


@pytest.mark.parametrize("g,t,e,k,c,priority", CASES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_k_matches_reference(g, t, e, k, c, priority, seed):
  logits = _logits(seed, g, t, e)
  rng = np.random.default_rng(seed)
  mask = rng.random((g, t)) > 0.25
  bias = (rng.standard_normal(e) * 0.1).astype(np.float32) if seed == 2 else None
  r = _route(logits, bias, mask, k=k, capacity=c, priority=priority)
  probs = np.asarray(r.probs)
  np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-6)
  for gi in range(g):
    idx_ref, slot_ref = ref_top_k(probs[gi], k, c, priority, bias, mask[gi])
    np.testing.assert_array_equal(np.asarray(r.expert_index[gi]), idx_ref)
    np.testing.assert_array_equal(np.asarray(r.slot[gi]), slot_ref)
    gate = np.take_along_axis(probs[gi], idx_ref, -1)
    gate = gate / gate.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(r.combine_weights[gi]),
                               np.where(slot_ref >= 0, gate, 0.0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("g,t,e,k,c,priority", CASES)
def test_invariants(g, t, e, k, c, priority):
  logits = _logits(7, g, t, e)
  mask = np.random.default_rng(7).random((g, t)) > 0.2
  r = _route(logits, None, mask, k=k, capacity=c, priority=priority)
  idx, slot, w = map(np.asarray, (r.expert_index, r.slot, r.combine_weights))
  assert idx.shape == slot.shape == w.shape == (g, t, k)
  assert idx.dtype == np.int32 and slot.dtype == np.int32 and w.dtype == np.float32
  assert ((idx >= 0) & (idx < e)).all()
  for gi in range(g):
    for ti in range(t):
      assert len(set(idx[gi, ti])) == k  # K distinct experts, at most K per token
    for ex in range(e):
      s = np.sort(slot[gi][(idx[gi] == ex) & (slot[gi] >= 0)])
      if c is not None:
        assert len(s) <= c
      np.testing.assert_array_equal(s, np.arange(len(s)))  # a permutation of 0..n_e-1
  assert (w[slot < 0] == 0).all() and (w[slot >= 0] > 0).all()


def test_padding_never_routed_and_never_counted():
  g, t, e, k, c = 2, 12, 4, 2, 3
  logits = _logits(3, g, t, e)
  mask = np.random.default_rng(3).random((g, t)) > 0.4
  r = _route(logits, None, mask, k=k, capacity=c)
  assert (np.asarray(r.slot)[~mask] == -1).all()
  assert (np.asarray(r.combine_weights)[~mask] == 0).all()
  # The real tokens alone, routed without the padding, get the very same slots.
  for gi in range(g):
    real = logits[gi][mask[gi]]
    r2 = _route(real, None, None, k=k, capacity=c)
    np.testing.assert_array_equal(np.asarray(r.slot[gi])[mask[gi]], np.asarray(r2.slot))
    np.testing.assert_array_equal(np.asarray(r.expert_index[gi])[mask[gi]],
                                  np.asarray(r2.expert_index))
  # Losses and metrics ignore padding: same values as the real tokens alone (one group).
  r1 = _route(logits[:1], None, mask[:1], k=k, capacity=c)
  r2 = _route(logits[0][mask[0]], None, None, k=k, capacity=c)
  for fn in (R.load_balancing_loss, R.router_z_loss):
    np.testing.assert_allclose(fn(r1), fn(r2), rtol=1e-6)
  m1, m2 = R.routing_metrics(r1), R.routing_metrics(r2)
  for key in m1:
    np.testing.assert_allclose(m1[key], m2[key], rtol=1e-6, err_msg=key)


def test_bpr_drops_the_least_confident():
  # Every token's top choice is expert 0 (K=1) with a different confidence; room for 3.
  t, e, c = 9, 3, 3
  conf = np.random.default_rng(0).permutation(t).astype(np.float32)
  logits = np.zeros((t, e), np.float32)
  logits[:, 0] = 1.0 + 0.3 * conf
  r = _route(logits, None, None, k=1, capacity=c, priority="bpr")
  kept = np.asarray(r.slot[:, 0]) >= 0
  np.testing.assert_array_equal(np.sort(np.nonzero(kept)[0]), np.sort(np.argsort(-conf)[:c]))
  # Slots follow confidence: the most confident token is first in the buffer.
  assert int(r.slot[int(np.argmax(conf)), 0]) == 0
  # Choice-major keeps the first c tokens instead.
  r_cm = _route(logits, None, None, k=1, capacity=c)
  np.testing.assert_array_equal(np.nonzero(np.asarray(r_cm.slot[:, 0]) >= 0)[0], np.arange(c))


def test_renormalized_weights():
  logits = _logits(5, 2, 10, 6)
  r = _route(logits, None, None, k=3, capacity=None)
  np.testing.assert_allclose(np.asarray(r.combine_weights).sum(-1), 1.0, rtol=1e-6)
  r = _route(logits, None, None, k=3, capacity=5)
  w, slot = np.asarray(r.combine_weights), np.asarray(r.slot)
  full = (slot >= 0).all(-1)
  assert full.any() and (~full).any()
  np.testing.assert_allclose(w[full].sum(-1), 1.0, rtol=1e-6)
  assert (w[~full].sum(-1) < 1.0 - 1e-6).all()  # no reweighting of the survivors
  r = _route(logits, None, None, k=3, capacity=None, renormalize=False)
  np.testing.assert_allclose(
      np.asarray(r.combine_weights),
      np.take_along_axis(np.asarray(r.probs), np.asarray(r.expert_index), -1), rtol=1e-6)


def test_two_dim_input_keeps_rank():
  logits = _logits(9, 8, 5)
  r2 = _route(logits, None, None, k=2, capacity=3)
  r3 = _route(logits[None], None, None, k=2, capacity=3)
  assert r2.expert_index.shape == (8, 2) and r2.probs.shape == (8, 5) and r2.token_mask.shape == (8,)
  for a, b in zip(jax.tree_util.tree_leaves(r2), jax.tree_util.tree_leaves(r3)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b)[0])


# ----------------------------------------------------------------------------------------------
# Edge cases


def test_one_expert():
  r = _route(_logits(0, 2, 5, 1), None, None, k=1, capacity=3)
  assert (np.asarray(r.expert_index) == 0).all()
  np.testing.assert_array_equal(np.asarray(r.slot[0, :, 0]), [0, 1, 2, -1, -1])
  np.testing.assert_array_equal(np.asarray(r.combine_weights[0, :, 0]), [1, 1, 1, 0, 0])


def test_k_equals_e():
  t, e = 7, 4
  r = _route(_logits(1, t, e), None, None, k=e, capacity=None)
  assert (np.sort(np.asarray(r.expert_index), -1) == np.arange(e)).all()
  for ex in range(e):
    np.testing.assert_array_equal(np.sort(np.asarray(r.slot)[np.asarray(r.expert_index) == ex]),
                                  np.arange(t))


def test_small_capacity_drops_and_all_to_one_expert():
  t, e, k = 10, 4, 2
  c = R.capacity_for(t, e, k, 0.5, 0)  # < K*T/E = 5
  assert c == 3
  logits = np.zeros((t, e), np.float32)
  logits[:, 2] = 5.0  # every token's first choice is expert 2
  logits[:, 1] = 2.0  # and its second expert 1
  r = _route(logits, None, None, k=k, capacity=c)
  slot = np.asarray(r.slot)
  np.testing.assert_array_equal(slot[:, 0], [0, 1, 2] + [-1] * 7)
  np.testing.assert_array_equal(slot[:, 1], [0, 1, 2] + [-1] * 7)
  m = R.routing_metrics(r)
  np.testing.assert_allclose(m["dropped_fraction"], 14 / 20)
  np.testing.assert_allclose(m["tokens_dropped_fraction"], 7 / 10)
  np.testing.assert_allclose(m["load"], [0, 0.5, 0.5, 0])
  np.testing.assert_allclose(m["max_over_mean_load"], 2.0)


def test_capacity_for():
  assert R.capacity_for(16, 8, 2, 1.25, 0) == 5  # ceil(1.25*2*16/8) = ceil(5.0)
  assert R.capacity_for(10, 11, 1, 1.1, 0) == 1  # 1.1*10/11 is 1 up to rounding
  assert R.capacity_for(16, 8, 2, 1.25, 8) == 8  # min_capacity
  assert R.capacity_for(16, 8, 2, 10.0, 0) == 16  # clamped to T
  assert R.capacity_for(4, 8, 2, 1.0, 6) == 4  # clamp beats min_capacity
  assert R.capacity_for(100, 64, 1, 0.01, 0) == 1  # at least one slot
  assert R.capacity_for(16, 8, 2, None, 4) is None
  assert R.capacity_for(16, 8, 2, 0.0, 4) is None


def test_bad_arguments():
  logits = _logits(0, 5, 3)
  with pytest.raises(ValueError, match="num_selected"):
    R.top_k_routing(logits, num_selected=4, capacity=None)
  with pytest.raises(ValueError, match="num_selected"):
    R.top_k_routing(logits, num_selected=0, capacity=None)
  with pytest.raises(ValueError, match="priority"):
    R.top_k_routing(logits, num_selected=1, capacity=None, priority="fifo")
  with pytest.raises(ValueError, match="padding_mask"):
    R.top_k_routing(logits, num_selected=1, capacity=None, padding_mask=np.ones(4, bool))


# ----------------------------------------------------------------------------------------------
# Balancing bias


def test_update_bias_direction():
  load = np.array([0.5, 0.25, 0.125, 0.125], np.float32)
  b = np.asarray(R.update_bias(np.zeros(4, np.float32), load, 0.01))
  np.testing.assert_allclose(b, [-0.01, 0.0, 0.01, 0.01])
  b = np.asarray(R.update_bias(np.ones(4, np.float32), np.full(4, 0.25), 0.1))
  np.testing.assert_allclose(b, 1.0)


def test_bias_changes_selection_only():
  t, e = 12, 4
  logits = _logits(4, t, e)
  bias = np.array([0.0, 0.0, 0.0, 10.0], np.float32)  # forces expert 3 into every top-2
  for renorm in (False, True):
    r0 = _route(logits, None, None, k=2, capacity=None, renormalize=renorm)
    r = _route(logits, bias, None, k=2, capacity=None, renormalize=renorm)
    idx = np.asarray(r.expert_index)
    assert (idx[:, 0] == 3).all()
    np.testing.assert_array_equal(np.asarray(r.probs), np.asarray(r0.probs))  # unbiased probs
    gate = np.take_along_axis(np.asarray(r.probs), idx, -1)
    if renorm:
      gate = gate / gate.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(r.combine_weights), gate, rtol=1e-6)


def test_bias_balancing_loop_evens_out_load():
  # A router that sends everything to expert 0; iterating the bias update spreads the load.
  t, e = 64, 4
  logits = jnp.asarray(_logits(0, t, e, scale=0.3)) + jnp.array([0.5, 0, 0, 0])
  route = jax.jit(lambda b: R.expert_load(R.top_k_routing(logits, num_selected=1, capacity=None,
                                                           bias=b)))
  bias = jnp.zeros(e)
  first = np.asarray(route(bias))
  for _ in range(200):
    bias = R.update_bias(bias, route(bias), 1e-3)
  last = np.asarray(route(bias))
  assert first.max() > 0.6
  assert last.max() < 0.4 and float(bias[0]) < 0


# ----------------------------------------------------------------------------------------------
# Losses and metrics


def _balanced_logits(num_tokens, e, k):
  """Token t prefers experts t, t+1, ..., t+k-1 (mod E) equally: uniform load and mean probs."""
  logits = np.zeros((num_tokens, e), np.float32)
  for i in range(num_tokens):
    for j in range(k):
      logits[i, (i + j) % e] = 3.0 - 1e-3 * j  # strict order inside the K, no ties
  return logits


@pytest.mark.parametrize("k", [1, 2, 4])
def test_load_balance_loss_is_one_when_balanced(k):
  e = 8
  logits = _balanced_logits(3 * e, e, k).reshape(3, e, e)  # 3 groups of T=E tokens
  r = _route(logits, None, None, k=k, capacity=None)
  np.testing.assert_allclose(R.expert_load(r), np.full(e, 1 / e), rtol=1e-6)
  np.testing.assert_allclose(R.load_balancing_loss(r), 1.0, rtol=1e-4)
  # Collapse onto one expert: f = e_0, P_0 near 1, so L_bal near E.
  collapsed = np.zeros((1, 16, e), np.float32)
  collapsed[..., 0] = 20.0
  r = _route(collapsed, None, None, k=1, capacity=None)
  np.testing.assert_allclose(R.load_balancing_loss(r), e, rtol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_and_metrics_vs_direct(seed):
  g, t, e, k, c = 2, 9, 5, 2, 3
  logits = _logits(seed, g, t, e)
  mask = np.random.default_rng(seed).random((g, t)) > 0.3
  r = _route(logits, None, mask, k=k, capacity=c)
  p = np.asarray(jax.nn.softmax(logits, -1), np.float64)[mask]  # [N, E] real tokens
  idx, slot = np.asarray(r.expert_index)[mask], np.asarray(r.slot)[mask]
  f = np.array([(idx == ex).sum() for ex in range(e)]) / idx.size
  np.testing.assert_allclose(R.load_balancing_loss(r), e * np.sum(f * p.mean(0)), rtol=1e-5)
  lse = np.log(np.exp(logits.astype(np.float64)).sum(-1))[mask]
  np.testing.assert_allclose(R.router_z_loss(r), np.mean(lse ** 2), rtol=1e-5)
  m = R.routing_metrics(r)
  assert set(m) == {"load", "max_over_mean_load", "dropped_fraction", "tokens_dropped_fraction",
                    "router_entropy", "top1_prob", "mean_k", "mean_kept_k", "k_hist"}
  np.testing.assert_allclose(m["load"], f, rtol=1e-6)
  np.testing.assert_allclose(m["max_over_mean_load"], f.max() * e, rtol=1e-6)
  np.testing.assert_allclose(m["dropped_fraction"], (slot < 0).mean(), rtol=1e-6)
  np.testing.assert_allclose(m["tokens_dropped_fraction"], (slot < 0).all(-1).mean(), rtol=1e-6)
  np.testing.assert_allclose(m["router_entropy"], -(p * np.log(p)).sum(-1).mean(), rtol=1e-5)
  np.testing.assert_allclose(m["top1_prob"], p.max(-1).mean(), rtol=1e-6)


def test_load_balance_gradient_flows_through_probs():
  logits = jnp.asarray(_logits(2, 1, 8, 4))
  g = jax.grad(lambda l: R.load_balancing_loss(R.top_k_routing(l, num_selected=2,
                                                               capacity=None)))(logits)
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0


# ----------------------------------------------------------------------------------------------
# Expert choice


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expert_choice_takes_top_c(seed):
  g, t, e, c = 2, 11, 3, 4
  logits = _logits(seed, g, t, e)
  mask = np.random.default_rng(seed).random((g, t)) > 0.3
  r = jax.jit(functools.partial(R.expert_choice_routing, capacity=c))(logits, padding_mask=mask)
  assert r.kind == R.EXPERT_CHOICE and r.capacity == c
  idx, slot, w, p = map(np.asarray, (r.expert_index, r.slot, r.combine_weights, r.probs))
  assert idx.shape == (g, t, e) and (idx == np.arange(e)).all()
  for gi in range(g):
    for ex in range(e):
      taken = np.nonzero(slot[gi, :, ex] >= 0)[0]
      real = np.nonzero(mask[gi])[0]
      expect = real[np.argsort(-p[gi, real, ex], kind="stable")[:c]]
      np.testing.assert_array_equal(np.sort(taken), np.sort(expect))  # its top-C real tokens
      # Slot = rank by probability.
      np.testing.assert_array_equal(slot[gi, expect, ex], np.arange(len(expect)))
  assert (slot[~mask] == -1).all()
  np.testing.assert_allclose(w, np.where(slot >= 0, p, 0.0))
  m = R.routing_metrics(r)
  assert float(m["dropped_fraction"]) == 0.0
  untaken = ~(slot >= 0).any(-1)
  np.testing.assert_allclose(m["tokens_dropped_fraction"], untaken[mask].mean(), rtol=1e-6)


def test_expert_choice_clamps_capacity():
  r = R.expert_choice_routing(_logits(0, 3, 2), capacity=10)
  assert r.capacity == 3 and (np.asarray(r.slot) >= 0).all()
