"""Real TFDS datasets without a network: TFDS's mock data through training, a TFRecord-prepared
dataset, the fast offline error, and the one data-folder rule (single runs, sweeps)."""

import os
import socket
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs.default import get_config
from conftest import one_line_error
from test_pipeline import _cfg as pipeline_cfg
from moe.data import pipeline as data_lib
from moe.data import sources

_DOCS = {"train": [f"line {i}: " + "tfrecord text " * (i % 7 + 1) for i in range(40)],
         "validation": [f"held out {i} " * 3 for i in range(12)]}


class TinyTfrecordText(tfds.core.GeneratorBasedBuilder):
  """A registered TFDS text dataset prepared locally (the tests choose its file format)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Test data."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):  # as moe.data.sources.MoeTextFiles: no checksums or files beside it
    from etils import epath
    return epath.Path(__file__)

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
        {"id": tfds.features.Scalar(np.int64), "body": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in _DOCS}

  def _generate_examples(self, split):
    for i, text in enumerate(_DOCS[split]):
      yield i, {"id": i, "body": text}


def _cfg(data_dir, **overrides):
  """test_pipeline's tiny config with rows of 16 tokens."""
  return pipeline_cfg(data_dir, seq_len=16, **overrides)


@pytest.fixture
def no_network(monkeypatch):
  """Every HTTP(S) download goes through a proxy on a closed local port (refused at once), as
  offline, the same on a machine that has a network."""
  for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
    monkeypatch.setenv(var, "http://127.0.0.1:9")
  for var in ("no_proxy", "NO_PROXY"):
    monkeypatch.delenv(var, raising=False)


# ----------------------------------------------------------------------------- TFRecord


def test_tfrecord_prepared_dataset_is_read_in_order_and_packed(tmp_path, monkeypatch):
  data_dir = tmp_path / "tfds"
  tfds.builder("tiny_tfrecord_text", data_dir=str(data_dir)).download_and_prepare(
      file_format="tfrecord")
  prepared = tfds.builder("tiny_tfrecord_text", data_dir=str(data_dir))
  with pytest.raises(NotImplementedError):  # what grain's random access would have met
    prepared.as_data_source(split="train")
  monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare",
                      lambda *a, **k: pytest.fail("a prepared dataset was prepared again"))
  cfg = _cfg(data_dir, data__name="tiny_tfrecord_text")
  d = data_lib.make_data(cfg, workdir=str(tmp_path / "run"))
  info = d.info
  assert info["file_format"] == "tfrecord" and info["text_field"] == "body"
  assert info["splits_used"] == {"train": "train", "validation": "validation"}
  assert (info["train_documents"], info["validation_documents"]) == (40, 12)
  # Every document once, in the files' (TFDS-shuffled, fixed) order; n bytes -> n + 1 predictions.
  source = sources.load_source("tiny_tfrecord_text", text_dir="", validation_fraction=0.05,
                               data_dir=str(data_dir))
  for split, docs in _DOCS.items():
    read = list(source.documents(split))
    assert sorted(read) == sorted(docs) and read == list(source.documents(split))
    assert info[f"{split}_loss_tokens"] == sum(len(t.encode()) + 1 for t in docs)
  b = next(d.train_iter)
  assert b["inputs"].shape == (4, 16) and b["loss_mask"].sum() > 0
  assert len(d.eval_batches()) == 2
  text = d.tokenizer.decode(d.eval_batches()[0]["inputs"][0])
  assert text and any(text in doc or doc in text for doc in _DOCS["validation"]), text


# ----------------------------------------------------------------------------- TFDS mock data


def _lm1b_metadata(folder) -> str:
  """lm1b's dataset_info.json with train/test splits in array_record, written under `folder`
  (what `tfds.testing.mock_data(policy=USE_FILES)` reads instead of a prepared copy)."""
  builder = tfds.builder("lm1b", data_dir=str(folder))
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=None)
      for s, n in (("train", 48), ("test", 48))]))
  builder.info.set_file_format("array_record", override=True)
  os.makedirs(builder.data_dir, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  return str(folder)


@pytest.mark.slow
def test_lm1b_with_mock_data_trains_evaluates_and_resumes(tiny_config, tmp_path, no_network):
  from moe.train import trainer as train
  meta = _lm1b_metadata(tmp_path / "meta")
  cfg = lambda: tiny_config({"data.name": "lm1b", "data.tfds_data_dir": str(tmp_path / "tfds"),
                             "train.steps": 6, "train.checkpoint_every": 3})
  workdir = str(tmp_path / "run")
  with tfds.testing.mock_data(num_examples=48, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=meta):
    first = train.train_and_evaluate(cfg(), workdir, stop_at_step=3)
    assert first["status"] == "preempted" and first["step"] == 3
    second = train.train_and_evaluate(cfg(), workdir)
    # --mode=eval --eval_split=<a split the run did not pack>: lm1b's "test" is the run's
    # validation split, read, packed and sampled by the same rule, so the numbers are the same.
    from moe.train import evaluate
    test = evaluate.run(cfg(), workdir, split="test")
    with one_line_error("--eval_split='nope'", "'train'", "'test'"):
      evaluate.run(cfg(), workdir, split="nope")
  assert second["status"] == "completed" and second["resumed_from_step"] == 3
  assert test["step"] == 6 and test["text"] == {"split": "test"}
  assert test["eval_cross_entropy"] == pytest.approx(second["eval_cross_entropy"], rel=1e-6)
  assert test["eval_bits_per_byte"] == pytest.approx(second["eval_bits_per_byte"], rel=1e-6)
  assert np.isfinite(second["eval_loss"]) and np.isfinite(first["eval_loss"])
  data = second["data"]
  assert data["tfds_name"].startswith("lm1b/") and data["text_field"] == "text"
  assert data["splits_used"] == {"train": "train", "validation": "test"}
  assert data["train_documents"] == 48 and data["train_rows"] > 0
  assert os.listdir(tmp_path / "tfds" / "moe_packed") == [data["packed_dir"].split("/")[-2]]


# ----------------------------------------------------------------------------- offline


def test_reachable_answers_within_its_timeout():
  with socket.socket() as server:
    server.bind(("127.0.0.1", 0))
    server.listen()
    start = time.monotonic()
    assert sources.reachable([("127.0.0.1", server.getsockname()[1])], 5.0)
    assert sources.reachable([("no-such-host.invalid", 80),
                              ("127.0.0.1", server.getsockname()[1])], 5.0)
    assert time.monotonic() - start < 2.0
  start = time.monotonic()
  assert not sources.reachable([("127.0.0.1", 9), ("no-such-host.invalid", 80)], 5.0)
  assert time.monotonic() - start < 2.0  # every try failed: no waiting for the deadline
  assert not sources.reachable([], 5.0)


def test_offline_unprepared_tfds_dataset_fails_in_seconds(tmp_path, no_network):
  cfg = _cfg(tmp_path / "tfds", data__name="lm1b")
  start = time.monotonic()
  with one_line_error("data.name='lm1b'", "data.tfds_data_dir", "www.statmt.org",
                      "download_and_prepare") as e:
    data_lib.make_data(cfg, workdir=str(tmp_path / "run"))
  seconds = time.monotonic() - start
  assert seconds < 5.0, f"{seconds:.1f} s: {e.value}"  # urllib3's retries took 3.5 minutes


def test_unknown_tfds_name_and_config_are_one_line_errors(tmp_path):
  with one_line_error("data.name='no_such_dataset_xyz'", "pystdlib"):
    data_lib.make_data(_cfg(tmp_path, data__name="no_such_dataset_xyz"), workdir=str(tmp_path))
  with one_line_error("data.name='lm1b/no_such_config'"):
    data_lib.make_data(_cfg(tmp_path, data__name="lm1b/no_such_config"), workdir=str(tmp_path))


# ----------------------------------------------------------------------------- the data folder


def test_data_dir_rule(tmp_path, monkeypatch):
  monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  run = str(tmp_path / "runs" / "default")
  assert data_lib.data_dir_for("", run) == str(tmp_path / "runs" / ".tfds")
  assert data_lib.data_dir_for(str(tmp_path / "x"), run) == str(tmp_path / "x")
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  assert data_lib.data_dir_for("", run) == str(tmp_path / "env")
  assert data_lib.data_dir_for(str(tmp_path / "x"), run) == str(tmp_path / "x")


def test_make_data_prepares_in_tfds_data_dir_from_the_environment(tmp_path, monkeypatch,
                                                                  textdir):
  monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  cfg = _cfg("", data__name="textdir", data__text_dir=textdir, data__validation_fraction=0.25)
  d = data_lib.make_data(cfg, workdir=str(tmp_path / "runs" / "a"))
  assert d.info["data_dir"] == str(tmp_path / "env")
  assert d.info["packed_dir"].startswith(str(tmp_path / "env"))
  assert not os.path.exists(tmp_path / "runs" / ".tfds")


@pytest.mark.parametrize("env", [False, True])
def test_sweep_members_use_the_folder_of_a_single_run(tmp_path, monkeypatch, env):
  from moe.sweep import spec
  if env:
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "env"))
  else:
    monkeypatch.delenv("TFDS_DATA_DIR", raising=False)
  c = get_config()
  c.sweep = ml_collections.ConfigDict()
  c.sweep.title, c.sweep.paper, c.sweep.metric = "t", "p", "eval_cross_entropy"
  c.sweep.members = [{"moe.num_selected": 1}, {"moe.num_selected": 2}]
  c.sweep.seeds = [0]
  sweep_dir = str(tmp_path / "runs" / "sweep")
  s = spec.expand(c, sweep_dir)
  single = data_lib.data_dir_for("", sweep_dir)
  assert single == str(tmp_path / ("env" if env else "runs/.tfds"))
  assert {r.cfg.data.tfds_data_dir for r in s.runs} == {single}
  c.data.tfds_data_dir = str(tmp_path / "mine")  # set: used as it is
  assert {r.cfg.data.tfds_data_dir for r in spec.expand(c, sweep_dir).runs} == {
      str(tmp_path / "mine")}
