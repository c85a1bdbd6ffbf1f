"""Dispatch/combine strategies: apply the routed experts to the tokens, one semantics, several
implementations (docs/semantics.md, "Dispatch strategies").

    y[g, t] = sum_k [slot[g,t,k] >= 0] * combine_weights[g,t,k] * FFN_{expert_index[g,t,k]}(x[g,t])

with FFN = (silu(x @ w_gate) * (x @ w_in)) @ w_out (swiglu) or gelu(x @ w_in) @ w_out (gelu, the
tanh approximation, as in GPT-2). The dense MLP of moe/model/transformer.py calls the same
`moe.layer.activation`, so upcycling is exact.
An assignment with slot < 0 (dropped, or a padding token) contributes exactly zero, whatever its
combine weight. Matmuls run in x's dtype (weights are cast); the sum over the K choices is
accumulated in float32; the result has x's dtype. Every strategy is differentiable in x, the
weights and the combine weights.

Strategies:
  reference  every expert on every token, masked sum. O(T*E*D*F). Tests only.
  einsum     GShard: one-hot dispatch tensor [G,T,E,C] and einsums. Capacity only.
  gather     rows ordered (expert, group, slot) in an [E, G*C, D] buffer filled by a gather,
             batched matmul over E, gathered back. Capacity only.
  grouped    rows sorted by expert: a batched block of each expert's first ~mean rows, the
             rest in one-expert tiles run by a loop over the used tiles (grouped.py). Dropless
             and capacity.
  ragged     rows sorted by expert, `jax.lax.ragged_dot` with per-expert group sizes (the XLA
             grouped matmul; megablox-like kernels on TPU/GPU). Dropless and capacity.
  megablox   rows sorted by expert as in `ragged`, JAX's Pallas TPU grouped matmul (megablox
             gmm / tgmm, as MaxText uses it) with a custom VJP (megablox.py). Dropless and
             capacity. Compiled on TPU, interpret mode on CPU (tests), refused elsewhere.

Checked on CPU against `reference` (tests/layer/test_dispatch.py): every strategy, `megablox`
in the kernel's interpret mode (the kernel body as ordinary JAX ops). Only on an accelerator:
`megablox` compiled by Mosaic (TPU; not yet run), and what XLA makes of `ragged_dot` on GPU/TPU
(experiments/accelerator_check.py). No GPU grouped-matmul kernel is a strategy: the installed
jax's Pallas GPU grouped matmuls (jax/experimental/pallas/ops/gpu/ragged_dot_mgpu.py and
transposed_ragged_dot_mgpu.py; Mosaic GPU, Hopper / Blackwell) do not pass an interpret flag
through to their kernel, so they cannot be checked against `reference` on CPU. On GPU `ragged`
is `ragged_dot`, which jax can lower through Pallas/Triton under the flag
jax_ragged_dot_use_gpu_pallas_triton_lowering (timed as a variant by the accelerator check).

`auto` picks per backend (resolve_strategy), from measurements where the project has them:
CPU from experiments/bench_moe_layer.py, GPU from experiments/accelerator_check.py on one H200
(BENCHMARKS.md, "Accelerator check"). TPU has no measurement yet: `gather` with a capacity and
`ragged` dropless (ragged_dot lowers to a grouped matmul there); `megablox`, the kernel written
for TPU, is not measured either, so `auto` does not pick it until the accelerator check has run
on a TPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moe.layer.activation import activate
from moe.layer import grouped
from moe.layer import megablox
from moe.layer import rows
from moe.layer.config import DISPATCHES, EXPERT_MLPS
from moe.errors import ConfigError, check_choice
from moe.layer.routing import Routing

STRATEGIES = tuple(s for s in DISPATCHES if s != "auto")
CAPACITY_ONLY = ("einsum", "gather")

# What "auto" resolves to: (with a capacity, dropless) per backend.
# - cpu: experiments/bench_moe_layer.py on the 2-core machine (BENCHMARKS.md), under launch.py's
#   allocator setting. `grouped` (a batched block of about the mean rows per expert plus tiles for
#   the overflow) skips a capacity buffer's empty slots; the batched `gather` computes them but
#   reads each expert's weights once, which wins when each expert has very few rows (T=8192,
#   K=2, cf 1.25, whole layer fwd+bwd over dense, rows per expert G*C: E=8 2560 rows, grouped
#   1.18x vs gather 1.40x; E=32 640: 1.35 vs 1.46; E=64 320: 1.45 vs 1.55; E=128 160: 1.67 vs
#   1.68; E=256 80: 2.14 vs 2.02), hence CPU_GATHER_BELOW.
# - gpu: experiments/accelerator_check.py on one H200, jax 0.11.2, bf16, T=65536 D=2048 F=1408:
#   gather 1.44x / 1.38x dense at (E=64, K=6) / (E=8, K=2); dropless, grouped 7.7x / 8.1x while
#   ragged was 8.7x at E=8 and failed at E=64 (XLA rewrote ragged_dot's weight gradient as a
#   dense [E, T*K, D] product and ran out of memory). That grouped was the tile loop alone; the
#   batched block it runs now (like gather's matmuls) is not measured on GPU yet. ROCm follows
#   CUDA, unmeasured.
# - tpu: not measured (nor is megablox, which is why auto does not pick it).
AUTO = {
    "cpu": ("grouped", "grouped"),  # with a capacity: gather below CPU_GATHER_BELOW rows per expert
    "gpu": ("gather", "grouped"),
    "cuda": ("gather", "grouped"),
    "rocm": ("gather", "grouped"),
    "tpu": ("gather", "ragged"),
}

CPU_GATHER_BELOW = 128  # rows per expert (G*C) under which `auto` takes gather on CPU


# Strategies that run only on some backends (a kernel written for one kind of chip).
BACKENDS = {"megablox": megablox.BACKENDS}


def unavailable(strategy: str, backend: str | None = None) -> str | None:
  """Why `strategy` cannot run on `backend` (default: jax's), in a few words; None if it can."""
  backend = backend or jax.default_backend()
  allowed = BACKENDS.get(strategy)
  if allowed is None or backend in allowed:
    return None
  return f"{strategy} runs on {' and '.join(allowed)} only (a Pallas TPU kernel), not {backend}"


def resolve_strategy(strategy: str, capacity: int | None, backend: str | None = None,
                     rows_per_expert: int | None = None) -> str:
  """The concrete strategy for a request. `rows_per_expert` (G*C, the buffer rows each expert
  gets with a capacity; None = unknown) refines `auto` on CPU. Raises ConfigError (one line)
  for bad requests, before anything is compiled."""
  check_choice("moe.dispatch", strategy, DISPATCHES)
  why = unavailable(strategy, backend)
  if why:
    raise ConfigError(f"moe.dispatch={strategy!r}: {why}; use one of "
                      f"{[s for s in DISPATCHES if s not in BACKENDS]}")
  if strategy == "auto":
    backend = backend or jax.default_backend()
    with_capacity, dropless = AUTO.get(backend, AUTO["gpu"])
    if capacity is None:
      return dropless
    if backend == "cpu" and rows_per_expert is not None and rows_per_expert < CPU_GATHER_BELOW:
      return "gather"
    return with_capacity
  if capacity is None and strategy in CAPACITY_ONLY:
    dropless = [s for s in DISPATCHES if s not in CAPACITY_ONLY + ("reference",)
                and not unavailable(s, backend)]
    raise ConfigError(f"moe.dispatch={strategy!r} needs a capacity (capacity_factor > 0); for "
                      f"dropless routing use one of {dropless}")
  return strategy


def expert_ffn(x, w_in_DF, w_gate_DF, w_out_FD, activation: str):
  """One expert's FFN on rows x[..., D] (weights already in x's dtype); with stacked weights
  [E, D, F] / [E, F, D] and x[..., E, R, D] it runs every expert on its rows (batched matmul)."""
  h_in = x @ w_in_DF
  h_gate = x @ w_gate_DF if activation == "swiglu" else None
  return activate(h_in, h_gate, activation) @ w_out_FD


def _check(x_GTD, routing: Routing, w_in, w_gate, w_out, activation):
  check_choice("moe.expert_mlp", activation, EXPERT_MLPS)
  if (activation == "swiglu") != (w_gate is not None):
    raise ValueError(f"apply_experts: activation={activation!r} "
                     f"{'needs' if activation == 'swiglu' else 'takes no'} w_gate")
  if x_GTD.ndim != 3:
    raise ValueError(f"apply_experts: x must be [G, T, D], got shape {x_GTD.shape}")
  G, T, D = x_GTD.shape
  E, D2, F = w_in.shape
  if routing.expert_index.shape[:2] != (G, T) or routing.expert_index.ndim != 3:
    raise ValueError(f"apply_experts: routing arrays must be [G={G}, T={T}, K], got "
                     f"{routing.expert_index.shape}")
  if D2 != D or w_out.shape != (E, F, D) or (w_gate is not None and w_gate.shape != w_in.shape):
    raise ValueError(f"apply_experts: weights must be w_in/w_gate [E, D={D}, F], w_out [E, F, D]; "
                     f"got {w_in.shape}, {None if w_gate is None else w_gate.shape}, {w_out.shape}")


def masked_weights(combine_weights, slot):
  """Combine weights with every slot < 0 assignment forced to exactly 0 (float32)."""
  return jnp.where(slot >= 0, combine_weights.astype(jnp.float32), 0.0)


def _reference(x_GTD, routing, w_in, w_gate, w_out, activation):
  E = w_in.shape[0]
  w_GTK = masked_weights(routing.combine_weights, routing.slot)
  y = jnp.zeros(x_GTD.shape, jnp.float32)
  for e in range(E):
    gate_e = None if w_gate is None else w_gate[e]
    y_e = expert_ffn(x_GTD, w_in[e], gate_e, w_out[e], activation).astype(jnp.float32)
    weight_e = jnp.sum(jnp.where(routing.expert_index == e, w_GTK, 0.0), axis=-1)
    y = y + weight_e[..., None] * y_e
  return y


def _einsum(x_GTD, routing, w_in, w_gate, w_out, activation):
  E = w_in.shape[0]
  C = routing.capacity
  valid = routing.slot >= 0
  # [G, T, K, E] x [G, T, K, C] -> [G, T, E, C]; dropped assignments have an all-zero slot row.
  onehot_e = jax.nn.one_hot(routing.expert_index, E, dtype=jnp.float32)
  onehot_c = jax.nn.one_hot(jnp.where(valid, routing.slot, -1), C, dtype=jnp.float32)
  w_GTK = masked_weights(routing.combine_weights, routing.slot)
  combine_GTEC = jnp.einsum("GTKE,GTKC,GTK->GTEC", onehot_e, onehot_c, w_GTK)
  dispatch_GTEC = jnp.einsum("GTKE,GTKC->GTEC", onehot_e, onehot_c).astype(x_GTD.dtype)
  x_GECD = jnp.einsum("GTEC,GTD->GECD", dispatch_GTEC, x_GTD)
  y_GECD = expert_ffn(x_GECD, w_in, w_gate, w_out, activation)  # batched over G and E
  return jnp.einsum("GTEC,GECD->GTD", combine_GTEC, y_GECD, preferred_element_type=jnp.float32)


def _gather(x_GTD, routing, w_in, w_gate, w_out, activation):
  G, T, D = x_GTD.shape
  E = w_in.shape[0]
  C = routing.capacity
  layout = rows.capacity_layout(routing.expert_index, routing.slot, E, C)
  x_ERD = rows.dispatch_rows(x_GTD.reshape(G * T, D), layout).reshape(E, G * C, D)
  y_ERD = expert_ffn(x_ERD, w_in, w_gate, w_out, activation)  # batched over E
  w_NK = masked_weights(routing.combine_weights, routing.slot).reshape(G * T, -1)
  return rows.combine_rows(y_ERD.reshape(E * G * C, D), w_NK, layout).reshape(G, T, D)


def _grouped(x_GTD, routing, w_in, w_gate, w_out, activation, rows_per_expert):
  G, T, D = x_GTD.shape
  E = w_in.shape[0]
  bulk, tile = grouped.plan(rows_per_expert)
  layout, tile_expert, num_tiles = rows.tiled_layout(
      routing.expert_index, routing.slot, E, tile, bulk)
  x_RD = rows.dispatch_rows(x_GTD.reshape(G * T, D), layout)
  y_RD = grouped.grouped_ffn(x_RD, tile_expert, num_tiles, w_in, w_gate, w_out,
                             tile=tile, activation=activation, bulk=bulk)
  w_NK = masked_weights(routing.combine_weights, routing.slot).reshape(G * T, -1)
  return rows.combine_rows(y_RD, w_NK, layout).reshape(G, T, D)


def _ragged(x_GTD, routing, w_in, w_gate, w_out, activation):
  G, T, D = x_GTD.shape
  E = w_in.shape[0]
  layout, counts = rows.packed_layout(routing.expert_index, routing.slot, E)
  x_RD = rows.dispatch_rows(x_GTD.reshape(G * T, D), layout)
  h_in = jax.lax.ragged_dot(x_RD, w_in, counts)
  h_gate = jax.lax.ragged_dot(x_RD, w_gate, counts) if activation == "swiglu" else None
  y_RD = jax.lax.ragged_dot(activate(h_in, h_gate, activation), w_out, counts)
  w_NK = masked_weights(routing.combine_weights, routing.slot).reshape(G * T, -1)
  return rows.combine_rows(y_RD, w_NK, layout).reshape(G, T, D)


def _megablox(x_GTD, routing, w_in, w_gate, w_out, activation, rows_per_expert):
  G, T, D = x_GTD.shape
  E = w_in.shape[0]
  A = routing.expert_index.size
  tm = megablox.row_tile(rows_per_expert)
  layout, counts = rows.packed_layout(routing.expert_index, routing.slot, E)
  x_RD = rows.dispatch_rows(x_GTD.reshape(G * T, D), layout)
  x_RD = jnp.pad(x_RD, ((0, -A % tm), (0, 0)))  # rows to a multiple of the row tile
  y_RD = megablox.grouped_ffn(x_RD, counts, w_in, w_gate, w_out, row_tile=tm,
                              activation=activation, interpret=jax.default_backend() != "tpu")
  w_NK = masked_weights(routing.combine_weights, routing.slot).reshape(G * T, -1)
  return rows.combine_rows(y_RD[:A], w_NK, layout).reshape(G, T, D)


_IMPLS = {"reference": _reference, "einsum": _einsum, "gather": _gather, "grouped": _grouped,
          "ragged": _ragged, "megablox": _megablox}


def planned_rows(routing: Routing, num_experts: int, planned_k: float | None = None) -> float:
  """Valid rows an expert is expected to get: G*T*planned_k / E (planned_k: the mean choices per
  token, default K), at most G*C with a capacity (expert choice has K = E, where T*K / E would
  overstate it)."""
  G, T, K = routing.expert_index.shape
  rows_ = G * T * (K if planned_k is None else planned_k) / num_experts
  if routing.capacity is not None:
    rows_ = min(rows_, G * routing.capacity)
  return rows_


def apply_experts(x_GTD, routing: Routing, w_in_EDF, w_gate_EDF_or_None, w_out_EFD, *,
                  activation: str, strategy: str = "auto",
                  planned_k: float | None = None) -> jax.Array:
  """y_GTD = sum_k combine_weights * FFN_{expert_index}(x) over kept assignments (module doc).

  `planned_k`: the mean choices per token the router is expected to make (an adaptive k makes
  fewer than its K slots; default K). It sizes `grouped`'s batched block and `megablox`'s row
  tile (`planned_rows`), never the result.
  """
  G = x_GTD.shape[0]
  rows_per_expert = None if routing.capacity is None else G * routing.capacity
  strategy = resolve_strategy(strategy, routing.capacity, rows_per_expert=rows_per_expert)
  _check(x_GTD, routing, w_in_EDF, w_gate_EDF_or_None, w_out_EFD, activation)
  dtype = x_GTD.dtype
  w_in = w_in_EDF.astype(dtype)
  w_gate = None if w_gate_EDF_or_None is None else w_gate_EDF_or_None.astype(dtype)
  w_out = w_out_EFD.astype(dtype)
  impl = _IMPLS[strategy]
  if strategy in ("grouped", "megablox"):
    impl = functools.partial(
        impl, rows_per_expert=planned_rows(routing, w_in.shape[0], planned_k))
  y = impl(x_GTD, routing, w_in, w_gate, w_out, activation)
  return y.astype(dtype)
