"""The expert FFN of the `megablox` strategy: JAX's TPU grouped matmul on rows sorted by expert.

The kernels are the Pallas TPU ones JAX ships (`jax.experimental.pallas.ops.tpu.megablox.gmm`),
as MaxText uses them:

  gmm(lhs[M, K], rhs[E, K, N], group_sizes[E])   each expert's contiguous run of rows times that
                                                  expert's matrix (transpose_rhs: rhs[E, N, K])
  tgmm(lhs[K, M], rhs[M, N], group_sizes[E])     per expert, lhs[:, run] @ rhs[run, :] -> [E, K, N]
                                                  (the weight gradient)

The rows are `rows.packed_layout`'s (valid assignments sorted by expert, no gaps, R = A), padded
with zero rows to a multiple of the row tile. The kernel visits only the row tiles a group touches
(a tile shared by two experts is visited once per expert, each storing only its own rows); rows
past the last group are never written (uninitialised memory on TPU, NaN in interpret mode), so
every gmm output is masked to zero there.

One custom VJP around the whole FFN (not one per matmul, as megablox.ops.gmm has): the forward
saves the pre-activations [R, F] and the backward runs

  d_act = gmm(dy, w_out^T)            dw_out = tgmm(act^T, dy)
  d_in, d_gate = activate_bwd(...)    dw_in = tgmm(x^T, d_in),  dw_gate = tgmm(x^T, d_gate)
  dx = gmm(d_in, w_in^T) + gmm(d_gate, w_gate^T)

Outputs have x's dtype; the kernels accumulate in float32.

Where it runs: compiled (Mosaic) on TPU; on CPU in the kernel's interpret mode (the same kernel
body evaluated with ordinary JAX ops: slow, for checking it against `reference` in the tests).
`moe.layer.dispatch.resolve_strategy` refuses it on any other backend (a GPU cannot compile a
Mosaic TPU kernel). The tile sizes below are valid for any shape but were not measured on a TPU.
"""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp

from moe.layer.activation import activate, activate_bwd

BACKENDS = ("tpu", "cpu")  # tpu: compiled; cpu: interpret mode
ROW_TILE_RANGE = (16, 512)  # tm: a power of two (16 rows: a bfloat16 sublane tile)
LANE_TILE_MAX = 1024  # tk, tn: at most MaxText's default embed / mlp tiles
LANE = 128  # tk, tn below the whole width: a multiple of the TPU's 128 lanes


def _kernels():
  """The megablox gmm module (imported on first use: it pulls in Pallas' TPU backend)."""
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


def row_tile(rows_per_expert: float) -> int:
  """tm: the largest power of two <= the mean rows per expert, within ROW_TILE_RANGE. A row tile
  holding several experts' rows is computed once per expert, so tm should not exceed a run."""
  low, high = ROW_TILE_RANGE
  tm = low
  while tm < high and tm * 2 <= rows_per_expert:
    tm *= 2
  return tm


def lane_tile(dim: int) -> int:
  """tk / tn for a contracted or output width: the whole width up to LANE_TILE_MAX, else the
  fewest tiles of a multiple of LANE covering it (the kernel masks a remainder):
  2048 -> 1024, 1408 -> 768."""
  if dim <= LANE_TILE_MAX:
    return dim
  n_tiles = -(-dim // LANE_TILE_MAX)
  per_tile = -(-dim // n_tiles)
  return -(-per_tile // LANE) * LANE


def _gmm(lhs_MK, rhs_EKN, counts_E, tm, interpret, transpose_rhs=False):
  """lhs rows of expert e times rhs[e] (rhs[e]^T with transpose_rhs); zero past the groups."""
  k = lhs_MK.shape[1]
  n = rhs_EKN.shape[1] if transpose_rhs else rhs_EKN.shape[2]
  out = _kernels().gmm(lhs_MK, rhs_EKN, counts_E, preferred_element_type=lhs_MK.dtype,
                       tiling=(tm, lane_tile(k), lane_tile(n)), transpose_rhs=transpose_rhs,
                       interpret=interpret)
  used_M = jnp.arange(lhs_MK.shape[0], dtype=jnp.int32) < jnp.sum(counts_E)
  return jnp.where(used_M[:, None], out, jnp.zeros((), out.dtype))


def _tgmm(lhs_MK, rhs_MN, counts_E, tm, interpret, dtype):
  """[E, K, N]: per expert, lhs[run]^T @ rhs[run] (an expert with no rows gets zeros)."""
  k, n = lhs_MK.shape[1], rhs_MN.shape[1]
  return _kernels().tgmm(lhs_MK.T, rhs_MN, counts_E, preferred_element_type=dtype,
                         tiling=(tm, lane_tile(k), lane_tile(n)), interpret=interpret)


def _forward(x_RD, counts_E, w_in, w_gate, w_out, tm, activation, interpret):
  h_in = _gmm(x_RD, w_in, counts_E, tm, interpret)
  h_gate = _gmm(x_RD, w_gate, counts_E, tm, interpret) if activation == "swiglu" else None
  y = _gmm(activate(h_in, h_gate, activation), w_out, counts_E, tm, interpret)
  return y, (h_in, h_gate)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _ffn(x_RD, counts_E, w_in, w_gate, w_out, tm, activation, interpret):
  return _forward(x_RD, counts_E, w_in, w_gate, w_out, tm, activation, interpret)[0]


def _ffn_fwd(x_RD, counts_E, w_in, w_gate, w_out, tm, activation, interpret):
  y, (h_in, h_gate) = _forward(x_RD, counts_E, w_in, w_gate, w_out, tm, activation, interpret)
  return y, (x_RD, counts_E, w_in, w_gate, w_out, h_in, h_gate)


def _ffn_bwd(tm, activation, interpret, res, dy_RD):
  x_RD, counts_E, w_in, w_gate, w_out, h_in, h_gate = res
  act = activate(h_in, h_gate, activation)
  dw_out = _tgmm(act, dy_RD, counts_E, tm, interpret, w_out.dtype)
  d_act = _gmm(dy_RD, w_out, counts_E, tm, interpret, transpose_rhs=True)
  d_in, d_gate = activate_bwd(h_in, h_gate, d_act, activation)
  dw_in = _tgmm(x_RD, d_in, counts_E, tm, interpret, w_in.dtype)
  dx = _gmm(d_in, w_in, counts_E, tm, interpret, transpose_rhs=True)
  dw_gate = None
  if w_gate is not None:
    dw_gate = _tgmm(x_RD, d_gate, counts_E, tm, interpret, w_gate.dtype)
    dx = dx + _gmm(d_gate, w_gate, counts_E, tm, interpret, transpose_rhs=True)
  return dx, None, dw_in, dw_gate, dw_out


_ffn.defvjp(_ffn_fwd, _ffn_bwd)


def grouped_ffn(x_RD, counts_E, w_in_EDF, w_gate_EDF, w_out_EFD, *, row_tile: int,
                activation: str, interpret: bool):
  """y[r] = FFN_e(x[r]) for the rows of expert e (runs of counts_E[e] rows from row 0, in expert
  order), zero past sum(counts_E). R must be a multiple of row_tile; weights in x's dtype
  (float32 or bfloat16); w_gate is None for gelu."""
  if x_RD.shape[0] % row_tile:
    raise ValueError(f"megablox.grouped_ffn: {x_RD.shape[0]} rows are not a multiple of the "
                     f"row tile {row_tile}")
  return _ffn(x_RD, counts_E.astype(jnp.int32), w_in_EDF, w_gate_EDF, w_out_EFD, row_tile,
              activation, interpret)
