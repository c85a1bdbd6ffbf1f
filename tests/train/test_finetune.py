"""Fine-tuning through the real trainer: `train.init_from` + `train.trainable` keep frozen params
bit-identical and update the others; the fine-tuning config and the two parent-based tables."""

from __future__ import annotations

import copy
import importlib

import jax
import numpy as np
import pytest

from conftest import run_smoke_parent
from moe.train import checkpoint as ckpt_lib
from moe.sweep import runner as sw
from moe.sweep import spec
from moe.errors import ConfigError


def flat(params) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v) for path, v in leaves}


def frozen_by_rule(name: str, rule: str) -> bool:
  """The rule, written out independently of moe.train.step."""
  parts = name.split("/")
  in_moe, in_router = "moe" in parts, "router" in parts
  return {"all": False, "non_moe": in_moe, "moe": not in_moe, "router_frozen": in_router}[rule]


@pytest.fixture(scope="module")
def parent(tmp_path_factory, textdir, tfds_dir):
  """A tiny MoE model trained 3 steps (its checkpoint is the fine-tuning start)."""
  from conftest import apply_overrides, load_config_file, tiny_overrides
  from moe.train import trainer as train
  cfg = apply_overrides(load_config_file("default"), tiny_overrides(textdir, tfds_dir))
  apply_overrides(cfg, {"train.steps": 3, "train.checkpoint_every": 3})
  workdir = str(tmp_path_factory.mktemp("parent"))
  assert train.train_and_evaluate(cfg, workdir)["status"] == "completed"
  return workdir


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["non_moe", "moe", "router_frozen", "all"])
def test_frozen_params_stay_bit_identical(parent, tiny_config, tmp_path, rule):
  from moe.train import trainer as train
  cfg = tiny_config({"train.init_from": parent, "train.trainable": rule, "train.steps": 3,
                     "train.checkpoint_every": 3, "train.learning_rate": 1e-2,
                     "train.weight_decay": 0.1})
  s = train.train_and_evaluate(cfg, str(tmp_path / rule))
  assert s["status"] == "completed"
  before = flat(ckpt_lib.load_params(parent))
  after = flat(ckpt_lib.load_params(str(tmp_path / rule)))
  assert set(before) == set(after)
  frozen = [n for n in before if frozen_by_rule(n, rule)]
  trained = [n for n in before if not frozen_by_rule(n, rule)]
  assert trained and (frozen or rule == "all")
  for n in frozen:
    assert before[n].tobytes() == after[n].tobytes(), f"{rule}: frozen {n} changed"
  for n in trained:
    assert not np.array_equal(before[n], after[n]), f"{rule}: trainable {n} did not change"


def test_init_from_missing_is_one_line_error(tiny_config, tmp_path):
  from moe.train import trainer as train
  cfg = tiny_config({"train.init_from": str(tmp_path / "nowhere")})
  with pytest.raises(ConfigError, match="train.init_from: no checkpoint found") as e:
    train.validate_config(cfg)
  assert "\n" not in str(e.value)


def test_finetune_config(parent, tiny_config):
  from conftest import load_config_file
  from moe.train import trainer as train
  c = load_config_file("finetune")
  assert c.data.name == "pystdlib_test" and c.train.init_from == "runs/default"
  assert c.train.learning_rate < load_config_file("default").train.learning_rate
  assert c.train.steps < load_config_file("default").train.steps
  # With the tiny model groups and an existing parent, it validates as a run config.
  tiny = tiny_config()
  for group in ("model", "moe", "data"):
    c[group] = copy.deepcopy(tiny[group])
  c.train.init_from = parent
  c.train.batch_size = tiny.train.batch_size
  train.validate_config(c)


@pytest.mark.parametrize("name", ["finetune_freeze", "upcycling"])
def test_parent_tables_expand(name):
  module = importlib.import_module(f"configs.ablations.{name}")
  table = spec.expand(module.get_config())
  parent = spec.expand(module.get_config("parent"))
  assert len(parent.runs) == len(table.seeds) >= 3 and parent.seeds == table.seeds  # one per seed
  want_dir = module.PARENT.split("/")
  assert [parent.members[0].name, "seed{seed}"] == want_dir[-2:]
  readers = [r for r in table.runs if r.cfg.train.init_from]
  # run s reads parent s
  assert readers and all(r.cfg.train.init_from == module.PARENT.format(seed=r.seed)
                         for r in readers)
  p, t = parent.runs[0].cfg, readers[0].cfg
  # The parent has the architecture the readers expect (same width; dense for upcycling).
  assert (p.model.d_model, p.model.num_layers, p.model.d_ff) == (
      t.model.d_model, t.model.num_layers, t.model.d_ff)
  if name == "upcycling":
    assert not p.moe.enabled and p.model.d_ff == t.moe.expert_hidden
    assert [r.cfg.train.upcycle for r in table.runs[:4]] == [False, True, False, False]
    assert table.runs[3].cfg.train.steps == 2 * table.runs[2].cfg.train.steps
  else:
    assert p.data.name == "pystdlib" and t.data.name == "textdir"
    assert (p.model.moe_interval, t.model.moe_interval) == (2, 2)  # MoE in few blocks
    assert sorted(r.cfg.train.trainable for r in table.runs[:4]) == sorted(
        ["all", "non_moe", "moe", "router_frozen"])
  with pytest.raises(ValueError, match="parent"):
    module.get_config("other")


@pytest.mark.slow
def test_upcycling_table_smoke_with_its_parent(tmp_path):
  """Both commands of the upcycling table, in smoke mode, through the real trainer."""
  from configs.ablations import upcycling
  run_smoke_parent(upcycling, tmp_path)
  table = spec.smoke_config(upcycling.get_config())
  table.data.tfds_data_dir = str(tmp_path / "tfds")
  table.data.name = "pystdlib_test"
  parent_dir = str(tmp_path / "parent" / "dense" / "seed0")
  # Smoke mode shrinks model.d_ff to 64 but not moe.expert_hidden: make them equal again.
  smoke_width = spec.SMOKE_OVERRIDES["model.d_ff"]
  table.sweep.members = [
      {**{k: (parent_dir if k == "train.init_from" else v) for k, v in m.items()},
       "moe.expert_hidden": smoke_width} for m in table.sweep.members]
  logs = []
  out = sw.run(table, str(tmp_path / "table"), log=logs.append)
  assert not out["failed"], "\n".join(logs)
  assert len(out["trained"]) == 2
