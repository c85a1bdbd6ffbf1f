"""A run keeps its config (config.json) and `--mode=eval` (moe.train.evaluate): one tiny run
with overrides, then resume / complete / eval / convert without --config."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, one_line_error
from moe import runconfig
from moe.train import evaluate
from moe.train import trainer as train

# The tiny config differs from configs/default.py in the architecture (2 layers, 4 experts, ...):
# anything that fell back to default.py would not fit the checkpoint.


@pytest.fixture(scope="module")
def run(tmp_path_factory, textdir, tfds_dir):
  from conftest import apply_overrides, load_config_file, tiny_overrides
  cfg = apply_overrides(load_config_file("default"), tiny_overrides(textdir, tfds_dir))
  workdir = str(tmp_path_factory.mktemp("runs") / "e4")
  summary = train.train_and_evaluate(cfg, workdir)
  return cfg, workdir, summary


def test_config_json_is_the_resolved_config(run):
  cfg, workdir, _ = run
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f) == json.loads(json.dumps(cfg.to_dict()))


def test_resume_with_other_architecture_refused_before_compiling(run, tiny_config):
  _, workdir, _ = run
  from test_config import CompileCounter
  with CompileCounter() as compiles, one_line_error("moe.num_experts (4 -> 8)",
                                                    "model.num_layers (2 -> 3)"):
    train.train_and_evaluate(tiny_config({"moe.num_experts": 8, "model.num_layers": 3}), workdir)
  assert compiles.count == 0


def test_init_from_names_the_source_runs_differences(run, tiny_config, tmp_path):
  _, workdir, _ = run
  cfg = tiny_config({"moe.num_experts": 8, "train.init_from": workdir})
  with one_line_error("train.init_from", "its run's config.json differs in",
                      "moe.num_experts (4 -> 8)"):
    train.train_and_evaluate(cfg, str(tmp_path / "ft"))
  assert not os.path.exists(tmp_path / "ft" / "config.json")  # a refused config is not kept


def test_eval_matches_the_training_evaluation(run):
  _, workdir, summary = run
  result = evaluate.run(runconfig.load(workdir), workdir)
  assert result["step"] == summary["step"] == 6
  assert result["eval_cross_entropy"] == pytest.approx(summary["eval_cross_entropy"], rel=1e-5)
  assert result["eval_bits_per_byte"] == pytest.approx(summary["eval_bits_per_byte"], rel=1e-5)
  assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_cross_entropy"]))
  assert sorted(result["layers"]) == ["layer_0", "layer_1"]
  for layer in result["layers"].values():
    assert len(layer["load"]) == 4 and sum(layer["load"]) == pytest.approx(1.0, abs=1e-5)
  with open(os.path.join(workdir, "eval_validation_step6.json")) as f:
    assert json.load(f)["eval_cross_entropy"] == result["eval_cross_entropy"]
  assert "step 6 on validation" in evaluate.summary_line(result)


def test_eval_of_a_text_file_and_a_named_step(run, tmp_path):
  _, workdir, _ = run
  cfg = runconfig.load(workdir)
  text = tmp_path / "notes.txt"
  text.write_text("def f(x):\n    return x + 1\n" * 8)  # 216 bytes: 14 rows of 17 tokens
  result = evaluate.run(cfg, workdir, step=3, text_file=str(text))
  assert result["step"] == 3 and result["batches"] == 4  # batches of 4 rows, the last padded
  assert result["eval_bytes"] == 216  # every byte predicted once, padding rows count nothing
  assert result["eval_tokens"] == 217  # ... and EOS after the last byte
  assert os.path.exists(os.path.join(workdir, "eval_file-notes_step3.json"))
  later = evaluate.run(cfg, workdir, text_file=str(text))
  assert later["step"] == 6 and later["eval_cross_entropy"] != result["eval_cross_entropy"]


def test_eval_argument_errors(run):
  _, workdir, _ = run
  cfg = runconfig.load(workdir)
  with one_line_error("--step=4", "steps: [3, 6]"):
    evaluate.run(cfg, workdir, step=4)
  with one_line_error("--eval_split", "'test'"):
    evaluate.run(cfg, workdir, split="test")
  with one_line_error("--eval_split or --eval_file"):
    evaluate.run(cfg, workdir, split="train", text_file="x.txt")
  with one_line_error("--step or --checkpoint"):
    evaluate.run(cfg, workdir, step=3, checkpoint=workdir)


def _launch(*args, module=None):
  cmd = [sys.executable, *(["-m", module] if module else [os.path.join(REPO, "launch.py")])]
  return subprocess.run(cmd + list(args), cwd=REPO, capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, PYTHONPATH=REPO))


@pytest.mark.slow
def test_commands_without_config_after_a_run_with_overrides(run, tmp_path):
  """complete, eval, convert and resume read the run's config.json; --config=configs/default.py
  (the other architecture) is one line naming the fields."""
  _, workdir, _ = run
  p = _launch(f"--workdir={workdir}", "--mode=complete", "--prompt=def f", "--max_new_tokens=3",
              "--temperature=0")
  assert p.returncode == 0 and p.stdout.startswith("def f"), p.stderr[-2000:]
  p = _launch(f"--workdir={workdir}", "--mode=eval", "--eval_split=train")
  assert p.returncode == 0 and "eval of step 6 on train" in p.stdout, p.stderr[-2000:]
  assert os.path.exists(os.path.join(workdir, "eval_train_step6.json"))
  out = str(tmp_path / "hf")
  p = _launch(f"--from={workdir}", f"--to_hf={out}", module="moe.convert")
  assert p.returncode == 0, p.stderr[-2000:]
  with open(os.path.join(out, "config.json")) as f:
    hf = json.load(f)
  assert hf["num_local_experts"] == 4 and hf["num_hidden_layers"] == 2
  p = _launch(f"--from={workdir}", f"--to_hf={out}2", "--config=configs/default.py",
              module="moe.convert")
  assert p.returncode == 2 and "moe.num_experts (4 -> 8)" in p.stderr, p.stderr[-2000:]
  assert "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0
  p = _launch(f"--workdir={workdir}", "--config.train.steps=8", "--config.train.log_every=4")
  assert p.returncode == 0, p.stderr[-2000:]
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary["step"] == 8 and summary["resumed_from_step"] == 6
  assert runconfig.load(workdir).train.steps == 8  # config.json follows the allowed change


def _saved_config(workdir, *overrides):
  """The config the command lines read with no --config (moe.cli on fresh absl flags)."""
  from absl import flags
  from moe import cli
  p = cli.prepare_argv(["prog", f"--workdir={workdir}", *overrides])
  assert p.saved_from == workdir
  fv = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  config = cli.define_config_flag(fv, sys_argv=p.argv)
  cli.parse(p, fv, config)
  return config.value


@pytest.mark.slow
def test_cycle_on_a_remote_workdir_without_config(remote_fs, tiny_config, tmp_path, monkeypatch):
  """train -> resume -> eval -> complete -> convert on a gs:// workdir (the fake bucket), with
  the config given only to the first command."""
  import io
  from moe.convert import cli as convert
  from moe.inference import generate
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  workdir = remote_fs.url("runs", "cycle")
  cfg = tiny_config({"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
                     "train.eval_batches": 1})
  assert train.train_and_evaluate(cfg, workdir, stop_at_step=2)["status"] == "preempted"
  assert os.path.exists(os.path.join(remote_fs.local(workdir), "config.json"))
  summary = train.train_and_evaluate(_saved_config(workdir), workdir)
  assert (summary["status"], summary["step"], summary["resumed_from_step"]) == ("completed", 4, 2)
  result = evaluate.run(_saved_config(workdir), workdir)
  assert result["eval_cross_entropy"] == pytest.approx(summary["eval_cross_entropy"], rel=1e-5)
  assert os.path.exists(os.path.join(remote_fs.local(workdir), "eval_validation_step4.json"))
  out = io.StringIO()
  text = generate.main(_saved_config(workdir), workdir, prompt="def", max_new_tokens=2,
                       temperature=0.0, out=out)
  assert out.getvalue().startswith("def") and isinstance(text, str)
  hf = str(tmp_path / "hf")
  assert convert.main(["prog", f"--from={workdir}", f"--to_hf={hf}"]) == 0
  with open(os.path.join(hf, "config.json")) as f:
    assert json.load(f)["num_local_experts"] == 4
  from remote_fs import stray_gs_entries
  assert stray_gs_entries(tmp_path, REPO) == []  # no gs:// URL was taken for a local path
