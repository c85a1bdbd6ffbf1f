"""Expert parallelism: the MoE layer on a device mesh, with explicit `jax.shard_map` collectives.

Active whenever a mesh with the axes of `moe.sharding.MESH_AXES` and more than one device is set
(`jax.set_mesh`, e.g. through `moe.sharding.activate`); otherwise the MoE layer runs exactly as on
one device. Letters as in docs/semantics.md; X = size of the `expert` mesh axis,
E_l = E / X experts per device, S = number of batch shards (data*fsdp*expert), G_l = G / S.

Layout (all read from `moe.sharding.LOGICAL_RULES`):
  tokens / groups  [G, T, D]     G split over the batch axes (data, fsdp, expert)
  w_in, w_gate     [E, D, F]     E over `expert`, D over `fsdp`, F over `tensor`
  w_out            [E, F, D]     E over `expert`, F over `tensor`, D over `fsdp`

Routing semantics on a mesh: routing groups never cross devices. Each device routes its own
tokens: with `moe.group_size` = T it holds G_l whole groups (T must divide the B/S*L tokens a
device holds: `moe.sharding.validate_mesh` and `routing_group_size` say so in one line); with
`group_size=None` each device's tokens are one group (T = B/S*L, where one device would make
one group of all B*L tokens). So a sharded run equals the one-device run whose `group_size` is
the same T, for every mesh: capacity C = f(T) and the drop order inside a group are the same.
Routing runs per device inside a shard_map (`route`); the returned `Routing` is a global array
sharded on G, and the layer computes its losses, metrics and the balancing-bias update from it
with the ordinary one-device code, which XLA turns into all-reduces: they are over the global
batch, equal to the one-device values.

The experts (`apply_experts`), inside one shard_map, per device:
  1. its assignments into its own capacity buffer [E, G_l*C, D] (`rows.capacity_layout`,
     rows ordered (expert, group, slot));
  2. `all_to_all` over `expert`: [E, G_l*C, D] -> [E_l, X*G_l*C, D] (its experts' rows from the
     X devices that share its data/fsdp coordinates);
  3. its E_l experts on those rows with its F/tensor slice of their weights (D gathered over
     `fsdp` by the shard_map's input, i.e. FSDP's all-gather of E_l experts, never all E);
     partial sums over F added up by a `psum` over `tensor`;
  4. `all_to_all` back to [E, G_l*C, D] and the weighted combine into its tokens.
The backward pass is the transpose: the same two all-to-alls, and XLA sums the weight gradients
over the axes the weights are replicated on (data, fsdp).

Dropless routing (capacity None) uses the same all-to-all with the static bound C = T per
(expert, group): an expert never gets more than T of a group's assignments (a token picks K
distinct experts), so nothing is dropped, at the price of a buffer E/K times the real rows.
The receiving device also gets the buffer's row-occupancy mask and runs only the occupied rows,
through `moe.layer.dispatch.apply_experts` with the configured dropless strategy (grouped / ragged).
`jax.lax.ragged_all_to_all` would move only the real rows, but XLA:CPU does not implement it
(UNIMPLEMENTED in jax 0.10), so it cannot be tested here and is not used.
With a capacity, every strategy is one computation here: the batched matmul over the buffer.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from moe.layer import dispatch
from moe.layer import rows
from moe.layer import routing as routing_lib
from moe import sharding
from moe.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
  """The active mesh as the MoE layer sees it (see `context`)."""

  mesh: jax.sharding.AbstractMesh
  batch_axes: tuple[str, ...]  # mesh axes the groups are split over (size > 1 only)
  expert_axes: tuple[str, ...]  # mesh axes the experts E are split over
  tensor_axes: tuple[str, ...]  # mesh axes F is split over

  def size(self, axes) -> int:
    return math.prod(self.mesh.shape[a] for a in axes)

  def spec(self, logical_axes) -> P:
    """The PartitionSpec LOGICAL_RULES gives these logical names, axes of size 1 left out
    (they split nothing, and naming them would make the shard_map treat values as varying
    over them)."""
    return P(*(None if name is None else _axis_arg(_used_axes(self.mesh, name))
               for name in logical_axes))

  @property
  def num_shards(self) -> int:
    """S: how many devices hold different tokens."""
    return self.size(self.batch_axes)

  # ------------------------------------------------------------------------------ grouping

  def routing_group_size(self, group_size: int | None, batch: int, length: int) -> int:
    """T on this mesh: `group_size`, or the tokens of one device when None (see module doc).

    `batch` is divisible by the batch shards: this is only called on `context(rows=batch)`,
    which is None for any other batch.
    """
    s = self.num_shards
    local = batch // s * length
    if group_size is None:
      return local
    if local % group_size:
      raise ConfigError(f"moe.group_size ({group_size}) must divide the {local} tokens each device "
                        f"routes ({batch} rows / {s} shards * {length}): routing groups never "
                        f"cross devices")
    return int(group_size)

  # ------------------------------------------------------------------------------ routing

  def route(self, route_fn, logits_GTE, mask_GT, bias_E, top_p=None):
    """`route_fn(logits_GTE, mask_GT, bias_E_or_None, top_p_or_None) -> Routing`, run per
    device on its groups (`top_p`: the adaptive-k threshold, a scalar every device shares).

    route_fn must treat groups independently (every router here does). Returns the global
    Routing, its arrays sharded on G like the tokens.
    """
    spec = self.spec(("act_group", None, None))
    spec2 = self.spec(("act_group", None))
    static = {}
    has_bias, has_top_p = bias_E is not None, top_p is not None

    def local(logits, mask, bias, p):
      r = route_fn(logits, mask, bias if has_bias else None, p if has_top_p else None)
      static.update(capacity=r.capacity, kind=r.kind, adaptive=r.selected is not None)
      selected = r.selected if r.selected is not None else jnp.zeros(r.slot.shape, bool)
      return (r.expert_index, r.combine_weights, r.slot, r.probs, r.logits, r.token_mask,
              selected)

    bias_in = bias_E if has_bias else jnp.zeros((logits_GTE.shape[-1],), jnp.float32)
    p_in = jnp.asarray(top_p if has_top_p else 1.0, jnp.float32)
    call = jax.shard_map(local, mesh=self.mesh, in_specs=(spec, spec2, P(), P()),
                         out_specs=(spec, spec, spec, spec, spec, spec2, spec))
    ei, cw, slot, probs, logits, mask, selected = call(logits_GTE, mask_GT, bias_in, p_in)
    return routing_lib.Routing(expert_index=ei, combine_weights=cw, slot=slot, probs=probs,
                               logits=logits, token_mask=mask,
                               selected=selected if static["adaptive"] else None,
                               capacity=static["capacity"], kind=static["kind"])

  # ------------------------------------------------------------------------------ experts

  def apply_experts(self, x_GTD, routing, w_in_EDF, w_gate_EDF_or_None, w_out_EFD, *,
                    activation: str, strategy: str = "auto", planned_k: float | None = None):
    """`moe.layer.dispatch.apply_experts` semantics, experts split over the mesh (module doc)."""
    capacity = routing.capacity
    # Same errors as one device; the result is used by the dropless path only.
    strategy = dispatch.resolve_strategy(strategy, capacity)
    E = w_in_EDF.shape[0]
    X = self.size(self.expert_axes)
    if E % X:
      raise ConfigError(f"moe.num_experts ({E}) must be divisible by mesh.expert ({X})")
    gated = w_gate_EDF_or_None is not None
    dtype = x_GTD.dtype
    expert_axis = _axis_arg(self.expert_axes)
    tensor_axis = _axis_arg(self.tensor_axes)
    tok = self.spec(("act_group", None, None))
    w_spec = self.spec(("expert", None, "mlp"))  # D whole: gathered over fsdp
    wo_spec = self.spec(("expert", "mlp", None))

    def local(x, expert_index, slot, weights, w_in, w_gate, w_out):
      G, T, D = x.shape
      C = T if capacity is None else capacity
      lay = rows.capacity_layout(expert_index, slot, E, C)
      x_ERD = rows.dispatch_rows(x.reshape(G * T, D), lay).reshape(E, G * C, D)
      if expert_axis is not None:
        x_ERD = jax.lax.all_to_all(x_ERD, expert_axis, 0, 1, tiled=True)  # [E_l, X*G*C, D]
      w_in, w_out = w_in.astype(dtype), w_out.astype(dtype)
      w_gate = w_gate.astype(dtype) if gated else None
      if capacity is None:
        occupied_ER = (lay.row_assign < expert_index.size).reshape(E, G * C)
        if expert_axis is not None:
          occupied_ER = jax.lax.all_to_all(occupied_ER, expert_axis, 0, 1, tiled=True)
        # A buffer row is occupied with probability planned_k / E (one token, one expert).
        k = expert_index.shape[-1] if planned_k is None else planned_k
        y_ERD = _occupied_rows_ffn(x_ERD, occupied_ER, w_in, w_gate, w_out, activation,
                                   strategy, k / E)
      else:
        y_ERD = dispatch.expert_ffn(x_ERD, w_in, w_gate, w_out, activation)  # batched over E
      if tensor_axis is not None:
        y_ERD = jax.lax.psum(y_ERD, tensor_axis)
      if expert_axis is not None:
        y_ERD = jax.lax.all_to_all(y_ERD, expert_axis, 1, 0, tiled=True)  # [E, G*C, D]
      w_NK = dispatch.masked_weights(weights, slot).reshape(G * T, -1)
      y_ND = rows.combine_rows(y_ERD.reshape(E * G * C, D), w_NK, lay)
      return y_ND.reshape(G, T, D).astype(dtype)

    w_gate = w_gate_EDF_or_None if gated else jnp.zeros((), w_in_EDF.dtype)
    # check_vma is off for dropless only: the grouped strategy's loop (moe.layer.grouped)
    # starts from zero carries that do not vary over the mesh axes while its outputs do, which
    # the check rejects inside a shard_map. Values and gradients of that path are checked
    # against one device in tests/layer/test_expert_parallel.py (meshes with tensor > 1 included).
    call = jax.shard_map(
        local, mesh=self.mesh,
        in_specs=(tok, tok, tok, tok, w_spec, w_spec if gated else P(), wo_spec),
        out_specs=tok, check_vma=capacity is not None)
    return call(x_GTD, routing.expert_index, routing.slot, routing.combine_weights,
                w_in_EDF, w_gate, w_out_EFD)


def _used_axes(mesh, logical: str) -> tuple[str, ...]:
  """The mesh axes LOGICAL_RULES gives this logical name, those of size 1 left out."""
  return tuple(a for a in sharding.axes_tuple(sharding.rule(logical)) if mesh.shape[a] > 1)


def _axis_arg(axes: tuple[str, ...]):
  """A collective's axis_name: None (no such axis), one name, or a tuple of names."""
  if not axes:
    return None
  return axes[0] if len(axes) == 1 else axes


def _occupied_rows_ffn(x_ERD, occupied_ER, w_in, w_gate, w_out, activation, strategy,
                       occupied_fraction):
  """FFN of expert e on the occupied rows of x[e] (zeros elsewhere), through the dispatch
  module's dropless strategies: each row is a one-choice "token" with weight 1, and about
  `occupied_fraction` of the rows are expected to be occupied."""
  E, R, D = x_ERD.shape
  n = E * R
  row = jnp.arange(n, dtype=jnp.int32)
  occupied = occupied_ER.reshape(1, n, 1)
  r = routing_lib.Routing(
      expert_index=(row // R).reshape(1, n, 1),
      combine_weights=occupied.astype(jnp.float32),
      slot=jnp.where(occupied, (row % R).reshape(1, n, 1), -1),
      probs=jnp.zeros((1, n, E), jnp.float32), logits=jnp.zeros((1, n, E), jnp.float32),
      token_mask=occupied_ER.reshape(1, n), capacity=None)
  y = dispatch.apply_experts(x_ERD.reshape(1, n, D), r, w_in, w_gate, w_out,
                             activation=activation, strategy=strategy,
                             planned_k=occupied_fraction)
  return y.reshape(E, R, D)


def context(rows: int | None = None) -> ExpertParallel | None:
  """The expert-parallel view of the current mesh, or None: then the MoE layer runs its
  one-device code (under XLA's automatic partitioning if a mesh is set).

  None when there is no mesh, a one-device mesh, a mesh without this project's axis names, or
  when `rows` (the leading axis the tokens are split on: batch rows, or groups) is not divisible
  by the number of batch shards: a one-row shape probe (`jax.eval_shape` of an init) or decoding
  one prompt on a mesh. A training batch always divides (`moe.sharding.validate_mesh`).
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is None or getattr(mesh, "empty", True) or mesh.size <= 1:
    return None
  if not set(sharding.MESH_AXES) <= set(mesh.axis_names):
    return None
  ep = ExpertParallel(mesh=mesh, batch_axes=_used_axes(mesh, "act_group"),
                      expert_axes=_used_axes(mesh, "expert"), tensor_axes=_used_axes(mesh, "mlp"))
  if rows is not None and rows % ep.num_shards:
    return None
  return ep
