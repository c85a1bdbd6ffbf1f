"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names through `nn.with_logical_partitioning`, activations through
`nn.with_logical_constraint`; nothing else in the code names a mesh axis.
"""

from __future__ import annotations

import math

import jax
from jax.experimental import mesh_utils
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe.config import ConfigError

MESH_AXES = ("data", "fsdp", "expert", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One table for everything.
LOGICAL_RULES = (
    # Activations. Tokens are sharded by batch over every axis that is not a weight axis; inside
    # the MoE layer the expert buffers are sharded over `expert` (the all-to-all between them).
    ("batch", ("data", "fsdp", "expert")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("act_expert", "expert"),
    ("act_capacity", None),
    # Parameters.
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("router_expert", None),  # router weights [D, E] stay whole on every device
    ("layers", None),  # the stacked axis of scanned blocks
    ("norm", None),
)


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Sizes of (data, fsdp, expert, tensor) from `cfg.mesh`; one axis may be -1 (fill)."""
  sizes = {a: int(mesh_cfg[a]) for a in MESH_AXES}
  fill = [a for a, s in sizes.items() if s == -1]
  for a, s in sizes.items():
    if s == 0 or s < -1:
      raise ConfigError(f"mesh.{a} must be >= 1 or -1 (fill), got {s}")
  if len(fill) > 1:
    raise ConfigError(f"only one mesh axis may be -1 (fill), got {fill}")
  known = math.prod(s for s in sizes.values() if s != -1)
  if fill:
    if num_devices % known:
      raise ConfigError(f"mesh sizes {sizes} cannot fill {num_devices} devices: "
                        f"{num_devices} is not divisible by {known}")
    sizes[fill[0]] = num_devices // known
  if math.prod(sizes.values()) != num_devices:
    raise ConfigError(f"mesh.data*fsdp*expert*tensor = {math.prod(sizes.values())} "
                      f"({sizes}) must equal the device count {num_devices}")
  return sizes


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  sizes = mesh_shape(mesh_cfg, len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  try:
    dev = mesh_utils.create_device_mesh(shape, devices=devices)
  except Exception:  # CPU or irregular topologies: plain order.
    dev = np.asarray(devices).reshape(shape)
  return Mesh(dev, MESH_AXES)


def logical_sharding(mesh: Mesh, logical_axes) -> NamedSharding:
  """NamedSharding for an array whose dims carry these logical names."""
  import flax.linen as nn
  spec = nn.logical_to_mesh_axes(logical_axes, LOGICAL_RULES)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
