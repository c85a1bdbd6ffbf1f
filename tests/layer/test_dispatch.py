"""Every dispatch strategy against the brute-force reference: forward and gradients, with and
without capacity, both activations, padding, dropped assignments, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.layer import dispatch
from moe.layer import grouped
from moe.layer import megablox
from moe.layer import rows
from moe.layer import routing as routing_lib
from moe.errors import ConfigError
from moe.layer.routing import Routing

G, T, E, K, D, F = 3, 37, 5, 2, 12, 20
SEEDS = (0, 1, 2)


def make_routing(key, *, capacity, num_experts=E, num_selected=K, groups=G, tokens=T,
                 pad_fraction=0.15, skew=0.0):
  """Routing built here with numpy (independent of moe.layer.routing): random logits, top-k, slots in
  choice-major then token order, capacity drops, padding tokens never routed."""
  k1, k2, k3 = jax.random.split(key, 3)
  logits = np.array(jax.random.normal(k1, (groups, tokens, num_experts)))
  logits[..., 0] += skew  # skew > 0 crowds expert 0 to force drops / an unbalanced load
  mask = np.asarray(jax.random.uniform(k2, (groups, tokens)) >= pad_fraction)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  expert = np.argsort(-probs, axis=-1, kind="stable")[..., :num_selected].astype(np.int32)
  gate = np.take_along_axis(probs, expert, -1)
  gate /= gate.sum(-1, keepdims=True)
  # Random positive weights so that gradients w.r.t. them are not all alike.
  gate *= np.asarray(jax.random.uniform(k3, gate.shape, minval=0.5, maxval=1.5))
  slot = np.full(expert.shape, -1, np.int32)
  for g in range(groups):
    fill = np.zeros(num_experts, np.int64)
    for k in range(num_selected):
      for t in range(tokens):
        if not mask[g, t]:
          continue
        e = expert[g, t, k]
        if capacity is None or fill[e] < capacity:
          slot[g, t, k] = fill[e]
        fill[e] += 1
  weights = np.where(slot >= 0, gate, 0.0).astype(np.float32)
  return Routing(expert_index=jnp.asarray(expert), combine_weights=jnp.asarray(weights),
                 slot=jnp.asarray(slot), probs=jnp.asarray(probs, jnp.float32),
                 logits=jnp.asarray(logits, jnp.float32), token_mask=jnp.asarray(mask),
                 capacity=capacity)


def make_params(key, activation, num_experts=E, d=D, f=F, dtype=jnp.float32):
  kx, ki, kg, ko = jax.random.split(key, 4)
  x = jax.random.normal(kx, (G, T, d), dtype)
  w_in = jax.random.normal(ki, (num_experts, d, f)) / np.sqrt(d)
  w_gate = jax.random.normal(kg, (num_experts, d, f)) / np.sqrt(d) if activation == "swiglu" else None
  w_out = jax.random.normal(ko, (num_experts, f, d)) / np.sqrt(f)
  return x, w_in, w_gate, w_out


def value_and_grads(strategy, activation):
  """jit of (y, grads of a random projection of y w.r.t. x, weights, combine weights)."""

  def loss(x, w_in, w_gate, w_out, cw, routing, proj):
    r = routing.replace(combine_weights=cw)
    y = dispatch.apply_experts(x, r, w_in, w_gate, w_out, activation=activation,
                               strategy=strategy)
    return jnp.sum(y.astype(jnp.float32) * proj), y

  grad = jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
  return jax.jit(grad)


def assert_close(a, b, tol, what):
  a = np.asarray(a, np.float32)
  b = np.asarray(b, np.float32)
  scale = max(float(np.abs(b).max()), 1e-3)
  np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol, err_msg=what)


CASES = [("einsum", 9), ("gather", 9), ("grouped", 9), ("grouped", None), ("ragged", 9),
         ("ragged", None), ("megablox", 9), ("megablox", None)]


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
@pytest.mark.parametrize("strategy,capacity", CASES)
def test_strategy_matches_reference(strategy, capacity, activation):
  fast = value_and_grads(strategy, activation)
  ref = value_and_grads("reference", activation)
  for seed in SEEDS:
    kr, kp, kq = jax.random.split(jax.random.PRNGKey(seed), 3)
    # C=9 with skewed logits guarantees drops (expert 0 wants far more than 9 per group).
    # Dropless, the skew makes expert 0 overflow `grouped`'s block into its tiles while other
    # experts leave block rows empty.
    routing = make_routing(kr, capacity=capacity, skew=1.5)
    if capacity is not None:
      assert int(jnp.sum(routing.slot < 0)) > int(jnp.sum(~routing.token_mask)) * K
    else:
      counts = np.bincount(np.asarray(routing.expert_index)[np.asarray(routing.slot) >= 0],
                           minlength=E)
      bulk = grouped.plan(dispatch.planned_rows(routing, E))[0]
      assert counts.max() > bulk > counts.min()
    x, w_in, w_gate, w_out = make_params(kp, activation)
    proj = jax.random.normal(kq, x.shape)
    args = (x, w_in, w_gate, w_out, routing.combine_weights, routing, proj)
    (_, y_fast), g_fast = fast(*args)
    (_, y_ref), g_ref = ref(*args)
    assert y_fast.shape == x.shape and y_fast.dtype == x.dtype
    assert float(jnp.abs(y_ref).max()) > 0.1  # the comparison is not between two zeros
    assert_close(y_fast, y_ref, 1e-5, f"{strategy} output, seed {seed}")
    for name, a, b in zip(("x", "w_in", "w_gate", "w_out", "combine_weights"), g_fast, g_ref):
      if b is None:
        assert a is None
        continue
      assert float(jnp.abs(b).max()) > 0, name
      assert_close(a, b, 1e-5, f"{strategy} grad {name}, seed {seed}")


@pytest.mark.parametrize("strategy", dispatch.STRATEGIES)
def test_dropped_assignments_contribute_exactly_zero(strategy):
  capacity = 6
  routing = make_routing(jax.random.PRNGKey(3), capacity=capacity, skew=2.0)
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(4), "swiglu")
  dropped = routing.slot < 0
  # Garbage weights on dropped assignments must be ignored, not just multiplied by zero.
  noisy = routing.replace(combine_weights=jnp.where(dropped, 7.0, routing.combine_weights))
  run = jax.jit(lambda r: dispatch.apply_experts(x, r, w_in, w_gate, w_out,
                                                 activation="swiglu", strategy=strategy))
  y_clean, y_noisy = run(routing), run(noisy)
  np.testing.assert_array_equal(np.asarray(y_clean), np.asarray(y_noisy))
  # Tokens whose every assignment was dropped (or that are padding) get exactly zero.
  all_dropped = np.asarray(jnp.all(dropped, axis=-1))
  assert all_dropped.sum() > 0
  assert np.all(np.asarray(y_clean)[all_dropped] == 0.0)
  # A token with one kept choice gets exactly that expert's contribution (checked by hand).
  one_kept = np.argwhere(np.asarray(jnp.sum(~dropped, axis=-1)) == 1)
  assert len(one_kept) > 0
  g, t = one_kept[0]
  k = int(np.argmax(np.asarray(~dropped[g, t])))
  e = int(routing.expert_index[g, t, k])
  want = float(routing.combine_weights[g, t, k]) * dispatch.expert_ffn(
      x[g, t], w_in[e], w_gate[e], w_out[e], "swiglu")
  assert_close(y_clean[g, t], want, 1e-5, "single kept choice")


@pytest.mark.parametrize("strategy,capacity", CASES)
def test_padding_tokens_get_zero_output(strategy, capacity):
  routing = make_routing(jax.random.PRNGKey(5), capacity=capacity, pad_fraction=0.4)
  # Padding tokens keep their (meaningless) expert choices; only slot/weights mark them.
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(6), "gelu")
  y = dispatch.apply_experts(x, routing, w_in, None, w_out, activation="gelu", strategy=strategy)
  pad = ~np.asarray(routing.token_mask)
  assert pad.sum() > 0
  assert np.all(np.asarray(y)[pad] == 0.0)
  assert np.all(np.abs(np.asarray(y)[~pad]).sum(-1) > 0)


@pytest.mark.parametrize("strategy,capacity", CASES)
def test_bfloat16_runs_and_is_close(strategy, capacity):
  routing = make_routing(jax.random.PRNGKey(7), capacity=capacity)
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(8), "swiglu")
  want = dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="swiglu",
                                strategy="reference")

  def loss(x, w_in):
    y = dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="swiglu",
                               strategy=strategy)
    return jnp.sum(y.astype(jnp.float32)), y

  (_, y), (gx, gw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
      x.astype(jnp.bfloat16), w_in)
  assert y.dtype == jnp.bfloat16 and gx.dtype == jnp.bfloat16 and gw.dtype == jnp.float32
  assert_close(y, want, 3e-2, f"{strategy} bf16")
  assert np.all(np.isfinite(np.asarray(gx, np.float32))) and np.all(np.isfinite(np.asarray(gw)))


@pytest.mark.parametrize("strategy", ["grouped", "ragged", "megablox"])
def test_dropless_with_everything_on_one_expert(strategy):
  """The worst imbalance: every token's first choice is expert 0 (more than a tile, a group)."""
  routing = make_routing(jax.random.PRNGKey(9), capacity=None, skew=50.0, pad_fraction=0.0)
  assert bool(jnp.all(routing.expert_index[..., 0] == 0))
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(10), "swiglu")
  want = dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="swiglu",
                                strategy="reference")
  # planned_k only sizes grouped's block (and megablox's row tile): 0.25 leaves most rows to the
  # tiles, 8 makes a block far larger than any expert but expert 0 needs.
  for planned_k in (None, 0.25, 8.0):
    got = dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="swiglu",
                                 strategy=strategy, planned_k=planned_k)
    assert_close(got, want, 1e-5, f"{strategy}, planned_k {planned_k}")


@pytest.mark.parametrize("tile,bulk", [(1, 0), (8, 0), (64, 0), (8, 16), (4, 24), (16, 40)])
def test_grouped_ffn_any_tile_matches_per_row_ffn(tile, bulk):
  """The block and the tile loop on their own: each row gets its expert's FFN; the gradients too.
  bulk 0: tiles only; 16 / 24: every expert spills into tiles; 40: some experts spill, the others
  leave empty rows in the block (36 to 46 valid rows per expert here)."""
  routing = make_routing(jax.random.PRNGKey(11), capacity=None)
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(12), "swiglu")
  layout, tile_expert, num_tiles = rows.tiled_layout(
      routing.expert_index, routing.slot, E, tile, bulk)
  x_RD = rows.dispatch_rows(x.reshape(G * T, D), layout)
  R = layout.num_rows
  row_expert = np.concatenate([np.repeat(np.arange(E), bulk), np.repeat(np.asarray(tile_expert),
                                                                         tile)])
  used = np.arange(R) < E * bulk + int(num_tiles) * tile
  # Layout invariants: every placed assignment sits in its own expert's block or tiles, rows
  # unique, an expert's first `bulk` assignments in the block.
  row_of = np.asarray(layout.row_of)
  placed = row_of < R
  experts = np.asarray(routing.expert_index).reshape(-1)
  counts = np.bincount(experts[placed], minlength=E)
  assert placed.sum() == int(jnp.sum(routing.slot >= 0))
  assert len(np.unique(row_of[placed])) == placed.sum()
  assert np.all(row_expert[row_of[placed]] == experts[placed])
  assert np.all(used[row_of[placed]])
  assert R == E * bulk + tile * (-(-(routing.slot.size - bulk) // tile) + E)
  np.testing.assert_array_equal(np.bincount(experts[placed & (row_of < E * bulk)], minlength=E),
                                np.minimum(counts, bulk))
  assert int(num_tiles) == sum(-(-max(c - bulk, 0) // tile) for c in counts)
  if bulk in (16, 24):
    assert np.all(counts > bulk)
  if bulk == 40:
    assert np.sum(counts < bulk) >= 2 and int(num_tiles) > 0

  def by_tiles(x_RD, w_in, w_gate, w_out):
    return grouped.grouped_ffn(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out,
                               tile=tile, activation="swiglu", bulk=bulk)

  def by_rows(x_RD, w_in, w_gate, w_out):
    e = jnp.asarray(row_expert)
    y = jax.vmap(lambda xr, e: dispatch.expert_ffn(xr, w_in[e], w_gate[e], w_out[e], "swiglu"))(
        x_RD, e)
    return jnp.where(jnp.asarray(used)[:, None], y, 0.0)

  proj = jax.random.normal(jax.random.PRNGKey(13), x_RD.shape)
  args = (x_RD, w_in, w_gate, w_out)
  got = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(by_tiles(*a) * proj),
                                   argnums=(0, 1, 2, 3)))(*args)
  want = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(by_rows(*a) * proj),
                                    argnums=(0, 1, 2, 3)))(*args)
  assert_close(got[0], want[0], 1e-5, "value")
  for a, b in zip(got[1], want[1]):
    assert_close(a, b, 1e-5, "grad")


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_megablox_ffn_small_tiles_match_per_row_ffn(monkeypatch, activation):
  """The kernel FFN on its own, with tiles smaller than every width so that each matmul runs
  several k and n tiles with a remainder (12 = 8 + 4, 20 = 8 + 8 + 4), row tiles shared by two
  experts, an empty expert and padding rows; values and all gradients vs a per-row FFN."""
  monkeypatch.setattr(megablox, "LANE_TILE_MAX", 8)
  monkeypatch.setattr(megablox, "LANE", 4)
  assert (megablox.lane_tile(D), megablox.lane_tile(F)) == (8, 8)
  counts = jnp.asarray([13, 0, 21, 5, 9], jnp.int32)  # 48 rows used, expert 1 empty
  R, tm = 64, 16
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(19), activation)
  x_RD = jax.random.normal(jax.random.PRNGKey(20), (R, D))
  used = np.arange(R) < int(counts.sum())
  row_expert = np.zeros(R, np.int32)  # padding rows: any expert, masked below
  row_expert[used] = np.repeat(np.arange(E), np.asarray(counts))

  def by_kernel(x_RD, w_in, w_gate, w_out):
    return megablox.grouped_ffn(x_RD, counts, w_in, w_gate, w_out, row_tile=tm,
                                activation=activation, interpret=True)

  def by_rows(x_RD, w_in, w_gate, w_out):
    y = jax.vmap(lambda xr, e: dispatch.expert_ffn(
        xr, w_in[e], None if w_gate is None else w_gate[e], w_out[e], activation))(
            x_RD, jnp.asarray(row_expert))
    return jnp.where(jnp.asarray(used)[:, None], y, 0.0)

  proj = jax.random.normal(jax.random.PRNGKey(21), (R, D))
  argnums = (0, 1, 2, 3) if activation == "swiglu" else (0, 1, 3)
  args = (x_RD, w_in, w_gate, w_out)
  got = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(by_kernel(*a) * proj), argnums))(*args)
  want = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(by_rows(*a) * proj), argnums))(*args)
  y = by_kernel(*args)
  assert np.all(np.asarray(y)[~used] == 0.0) and np.all(np.isfinite(np.asarray(y)))
  assert_close(y, by_rows(*args), 1e-5, "rows")  # (the summed value cancels: not compared)
  for a, b in zip(got[1], want[1]):
    assert float(jnp.abs(b).max()) > 0
    assert_close(a, b, 1e-5, "grad")
  assert np.all(np.asarray(got[1][1])[1] == 0.0)  # the empty expert's weight gradient
  with pytest.raises(ValueError, match="row tile"):
    megablox.grouped_ffn(x_RD[:60], counts, w_in, w_gate, w_out, row_tile=tm,
                         activation=activation, interpret=True)


def test_megablox_tiles():
  assert [megablox.lane_tile(d) for d in (12, 1024, 1408, 2048, 5000)] == [12, 1024, 768, 1024,
                                                                            1024]
  assert [megablox.row_tile(r) for r in (3, 44, 64, 6144)] == [16, 32, 64, 512]


def test_with_the_project_router():
  """The routers of moe.layer.routing (token choice with capacity, dropless, expert choice) feed every
  strategy unchanged."""
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(14), "swiglu")
  logits = jax.random.normal(jax.random.PRNGKey(15), (G, T, E))
  mask = jax.random.uniform(jax.random.PRNGKey(16), (G, T)) > 0.2
  routings = {
      "capacity": routing_lib.top_k_routing(logits, num_selected=K, capacity=11,
                                            padding_mask=mask),
      "dropless": routing_lib.top_k_routing(logits, num_selected=K, capacity=None,
                                            padding_mask=mask),
      "expert_choice": routing_lib.expert_choice_routing(logits, capacity=8, padding_mask=mask),
  }
  for name, r in routings.items():
    outs = {}
    for strategy in dispatch.STRATEGIES:
      if r.capacity is None and strategy in dispatch.CAPACITY_ONLY:
        continue
      run = jax.jit(lambda x, r, s=strategy: dispatch.apply_experts(
          x, r, w_in, w_gate, w_out, activation="swiglu", strategy=s))
      outs[strategy] = run(x, r)
    assert float(jnp.abs(outs["reference"]).max()) > 0.1
    for strategy, got in outs.items():
      assert_close(got, outs["reference"], 1e-5, f"{name} / {strategy}")


def test_resolve_strategy():
  assert dispatch.resolve_strategy("auto", 10, "cpu") in dispatch.STRATEGIES
  assert dispatch.resolve_strategy("auto", None, "cpu") in ("grouped", "ragged")
  assert dispatch.resolve_strategy("auto", 10, "tpu") == "gather"
  # CPU with a capacity: the batched gather when each expert has few rows, else the tile loop.
  few, many = dispatch.CPU_GATHER_BELOW - 1, dispatch.CPU_GATHER_BELOW
  assert dispatch.resolve_strategy("auto", 10, "cpu", rows_per_expert=few) == "gather"
  assert dispatch.resolve_strategy("auto", 10, "cpu", rows_per_expert=many) == "grouped"
  assert dispatch.resolve_strategy("auto", 10, "gpu", rows_per_expert=few) == "gather"
  assert dispatch.resolve_strategy("auto", None, "cpu", rows_per_expert=few) == "grouped"
  assert dispatch.resolve_strategy("grouped", 10, "cpu", rows_per_expert=few) == "grouped"
  assert dispatch.resolve_strategy("auto", None, "gpu") == "grouped"  # measured on an H200
  assert dispatch.resolve_strategy("auto", None, "tpu") == "ragged"
  assert dispatch.resolve_strategy("auto", None) in ("grouped", "ragged")
  for s in dispatch.STRATEGIES:
    assert dispatch.resolve_strategy(s, 10, "cpu") == s
  for s in ("einsum", "gather"):
    with pytest.raises(ConfigError, match=r"moe\.dispatch"):
      dispatch.resolve_strategy(s, None, "cpu")
  with pytest.raises(ConfigError, match=r"one of \['auto', 'grouped', 'ragged'\]$"):
    dispatch.resolve_strategy("gather", None, "gpu")  # megablox is not offered where it cannot run
  with pytest.raises(ConfigError, match=r"'ragged', 'megablox'\]$"):
    dispatch.resolve_strategy("gather", None, "tpu")
  with pytest.raises(ConfigError, match=r"moe\.dispatch must be one of"):
    dispatch.resolve_strategy("scatter", 10, "cpu")
  # The Pallas TPU kernel: TPU (compiled) and CPU (interpret mode) only; never picked by auto.
  for backend in ("tpu", "cpu"):
    assert dispatch.resolve_strategy("megablox", None, backend) == "megablox"
    assert dispatch.unavailable("megablox", backend) is None
  for backend in ("gpu", "cuda", "rocm"):
    assert "megablox" not in (dispatch.resolve_strategy("auto", c, backend) for c in (None, 10))
    assert "not " + backend in dispatch.unavailable("megablox", backend)
    with pytest.raises(ConfigError, match=r"^moe\.dispatch='megablox': .*not " + backend):
      dispatch.resolve_strategy("megablox", 10, backend)
  assert all(dispatch.unavailable(s, "gpu") is None for s in dispatch.STRATEGIES
             if s != "megablox")


def test_bad_inputs_raise_before_compiling():
  routing = make_routing(jax.random.PRNGKey(17), capacity=None)
  x, w_in, w_gate, w_out = make_params(jax.random.PRNGKey(18), "swiglu")
  with pytest.raises(ConfigError, match=r"moe\.dispatch"):
    dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="swiglu", strategy="gather")
  with pytest.raises(ConfigError, match=r"moe\.expert_mlp"):
    dispatch.apply_experts(x, routing, w_in, w_gate, w_out, activation="relu", strategy="grouped")
  with pytest.raises(ValueError, match="w_gate"):
    dispatch.apply_experts(x, routing, w_in, None, w_out, activation="swiglu", strategy="grouped")
  with pytest.raises(ValueError, match=r"\[G, T, D\]"):
    dispatch.apply_experts(x[0], routing, w_in, w_gate, w_out, activation="swiglu",
                           strategy="grouped")
  with pytest.raises(ValueError, match="weights"):
    dispatch.apply_experts(x, routing, w_in, w_gate, w_out[:, :-1], activation="swiglu",
                           strategy="grouped")
