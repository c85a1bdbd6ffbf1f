"""Config loading for the command lines (`launch.py`, `python -m moe.convert`): absl flags and an
`ml_collections` config file, with one-line errors.

- `--config=path[:arg]` names a config file (`get_config()` / `get_config(arg)` returns an
  `ml_collections.ConfigDict`); `--config.<group>.<field>=<value>` overrides one field, and an
  unknown field is an error naming the fields there.
- `--config.<group>.<field>=None` sets a field to None (e.g. `--config.moe.capacity_factor=None`,
  dropless): ml_collections cannot parse "None" for a typed field, so those flags leave argv
  before absl parses it and are set right after (the config's validation then says if None is
  not allowed there).
- No `--config` but a run directory (`--workdir`, `--from`) holding `config.json`: that saved
  config is used (`moe.runconfig`; overrides apply to it as to a file).
- A config file that is broken is one line, never a traceback: it raises (NameError,
  ImportError, SyntaxError, ...), has no `get_config`, or `get_config()` returns None or
  something that is not a ConfigDict.

Each entry point defines its `--config` flag with `define_config_flag` and parses with
`parse(argv, ...)`, which raises `ConfigError` (one line) for every mistake above.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re

from absl import flags
import ml_collections
from ml_collections import config_flags

from moe import rundir
from moe import runconfig
from moe.errors import ConfigError

_NONE_OVERRIDE = re.compile(r"^--?config\.([\w.]+)=(none|None|null)$")
RUNCONFIG_FILE = os.path.abspath(runconfig.__file__)  # a config file: get_config(workdir)


def define_config_flag(flag_values=flags.FLAGS, *, sys_argv=None):
  """The `--config` flag (a locked config file) on `flag_values`."""
  return config_flags.DEFINE_config_file(
      "config", None, "Config file, e.g. configs/default.py; override fields with "
      "--config.<group>.<field>=<value>. Optional where the run directory holds config.json.",
      flag_values=flag_values, lock_config=True, sys_argv=sys_argv)


def flag_value(argv: list[str], name: str) -> str | None:
  """The value of `--name=v` / `--name v` in `argv` (the first), or None."""
  for i, a in enumerate(argv):
    m = re.match(rf"^--?{name}(=(.*))?$", a)
    if m:
      return m.group(2) if m.group(1) else (argv[i + 1] if i + 1 < len(argv) else None)
  return None


def load_config_file(path: str):
  """The ConfigDict `--config=path[:arg]` names (unlocked); one-line ConfigError if the file is
  missing or broken."""
  file, _, arg = path.partition(":")
  if not os.path.isfile(file):
    raise ConfigError(f"--config={path}: no such file")
  try:
    spec = importlib.util.spec_from_file_location("_moe_config_file", file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in the user's file is reported in one line
    raise ConfigError(f"--config={path}: {_one_line(e)}") from None
  get_config = getattr(module, "get_config", None)
  if not callable(get_config):
    raise ConfigError(f"--config={path}: the file defines no get_config() (a config file's "
                      "get_config() returns an ml_collections.ConfigDict)")
  try:
    cfg = get_config(arg) if arg else get_config()
  except ConfigError:
    raise
  except Exception as e:  # noqa: BLE001
    raise ConfigError(f"--config={path}: get_config() raised {_one_line(e)}") from None
  if cfg is None:
    raise ConfigError(f"--config={path}: get_config() returned None (a missing return?); it "
                      "must return an ml_collections.ConfigDict")
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"--config={path}: get_config() returned a {type(cfg).__name__}, not an "
                      "ml_collections.ConfigDict")
  return cfg


def _one_line(e: BaseException) -> str:
  text = f"{type(e).__name__}: {e}"
  return text.splitlines()[0] if text.strip() else type(e).__name__


def unknown_field(argv: list[str], cfg) -> str | None:
  """Names the first `--config.a.b` override that is not a field of `cfg`."""
  for a in argv:
    m = re.match(r"^--?(?:no)?config\.([\w.]+)(=|$)", a)
    if not m:
      continue
    node, walked = cfg, []
    for part in m.group(1).split("."):
      if not hasattr(node, "keys") or part not in node:
        where = ".".join(walked) or "the config"
        fields = sorted(node.keys()) if hasattr(node, "keys") else []
        return (f"--config.{m.group(1)}: {where} has no field {part!r}"
                + (f" (fields: {', '.join(fields)})" if fields else ""))
      node = node[part]
      walked.append(part)
  return None


@dataclasses.dataclass
class Prepared:
  """argv ready for absl: `--config.x=None` taken out (into `nones`), and `--config` added when
  a run directory's config.json stands in for it (`saved_from`: that directory)."""

  argv: list[str]
  nones: list[str]
  config: str | None  # the --config value absl will read
  saved_from: str | None


def prepare_argv(argv: list[str], run_flag: str = "workdir") -> Prepared:
  """Takes out `--config.x=None` and, when there is no `--config` but `--<run_flag>` names a
  directory with config.json, adds `--config=<moe/runconfig.py>:<that directory>` (for a
  checkpoint converted by moe.convert: `--config=<that directory>/config.py`)."""
  nones = [m.group(1) for a in argv if (m := _NONE_OVERRIDE.match(a))]
  argv = [a for a in argv if not _NONE_OVERRIDE.match(a)]
  path, saved_from = flag_value(argv, "config"), None
  if path is None:
    run = flag_value(argv, run_flag)
    saved = runconfig.saved(run) if run else None
    if saved is not None and runconfig.CONVERTED_KEY in saved:
      # A converted checkpoint's config.json has the model groups only; the converter wrote a
      # whole config file beside it (moe.convert.cli), which is what this run means.
      converted = rundir.join(run, runconfig.CONVERTED_CONFIG_PY)
      if rundir.exists(converted):
        path = converted
        argv = argv[:1] + [f"--config={path}"] + argv[1:]
    elif saved is not None:
      path, saved_from = f"{RUNCONFIG_FILE}:{run}", run
      argv = argv[:1] + [f"--config={path}"] + argv[1:]
  return Prepared(argv=argv, nones=nones, config=path, saved_from=saved_from)


def shown(p: Prepared) -> str:
  """How errors name the config: the file given, or the run's config.json."""
  return runconfig.config_path(p.saved_from) if p.saved_from else str(p.config)


def parse(p: Prepared, flag_values, config_flag, *, run_flag: str = "workdir") -> list[str]:
  """absl parsing of `p.argv` into `flag_values` (whose `config_flag` reads `p.argv`'s
  overrides), then the None overrides; returns the arguments absl left. Every mistake is a
  one-line ConfigError: a broken config file, an unknown or unparsable field, no config."""
  cfg = None
  if p.config is not None:
    cfg = load_config_file(p.config)  # a broken file: one line here, not absl's traceback
  try:
    rest = flag_values(p.argv)
  except flags.Error as e:
    raise ConfigError((cfg is not None and unknown_field(p.argv, cfg)) or str(e)) from None
  except (AttributeError, KeyError) as e:  # locked config: an override names no field
    raise ConfigError((cfg is not None and unknown_field(p.argv, cfg))
                      or f"unknown config field {e}") from None
  except (OSError, ValueError, TypeError, SyntaxError) as e:
    raise ConfigError(f"--config={shown(p)}: {_one_line(e)}") from None
  cfg = config_flag.value
  if cfg is None:
    raise ConfigError(f"--config is required (the config file, e.g. "
                      f"--config=configs/default.py) unless --{run_flag} holds a run's config.json")
  for path in p.nones:
    set_none(cfg, path)
  return rest


def set_none(cfg, path: str) -> None:
  """`--config.<path>=None`: the field set to None (ConfigError when there is no such field)."""
  *groups, leaf = path.split(".")
  node = cfg
  for g in groups:
    if not hasattr(node, "keys") or g not in node:
      raise ConfigError(f"--config.{path}=None: the config has no field {path!r}")
    node = node[g]
  if not hasattr(node, "keys") or leaf not in node:
    raise ConfigError(f"--config.{path}=None: the config has no field {path!r}")
  try:
    node[leaf] = None
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--config.{path}=None: {e}") from None
