"""Routing as pure functions (no Flax): which tokens go to which experts, in which slot.

Letters as in ../shared/moe-spec.md: G groups, T tokens per group, E experts, K choices, C capacity.
"""

from __future__ import annotations

import flax.struct
import jax


@flax.struct.dataclass
class Routing:
  """The result of routing one batch of groups. Arrays carry an optional leading group axis G.

  expert_index[G, T, K] int32: the k-th expert chosen by token t (choice order: k=0 is the best).
  combine_weights[G, T, K] float32: weight of that assignment in the output; exactly 0 where the
      assignment was dropped or the token is padding.
  slot[G, T, K] int32: the assignment's position in its expert's buffer, in [0, C) with capacity,
      in [0, T*K) dropless; -1 where dropped or padding.
  probs[G, T, E] float32: softmax of the router logits (before any balancing bias).
  logits[G, T, E] float32: router logits.
  token_mask[G, T] bool: True for real (non-padding) tokens.
  capacity: C (static int), or None when dropless.
  """

  expert_index: jax.Array
  combine_weights: jax.Array
  slot: jax.Array
  probs: jax.Array
  logits: jax.Array
  token_mask: jax.Array
  capacity: int | None = flax.struct.field(pytree_node=False, default=None)
