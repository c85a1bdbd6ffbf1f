"""Ablation sweeps, the runner: trains every (member, seed) run of a sweep config, then reports.

The format of a sweep config and its expansion into runs live in `moe/sweep/spec.py`.

`run(cfg, workdir, shard="i/n")` trains the i-th round-robin slice of the (seed, member) runs into
`workdir/<member>/seed<k>/`, skipping runs whose summary.json says completed or diverged (an
interrupted run is simply called again: the trainer resumes from its checkpoint), then writes the
report (`moe/sweep/report.py`), partial if runs are missing.
"""

from __future__ import annotations

import copy
import datetime
import os
import platform
import shlex
import sys
import time
import traceback
from typing import Callable

import jax

from moe import runconfig
from moe.errors import ConfigError
from moe.rundir import (CONFIG_FILE, RUN_INFO_FILE, SUMMARY_FILE, SWEEP_FILE, eval_file, exists,
                        join, makedirs, read_json, write_json_atomic)
from moe.sweep import report
from moe.sweep.spec import Run, Sweep, apply_override, expand, parse_shard
from moe.train import trainer as train
from moe.train.checks import validate_environment

DONE_STATUSES = ("completed", "diverged")


# ----------------------------------------------------------------------------- files


def run_status(rundir: str) -> str | None:
  s = read_json(join(rundir, SUMMARY_FILE))
  return s.get("status") if isinstance(s, dict) else None


def machine_description() -> str:
  parts = [platform.node() or "?", platform.machine(), f"{os.cpu_count()} CPU cores"]
  try:
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
  return train.evaluate


def _eval_config(run: Run, overrides: dict):
  c = copy.deepcopy(run.cfg)
  for p, v in overrides.items():
    apply_override(c, p, v, "sweep.eval_overrides")
  return c


def _train_one(r: Run, rundir: str, train_fn: Callable, machine: str, log) -> str:
  """Trains (or resumes) one run, records its wall time and machine in RUN_INFO_FILE, and
  returns its status; an exception is the run's failure (a summary saying so), not the sweep's."""
  tag = f"{r.member}/seed{r.seed}"
  makedirs(rundir)
  runconfig.save(r.cfg, rundir)
  t0 = time.time()
  error = None
  try:
    train_fn(r.cfg, rundir)
  except Exception as e:  # noqa: BLE001 - one failed member must not stop the sweep
    error = f"{type(e).__name__}: {e}".splitlines()[0]
    log(f"[sweep] {tag} raised {error}\n{traceback.format_exc()}")
  wall = time.time() - t0
  prev = read_json(join(rundir, RUN_INFO_FILE)) or {}
  write_json_atomic(join(rundir, RUN_INFO_FILE), {
      "machine": machine, "wall_s": wall + float(prev.get("wall_s", 0.0)),
      "finished": datetime.datetime.now().isoformat(timespec="seconds"), "error": error})
  status = run_status(rundir)
  if error is not None and status not in DONE_STATUSES + ("failed",):
    write_json_atomic(join(rundir, SUMMARY_FILE),
                      {"status": "failed", "error": error, "written_by": "moe.sweep"})
    status = "failed"
  return status


def run(cfg, workdir: str, shard: str = "0/1", train_fn: Callable | None = None,
        eval_fn: Callable | None = None, log: Callable[[str], None] = print) -> dict:
  """Trains this shard's runs (skipping finished ones), extra-evaluates them, writes the report.

  Returns {"trained", "skipped", "failed", "preempted": ["member/seedK", ...], "report": paths}.
  """
  index, count = parse_shard(shard)
  sweep = expand(cfg, workdir)  # every ConfigError surfaces here, before any training
  if train_fn is None:
    for r in sweep.runs:  # expand checked the fields; the disk and devices, before any training
      try:
        validate_environment(r.cfg)
      except ConfigError as e:
        raise ConfigError(f"sweep member {r.member} (seed {r.seed}): {e}") from None
    train_fn = train.train_and_evaluate
  if eval_fn is None and sweep.eval_overrides:
    eval_fn = _default_eval_fn()
  _check_existing(sweep, workdir)
  makedirs(workdir)
  info = sweep.to_json()
  info["command"] = command_for(sweep, workdir)
  info["argv"] = shlex.join([os.path.basename(sys.executable)] + sys.argv)
  info["extra_eval_available"] = eval_fn is not None
  write_json_atomic(join(workdir, SWEEP_FILE), info)  # shards share the workdir

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
      machine = machine or machine_description()
      log(f"[sweep {index}/{count}] {n+1}/{len(mine)} {tag}: "
          f"{'resuming' if status else 'training'}")
      status = _train_one(r, rundir, train_fn, machine, log)
      if status == "preempted":  # the trainer saw SIGTERM / a stop request: stop the sweep too
        log(f"[sweep {index}/{count}] {tag} was preempted; rerun the same command to resume")
        done["preempted"].append(tag)
        break
      (done["failed"] if status not in DONE_STATUSES else done["trained"]).append(tag)
    if status == "completed" and sweep.eval_overrides:
      _extra_evals(sweep, r, rundir, eval_fn, log)

  paths = report.write_report(workdir)
  log(f"[sweep {index}/{count}] report: {paths['table.md']}")
  done["report"] = paths
  return done


def _flat(d: dict) -> dict:
  """A config dict as {"a.b": value as JSON reads it back}, comparable with a config.json."""
  out = runconfig.flat(d)
  out.pop("data.tfds_data_dir", None)  # depends on where the workdir is mounted
  return out


def _check_existing(sweep: Sweep, workdir: str) -> None:
  """A run directory left by a different config would be silently reused: refuse it. Every
  field counts, except one the saved config lacks whose value here is its default (a run
  written before the field existed: `moe.runconfig.differences`)."""
  for r in sweep.runs:
    old = read_json(join(r.dirname(workdir), CONFIG_FILE))
    if old is None:
      continue
    a, b = _flat(old), _flat(r.cfg.to_dict())
    diff = sorted(k for k in set(a) | set(b) if a.get(k, runconfig.ABSENT) != b.get(k)
                  and not (k not in a and runconfig.is_default(k, b[k])))
    if diff:
      raise ConfigError(f"{r.dirname(workdir)} holds a run of a different config (differs in "
                        f"{diff[:5]}); use a fresh --workdir or delete that run")


def _extra_evals(sweep: Sweep, r: Run, rundir: str, eval_fn, log) -> None:
  for e in sweep.eval_overrides:
    path = join(rundir, eval_file(e["name"]))
    if exists(path):
      continue
    if eval_fn is None:
      log(f"[sweep] {r.member}/seed{r.seed}: extra evaluation {e['name']!r} skipped: "
          f"moe.train.trainer.evaluate(cfg, workdir) does not exist")
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
    write_json_atomic(path, {"overrides": e["overrides"], "metrics": clean})
