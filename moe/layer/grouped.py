"""Grouped expert FFN over an expert-sorted row buffer (the `grouped` strategy).

The buffer (see `rows.tiled_layout`) has two parts:

- the block: each expert's first `bulk` rows (zero-padded when it has fewer), which reshape to
  [E, bulk, D] and run as one batched matmul per weight, each expert's weights read once;
- the tail: each expert's remaining rows, contiguous and padded to a multiple of `tile`, so every
  tile belongs to one expert. A `while_loop` visits only the tiles in use (a dynamic count) and
  runs the expert FFN on each with that expert's weights, sliced in place.

The caller sets `bulk` to about the mean rows per expert, so the block does most of the work
with few empty rows, and the tail holds only what busy experts have over the mean. Cost is the
active FLOPs, the block's empty rows, and at most one partial tile per busy expert; no one-hot
tensors and no scatter-add. With bulk = 0 it is a loop over tiles alone.

Why the block: on CPU a loop of small matmuls runs well below one large matmul's speed, and every
tile reads its expert's [D, F] weights again (at E = 256, D = 256, F = 1024 the weights of one
tile weigh more than its rows' work). BENCHMARKS.md ("Where the MoE layer's time goes").

The loop has a dynamic trip count, so reverse-mode autodiff cannot go through it; a custom VJP
computes the block's gradients with einsums from the saved pre-activations, then runs a second
loop over the same tiles that adds each tile's weight gradients into them in place and writes
its input gradient. The tail's pre-activations are recomputed in that loop rather than kept in
[R, F] buffers: the tail is small, and such buffers would be zero-filled every step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe.layer.activation import activate, activate_bwd


def _slice_rows(a, i, tile):
  return jax.lax.dynamic_slice_in_dim(a, i * tile, tile, axis=0)


def _put_rows(a, v, i, tile):
  return jax.lax.dynamic_update_slice_in_dim(a, v, i * tile, axis=0)


def _expert(w, e):
  return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False)


def _add_expert(acc, v, e):
  cur = jax.lax.dynamic_index_in_dim(acc, e, axis=0, keepdims=True)
  return jax.lax.dynamic_update_index_in_dim(acc, cur + v[None], e, axis=0)


def _tile_pre(x_t, w_in, w_gate, e, gated):
  """The pre-activations (h_in, h_gate) of one tile of expert e."""
  return x_t @ _expert(w_in, e), (x_t @ _expert(w_gate, e) if gated else None)


def _forward_loop(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation):
  """y rows over the used tiles, zero elsewhere."""
  gated = activation == "swiglu"

  def body(i, y):
    e = tile_expert[i]
    h_in, h_gate = _tile_pre(_slice_rows(x_RD, i, tile), w_in, w_gate, e, gated)
    return _put_rows(y, activate(h_in, h_gate, activation) @ _expert(w_out, e), i, tile)

  return jax.lax.fori_loop(0, num_tiles, body, jnp.zeros_like(x_RD))


def _bulk_forward(x_ECD, w_in, w_gate, w_out, activation):
  """The block: every expert's FFN on its own [C, D] rows, one batched matmul per weight."""
  h_in = jnp.einsum("ECD,EDF->ECF", x_ECD, w_in)
  h_gate = jnp.einsum("ECD,EDF->ECF", x_ECD, w_gate) if activation == "swiglu" else None
  y = jnp.einsum("ECF,EFD->ECD", activate(h_in, h_gate, activation), w_out)
  return y, h_in, h_gate


def _bulk_backward(x_ECD, w_in, w_gate, w_out, h_in, h_gate, dy_ECD, activation):
  """(dx, dw_in, dw_gate, dw_out) of the block, from the saved pre-activations."""
  act = activate(h_in, h_gate, activation)
  dw_out = jnp.einsum("ECF,ECD->EFD", act, dy_ECD)
  d_in, d_gate = activate_bwd(h_in, h_gate, jnp.einsum("ECD,EFD->ECF", dy_ECD, w_out), activation)
  dw_in = jnp.einsum("ECD,ECF->EDF", x_ECD, d_in)
  dx = jnp.einsum("ECF,EDF->ECD", d_in, w_in)
  dw_gate = None
  if h_gate is not None:
    dw_gate = jnp.einsum("ECD,ECF->EDF", x_ECD, d_gate)
    dx = dx + jnp.einsum("ECF,EDF->ECD", d_gate, w_gate)
  return dx, dw_in, dw_gate, dw_out


def _split(x_RD, num_experts, bulk):
  """(the block [E, bulk, D] or None, the tile rows) of a buffer laid out by rows.tiled_layout."""
  if not bulk:
    return None, x_RD
  n = num_experts * bulk
  return x_RD[:n].reshape(num_experts, bulk, x_RD.shape[-1]), x_RD[n:]


def _forward(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation, bulk):
  """(y rows, the block's pre-activations (h_in, h_gate), None without a block)."""
  E = w_in.shape[0]
  x_ECD, x_tiles = _split(x_RD, E, bulk)
  y = _forward_loop(x_tiles, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation)
  if not bulk:
    return y, (None, None)
  y_ECD, h_in, h_gate = _bulk_forward(x_ECD, w_in, w_gate, w_out, activation)
  return jnp.concatenate([y_ECD.reshape(E * bulk, -1), y], axis=0), (h_in, h_gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _grouped_ffn(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation, bulk):
  return _forward(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation, bulk)[0]


def _grouped_ffn_fwd(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation, bulk):
  y, saved = _forward(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation, bulk)
  return y, (x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, saved)


def _grouped_ffn_bwd(tile, activation, bulk, res, dy_RD):
  x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, (h_in_b, h_gate_b) = res
  E = w_in.shape[0]
  gated = activation == "swiglu"
  x_ECD, x_tiles = _split(x_RD, E, bulk)
  dy_ECD, dy_tiles = _split(dy_RD, E, bulk)
  dims_t = (((0,), (0,)), ((), ()))  # contract rows: a^T @ b
  dims_wt = (((1,), (1,)), ((), ()))  # contract the last axes: a @ w^T

  def body(i, carry):
    dx, dw_in, dw_gate, dw_out = carry
    e = tile_expert[i]
    x_t = _slice_rows(x_tiles, i, tile)
    dy_t = _slice_rows(dy_tiles, i, tile)
    h_in, h_gate = _tile_pre(x_t, w_in, w_gate, e, gated)
    act = activate(h_in, h_gate, activation)
    dw_out = _add_expert(dw_out, jax.lax.dot_general(act, dy_t, dims_t), e)
    d_act = jax.lax.dot_general(dy_t, _expert(w_out, e), dims_wt)
    d_in, d_gate = activate_bwd(h_in, h_gate, d_act, activation)
    dw_in = _add_expert(dw_in, jax.lax.dot_general(x_t, d_in, dims_t), e)
    dx_t = jax.lax.dot_general(d_in, _expert(w_in, e), dims_wt)
    if gated:
      dw_gate = _add_expert(dw_gate, jax.lax.dot_general(x_t, d_gate, dims_t), e)
      dx_t = dx_t + jax.lax.dot_general(d_gate, _expert(w_gate, e), dims_wt)
    return _put_rows(dx, dx_t, i, tile), dw_in, dw_gate, dw_out

  if bulk:  # the loop adds the tiles' weight gradients to the block's
    dx_b, dw_in, dw_gate, dw_out = _bulk_backward(x_ECD, w_in, w_gate, w_out, h_in_b, h_gate_b,
                                                  dy_ECD, activation)
  else:
    dw_in, dw_out = jnp.zeros_like(w_in), jnp.zeros_like(w_out)
    dw_gate = jnp.zeros_like(w_gate) if gated else None
  init = (jnp.zeros_like(x_tiles), dw_in, dw_gate, dw_out)
  dx, dw_in, dw_gate, dw_out = jax.lax.fori_loop(0, num_tiles, body, init)
  if bulk:
    dx = jnp.concatenate([dx_b.reshape(E * bulk, -1), dx], axis=0)
  return dx, None, None, dw_in, dw_gate, dw_out


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def grouped_ffn(x_RD, tile_expert, num_tiles, w_in_EDF, w_gate_EDF, w_out_EFD, *, tile: int,
                activation: str, bulk: int = 0):
  """y = each row's expert FFN on a buffer laid out by `rows.tiled_layout(..., tile, bulk)`: the
  first E*bulk rows as a batched [E, bulk, D] block, then the first `num_tiles` tiles of the
  rest (row r of the tiles by expert tile_expert[r // tile]); rows of unused tiles get 0.

  Weights must already be in x's dtype. w_gate is None for gelu.
  """
  return _grouped_ffn(x_RD, tile_expert, num_tiles, w_in_EDF, w_gate_EDF, w_out_EFD, tile,
                      activation, bulk)


def plan(rows_per_expert: float) -> tuple[int, int]:
  """(bulk, tile) for an expected `rows_per_expert` valid rows per expert.

  bulk: the mean rounded up to a multiple of 8. tile: 32 rows, or the largest power of two <= half
  the bulk when that is smaller (at least 8). Measured on the 2-core CPU (whole MoeLayer,
  forward+backward, T=8192, D=256, F=1024, K=2, dropless, the layer's own router at init):
  - bulk 1.0x / 1.125x / 1.25x the mean: 1.49 / 1.55 / 1.59x dense at E=64, 2.17 / 2.12 / 2.12x
    at E=256 (the smaller block leaves more tiles, the larger one more empty rows);
  - tiles of 16 / 32 / 64 rows: E=8 1.20 / 1.18 / 1.19x, E=32 1.38 / 1.34 / 1.37x; E=64 32 rows
    1.46x against 16 rows 1.49x. Each tile reads its expert's weights again, so tiles of 8 lose
    (E=256: 272 tiles of 8 against 165 of 16).
  """
  bulk = -(-int(round(rows_per_expert)) // 8) * 8
  tile = 8
  while tile < 32 and tile * 2 <= bulk / 2:
    tile *= 2
  return bulk, tile
