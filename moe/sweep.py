"""Ablation sweeps: a config with a top-level `sweep` group expands into (member, seed) runs.

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
  cfg.sweep.published        list of orderings {"claim", "source", "metric", "higher_is_better",
                             "order": [member index or name, best first]}
  cfg.sweep.notes            list of strings printed under the table (caveats)
  cfg.sweep.smoke            True: CI smoke mode (2 members, 1 seed, tiny model, a few steps)
  cfg.sweep.smoke_members    indices of the members the smoke mode keeps

A run's config is the base config (everything but `sweep`) with, in order, the scale's overrides,
the member's overrides, `train.seed`, and (smoke mode) `SMOKE_OVERRIDES`. Every override must
name an existing field; every run config is validated before anything trains.

`run(cfg, workdir, shard="i/n")` trains the i-th round-robin slice of the (seed, member) runs into
`workdir/<member>/seed<k>/`, skipping runs whose summary.json says completed or diverged (an
interrupted run is simply called again: the trainer resumes from its checkpoint), then writes the
report (`moe/report.py`), partial if runs are missing.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import sys
import time
import traceback
from typing import Any, Callable

from moe.config import ConfigError, model_config_from, validate_model

SCALES = ("cpu", "accelerator")
DONE_STATUSES = ("completed", "diverged")
SWEEP_FILE = "sweep.json"  # the expanded sweep, written into the sweep's workdir
RUN_INFO_FILE = "sweep_run.json"  # per run: machine, wall time, written by the runner
SUMMARY_FILE = "summary.json"  # per run: written by the trainer
METRICS_FILE = "metrics.jsonl"  # per run: written by the trainer

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
    return os.path.join(workdir, self.member, f"seed{self.seed}")


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
  published: list  # [{"claim", "source", "metric", "higher_is_better", "order": [names]}]
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
  try:
    validate_model(model_config_from(c, vocab_size=259))
  except ConfigError as e:
    raise ConfigError(f"{what}: {e}") from None
  for f in ("steps", "batch_size", "eval_batches", "log_every", "eval_every", "checkpoint_every"):
    v = c.train[f]
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
      raise ConfigError(f"{what}: train.{f} must be an integer >= 1, got {v!r}")


def expand(cfg, workdir: str | None = None) -> Sweep:
  """Validates `cfg.sweep` and builds every run's config. Raises ConfigError (one line)."""
  if "sweep" not in cfg:
    raise ConfigError("config has no `sweep` group; a sweep config is built by "
                      "configs/ablations/*.py")
  s = cfg.sweep
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
  smoke = bool(get("smoke", False))
  raw_members = _as_list(get("members", []), "members")
  if not raw_members:
    raise ConfigError("sweep.members is empty: a sweep needs at least one member (an override "
                      "dict; {} is the base config)")
  seeds = _as_list(get("seeds", [0]), "seeds")
  if not seeds or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(
      set(seeds)) != len(seeds):
    raise ConfigError(f"sweep.seeds must be a non-empty list of distinct ints, got {seeds!r}")
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

  published = []
  by_name = {m.name: m for m in members}
  for i, pub in enumerate(_as_list(get("published", []), "published")):
    what = f"sweep.published[{i}]"
    need = {"claim", "source", "order"}
    if not isinstance(pub, dict) or not need <= set(pub) or not set(pub) <= need | {
        "metric", "higher_is_better"}:
      raise ConfigError(f"{what} must be a dict with keys {sorted(need)} (+ optional metric, "
                        f"higher_is_better), got {pub!r}")
    order = []
    for ref in _as_list(pub["order"], f"published[{i}].order"):
      if isinstance(ref, int) and not isinstance(ref, bool) and 0 <= ref < len(members):
        order.append(members[ref].name)
      elif isinstance(ref, str) and ref in by_name:
        order.append(ref)
      else:
        raise ConfigError(f"{what}.order: {ref!r} is neither a member index (0..{len(members)-1}) "
                          f"nor a member name ({sorted(by_name)})")
    if len(order) < 2 or len(set(order)) != len(order):
      raise ConfigError(f"{what}.order must list at least two distinct members, got {order}")
    published.append({"claim": str(pub["claim"]), "source": str(pub["source"]),
                      "metric": str(pub.get("metric", metric)),
                      "higher_is_better": bool(pub.get("higher_is_better",
                                                       get("higher_is_better", False))),
                      "order": order})

  if smoke:
    keep = _as_list(get("smoke_members", [0, 1]), "smoke_members")
    if not all(isinstance(k, int) and 0 <= k < len(members) for k in keep):
      raise ConfigError(f"sweep.smoke_members must be member indices 0..{len(members)-1}, "
                        f"got {keep!r}")
    members = [members[k] for k in keep][:2]
    seeds = seeds[:1]
    names = {m.name for m in members}
    published = [p for p in published if sum(n in names for n in p["order"]) >= 2]
    for p in published:
      p["order"] = [n for n in p["order"] if n in names]

  if workdir is not None and "data" in base and base.data.get("tfds_data_dir", None) == "":
    # All runs of a sweep share one prepared dataset, beside the sweep's workdir.
    base.data.tfds_data_dir = os.path.join(os.path.dirname(os.path.abspath(workdir)), "tfds")

  runs = []
  for seed in seeds:
    for m in members:
      c = copy.deepcopy(base)
      for p, v in m.overrides.items():
        apply_override(c, p, v, f"sweep member {m.name}")
      apply_override(c, "train.seed", seed, f"sweep member {m.name}")
      if smoke:
        for p, v in SMOKE_OVERRIDES.items():
          apply_override(c, p, v, "sweep smoke mode")
      _validate_run_config(c, f"sweep member {m.name} (seed {seed})")
      runs.append(Run(m.name, seed, c))

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


# ----------------------------------------------------------------------------- files


def write_json(path: str, obj) -> None:
  """Atomic write (parallel shards share the sweep directory)."""
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=False, default=repr)
  os.replace(tmp, path)


def read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def run_status(rundir: str) -> str | None:
  s = read_json(os.path.join(rundir, SUMMARY_FILE))
  return s.get("status") if isinstance(s, dict) else None


def machine_description() -> str:
  parts = [platform.node() or "?", platform.machine(), f"{os.cpu_count()} CPU cores"]
  try:
    import jax  # the trainer imports it anyway
    devs = jax.devices()
    parts.append(f"{len(devs)}x {devs[0].device_kind} ({jax.default_backend()})")
  except Exception:  # noqa: BLE001 - the description is best effort
    pass
  return ", ".join(parts)


def command_for(sweep: Sweep, workdir: str) -> str:
  cmd = f"python launch.py --config={sweep.config_file or '<config>'} --workdir={workdir}"
  if sweep.scale != "cpu":
    cmd += f" --config.sweep.scale={sweep.scale}"
  if sweep.smoke:
    cmd += " --config.sweep.smoke=True"
  return cmd


# ----------------------------------------------------------------------------- runner


def _default_eval_fn():
  try:
    from moe import train
  except ImportError:
    return None
  return getattr(train, "evaluate", None)


def _eval_config(run: Run, overrides: dict):
  c = copy.deepcopy(run.cfg)
  for p, v in overrides.items():
    apply_override(c, p, v, "sweep.eval_overrides")
  return c


def run(cfg, workdir: str, shard: str = "0/1", train_fn: Callable | None = None,
        eval_fn: Callable | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains this shard's runs (skipping finished ones), extra-evaluates them, writes the report.

  Returns {"trained", "skipped", "failed", "preempted": ["member/seedK", ...], "report": paths}.
  """
  index, count = parse_shard(shard)
  sweep = expand(cfg, workdir)  # every ConfigError surfaces here, before any training
  if train_fn is None:
    from moe import train  # imported late: tests inject a fake and need no trainer
    for r in sweep.runs:  # the trainer's own static checks, before anything trains
      try:
        train.validate_config(r.cfg)
      except ConfigError as e:
        raise ConfigError(f"sweep member {r.member} (seed {r.seed}): {e}") from None
    train_fn = train.train_and_evaluate
  if eval_fn is None and sweep.eval_overrides:
    eval_fn = _default_eval_fn()
  _check_existing(sweep, workdir)
  os.makedirs(workdir, exist_ok=True)
  info = sweep.to_json()
  info["command"] = command_for(sweep, workdir)
  info["argv"] = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  info["extra_eval_available"] = eval_fn is not None
  write_json(os.path.join(workdir, SWEEP_FILE), info)

  mine = sweep.runs[index::count]
  done = {"trained": [], "skipped": [], "failed": [], "preempted": []}
  machine = None
  for n, r in enumerate(mine):
    rundir = r.dirname(workdir)
    tag = f"{r.member}/seed{r.seed}"
    status = run_status(rundir)
    if status in DONE_STATUSES:
      log(f"[sweep {index}/{count}] {n+1}/{len(mine)} {tag}: {status}, skipped")
      done["skipped"].append(tag)
    else:
      os.makedirs(rundir, exist_ok=True)
      machine = machine or machine_description()
      write_json(os.path.join(rundir, "config.json"), r.cfg.to_dict())
      log(f"[sweep {index}/{count}] {n+1}/{len(mine)} {tag}: "
          f"{'resuming' if status else 'training'}")
      t0 = time.time()
      error = None
      try:
        train_fn(r.cfg, rundir)
      except Exception as e:  # noqa: BLE001 - one failed member must not stop the sweep
        error = f"{type(e).__name__}: {e}".splitlines()[0]
        log(f"[sweep] {tag} raised {error}\n{traceback.format_exc()}")
      wall = time.time() - t0
      prev = read_json(os.path.join(rundir, RUN_INFO_FILE)) or {}
      write_json(os.path.join(rundir, RUN_INFO_FILE), {
          "machine": machine, "wall_s": wall + float(prev.get("wall_s", 0.0)),
          "finished": datetime.datetime.now().isoformat(timespec="seconds"), "error": error})
      status = run_status(rundir)
      if error is not None and status not in DONE_STATUSES + ("failed",):
        write_json(os.path.join(rundir, SUMMARY_FILE),
                   {"status": "failed", "error": error, "written_by": "moe.sweep"})
        status = "failed"
      if status == "preempted":  # the trainer saw SIGTERM / a stop request: stop the sweep too
        log(f"[sweep {index}/{count}] {tag} was preempted; rerun the same command to resume")
        done["preempted"].append(tag)
        break
      (done["failed"] if status not in DONE_STATUSES else done["trained"]).append(tag)
    if status == "completed" and sweep.eval_overrides:
      _extra_evals(sweep, r, rundir, eval_fn, log)

  from moe import report  # no jax, no trainer
  paths = report.write_report(workdir)
  log(f"[sweep {index}/{count}] report: {paths['table.md']}")
  done["report"] = paths
  return done


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = json.loads(json.dumps(v, default=repr))
  out.pop("data.tfds_data_dir", None)  # depends on where the workdir is mounted
  return out


def _check_existing(sweep: Sweep, workdir: str) -> None:
  """A run directory left by a different config would be silently reused: refuse it."""
  for r in sweep.runs:
    old = read_json(os.path.join(r.dirname(workdir), "config.json"))
    if old is None:
      continue
    a, b = _flat(old), _flat(r.cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    if diff:
      raise ConfigError(f"{r.dirname(workdir)} holds a run of a different config (differs in "
                        f"{diff[:5]}); use a fresh --workdir or delete that run")


def _extra_evals(sweep: Sweep, r: Run, rundir: str, eval_fn, log) -> None:
  for e in sweep.eval_overrides:
    path = os.path.join(rundir, f"eval_{e['name']}.json")
    if os.path.exists(path):
      continue
    if eval_fn is None:
      log(f"[sweep] {r.member}/seed{r.seed}: extra evaluation {e['name']!r} skipped: "
          f"moe.train.evaluate(cfg, workdir) does not exist")
      continue
    try:
      metrics = eval_fn(_eval_config(r, e["overrides"]), rundir)
    except Exception as err:  # noqa: BLE001 - reported in the table, not fatal
      log(f"[sweep] {r.member}/seed{r.seed}: extra evaluation {e['name']!r} failed: {err}")
      continue
    clean = {}
    for k, v in dict(metrics).items():
      try:
        clean[k] = float(v)  # python, numpy and 0-d jax numbers
      except (TypeError, ValueError):
        clean[k] = v if isinstance(v, (str, bool, type(None))) else repr(v)
    write_json(path, {"overrides": e["overrides"], "metrics": clean})
