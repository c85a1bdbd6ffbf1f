"""moe.sharding: mesh sizes, the logical rules table, mesh validation (one-line ConfigErrors),
hybrid (multi-slice / multi-process) meshes, and the layer's one-device fallback.

Runs on the pytest process's single CPU device; everything that needs 8 devices is in
test_expert_parallel.py (subprocesses)."""

from __future__ import annotations

import types

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from conftest import load_config_file, one_line_error
from experiments import hlo as hlo_lib  # namespace package: conftest puts REPO on sys.path
from moe.layer import expert_parallel
from moe import sharding
from moe.errors import ConfigError
from moe.train.checks import check_mesh


def mesh_cfg(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, expert=expert, tensor=tensor,
                                        dcn_data=dcn_data))


def config(**overrides):
  """configs/default.py with overrides {"group.field": value}."""
  cfg = load_config_file("default")
  for path, value in overrides.items():
    group, field = path.split(".")
    cfg[group][field] = value
  return cfg


# ----------------------------------------------------------------------------- mesh sizes


@pytest.mark.parametrize("given, devices, want", [
    (dict(data=-1), 8, (8, 1, 1, 1)),
    (dict(data=2, expert=-1), 8, (2, 1, 4, 1)),
    (dict(data=1, fsdp=2, expert=4), 8, (1, 2, 4, 1)),
    (dict(data=2, expert=2, tensor=-1), 8, (2, 1, 2, 2)),
    (dict(data=-1, expert=8), 8, (1, 1, 8, 1)),
    (dict(data=-1), 1, (1, 1, 1, 1)),
])
def test_mesh_shape_fills_one_axis(given, devices, want):
  sizes = sharding.mesh_shape(mesh_cfg(**given), devices)
  assert tuple(sizes[a] for a in sharding.MESH_AXES) == want


@pytest.mark.parametrize("given, devices, needles", [
    (dict(data=3), 8, ("mesh.data*fsdp*expert*tensor = 3", "device count 8")),
    (dict(data=2, expert=2), 8, ("= 4", "device count 8")),
    (dict(data=-1, expert=3), 8, ("mesh.data=-1", "device count 8")),
    (dict(data=-1, expert=-1), 8, ("only one mesh axis", "mesh.data", "mesh.expert")),
    (dict(data=0), 8, ("mesh.data", ">= 1 or -1")),
    (dict(data=-1, tensor="2"), 8, ("mesh.tensor",)),
])
def test_mesh_shape_errors_name_the_axes(given, devices, needles):
  with one_line_error(*needles):
    sharding.mesh_shape(mesh_cfg(**given), devices)


def test_make_mesh_on_this_process():
  mesh = sharding.make_mesh(mesh_cfg())
  assert mesh.axis_names == sharding.MESH_AXES
  assert mesh.devices.size == jax.device_count()


# ----------------------------------------------------------------------------- the table


def test_rules_table_is_one_table_with_unique_names():
  names = [n for n, _ in sharding.LOGICAL_RULES]
  assert len(names) == len(set(names))
  for _, axes in sharding.LOGICAL_RULES:
    assert set(sharding.axes_tuple(axes)) <= set(sharding.MESH_AXES)
  # Every logical name the model, the layer, the trainer and common.md's contract use.
  for n in ("embed", "mlp", "heads", "kv_heads", "head_dim", "vocab", "expert", "router_expert",
            "layers", "norm", "batch", "length", "act_embed", "act_mlp", "act_heads",
            "act_kv_heads", "act_vocab", "act_expert", "act_capacity", "act_group"):
    sharding.rule(n)
  with pytest.raises(KeyError):
    sharding.rule("no_such_axis")


def test_expert_weights_and_tokens_land_on_the_spec_axes():
  assert sharding.logical_spec(("expert", "embed", "mlp")) == \
      jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  assert sharding.logical_spec(("expert", "mlp", "embed")) == \
      jax.sharding.PartitionSpec("expert", "tensor", "fsdp")
  batch = sharding.logical_spec(("batch", "length"))
  assert batch == jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None)
  assert sharding.logical_spec(("act_group", None, None))[0] == batch[0]
  # Flax reads the same table.
  assert nn.logical_to_mesh_axes(("expert", "embed", "mlp"), sharding.LOGICAL_RULES) == \
      jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  # The router and the balancing bias are whole on every device.
  assert sharding.logical_spec(("embed", "router_expert"))[1] is None


def test_params_of_the_moe_model_all_have_rules():
  """Every logical name the real model attaches to a parameter maps through the table."""
  from moe.model.config import model_config_from
  from moe.model.transformer import Transformer
  import jax.numpy as jnp
  cfg = config(**{"model.num_layers": 2, "model.d_model": 16, "model.head_dim": 8,
                  "moe.expert_hidden": 16})
  model = Transformer(model_config_from(cfg, vocab_size=40))
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32)))
  names = set()
  for spec in jax.tree.leaves(nn.get_partition_spec(boxed),
                              is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)):
    names.update(n for n in spec if n is not None)
  assert names, "no logical names on the params"
  for n in names:
    sharding.rule(n)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize("overrides, devices, needles", [
    ({"mesh.data": 3}, 8, ("mesh.data*fsdp*expert*tensor", "device count 8")),
    ({"mesh.data": -1, "mesh.expert": 3}, 8, ("mesh.data=-1", "device count 8")),
    ({"mesh.data": 2, "mesh.expert": 4, "moe.num_experts": 6}, 8,
     ("moe.num_experts (6)", "mesh.expert (4)")),
    ({"mesh.data": 8, "train.batch_size": 12}, 8,
     ("train.batch_size (12)", "mesh.data*fsdp*expert = 8")),
    ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.expert": 2, "train.batch_size": 4}, 8,
     ("train.batch_size (4)", "= 8")),
    ({"mesh.data": 4, "mesh.tensor": 2, "moe.expert_hidden": 15}, 8,
     ("mesh.tensor (2)", "moe.expert_hidden (15)")),
    ({"mesh.data": 4, "mesh.tensor": 2, "model.d_ff": 33}, 8, ("mesh.tensor (2)", "model.d_ff")),
    ({"mesh.data": 2, "mesh.tensor": 4, "model.num_heads": 6, "model.num_kv_heads": 6}, 8,
     ("mesh.tensor (4)", "model.num_heads (6)")),
    ({"mesh.data": 2, "mesh.tensor": 4, "model.num_kv_heads": 2}, 8,
     ("mesh.tensor (4)", "model.num_kv_heads (2)")),
    ({"mesh.data": 4, "mesh.fsdp": 2, "model.d_model": 129}, 8, ("mesh.fsdp (2)", "model.d_model")),
    ({"mesh.data": 4, "mesh.dcn_data": 3}, 4, ("mesh.dcn_data (3)", "mesh.data (4)")),
    ({"mesh.data": 8, "moe.group_size": 48}, 8, ("moe.group_size (48)", "512")),
])
def test_validate_mesh_one_line_errors(overrides, devices, needles):
  """Through moe.train.checks.check_mesh, which passes the config's numbers on."""
  with one_line_error(*needles):
    check_mesh(config(**overrides), devices)


def test_validate_mesh_accepts_the_issue_meshes():
  for shape in [(8, 1, 1, 1), (2, 1, 4, 1), (1, 2, 4, 1), (2, 1, 2, 2), (1, 1, 8, 1)]:
    cfg = config(**{f"mesh.{a}": s for a, s in zip(sharding.MESH_AXES, shape)})
    sizes = check_mesh(cfg, 8)
    assert tuple(sizes[a] for a in sharding.MESH_AXES) == shape
  # Process count: the batch must split evenly over processes too.
  with pytest.raises(ConfigError, match="process count"):
    check_mesh(config(**{"train.batch_size": 8, "mesh.data": 8}), 8, 3)
  # A dense model skips the expert checks; one device skips the group check.
  check_mesh(config(**{"moe.enabled": False, "moe.num_experts": 3,
                       "mesh.expert": 2, "mesh.data": 4}), 8)
  check_mesh(config(**{"moe.group_size": 48}), 1)


def test_validate_mesh_reads_only_the_mesh_group():
  """The numbers come from the caller: no train/data/model group is read."""
  sizes = sharding.validate_mesh(mesh_cfg(data=2, expert=4), 8, batch_size=8, seq_len=16,
                                 divisible=[("width", 12, "expert")], group_size=8)
  assert sizes == {"data": 2, "fsdp": 1, "expert": 4, "tensor": 1}
  with one_line_error("mesh.expert (4) must divide width (10)"):
    sharding.validate_mesh(mesh_cfg(data=2, expert=4), 8, batch_size=8, seq_len=16,
                           divisible=[("width", 10, "expert")])


# ----------------------------------------------------------------------------- hybrid mesh


def _fake_devices(n, per_granule, attr):
  out = []
  for i in range(n):
    d = types.SimpleNamespace(id=i, platform="cpu", device_kind="cpu", process_index=0,
                              slice_index=None)
    setattr(d, attr, i // per_granule)
    out.append(d)
  return out


@pytest.mark.parametrize("attr", ["slice_index", "process_index"])
def test_dcn_data_puts_slices_on_the_data_axis(attr, monkeypatch):
  """dcn_data=2 over 2 slices (or processes) of 4 devices: each slice holds one contiguous half
  of the data axis, and the expert axis stays inside a slice."""
  devices = _fake_devices(8, 4, attr)
  captured = {}
  monkeypatch.setattr(sharding, "Mesh", lambda dev, names: captured.setdefault("dev", dev))
  sharding.make_mesh(mesh_cfg(data=2, expert=4, dcn_data=2), devices)
  dev = captured["dev"]
  assert dev.shape == (2, 1, 4, 1)
  for i in range(2):
    assert {getattr(d, attr) for d in dev[i].reshape(-1)} == {i}
  with pytest.raises(ConfigError, match=r"mesh.dcn_data \(4\).*span \(2\)"):
    sharding.make_mesh(mesh_cfg(data=4, expert=2, dcn_data=4), devices)


# ----------------------------------------------------------------------------- routing groups


def test_default_group_size_divides_the_tokens_of_1_2_4_8_devices():
  """configs/default.py routes fixed groups that every data-parallel mesh up to 8 devices holds
  whole, so the default model is the same function on each (tests/train/test_determinism.py
  trains it on 1 and 8 devices)."""
  cfg = config()
  g = cfg.moe.group_size
  assert isinstance(g, int) and g < cfg.train.batch_size * cfg.data.seq_len  # really several
  for n in (1, 2, 4, 8):
    check_mesh(cfg, n)
    assert (cfg.train.batch_size // n * cfg.data.seq_len) % g == 0
  with one_line_error("moe.group_size (512)", "train.batch_size/(mesh.data*fsdp*expert)", "256"):
    check_mesh(cfg, 16)  # 256 tokens a device: a group would cross devices


@pytest.mark.parametrize("mesh, devices, warns", [
    (dict(data=-1), 8, True), (dict(data=2, expert=4), 8, True), (dict(data=1, tensor=8), 8, False),
    (dict(data=-1), 1, False)])
def test_group_size_none_warns_when_the_batch_is_split(mesh, devices, warns):
  """One line, only when the batch is split over more than one device (a tensor-only mesh gives
  every device the whole batch: one group, as on one device)."""
  from moe.train.checks import config_warnings
  cfg = config(**{"moe.group_size": None, **{f"mesh.{k}": v for k, v in mesh.items()}})
  got = config_warnings(cfg, devices)
  if not warns:
    assert got == []
    return
  (w,) = got
  assert "moe.group_size=None" in w and "mesh" in w and "\n" not in w
  assert config_warnings(config(**{f"mesh.{k}": v for k, v in mesh.items()}), devices) == []
  assert config_warnings(config(**{"moe.group_size": None, "moe.enabled": False}), devices) == []


# ----------------------------------------------------------------------------- fallback


def test_no_mesh_or_one_device_mesh_means_one_device_code():
  assert expert_parallel.context() is None
  mesh = sharding.make_mesh(mesh_cfg(), jax.devices()[:1])
  with sharding.activate(mesh):
    assert expert_parallel.context() is None
  other = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("x",))
  with jax.set_mesh(other):
    assert expert_parallel.context() is None


def test_hlo_collectives_parser():
  hlo = """
  %all-to-all.1 = (f32[2,6,12]{2,1,0}, f32[2,6,12]{2,1,0}) all-to-all(f32[2,6,12]{2,1,0} %a, f32[2,6,12]{2,1,0} %b), replica_groups={{0,1}}
  %all-gather-start = (bf16[4,8]{1,0}, bf16[8,8]{1,0}) all-gather-start(bf16[4,8]{1,0} %w), dimensions={0}
  %all-gather-done = bf16[8,8]{1,0} all-gather-done((bf16[4,8]{1,0}, bf16[8,8]{1,0}) %all-gather-start)
  ROOT %all-reduce = f32[8]{0} all-reduce(f32[8]{0} %c), to_apply=%add
  %add.3 = f32[] add(f32[] %x, f32[] %y)
  """
  found = hlo_lib.hlo_collectives(hlo)
  assert [c["op"] for c in found] == ["all-to-all", "all-gather", "all-reduce"]
  assert found[0]["bytes"] == 2 * 2 * 6 * 12 * 4
  assert found[1]["shapes"] == [("bf16", (8, 8))] and found[1]["bytes"] == 128
  assert hlo_lib.all_to_all_bytes(hlo) == 2 * 2 * 6 * 12 * 4
