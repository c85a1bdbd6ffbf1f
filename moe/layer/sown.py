"""What an MoE layer sows into `intermediates`, and the one walker that reads it back per layer.

    _, mut = model.apply(variables, tokens, mutable=["intermediates"])
    stats = per_layer(mut["intermediates"], STATS)      # {"layer_0": {"aux_loss": ..., ...}, ...}
    routing = per_layer(mut["intermediates"], ROUTING)  # {"layer_0": {"expert_index": ..., ...}}

`moe.layer.modules.MoeLayer` sows two dicts (only when `intermediates` is mutable; otherwise
`sow` does nothing and the layer's outputs are the same either way):

- `STATS` ("moe"): the losses and routing metrics of docs/semantics.md (aux_loss, ...,
  mean_k, mean_kept_k, active_expert_flops_per_token, top_p, bias_norm: float32 scalars; load
  [E] and k_hist [K+1]).
- `ROUTING` ("routing"): the routing of every token, `ROUTING_KEYS` as in
  `moe.layer.routing.Routing`: expert_index [G, T, K] int32, combine_weights [G, T, K] float32,
  slot [G, T, K] int32 (-1: dropped, padding or not selected), selected [G, T, K] bool (the
  router's choices before capacity, `moe.layer.routing.selected_mask`: with an adaptive k only
  a prefix of each token's K slots). Tokens are the layer's B*L inputs, batch-major,
  cut into G groups of T (the last group padded).

Flax's `sow` appends, so an entry is a tuple holding one dict per call; under `nn.scan` every
leaf gains a leading layer axis.
"""

from __future__ import annotations

import re
from typing import Mapping

import jax.numpy as jnp

from moe.layer import routing as routing_lib

STATS = "moe"
ROUTING = "routing"
ROUTING_KEYS = ("expert_index", "combine_weights", "slot", "selected")
# Per entry: a key always present and its rank in one unscanned layer (one more: a scanned stack).
_PROBE = {STATS: ("aux_loss", 0), ROUTING: ("expert_index", 3)}


def routing_entry(routing) -> dict:
  """The ROUTING dict of one `moe.layer.routing.Routing` (ROUTING_KEYS)."""
  return {"expert_index": routing.expert_index, "combine_weights": routing.combine_weights,
          "slot": routing.slot, "selected": routing_lib.selected_mask(routing)}


def _natural(s: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def _block_of(path) -> int | None:
  """`block_3` -> 3: the model's block index, when a path component names one."""
  return next((int(m.group(1)) for p in path if (m := re.fullmatch(r"\w*?_(\d+)", p))), None)


def _entries(node, name: str, key: str, path: tuple, found: list) -> None:
  """Appends (path, dict) for every sown `name` entry under `node`, in any nesting."""
  if not isinstance(node, Mapping):
    return
  for k, v in node.items():
    if k == name and isinstance(v, (tuple, list)) and v and all(
        isinstance(d, Mapping) and key in d for d in v):
      found.extend((path + (str(k), str(n)), d) for n, d in enumerate(v))
    else:
      _entries(v, name, key, path + (str(k),), found)


def per_layer(intermediates, name: str) -> dict[str, dict]:
  """{layer name: sown dict} of every MoE layer's `name` entry (STATS or ROUTING), in block order.

  Searches the whole tree. A scanned stack (leaves with a leading layer axis) is split into its
  layers `layer_0`, `layer_1`, ...; an unscanned layer is `layer_<i>` with i the block index its
  path names (`block_3/moe/...` -> layer_3), else its position. Several stacks, or names that
  would repeat, fall back to positions. Works on traced and on host arrays alike.
  """
  key, rank = _PROBE[name]
  found: list = []
  _entries(intermediates, name, key, (), found)
  found.sort(key=lambda pd: (_block_of(pd[0]) is None, _block_of(pd[0]) or 0,
                             _natural("/".join(pd[0]))))
  layers = []
  for path, d in found:
    stacked = jnp.ndim(d[key]) == rank + 1  # nn.scan: [num_layers, ...]
    block = _block_of(path)
    for j in range(d[key].shape[0] if stacked else 1):
      one = {k: (v[j] if stacked else v) for k, v in d.items()}
      index = j if stacked else (block if block is not None else len(layers))
      layers.append((f"layer_{index}", one))
  names = [n for n, _ in layers]
  if len(set(names)) != len(names):
    layers = [(f"layer_{i}", d) for i, (_, d) in enumerate(layers)]
  return dict(layers)
