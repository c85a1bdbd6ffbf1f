"""The sweep format: a config with a top-level `sweep` group expands into (member, seed) runs.

Format (built by `configs/ablations/*.py`, see `configs/ablations/_base.py` for helpers):

  cfg.sweep.title            one line, the table's heading
  cfg.sweep.paper            citation(s) of the published result being reproduced
  cfg.sweep.config_file      repo-relative path of the config file (for the report's command)
  cfg.sweep.metric           headline metric, e.g. "eval_cross_entropy"
  cfg.sweep.higher_is_better direction of `metric`
  cfg.sweep.members          list of override dicts {"group.field": value}; a value may be a dict
                             {scale name: value} to differ per scale. A member's name is a slug of
                             its overrides (`member_name`), e.g. {"moe.num_selected": 2,
                             "moe.capacity_factor": 1.25} -> "k2_cf1.25"; {} -> "base".
  cfg.sweep.seeds            list of ints; each member runs once per seed (sets train.seed)
  cfg.sweep.scale            "cpu" | "accelerator": which entry of `scales` is applied
  cfg.sweep.scales           list of {"name": scale, "overrides": {...}} applied before the members
  cfg.sweep.eval_overrides   list of {"name": ..., "overrides": {...}}: extra evaluations of each
                             finished checkpoint (e.g. at eval capacity factor 2.0)
  cfg.sweep.published        list of claims {"claim", "source", "order": [member index or name,
                             best first], + optional "kind" (order | trend | no_worse |
                             stability), "metric", "higher_is_better", "published" (the paper's
                             numbers), "effect", "margin", "mechanism"}: the format and its
                             checks are `moe/sweep/claims.py`, the tests `moe/sweep/stats.py`
  cfg.sweep.notes            list of strings printed under the table (caveats)
  cfg.sweep.smoke            True: CI smoke mode (2 members, 1 seed, tiny model, a few steps)
  cfg.sweep.smoke_members    indices of the members the smoke mode keeps

A run's config is the base config (everything but `sweep`) with, in order, the scale's overrides,
the member's overrides, `train.seed`, and (smoke mode) `SMOKE_OVERRIDES`. A `{seed}` in
`train.init_from` becomes the run's seed (one parent per seed: `configs/ablations/upcycling.py`).
Every override must
name an existing field; every run config passes the trainer's config-only checks
(`moe.train.checks.validate_fields`) here, before anything trains.

The runner that trains the runs and writes the report is `moe/sweep/runner.py`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from typing import Any

from moe import rundir
from moe.errors import ConfigError, check_int
from moe.sweep.claims import check_claim, smoke_claim

SCALES = ("cpu", "accelerator")
SEED_FIELD = "{seed}"  # in train.init_from: replaced by the run's seed

# Smoke mode: applied last, so every table runs in seconds through the real trainer.
SMOKE_OVERRIDES = {
    "model.d_model": 32, "model.num_layers": 1, "model.num_heads": 2, "model.num_kv_heads": 2,
    "model.head_dim": 16, "model.d_ff": 64, "moe.expert_hidden": 64, "model.max_len": 32,
    "data.seq_len": 32,
    "train.batch_size": 2, "train.steps": 4, "train.warmup_steps": 1, "train.log_every": 2,
    "train.eval_every": 4, "train.eval_batches": 1, "train.checkpoint_every": 4,
}

# Short names used in member slugs; other fields use their last path component.
_ALIASES = {
    "moe.num_experts": "e", "moe.num_selected": "k", "moe.expert_hidden": "f",
    "moe.capacity_factor": "cf", "moe.eval_capacity_factor": "ecf", "moe.load_balance_weight": "lb",
    "moe.z_loss_weight": "z", "moe.bias_balancing": "bias", "moe.bias_rate": "u",
    "moe.router_dtype": "router", "moe.router": "", "moe.num_shared_experts": "shared",
    "moe.allow_noncausal_routing": "noncausal", "moe.group_size": "g", "moe.jitter_eps": "jitter",
    "train.learning_rate": "lr", "model.d_ff": "dff", "model.dtype": "dtype",
    "moe.k_rule": "", "moe.top_p": "p", "moe.target_k": "target",
}
_SLUG_OK = re.compile(r"[^A-Za-z0-9.+\-]")


@dataclasses.dataclass(frozen=True)
class Member:
  name: str
  overrides: dict  # resolved for the active scale, insertion order kept


@dataclasses.dataclass(frozen=True)
class Run:
  member: str
  seed: int
  cfg: Any  # locked ConfigDict, no `sweep` group

  def dirname(self, workdir: str) -> str:
    return rundir.join(workdir, self.member, f"seed{self.seed}")


@dataclasses.dataclass
class Sweep:
  title: str
  paper: str
  config_file: str
  metric: str
  higher_is_better: bool
  scale: str
  smoke: bool
  seeds: list
  members: list  # [Member]
  eval_overrides: list  # [{"name", "overrides"}]
  published: list  # [claim dicts, moe.sweep.claims.FIELDS, "order" as member names]
  notes: list
  runs: list  # [Run], seed-major

  def to_json(self) -> dict:
    d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "runs"}
    d["members"] = [{"name": m.name, "overrides": m.overrides} for m in self.members]
    return d


# ----------------------------------------------------------------------------- names


def format_value(v) -> str:
  """Compact, stable text for an override value: 1e-3 -> '1e-3', 1.25 -> '1.25'."""
  if isinstance(v, bool):
    return "on" if v else "off"
  if v is None:
    return "none"
  if isinstance(v, float):
    if v == 0:
      return "0"
    if abs(v) < 0.1 or abs(v) >= 1e5:
      mant, exp = f"{v:e}".split("e")
      mant = mant.rstrip("0").rstrip(".")
      return f"{mant}e{int(exp)}"
    return f"{v:g}"
  return str(v)


def _slug_part(path: str, v) -> str:
  alias = _ALIASES.get(path, path.rsplit(".", 1)[-1].replace("_", "-"))
  if path == "moe.enabled":
    return "moe" if v else "dense"
  if path in ("moe.capacity_factor", "moe.eval_capacity_factor") and (v is None or v <= 0):
    return f"{alias}-dropless"
  if isinstance(v, bool):
    return alias if v else f"no-{alias}"
  if isinstance(v, str) or v is None:
    return f"{alias}-{format_value(v)}" if alias else format_value(v)
  return f"{alias}{format_value(v)}"


def member_name(overrides: dict) -> str:
  """Stable slug of a member's (scale-resolved) overrides; '{}' -> 'base'."""
  if not overrides:
    return "base"
  parts = [_SLUG_OK.sub("-", _slug_part(p, v)) for p, v in overrides.items()]
  return "_".join(parts)


def describe_overrides(overrides: dict) -> str:
  return ", ".join(f"{p}={format_value(v)}" for p, v in overrides.items()) or "(base config)"


# ----------------------------------------------------------------------------- expansion


def apply_override(cfg, path: str, value, what: str) -> None:
  """Sets `path` (dotted) in a locked ConfigDict; a missing field is a ConfigError."""
  parts = path.split(".") if isinstance(path, str) else []
  if not parts or not all(parts):
    raise ConfigError(f"{what}: override key must be a dotted config path like 'moe.num_experts', "
                      f"got {path!r}")
  node = cfg
  for i, part in enumerate(parts):
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if part not in keys:
      where = ".".join(parts[:i]) or "the config"
      raise ConfigError(f"{what}: {path!r} names no config field ({part!r} not in {where}; "
                        f"fields: {sorted(keys)})")
    if i < len(parts) - 1:
      node = node[part]
      if not hasattr(node, "keys"):
        raise ConfigError(f"{what}: {path!r} names no config field ({'.'.join(parts[:i+1])} "
                          f"is not a group)")
  if hasattr(node[parts[-1]], "keys"):
    raise ConfigError(f"{what}: {path!r} is a group; override its fields one by one")
  try:
    node[parts[-1]] = value
  except (TypeError, ValueError) as e:
    raise ConfigError(f"{what}: {path}={value!r} has the wrong type "
                      f"({type(e).__name__}: {str(e).splitlines()[0]})") from None


def _resolve_scale(value, scale: str, what: str):
  if isinstance(value, dict) or hasattr(value, "keys"):
    keys = set(value.keys())
    if not keys <= set(SCALES) or scale not in keys:
      raise ConfigError(f"{what}: a per-scale value must be a dict with keys {list(SCALES)} "
                        f"(including {scale!r}), got keys {sorted(keys)}")
    return value[scale]
  return value


def _as_list(value, field: str) -> list:
  if isinstance(value, (list, tuple)):
    return list(value)
  raise ConfigError(f"sweep.{field} must be a list, got {type(value).__name__}")


def _named_overrides(value, field: str) -> list:
  out = []
  for i, item in enumerate(_as_list(value, field)):
    if not isinstance(item, dict) or set(item) != {"name", "overrides"} or not isinstance(
        item["overrides"], dict) or not isinstance(item["name"], str) or not item["name"]:
      raise ConfigError(f"sweep.{field}[{i}] must be {{'name': str, 'overrides': dict}}, "
                        f"got {item!r}")
    out.append({"name": item["name"], "overrides": dict(item["overrides"])})
  names = [x["name"] for x in out]
  if len(set(names)) != len(names):
    raise ConfigError(f"sweep.{field}: names must be unique, got {names}")
  return out


def base_config(cfg):
  """A locked deep copy of `cfg` without its `sweep` group."""
  base = copy.deepcopy(cfg)
  base.unlock()
  if "sweep" in base:
    del base["sweep"]
  base.lock()
  return base


def _validate_run_config(c, what: str) -> None:
  """The trainer's config-only checks (`moe.train.checks.validate_fields`), and an evaluation:
  a table compares eval metrics. The disk and devices are checked by the runner."""
  # Imported here, not at the top: report.py reads a finished sweep without importing jax.
  from moe.train.checks import validate_fields
  try:
    validate_fields(c)
    check_int("train.eval_batches", c.train.eval_batches, 1)
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None


def _check_fields(s) -> None:
  """The `sweep` group's own fields: known names, scale, metric, members, seeds."""
  allowed = {"title", "paper", "config_file", "metric", "higher_is_better", "members", "seeds",
             "scale", "scales", "eval_overrides", "published", "notes", "smoke", "smoke_members"}
  unknown = set(s.keys()) - allowed
  if unknown:
    raise ConfigError(f"sweep: unknown field(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
  get = lambda k, d: s[k] if k in s else d  # noqa: E731
  scale = get("scale", "cpu")
  if scale not in SCALES:
    raise ConfigError(f"sweep.scale must be one of {list(SCALES)}, got {scale!r}")
  metric = get("metric", "eval_cross_entropy")
  if not isinstance(metric, str) or not metric:
    raise ConfigError(f"sweep.metric must be a metric name like 'eval_cross_entropy', "
                      f"got {metric!r}")
  raw_members = _as_list(get("members", []), "members")
  if not raw_members:
    raise ConfigError("sweep.members is empty: a sweep needs at least one member (an override "
                      "dict; {} is the base config)")
  seeds = _as_list(get("seeds", [0]), "seeds")
  if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(
      set(seeds)) != len(seeds):
    raise ConfigError(f"sweep.seeds must be a non-empty list of distinct ints, got {seeds!r}")


def _members(raw_members: list, scale: str) -> list[Member]:
  """The members' overrides resolved at `scale`, each checked, named and unique."""
  members, seen = [], {}
  for i, raw in enumerate(raw_members):
    what = f"sweep.members[{i}]"
    if not isinstance(raw, dict):
      raise ConfigError(f"{what} must be a dict of overrides {{'group.field': value}}, got {raw!r}")
    ov = {p: _resolve_scale(v, scale, f"{what}[{p!r}]") for p, v in raw.items()}
    for p in ov:
      if isinstance(p, str) and (p.startswith("sweep.") or p == "train.seed"):
        raise ConfigError(f"{what}: {p!r} cannot be overridden by a member (seeds come from "
                          f"sweep.seeds)")
    key = json.dumps(sorted(ov.items(), key=lambda kv: kv[0]), default=repr)
    if key in seen:
      raise ConfigError(f"{what} has the same overrides as sweep.members[{seen[key]}]: "
                        f"{describe_overrides(ov)}")
    seen[key] = i
    m = Member(member_name(ov), ov)
    if m.name in {x.name for x in members}:
      raise ConfigError(f"{what}: name {m.name!r} is already used by another member")
    members.append(m)
  return members


def _runs(base, members: list[Member], seeds: list[int], smoke: bool) -> list[Run]:
  """Every (seed, member) run's full config: the base, the member's overrides, the seed (and
  its parent through `{seed}` in train.init_from), the smoke overrides; each validated."""
  runs = []
  for seed in seeds:
    for m in members:
      c = copy.deepcopy(base)
      for p, v in m.overrides.items():
        apply_override(c, p, v, f"sweep member {m.name}")
      apply_override(c, "train.seed", seed, f"sweep member {m.name}")
      if SEED_FIELD in c.train.init_from:  # each seed reads its own parent
        c.train.init_from = c.train.init_from.replace(SEED_FIELD, str(seed))
      if smoke:
        for p, v in SMOKE_OVERRIDES.items():
          apply_override(c, p, v, "sweep smoke mode")
      _validate_run_config(c, f"sweep member {m.name} (seed {seed})")
      runs.append(Run(m.name, seed, c))
  return runs


def expand(cfg, workdir: str | None = None) -> Sweep:
  """Validates `cfg.sweep` and builds every run's config. Raises ConfigError (one line)."""
  if "sweep" not in cfg:
    raise ConfigError("config has no `sweep` group; a sweep config is built by "
                      "configs/ablations/*.py")
  s = cfg.sweep
  _check_fields(s)
  get = lambda k, d: s[k] if k in s else d  # noqa: E731
  scale, metric, smoke = get("scale", "cpu"), get("metric", "eval_cross_entropy"), bool(get(
      "smoke", False))
  raw_members, seeds = _as_list(get("members", []), "members"), _as_list(get("seeds", [0]), "seeds")
  scales = _named_overrides(get("scales", []), "scales")
  bad = [x["name"] for x in scales if x["name"] not in SCALES]
  if bad:
    raise ConfigError(f"sweep.scales: names must be in {list(SCALES)}, got {bad}")
  scale_overrides = next((x["overrides"] for x in scales if x["name"] == scale), {})
  eval_overrides = _named_overrides(get("eval_overrides", []), "eval_overrides")

  base = base_config(cfg)
  for p, v in scale_overrides.items():
    apply_override(base, p, v, f"sweep.scales[{scale}]")
  for e in eval_overrides:  # checked on a scratch copy so a typo fails before training
    scratch = copy.deepcopy(base)
    for p, v in e["overrides"].items():
      apply_override(scratch, p, v, f"sweep.eval_overrides[{e['name']}]")

  members = _members(raw_members, scale)

  published = [check_claim(pub, i, [m.name for m in members], metric,
                           bool(get("higher_is_better", False)),
                           [e["name"] for e in eval_overrides])
               for i, pub in enumerate(_as_list(get("published", []), "published"))]

  if smoke:
    keep = _as_list(get("smoke_members", [0, 1]), "smoke_members")
    if not all(isinstance(k, int) and 0 <= k < len(members) for k in keep):
      raise ConfigError(f"sweep.smoke_members must be member indices 0..{len(members)-1}, "
                        f"got {keep!r}")
    members = [members[k] for k in keep][:2]
    seeds = seeds[:1]
    names = {m.name for m in members}
    published = [p for p in (smoke_claim(p, names) for p in published) if p is not None]

  if workdir is not None and "data" in base and base.data.get("tfds_data_dir", None) == "":
    # The members share the data folder a single run in the sweep's workdir would use (a local
    # cache folder when the workdir is remote: moe.rundir.cache_dir).
    from moe.data.pipeline import data_dir_for  # pylint: disable=g-import-not-at-top
    base.data.tfds_data_dir = data_dir_for("", workdir)

  runs = _runs(base, members, seeds, smoke)
  return Sweep(title=str(get("title", "")), paper=str(get("paper", "")),
               config_file=str(get("config_file", "")), metric=metric,
               higher_is_better=bool(get("higher_is_better", False)), scale=scale, smoke=smoke,
               seeds=list(seeds), members=members, eval_overrides=eval_overrides,
               published=published, notes=[str(n) for n in _as_list(get("notes", []), "notes")],
               runs=runs)


def smoke_config(cfg):
  """A copy of a sweep config in CI smoke mode (two members, one seed, tiny model, 4 steps)."""
  c = copy.deepcopy(cfg)
  c.unlock()
  c.sweep.smoke = True
  c.sweep.scale = "cpu"
  return c


def parse_shard(shard: str) -> tuple[int, int]:
  m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(shard))
  if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
    raise ConfigError(f"shard must be 'i/n' with integers 0 <= i < n (e.g. '0/4'), got {shard!r}")
  return int(m.group(1)), int(m.group(2))
