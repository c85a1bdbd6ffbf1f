"""A run keeps its config: `<workdir>/config.json` written when a run starts, read back later.

- `save(cfg, workdir)`: the resolved config (every override applied) as readable JSON, replacing
  `config.json` atomically (`moe.rundir`); the trainer calls it on process 0 before training,
  and the sweep runner for each member.
- `load(workdir)`: that file as a locked `ConfigDict`, so resume, `--mode=complete`,
  `--mode=eval`, `python -m moe.convert --from=<run>` need no `--config`. A field that is None
  (e.g. `moe.capacity_factor`, dropless) comes back as a placeholder that takes any literal
  override. This module is also a config file for `ml_collections` (`get_config(workdir)`):
  `moe.cli` passes `--config=<this file>:<workdir>` when no `--config` is given, so
  `--config.<field>=<value>` overrides work on a saved config too.
- `check_saved(cfg, workdir, may_change)`: a given config that differs from the saved one is a
  one-line ConfigError naming the differing fields (`--config differs from runs/e4/config.json
  in moe.num_experts (4 -> 8), ...`), except the fields `may_change` allows:

  RESUME_MAY_CHANGE   the length of the run and how often it logs, evaluates and saves
                      (`train.steps`, `train.log_every`, `train.eval_every`,
                      `train.checkpoint_every`, `train.keep_checkpoints`, `train.eval_batches`),
                      what it reports (`train.profile_steps`, `train.wandb_project`),
                      where data is prepared and read (`data.tfds_data_dir`, `data.num_workers`),
                      the mesh (`mesh.*`: a checkpoint restores onto another mesh) and how the
                      same computation is carried out (`moe.dispatch`, `model.remat`);
  EVAL_MAY_CHANGE     those, plus what evaluation or generation alone reads:
                      `moe.eval_capacity_factor` and `train.batch_size`.

  A field the saved config lacks (a config.json written before the field existed) counts as
  equal when the given value is the field's default (`MoeConfig` / `ModelConfig`), the
  behaviour the older version had, and as a difference otherwise; a field only the saved config
  has (since removed) is not compared, nor is any field the `model` / `moe` groups of a
  converted checkpoint (`moe.convert`) leave out.
- `architecture_diff(cfg, source)`: the `model` / `moe` fields in which `cfg` differs from the
  run in `source` (`train.init_from` names them when the checkpoint does not fit).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os

from etils import epath
import ml_collections
from ml_collections import config_dict

from moe import rundir
from moe import trees
from moe.errors import ConfigError
from moe.rundir import CONFIG_FILE, read_json, write_json_atomic

RESUME_MAY_CHANGE = (
    "train.steps", "train.log_every", "train.eval_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.eval_batches", "train.profile_steps", "train.wandb_project",
    "data.tfds_data_dir", "data.num_workers", "mesh.*", "moe.dispatch", "model.remat")
EVAL_MAY_CHANGE = RESUME_MAY_CHANGE + ("moe.eval_capacity_factor", "train.batch_size")
ARCHITECTURE_GROUPS = ("model", "moe")
CONVERTED_KEY = "source"  # a converted checkpoint's config.json (moe.convert) has this group
CONVERTED_CONFIG_PY = "config.py"  # and the whole config file moe.convert writes beside it


def config_path(workdir: str) -> str:
  return rundir.join(workdir, CONFIG_FILE)


def to_dict(cfg) -> dict:
  """The config as plain JSON values (tuples become lists, anything else JSON lacks its repr)."""
  d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
  return json.loads(json.dumps(d, default=repr))


def save(cfg, workdir: str) -> str:
  """Writes `cfg` to `<workdir>/config.json` atomically; returns the path. A converted
  checkpoint's config.json (the `model`/`moe` groups and their source) is kept as it is."""
  path = config_path(workdir)
  old = read_json(path)
  if isinstance(old, dict) and CONVERTED_KEY in old:
    return path
  write_json_atomic(path, to_dict(cfg), indent=2)
  return path


def saved(workdir: str) -> dict | None:
  """The JSON of `<workdir>/config.json`, or None when there is none (or it is not an object)."""
  d = read_json(config_path(workdir))
  return d if isinstance(d, dict) else None


def _as_config(d: dict):
  out = ml_collections.ConfigDict()
  for key, value in d.items():
    if isinstance(value, dict):
      out[key] = _as_config(value)
    elif value is None:
      out[key] = config_dict.placeholder(object)  # takes any literal override
    else:
      out[key] = value
  return out


def load(workdir: str):
  """`<workdir>/config.json` as a locked ConfigDict; a one-line ConfigError when there is none."""
  d = saved(workdir)
  if d is None:
    raise ConfigError(f"{config_path(workdir)} does not exist (or is no JSON object): pass "
                      "--config=<the config file the run was trained with>")
  if CONVERTED_KEY in d:
    raise ConfigError(f"{config_path(workdir)} holds only the model groups of a converted "
                      f"checkpoint: pass --config={rundir.join(workdir, CONVERTED_CONFIG_PY)}")
  cfg = _as_config(d)
  cfg.lock()
  return cfg


def get_config(workdir: str):
  """ml_collections' config-file entry point: `--config=<this file>:<workdir>`."""
  return load(workdir)


# ----------------------------------------------------------------------------- differences


def flat(d) -> dict:
  """A config (ConfigDict or dict) as {"group.field": value as config.json holds it}."""
  return trees.flatten(to_dict(d), sep=".")


def _allowed(field: str, may_change) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in may_change)


ABSENT = "(absent)"  # the saved value shown for a field an older config.json lacks


def is_default(field: str, value) -> bool:
  """Whether `value` is the dataclass default of a `model.*` / `moe.*` field (False for other
  groups and unknown fields: their absence cannot be judged)."""
  from moe.layer.config import MoeConfig  # pylint: disable=import-outside-toplevel
  from moe.model.config import ModelConfig  # pylint: disable=import-outside-toplevel
  group, _, name = field.partition(".")
  cls = {"moe": MoeConfig, "model": ModelConfig}.get(group)
  f = {x.name: x for x in dataclasses.fields(cls)}.get(name) if cls else None
  return f is not None and f.default is not dataclasses.MISSING and value == f.default


def differences(old: dict, cfg, may_change=(), groups=None) -> list[tuple[str, object, object]]:
  """[(field, saved value, given value)] for the fields that differ (the architecture groups
  first, then by name), leaving out those `may_change` allows (fnmatch patterns) and, when
  given, other groups. A field `old` lacks differs unless the given value is its default (module
  docstring); a converted checkpoint's config is compared on the fields it has."""
  a, b = flat(old), flat(cfg)
  new_only = set() if CONVERTED_KEY in old else {
      f for f in set(b) - set(a) if not is_default(f, b[f])}
  out = []
  order = lambda f: (f.split(".")[0] not in ARCHITECTURE_GROUPS, f)  # noqa: E731
  for field in sorted((set(a) & set(b)) | new_only, key=order):
    if groups is not None and field.split(".")[0] not in groups:
      continue
    if a.get(field, ABSENT) != b[field] and not _allowed(field, may_change):
      out.append((field, a.get(field, ABSENT), b[field]))
  return out


def describe(diffs, limit: int = 10) -> str:
  parts = [f"{f} ({a!r} -> {b!r})" for f, a, b in diffs[:limit]]
  more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
  return ", ".join(parts) + more


def check_saved(cfg, workdir: str, may_change=RESUME_MAY_CHANGE, groups=None) -> None:
  """One-line ConfigError when `workdir` has a config.json that differs from `cfg` in a field
  `may_change` does not allow (only `groups`, when given)."""
  old = saved(workdir)
  if old is None:
    return
  if CONVERTED_KEY in old:
    groups = ARCHITECTURE_GROUPS if groups is None else groups
  diffs = differences(old, cfg, may_change, groups)
  if diffs:
    raise ConfigError(f"--config differs from {config_path(workdir)} in {describe(diffs)} "
                      "(leave --config out to use the saved config; a new config trains in a "
                      "fresh workdir)")


def architecture_diff(cfg, source: str) -> str:
  """'moe.num_experts (4 -> 8), ...': where `cfg`'s model differs from the run in `source` (a
  workdir, its checkpoints/ directory or a step directory); '' when unknown or equal."""
  path = epath.Path(rundir.absolute(source))
  for _ in range(3):  # <run>/checkpoints/<step> -> <run>
    old = saved(os.fspath(path))
    if old is not None:
      return describe(differences(old, cfg, EVAL_MAY_CHANGE, ARCHITECTURE_GROUPS))
    path = path.parent
  return ""
