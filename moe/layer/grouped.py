"""Grouped expert FFN over an expert-sorted, tile-padded row buffer (the `grouped` strategy).

The buffer (see `rows.tiled_layout`) holds each expert's rows contiguously, every run
padded to a multiple of `tile` rows, so each tile belongs to exactly one expert. A `while_loop`
visits only the tiles in use (a dynamic count) and runs the whole expert FFN on each tile with
that expert's weights, sliced in place. Cost is the active FLOPs plus at most one partial tile
per expert; no one-hot tensors, no weight copies, no scatter-add.

The loop has a dynamic trip count, so reverse-mode autodiff cannot go through it; a custom VJP
runs a second loop over the same tiles that accumulates the weight gradients in place (slice of
the [E, ...] gradient carry, add, update slice) and writes the input gradient per tile. The
forward saves the two pre-activation tiles ([R, F] each) so the backward does not recompute them.

On CPU (XLA: no megablox kernel, and `ragged_dot` expands to dense masking) this is the fast
dropless path; see BENCHMARKS.md.
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


def _forward_loop(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation):
  R, _ = x_RD.shape
  F = w_in.shape[-1]
  gated = activation == "swiglu"

  def body(i, carry):
    y, h_in_all, h_gate_all = carry
    e = tile_expert[i]
    x_t = _slice_rows(x_RD, i, tile)
    h_in = x_t @ _expert(w_in, e)
    h_gate = x_t @ _expert(w_gate, e) if gated else None
    y = _put_rows(y, activate(h_in, h_gate, activation) @ _expert(w_out, e), i, tile)
    h_in_all = _put_rows(h_in_all, h_in, i, tile)
    if gated:
      h_gate_all = _put_rows(h_gate_all, h_gate, i, tile)
    return y, h_in_all, h_gate_all

  zeros_RF = jnp.zeros((R, F), x_RD.dtype)
  init = (jnp.zeros_like(x_RD), zeros_RF, zeros_RF if gated else jnp.zeros((0,), x_RD.dtype))
  return jax.lax.fori_loop(0, num_tiles, body, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _grouped_ffn(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation):
  return _forward_loop(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation)[0]


def _grouped_ffn_fwd(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, tile, activation):
  y, h_in_all, h_gate_all = _forward_loop(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out,
                                          tile, activation)
  return y, (x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, h_in_all, h_gate_all)


def _grouped_ffn_bwd(tile, activation, res, dy_RD):
  x_RD, tile_expert, num_tiles, w_in, w_gate, w_out, h_in_all, h_gate_all = res
  gated = activation == "swiglu"
  dims_t = (((0,), (0,)), ((), ()))  # contract rows: a^T @ b
  dims_wt = (((1,), (1,)), ((), ()))  # contract the last axes: a @ w^T

  def body(i, carry):
    dx, dw_in, dw_gate, dw_out = carry
    e = tile_expert[i]
    x_t = _slice_rows(x_RD, i, tile)
    dy_t = _slice_rows(dy_RD, i, tile)
    h_in = _slice_rows(h_in_all, i, tile)
    h_gate = _slice_rows(h_gate_all, i, tile) if gated else None
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

  init = (jnp.zeros_like(x_RD), jnp.zeros_like(w_in),
          jnp.zeros_like(w_gate) if gated else None, jnp.zeros_like(w_out))
  dx, dw_in, dw_gate, dw_out = jax.lax.fori_loop(0, num_tiles, body, init)
  return dx, None, None, dw_in, dw_gate, dw_out


_grouped_ffn.defvjp(_grouped_ffn_fwd, _grouped_ffn_bwd)


def grouped_ffn(x_RD, tile_expert, num_tiles, w_in_EDF, w_gate_EDF, w_out_EFD, *, tile: int,
                activation: str):
  """y[r] = FFN_{tile_expert[r // tile]}(x[r]) for the first `num_tiles` tiles, 0 elsewhere.

  Weights must already be in x's dtype. w_gate is None for gelu.
  """
  return _grouped_ffn(x_RD, tile_expert, num_tiles, w_in_EDF, w_gate_EDF, w_out_EFD, tile,
                      activation)


def choose_tile(num_assignments: int, num_experts: int) -> int:
  """Rows per tile: the largest power of two <= half the mean rows per expert, within [8, 256].

  Larger tiles run the matmuls faster and read each expert's weights fewer times; smaller
  tiles waste less on the padding of each expert's last tile (half a tile per expert on
  average). Measured on CPU at T*K=16384 (fwd+bwd CPU time of the tile loop alone): E=8 best at
  256, E=64 flat over 32..128, E=256 best at 32 (16 and 64 about 10% slower).
  """
  half_mean = num_assignments / max(num_experts, 1) / 2
  tile = 8
  while tile < 256 and tile * 2 <= half_mean:
    tile *= 2
  return tile
