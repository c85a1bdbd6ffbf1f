"""The device mesh, the one table that maps logical axis names to mesh axes, and mesh validation.

Parameters carry logical names through `nn.with_logical_partitioning`, activations through
`nn.with_logical_constraint`; nothing else in the code names a mesh axis (the expert-parallel
MoE layer, `moe.layer.expert_parallel`, reads its axes from this table too).

Mesh axes (`cfg.mesh`): `data` (replicas), `fsdp` (replicas whose parameters are split on the
model width D), `expert` (replicas whose routed experts are split on E) and `tensor` (the
hidden widths F, d_ff, heads and vocabulary split). The batch is split over data*fsdp*expert:
every device outside `tensor` holds its own rows. `mesh.dcn_data` says over how many slices
(TPU multi-slice) or processes (other platforms) the `data` axis is spread; it changes device
placement only, never the math.

`activate(mesh)` is the context a trainer traces and runs its steps in: `jax.set_mesh(mesh)`
(which also makes the mesh visible to `jax.shard_map` and to the MoE layer) plus Flax's logical
rules (which make the activation constraints take effect).
"""

from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.errors import ConfigError, check_int

MESH_AXES = ("data", "fsdp", "expert", "tensor")
# Mesh axes the batch (and every token-shaped activation) is split over.
BATCH_AXES = ("data", "fsdp", "expert")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One table for everything:
# parameters, optimizer state (each leaf mirrors its parameter), activations and the data batch.
LOGICAL_RULES = (
    # Activations and the data batch ([B, L] arrays use ("batch", "length")). Tokens are sharded
    # by batch over every axis that is not a weight axis; inside the MoE layer the routing groups
    # [G, T, ...] stay on the device that holds their tokens ("act_group"), and the expert
    # buffers [E, C, D] are sharded over `expert` (the all-to-all between the two layouts).
    ("batch", BATCH_AXES),
    ("act_group", BATCH_AXES),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("act_capacity", None),
    # Parameters (and, through them, the optimizer state).
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("latent", None),  # MLA's low-rank q / kv latents (moe/model/mla.py)
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("router_expert", None),  # router weights [D, E] and the balancing bias [E] stay whole
    ("layers", None),  # the stacked axis of scanned blocks
    ("norm", None),
)


def rule(logical_name: str):
  """The mesh axis (str, tuple of str, or None) that LOGICAL_RULES maps a logical name to."""
  for name, axes in LOGICAL_RULES:
    if name == logical_name:
      return axes
  raise KeyError(f"no logical axis rule for {logical_name!r}")


def axes_tuple(axes) -> tuple[str, ...]:
  """A rule's value as a tuple of mesh axis names (None -> ())."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Sizes of (data, fsdp, expert, tensor) from `cfg.mesh`; one axis may be -1 (fill)."""
  sizes = {}
  for a in MESH_AXES:
    v = mesh_cfg[a]
    if not isinstance(v, int) or isinstance(v, bool) or v == 0 or v < -1:
      raise ConfigError(f"mesh.{a} must be an integer >= 1 or -1 (fill), got {v!r}")
    sizes[a] = v
  fill = [a for a, s in sizes.items() if s == -1]
  if len(fill) > 1:
    raise ConfigError(f"only one mesh axis may be -1 (fill), got mesh.{', mesh.'.join(fill)}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh.{fill[0]}=-1 cannot fill the device count {num_devices}: the "
                        f"other mesh axes multiply to {known}, which does not divide it")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh.data*fsdp*expert*tensor = {math.prod(sizes.values())} "
                      f"({_fmt(sizes)}) must equal the device count {num_devices}")
  return sizes


def _fmt(sizes: dict[str, int]) -> str:
  return ", ".join(f"{a}={s}" for a, s in sizes.items())


def _dcn_data(mesh_cfg, sizes: dict[str, int]) -> int:
  """mesh.dcn_data, checked: an integer >= 1 that divides mesh.data (`sizes` from mesh_shape)."""
  v = mesh_cfg.get("dcn_data", 1) if hasattr(mesh_cfg, "get") else 1
  check_int("mesh.dcn_data", v, 1)
  if sizes["data"] % v:
    raise ConfigError(f"mesh.dcn_data ({v}) must divide mesh.data ({sizes['data']})")
  return v


def validate_mesh(mesh_cfg, num_devices: int, num_processes: int = 1, *, batch_size: int,
                  seq_len: int, divisible=(), group_size: int | None = None) -> dict[str, int]:
  """Every check of the `mesh` group against the devices and the numbers it splits.

  The caller passes numbers it has already checked (integers >= 1): `batch_size` rows of
  `seq_len` tokens per step (`train.batch_size`, `data.seq_len`), `divisible`, a sequence of
  (field name, value, mesh axis) for each width an axis splits, e.g. ("model.d_ff", 512,
  "tensor"), and `group_size`, the MoE routing group size (None: one group per device, or no MoE).

  Returns the mesh sizes. Raises ConfigError (one line naming the fields) when the mesh does not
  multiply to the device count, `mesh.dcn_data` does not divide `mesh.data`, the batch is not
  divisible by the data-parallel degree data*fsdp*expert (or by the process count), an axis does
  not divide its value in `divisible`, or (on a mesh of more than one device) `group_size` does
  not divide the tokens each device holds (groups never cross devices, see
  `moe.layer.expert_parallel`).
  """
  sizes = mesh_shape(mesh_cfg, num_devices)
  _dcn_data(mesh_cfg, sizes)
  shards = _shards(sizes)
  if batch_size % shards:
    raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the data-parallel "
                      f"degree mesh.data*fsdp*expert = {shards} ({_fmt(sizes)})")
  if batch_size % num_processes:
    raise ConfigError(f"train.batch_size ({batch_size}) must be divisible by the process count "
                      f"({num_processes})")
  for name, value, axis in divisible:
    if value % sizes[axis]:
      raise ConfigError(f"mesh.{axis} ({sizes[axis]}) must divide {name} ({value})")
  local_tokens = batch_size // shards * seq_len
  if group_size is not None and num_devices > 1 and local_tokens % group_size:
    raise ConfigError(f"moe.group_size ({group_size}) must divide the tokens each device routes, "
                      f"train.batch_size/(mesh.data*fsdp*expert)*data.seq_len = "
                      f"{batch_size}/{shards}*{seq_len} = {local_tokens} (routing groups "
                      f"never cross devices), or be None (one group per device: mesh-dependent)")
  return sizes


def batch_shards(mesh_cfg, num_devices: int) -> int:
  """How many devices the batch is split over on `cfg.mesh`: data*fsdp*expert (ConfigError as
  `mesh_shape`). With `moe.group_size=None` each of them routes its tokens as one group."""
  return _shards(mesh_shape(mesh_cfg, num_devices))


def _shards(sizes: dict[str, int]) -> int:
  return math.prod(sizes[a] for a in BATCH_AXES)


def _count(devices, attr: str) -> int:
  return len({getattr(d, attr, None) for d in devices})


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The Mesh of `cfg.mesh` over `devices` (default: all), axes MESH_AXES.

  `mesh.dcn_data` > 1: the `data` axis is laid out as dcn_data blocks, one per slice (devices
  with a `slice_index`, TPU multi-slice) or else one per process (GPU/CPU hosts), through
  `mesh_utils.create_hybrid_device_mesh`; the other axes stay inside a slice/process.
  """
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  dcn = _dcn_data(mesh_cfg, sizes)
  if dcn > 1:
    # Slices when the devices span several (TPU multi-slice), else processes (hosts).
    by_slice = (all(getattr(d, "slice_index", None) is not None for d in devices)
                and _count(devices, "slice_index") > 1)
    attr = "slice_index" if by_slice else "process_index"
    granules = _count(devices, attr)
    if granules != dcn:
      raise ConfigError(f"mesh.dcn_data ({dcn}) must equal the number of slices or processes "
                        f"the devices span ({granules})")
    ici = (sizes["data"] // dcn,) + shape[1:]
    dev = mesh_utils.create_hybrid_device_mesh(ici, (dcn, 1, 1, 1), devices,
                                               process_is_granule=not by_slice)
    return Mesh(dev, MESH_AXES)
  try:
    dev = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # noqa: BLE001 - CPU or irregular topologies: plain order.
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def logical_sharding(mesh: Mesh, logical_axes) -> NamedSharding:
  """NamedSharding for an array whose dims carry these logical names."""
  spec = nn.logical_to_mesh_axes(logical_axes, LOGICAL_RULES)
  return NamedSharding(mesh, spec)


def logical_spec(logical_axes) -> P:
  """PartitionSpec for these logical names (e.g. the in/out specs of a `jax.shard_map`)."""
  return P(*(rule(a) if a is not None else None for a in logical_axes))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Trace and run under this mesh: `jax.set_mesh` plus Flax's logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield mesh
