"""moe.runconfig (a run's config.json) and moe.cli (config loading of the command lines).

In process and without jax work, except the two subprocesses that show a broken config file is
one line on stderr with exit code 2 for launch.py and `python -m moe.convert`."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import ml_collections
import pytest
from absl import flags

from conftest import REPO, one_line_error
from moe import cli
from moe import runconfig
from moe.errors import ConfigError


def test_save_writes_the_resolved_config_and_load_reads_it_back(tiny_config, tmp_path):
  cfg = tiny_config({"moe.capacity_factor": None, "train.init_from": ""})
  path = runconfig.save(cfg, str(tmp_path))
  assert path == os.path.join(str(tmp_path), "config.json")
  with open(path) as f:
    written = json.load(f)
  assert written == json.loads(json.dumps(cfg.to_dict()))
  assert written["moe"]["num_experts"] == 4 and written["moe"]["capacity_factor"] is None
  loaded = runconfig.load(str(tmp_path))
  assert loaded.to_dict() == written
  assert runconfig.differences(written, loaded) == []
  with pytest.raises(AttributeError):  # locked, like a config file's
    loaded.moe.num_expert = 3
  loaded.moe.capacity_factor = 1.5  # a None field takes a value again
  assert runconfig.differences(written, loaded) == [("moe.capacity_factor", None, 1.5)]


def test_differing_config_is_one_line_naming_the_fields(tiny_config, tmp_path):
  workdir = str(tmp_path)
  runconfig.save(tiny_config(), workdir)
  given = tiny_config({"moe.num_experts": 8, "model.num_layers": 3})
  with one_line_error("config.json in", "moe.num_experts (4 -> 8)", "model.num_layers (2 -> 3)"):
    runconfig.check_saved(given, workdir, runconfig.RESUME_MAY_CHANGE)


def test_fields_that_may_change_are_accepted(tiny_config, tmp_path):
  workdir = str(tmp_path)
  runconfig.save(tiny_config(), workdir)
  resume = tiny_config({"train.steps": 60, "train.log_every": 5, "train.eval_every": 7,
                        "train.checkpoint_every": 9, "train.keep_checkpoints": 5,
                        "train.eval_batches": 3, "train.profile_steps": "2:3",
                        "train.wandb_project": "p", "data.num_workers": 2, "mesh.data": 1,
                        "mesh.fsdp": 1})
  runconfig.check_saved(resume, workdir, runconfig.RESUME_MAY_CHANGE)
  other_eval = tiny_config({"moe.eval_capacity_factor": None})
  with one_line_error("moe.eval_capacity_factor (2.0 -> None)"):
    runconfig.check_saved(other_eval, workdir, runconfig.RESUME_MAY_CHANGE)
  runconfig.check_saved(other_eval, workdir, runconfig.EVAL_MAY_CHANGE)
  runconfig.check_saved(tiny_config({"moe.num_experts": 8}), str(tmp_path / "no_run"))


def test_config_of_an_older_version_lacking_a_new_field(tiny_config, tmp_path):
  """A field the saved config.json lacks: its default matches (the older version behaved so),
  another value is a difference shown against "(absent)"."""
  workdir = str(tmp_path)
  runconfig.save(tiny_config(), workdir)
  path = runconfig.config_path(workdir)
  with open(path) as f:
    saved = json.load(f)
  del saved["moe"]["k_rule"], saved["moe"]["top_p"]
  with open(path, "w") as f:
    json.dump(saved, f)
  runconfig.check_saved(tiny_config(), workdir, runconfig.RESUME_MAY_CHANGE)
  with one_line_error("moe.k_rule ('(absent)' -> 'top_p')"):
    runconfig.check_saved(tiny_config({"moe.k_rule": "top_p"}), workdir)
  with one_line_error("moe.top_p ('(absent)' -> 0.7)"):
    runconfig.check_saved(tiny_config({"moe.top_p": 0.7}), workdir)


def test_converted_config_compares_model_groups_only(tiny_config, tmp_path):
  cfg = tiny_config()
  spec = {"model": cfg.model.to_dict(), "moe": cfg.moe.to_dict(), "source": {"from_hf": "x"}}
  with open(tmp_path / "config.json", "w") as f:
    json.dump(spec, f)
  runconfig.check_saved(tiny_config({"train.learning_rate": 0.5}), str(tmp_path))
  with one_line_error("moe.num_experts (4 -> 2)"):
    runconfig.check_saved(tiny_config({"moe.num_experts": 2}), str(tmp_path))
  runconfig.save(cfg, str(tmp_path))  # a converted checkpoint's config.json is kept
  assert json.load(open(tmp_path / "config.json")) == spec
  with one_line_error("converted", "config.py"):
    runconfig.load(str(tmp_path))


def test_architecture_diff_reads_the_source_run(tiny_config, tmp_path):
  runconfig.save(tiny_config(), str(tmp_path))
  step_dir = str(tmp_path / "checkpoints" / "6")
  diff = runconfig.architecture_diff(tiny_config({"moe.num_experts": 8}), step_dir)
  assert diff == "moe.num_experts (4 -> 8)"
  assert runconfig.architecture_diff(tiny_config({"train.steps": 99}), step_dir) == ""
  assert runconfig.architecture_diff(tiny_config(), str(tmp_path / "elsewhere")) == ""


# ----------------------------------------------------------------------------- moe.cli


BROKEN = {
    "nameerror.py": ("def get_config():\n  return undefined_name\n", "NameError"),
    "importerror.py": ("import no_such_module_xyz\n", "ModuleNotFoundError"),
    "syntax.py": ("def get_config(:\n", "SyntaxError"),
    "returns_none.py": ("def get_config():\n  x = 1\n", "get_config() returned None"),
    "returns_dict.py": ("def get_config():\n  return {'a': 1}\n",
                        "returned a dict, not an ml_collections.ConfigDict"),
    "no_get_config.py": ("x = 1\n", "defines no get_config()"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_config_file_is_one_line(tmp_path, name):
  text, needle = BROKEN[name]
  path = tmp_path / name
  path.write_text(text)
  with one_line_error(f"--config={path}: ", needle):
    cli.load_config_file(str(path))


def _run(args):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=dict(os.environ, PYTHONPATH=REPO))


def _one_error_line(proc, *needles):
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  (line,) = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  for needle in needles:
    assert needle in line, line


def test_broken_config_file_launch_and_convert_subprocesses(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(BROKEN["nameerror.py"][0])
  _one_error_line(_run(["launch.py", f"--config={bad}", f"--workdir={tmp_path / 'w'}"]),
                  f"--config={bad}: ", "NameError: name 'undefined_name' is not defined")
  none = tmp_path / "none.py"
  none.write_text(BROKEN["returns_none.py"][0])
  _one_error_line(_run(["-m", "moe.convert", f"--from={tmp_path / 'w'}",
                        f"--to_hf={tmp_path / 'hf'}", f"--config={none}"]),
                  "get_config() returned None")


def _parse(argv, run_flag="workdir"):
  """moe.cli on fresh flags, as moe.convert uses it: (flag values, the config)."""
  p = cli.prepare_argv(argv, run_flag)
  fv = flags.FlagValues()
  flags.DEFINE_string(run_flag, None, "", flag_values=fv)
  config = cli.define_config_flag(fv, sys_argv=p.argv)
  cli.parse(p, fv, config, run_flag=run_flag)
  return fv, config.value


def test_saved_config_stands_in_for_config_and_takes_overrides(tiny_config, tmp_path):
  workdir = str(tmp_path)
  runconfig.save(tiny_config({"moe.capacity_factor": None}), workdir)
  _, cfg = _parse(["prog", f"--workdir={workdir}", "--config.train.steps=60",
                   "--config.moe.capacity_factor=1.5", "--config.moe.eval_capacity_factor=None"])
  assert isinstance(cfg, ml_collections.ConfigDict)
  assert cfg.model.num_layers == 2 and cfg.moe.num_experts == 4  # the run's, not default.py's
  assert cfg.train.steps == 60 and cfg.moe.capacity_factor == 1.5
  assert cfg.moe.eval_capacity_factor is None
  with one_line_error("moe.num_expert", "num_experts"):
    _parse(["prog", f"--workdir={workdir}", "--config.moe.num_expert=3"])
  with one_line_error("--config is required", "--workdir"):
    _parse(["prog", f"--workdir={tmp_path / 'empty'}"])
  _, cfg = _parse(["prog", f"--from={workdir}"], run_flag="from")
  assert cfg.moe.num_experts == 4


def test_config_file_with_argument_and_none_override(tmp_path):
  path = tmp_path / "c.py"
  path.write_text("import ml_collections\n"
                  "def get_config(arg='1'):\n"
                  "  c = ml_collections.ConfigDict()\n"
                  "  c.a = ml_collections.ConfigDict({'n': int(arg), 'f': 0.5})\n"
                  "  return c\n")
  _, cfg = _parse(["prog", f"--config={path}:7", "--config.a.f=None"])
  assert cfg.a.n == 7 and cfg.a.f is None
  with one_line_error("--config.a.g=None", "no field"):
    _parse(["prog", f"--config={path}", "--config.a.g=None"])
  with pytest.raises(ConfigError, match="no such file"):
    _parse(["prog", f"--config={tmp_path / 'missing.py'}"])
