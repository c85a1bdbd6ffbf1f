"""Remote run directories (`gs://...`) on the fake bucket of tests/remote_fs.py: the run-dir files,
the workdir check, the caches, a short training and its resume, a sweep and its report. Nothing
may land on local disk under a folder named `gs:` (what os.path.abspath makes of a URL)."""

import json
import os
import shutil
import tempfile

import pytest

from conftest import REPO
from moe import rundir
from remote_fs import stray_gs_entries


@pytest.fixture
def remote(remote_fs, tmp_path, monkeypatch):
  """The fake bucket, run from an empty current folder (where a `./gs:/` would appear), with
  the local caches of remote workdirs (moe.rundir.cache_dir) under tmp_path."""
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
  yield remote_fs
  assert stray_gs_entries(cwd, tmp_path, REPO) == []
  for top in (tempfile.gettempdir(), os.path.dirname(str(tmp_path)), os.path.expanduser("~")):
    assert not os.path.exists(os.path.join(top, "gs:")), top


def test_mock_maps_the_bucket_and_leaves_local_paths_alone(remote, tmp_path):
  """The fixture itself: gs:// goes to its folder, a local path stays where it is."""
  url = remote.url("a", "b.txt")
  rundir.write_text_atomic(url, "remote")
  assert open(os.path.join(remote.root, "bucket", "a", "b.txt")).read() == "remote"
  local = str(tmp_path / "b.txt")
  rundir.write_text_atomic(local, "local")
  assert open(local).read() == "local"
  assert rundir.read_text(url) == "remote" and rundir.exists(url)
  assert not rundir.exists(remote.url("a", "c.txt"))


def test_rundir_files_on_a_remote_path(remote):
  run = remote.url("runs", "r1")
  rundir.makedirs(run)
  summary = rundir.join(run, rundir.SUMMARY_FILE)
  assert summary == "gs://bucket/runs/r1/summary.json"
  rundir.write_json_atomic(summary, {"status": "completed", "s": "\u00e9"}, indent=2)
  assert rundir.read_json(summary) == {"status": "completed", "s": "\u00e9"}
  assert rundir.read_json(rundir.join(run, "missing.json")) is None
  metrics = rundir.join(run, rundir.METRICS_FILE)
  for step in (1, 2, 3):  # no append on an object store: each record rewrites the object
    rundir.append_metrics(metrics, {"step": step, "loss": 3.0 - step})
  with open(remote.local(metrics), "rb") as f:
    assert f.read() == b"".join(b'{"step": %d, "loss": %.1f}\n' % (s, 3.0 - s) for s in (1, 2, 3))
  assert [r["step"] for r in rundir.read_metrics(metrics)] == [1, 2, 3]
  with rundir.replacing(rundir.join(run, "plot.png")) as tmp:  # a local temporary file
    assert not rundir.is_remote(tmp) and tmp.endswith(".png")
    with open(tmp, "wb") as f:
      f.write(b"png")
  assert not os.path.exists(tmp)
  assert sorted(os.listdir(remote.local(run))) == ["metrics.jsonl", "plot.png", "summary.json"]


def test_failed_remote_write_keeps_the_old_object(remote):
  path = remote.url("summary.json")
  rundir.write_json_atomic(path, {"status": "preempted"})
  with pytest.raises(RuntimeError, match="half way"):
    with rundir.replacing(path) as tmp:
      with open(tmp, "w") as f:
        f.write('{"status": "compl')
      raise RuntimeError("half way")
  assert rundir.read_json(path) == {"status": "preempted"} and not os.path.exists(tmp)


def test_paths_and_caches_of_a_remote_workdir(remote, tmp_path):
  from moe.data.pipeline import default_data_dir
  workdir = "gs://bucket/runs/big"
  assert rundir.absolute(workdir) == workdir
  assert rundir.absolute("runs/big") == os.path.join(os.getcwd(), "runs", "big")
  assert default_data_dir(workdir) == str(tmp_path / "cache" / "moe" / "tfds")
  assert default_data_dir("runs/big") == os.path.join(os.getcwd(), "runs", ".tfds")
  assert rundir.cache_dir(workdir, ".jax_cache") == str(tmp_path / "cache" / "moe" / "jax_cache")


def test_check_workdir_creates_the_remote_folder(remote):
  from moe.train.checks import check_workdir
  check_workdir("gs://bucket/runs/big")
  assert os.listdir(remote.local("gs://bucket/runs/big")) == []  # the probe is gone
  assert not os.path.exists("gs:")


@pytest.mark.slow
def test_train_and_resume_on_a_remote_workdir(remote, tiny_config):
  """A tiny training stopped half way and resumed: every file of the run is in the bucket (the
  checkpoints written through Orbax's GCS paths and TensorStore), none on local disk."""
  from moe.train import checkpoint as ckpt_lib
  from moe.train import trainer
  cfg = tiny_config({"train.steps": 4, "train.eval_every": 2, "train.checkpoint_every": 2,
                     "train.eval_batches": 1})
  workdir = remote.url("runs", "tiny")
  first = trainer.train_and_evaluate(cfg, workdir, stop_at_step=2)
  assert first["status"] == "preempted" and first["step"] == 2
  assert ckpt_lib.resolve(workdir) == (workdir + "/checkpoints", 2)
  second = trainer.train_and_evaluate(cfg, workdir)
  assert (second["status"], second["step"], second["resumed_from_step"]) == ("completed", 4, 2)
  local = remote.local(workdir)
  names = os.listdir(local)
  assert {"metrics.jsonl", "summary.json", "checkpoints"} <= set(names), names
  assert any(n.startswith("events.out.tfevents") for n in names), names  # TensorBoard
  assert sorted(os.listdir(os.path.join(local, "checkpoints"))) == ["2", "4"]
  assert [r["step"] for r in rundir.read_metrics(workdir + "/metrics.jsonl")] == [2, 4]
  with open(os.path.join(local, "summary.json")) as f:
    assert json.load(f)["status"] == "completed"
  params = ckpt_lib.load_params(workdir)
  assert params["embedding_table"].shape[1] == 16


def test_sweep_and_report_on_a_remote_workdir(remote, tmp_path):
  """The runner (with a stand-in trainer writing through moe.rundir) and the report on a gs://
  workdir; the report is the same bytes as on a local copy of the same files."""
  import ml_collections
  from configs import default
  from moe.sweep import report, runner

  def fake_train(cfg, workdir):
    rundir.append_metrics(rundir.join(workdir, rundir.METRICS_FILE),
                          {"step": 1, "loss": 3.0 - cfg.moe.num_selected})
    summary = {"status": "completed",
               "eval_cross_entropy": 2.0 - 0.1 * cfg.moe.num_selected + 0.01 * cfg.train.seed}
    rundir.write_json_atomic(rundir.join(workdir, rundir.SUMMARY_FILE), summary)
    return summary

  c = default.get_config()
  c.sweep = ml_collections.ConfigDict({
      "title": "tiny", "paper": "nobody", "metric": "eval_cross_entropy",
      "members": [{"moe.num_selected": 1}, {"moe.num_selected": 2}], "seeds": [0, 1],
      "published": [{"claim": "k2 better", "source": "x", "order": [1, 0]}]})
  workdir = remote.url("sweeps", "tiny")
  done = runner.run(c, workdir, train_fn=fake_train, log=lambda _: None)
  assert len(done["trained"]) == 4 and done["report"]["table.md"] == workdir + "/table.md"
  local = remote.local(workdir)
  assert {"sweep.json", "table.md", "table.csv", "plot.png"} <= set(os.listdir(local))
  with open(os.path.join(local, "table.md")) as f:
    assert "tiny" in f.read()
  # The report of the files in the bucket == the report of a local copy of them.
  copy = str(tmp_path / "copy")
  shutil.copytree(local, copy)
  report.write_report(copy, generated="2024-01-02T03:04:05")
  report.write_report(workdir, generated="2024-01-02T03:04:05")
  for name in ("table.md", "table.csv"):
    with open(os.path.join(copy, name)) as a, open(os.path.join(local, name)) as b:
      assert a.read() == b.read(), name


def test_stray_check_finds_a_url_made_local(tmp_path):
  """The check the fixture runs after each test can fail: abspath of a URL is a `gs:` folder."""
  os.makedirs(os.path.join(tmp_path, os.path.relpath(os.path.abspath("gs://bucket/x"), "/")))
  assert stray_gs_entries(tmp_path) == [str(tmp_path / os.path.relpath(os.getcwd(), "/") / "gs:")]


def test_remote_data_dir_is_a_one_line_error(remote, tiny_config):
  """Prepared rows are memory-mapped: a gs:// data.tfds_data_dir is refused before any work."""
  from conftest import one_line_error
  from moe.data import pipeline
  cfg = tiny_config({"data.tfds_data_dir": "gs://bucket/tfds"})
  with one_line_error("data.tfds_data_dir='gs://bucket/tfds'", "local folder"):
    pipeline.make_data(cfg, workdir=remote.url("runs", "x"))
  assert not os.path.exists(remote.local("gs://bucket/tfds"))
