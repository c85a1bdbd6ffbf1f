"""Moving tokens between token order and an expert-sorted row buffer, with gathers only.

The sparse strategies (`gather`, `grouped`, `ragged`) all work on a buffer of R rows in which
every expert's assignments are contiguous. A layout is described by two integer maps:

  row_of[A]      for each assignment a = n*K + k (n = flat token g*T + t): its row in the buffer,
                 or R when the assignment is dropped / padding (slot < 0).
  row_assign[R]  for each row: the assignment it holds, or A when the row is empty.

`dispatch_rows` (tokens -> rows) and `combine_rows` (rows -> tokens, weighted by the combine
weights) are each other's transposes. Their custom VJPs use the *other* map, so both directions
of both ops are gathers: XLA's scatter-add (the default transpose of a gather) is slow on CPU and
needs atomics on GPU.

Letters as in docs/semantics.md: G groups, T tokens per group, E experts, K choices,
C capacity, D model width, N = G*T tokens, A = N*K assignments, R buffer rows.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class RowLayout:
  """Integer maps between assignments and buffer rows (see the module docstring)."""

  row_of: jax.Array  # [A] int32, R where not placed
  row_assign: jax.Array  # [R] int32, A where empty
  num_rows: int = flax.struct.field(pytree_node=False)  # R


def _invert(row_of_A: jax.Array, num_rows: int) -> jax.Array:
  """row_assign[R] from row_of[A]: an integer scatter of A entries (rows R are dropped).
  With R = A it also inverts the other way: row_of[A] from row_assign[R]."""
  num_assign = row_of_A.shape[0]
  return jnp.full((num_rows,), num_assign, jnp.int32).at[row_of_A].set(
      jnp.arange(num_assign, dtype=jnp.int32), mode="drop")


def capacity_layout(expert_index_GTK, slot_GTK, num_experts: int, capacity: int) -> RowLayout:
  """Rows ordered (expert, group, slot): the buffer reshapes to [E, G*C, D] for free."""
  G = expert_index_GTK.shape[0]
  g = jnp.arange(G, dtype=jnp.int32)[:, None, None]
  valid = slot_GTK >= 0
  R = num_experts * G * capacity
  row = (expert_index_GTK * G + g) * capacity + slot_GTK
  row_of = jnp.where(valid, row, R).reshape(-1).astype(jnp.int32)
  return RowLayout(row_of, _invert(row_of, R), R)


def sort_by_key(key_A, num_experts: int):
  """Stable sort of A int32 keys in [0, E], E the sentinel of entries no expert counts.

  Returns (order[A], rank[A] position of each *sorted* entry within its key's run (for the
  sentinel: after all E runs), counts[E] entries per expert, key_sorted[A]).
  """
  order = jnp.argsort(key_A, stable=True).astype(jnp.int32)
  key_sorted = key_A[order]
  counts = jnp.zeros((num_experts + 1,), jnp.int32).at[key_A].add(1)[:num_experts]
  start = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(counts)])  # [E+1]
  rank = jnp.arange(key_A.shape[0], dtype=jnp.int32) - start[key_sorted]
  return order, rank, counts, key_sorted


def sorted_counts(expert_index_GTK, slot_GTK, num_experts: int):
  """Stable sort of the valid assignments by expert.

  Returns (order[A], rank[A] position of each *sorted* assignment within its expert,
  counts[E] valid assignments per expert, key_sorted[A] expert of each sorted assignment or E).
  """
  key = jnp.where(slot_GTK >= 0, expert_index_GTK, num_experts).reshape(-1).astype(jnp.int32)
  return sort_by_key(key, num_experts)


def packed_layout(expert_index_GTK, slot_GTK, num_experts: int):
  """Rows = valid assignments sorted by expert, no gaps (R = A); returns (layout, counts[E])."""
  order, _, counts, key_sorted = sorted_counts(expert_index_GTK, slot_GTK, num_experts)
  A = order.shape[0]
  # Sorted position p holds assignment order[p]; invalid ones sort last and are left out.
  row_assign = jnp.where(key_sorted < num_experts, order, A).astype(jnp.int32)
  return RowLayout(_invert(row_assign, A), row_assign, A), counts


def tiled_layout(expert_index_GTK, slot_GTK, num_experts: int, tile: int, bulk: int = 0):
  """Rows sorted by expert in two parts: each expert's first `bulk` assignments in a block of
  `bulk` rows (rows e*bulk .. (e+1)*bulk, zero-padded; the buffer's first E*bulk rows reshape to
  [E, bulk, D]), then the rest (all of them when bulk = 0) in tiles: each expert's remaining run
  padded up to a multiple of `tile` rows, so every tile holds one expert.

  R = E*bulk + tile * (ceil(max(A - bulk, 0) / tile) + E), a static upper bound. Returns
  (layout, tile_expert[n_tiles] expert of each tile (clamped to E-1 past the used ones),
  num_used_tiles scalar int32).
  """
  order, rank, counts, key_sorted = sorted_counts(expert_index_GTK, slot_GTK, num_experts)
  A = order.shape[0]
  n_tiles = -(-max(A - bulk, 0) // tile) + num_experts
  base = num_experts * bulk
  R = base + n_tiles * tile
  tiles_per_expert = -(-jnp.maximum(counts - bulk, 0) // tile)  # [E]
  tile_end = jnp.cumsum(tiles_per_expert)  # inclusive
  tile_start = tile_end - tiles_per_expert
  key_c = jnp.minimum(key_sorted, num_experts - 1)
  row_tiles = base + tile_start[key_c] * tile + rank - bulk
  row_sorted = jnp.where(rank < bulk, key_c * bulk + rank, row_tiles)
  row_sorted = jnp.where(key_sorted < num_experts, row_sorted, R)
  row_of = jnp.full((A,), R, jnp.int32).at[order].set(row_sorted.astype(jnp.int32))
  tile_expert = jnp.searchsorted(tile_end, jnp.arange(n_tiles, dtype=jnp.int32), side="right")
  tile_expert = jnp.minimum(tile_expert, num_experts - 1).astype(jnp.int32)
  layout = RowLayout(row_of, _invert(row_of, R), R)
  return layout, tile_expert, tile_end[-1].astype(jnp.int32)


def _take_rows(src_RD, idx):
  """src rows at idx; idx == len(src) reads a zero row."""
  pad = jnp.zeros((1, src_RD.shape[-1]), src_RD.dtype)
  return jnp.concatenate([src_RD, pad], axis=0)[idx]


@jax.custom_vjp
def _dispatch(x_ND, row_of_A, row_assign_R):
  K = row_of_A.shape[0] // x_ND.shape[0]
  return _take_rows(x_ND, row_assign_R // K)


def _dispatch_fwd(x_ND, row_of_A, row_assign_R):
  return _dispatch(x_ND, row_of_A, row_assign_R), (row_of_A, row_assign_R, x_ND.shape[0])


def _dispatch_bwd(res, d_RD):
  row_of_A, row_assign_R, N = res
  K = row_of_A.shape[0] // N
  # dx[n] = sum_k d_rows[row_of[n, k]]; the sum over K runs in float32.
  d_NKD = _take_rows(d_RD, row_of_A).reshape(N, K, -1)
  dx = jnp.sum(d_NKD.astype(jnp.float32), axis=1).astype(d_RD.dtype)
  return dx, None, None


_dispatch.defvjp(_dispatch_fwd, _dispatch_bwd)


@jax.custom_vjp
def _combine(y_RD, w_NK, row_of_A, row_assign_R):
  N, K = w_NK.shape
  y_NKD = _take_rows(y_RD, row_of_A).reshape(N, K, -1).astype(jnp.float32)
  return jnp.einsum("NKD,NK->ND", y_NKD, w_NK.astype(jnp.float32))


def _combine_fwd(y_RD, w_NK, row_of_A, row_assign_R):
  return _combine(y_RD, w_NK, row_of_A, row_assign_R), (y_RD, w_NK, row_of_A, row_assign_R)


def _combine_bwd(res, dy_ND):
  y_RD, w_NK, row_of_A, row_assign_R = res
  N, K = w_NK.shape
  dy_ND = dy_ND.astype(jnp.float32)
  # d rows[r] = w[assignment(r)] * dy[token(r)]: a gather by row_assign (empty rows read 0).
  w_A = jnp.concatenate([w_NK.reshape(-1).astype(jnp.float32), jnp.zeros((1,), jnp.float32)])
  d_RD = (_take_rows(dy_ND, row_assign_R // K) * w_A[row_assign_R][:, None]).astype(y_RD.dtype)
  # d w[n, k] = <dy[n], rows[row_of[n, k]]>.
  y_NKD = _take_rows(y_RD, row_of_A).reshape(N, K, -1).astype(jnp.float32)
  dw = jnp.einsum("NKD,ND->NK", y_NKD, dy_ND).astype(w_NK.dtype)
  return d_RD, dw, None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


def dispatch_rows(x_ND: jax.Array, layout: RowLayout) -> jax.Array:
  """[N, D] tokens -> [R, D] rows (empty rows are zero)."""
  return _dispatch(x_ND, layout.row_of, layout.row_assign)


def combine_rows(y_RD: jax.Array, w_NK: jax.Array, layout: RowLayout) -> jax.Array:
  """[R, D] rows -> [N, D] float32, y[n] = sum_k w[n, k] * rows[row_of[n, k]]."""
  return _combine(y_RD, w_NK, layout.row_of, layout.row_assign)
