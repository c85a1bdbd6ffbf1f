"""The run directory contract: file names, byte formats, atomic replacement, tolerant reads."""

import ast
import errno
import json
import math
import os
import sys

import pytest

from moe import rundir


class Unserializable:
  def __repr__(self):
    return "<unserializable>"


class ReprRaises:
  def __repr__(self):
    raise RuntimeError("repr failed")


def read_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def test_file_names():
  assert (rundir.METRICS_FILE, rundir.SUMMARY_FILE, rundir.CONFIG_FILE) == (
      "metrics.jsonl", "summary.json", "config.json")
  assert (rundir.CHECKPOINTS_DIR, rundir.HF_TOKENIZER_DIR) == ("checkpoints", "hf_tokenizer")
  assert (rundir.RUN_INFO_FILE, rundir.SWEEP_FILE) == ("sweep_run.json", "sweep.json")
  assert rundir.eval_file("cf2") == "eval_cf2.json"


# ----------------------------------------------------------------------------- byte formats


def test_sweep_files_format(tmp_path):
  """sweep.json, config.json, sweep_run.json, eval_<name>.json: indent 1, insertion order,
  repr for what JSON cannot hold, no trailing newline."""
  path = str(tmp_path / rundir.SWEEP_FILE)
  obj = {"b": 1, "a": [1, 2.5], "x": Unserializable(), "s": "é"}
  rundir.write_json_atomic(path, obj)
  assert read_bytes(path) == (b'{\n "b": 1,\n "a": [\n  1,\n  2.5\n ],\n'
                              b' "x": "<unserializable>",\n "s": "\\u00e9"\n}')
  with open(tmp_path / "reference", "w") as f:  # the runner's writer before moe.rundir
    json.dump(obj, f, indent=1, sort_keys=False, default=repr)
  assert read_bytes(path) == read_bytes(tmp_path / "reference")


def test_summary_format(tmp_path):
  """The trainer's summary.json: indent 2, repr for what JSON cannot hold."""
  path = str(tmp_path / rundir.SUMMARY_FILE)
  obj = {"status": "completed", "eval_loss": 2.25, "mesh": {"data": 1}, "x": Unserializable()}
  rundir.write_json_atomic(path, obj, indent=2)
  assert read_bytes(path) == (b'{\n  "status": "completed",\n  "eval_loss": 2.25,\n'
                              b'  "mesh": {\n    "data": 1\n  },\n  "x": "<unserializable>"\n}')


def test_converted_config_format(tmp_path):
  """moe.convert's config.json: indent 1, and what JSON cannot hold is an error."""
  path = str(tmp_path / rundir.CONFIG_FILE)
  rundir.write_json_atomic(path, {"model": {"num_layers": 2}}, default=None)
  assert read_bytes(path) == b'{\n "model": {\n  "num_layers": 2\n }\n}'
  with pytest.raises(TypeError):
    rundir.write_json_atomic(path, {"x": Unserializable()}, default=None)
  assert read_bytes(path) == b'{\n "model": {\n  "num_layers": 2\n }\n}'


def test_metrics_format(tmp_path):
  path = str(tmp_path / rundir.METRICS_FILE)
  rundir.append_metrics(path, {"step": 1, "loss": 2.5})
  rundir.append_metrics(path, {"step": 2, "moe/layer_0/load": [0.5, 0.5]})
  assert read_bytes(path) == (b'{"step": 1, "loss": 2.5}\n'
                              b'{"step": 2, "moe/layer_0/load": [0.5, 0.5]}\n')


# ----------------------------------------------------------------------------- atomic writes


def test_round_trip(tmp_path):
  path = str(tmp_path / "x.json")
  obj = {"status": "completed", "values": [1, 2.5, None, True], "nested": {"a": "b"}}
  rundir.write_json_atomic(path, obj)
  assert rundir.read_json(path) == obj
  rundir.write_json_atomic(path, {"replaced": 1}, indent=2)
  assert rundir.read_json(path) == {"replaced": 1}


def test_failed_encoding_leaves_the_old_file(tmp_path):
  path = str(tmp_path / rundir.SUMMARY_FILE)
  rundir.write_json_atomic(path, {"status": "preempted"})
  before = read_bytes(path)
  with pytest.raises(RuntimeError, match="repr failed"):
    rundir.write_json_atomic(path, {"status": "completed", "x": ReprRaises()})
  assert read_bytes(path) == before
  assert os.listdir(tmp_path) == [rundir.SUMMARY_FILE]


def test_failed_write_midway_leaves_no_partial_file(tmp_path, monkeypatch):
  """A disk that fills up half way through the temporary file: the target keeps its old bytes
  and the temporary file is removed."""
  path = str(tmp_path / rundir.SUMMARY_FILE)
  rundir.write_json_atomic(path, {"status": "preempted"})
  before = read_bytes(path)

  class HalfWriter:
    def __init__(self, f):
      self.f = f

    def __enter__(self):
      return self

    def __exit__(self, *exc):
      self.f.close()

    def write(self, text):
      self.f.write(text[:len(text) // 2])
      self.f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(rundir, "open", lambda p, mode="r", **kw: HalfWriter(open(p, mode, **kw)),
                      raising=False)
  with pytest.raises(OSError, match="No space left"):
    rundir.write_json_atomic(path, {"status": "completed", "eval_loss": 1.0})
  monkeypatch.delattr(rundir, "open")
  assert read_bytes(path) == before
  assert os.listdir(tmp_path) == [rundir.SUMMARY_FILE]


def test_failed_replace_leaves_no_temporary_file(tmp_path, monkeypatch):
  path = str(tmp_path / rundir.SWEEP_FILE)

  def refuse(src, dst):
    raise PermissionError(errno.EACCES, "read-only", dst)

  monkeypatch.setattr(os, "replace", refuse)
  with pytest.raises(PermissionError):
    rundir.write_json_atomic(path, {"a": 1})
  assert os.listdir(tmp_path) == []


def test_replacing_keeps_the_extension(tmp_path):
  """matplotlib picks the image format from the name: the temporary file keeps `.png`."""
  path = str(tmp_path / "plot.png")
  with rundir.replacing(path) as tmp:
    assert os.path.dirname(tmp) == str(tmp_path) and tmp.endswith(".png") and tmp != path
    with open(tmp, "wb") as f:
      f.write(b"png")
  assert read_bytes(path) == b"png" and os.listdir(tmp_path) == ["plot.png"]


def test_write_text_atomic(tmp_path):
  path = str(tmp_path / "table.md")
  rundir.write_text_atomic(path, "| a | b |\n")
  rundir.write_text_atomic(path, "| c |\n")
  assert read_bytes(path) == b"| c |\n" and os.listdir(tmp_path) == ["table.md"]


# ----------------------------------------------------------------------------- reads


def test_read_json_missing_or_garbled_is_none(tmp_path):
  assert rundir.read_json(str(tmp_path / "missing.json")) is None
  (tmp_path / "torn.json").write_text('{"status": "compl')
  assert rundir.read_json(str(tmp_path / "torn.json")) is None
  (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00")
  assert rundir.read_json(str(tmp_path / "binary.json")) is None
  assert rundir.read_json(str(tmp_path)) is None  # a directory
  (tmp_path / "list.json").write_text("[1, 2]")
  assert rundir.read_json(str(tmp_path / "list.json")) == [1, 2]  # any JSON value


def test_read_metrics_skips_torn_and_non_object_lines(tmp_path):
  path = tmp_path / rundir.METRICS_FILE
  path.write_text('{"step": 1, "loss": 3.0}\n[1, 2]\n\n{"step": 2, "loss": 2.0}\n{"step": 3, "lo')
  assert rundir.read_metrics(str(path)) == [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}]
  assert rundir.read_metrics(str(tmp_path / "missing.jsonl")) == []


def test_rewritten_metrics_keep_their_bytes(tmp_path):
  """Resuming rewrites metrics.jsonl from its parsed records: what `append_metrics` wrote comes
  back byte for byte (floats, non-finite values, unicode, nesting)."""
  path = str(tmp_path / rundir.METRICS_FILE)
  records = [{"step": 1, "loss": 0.1, "lr": 1e-05, "big": 1e16, "neg": -0.0, "n": 12345678901234},
             {"step": 2, "loss": math.inf, "ce": -math.inf, "x": math.nan, "k\u00e9": "\u2014"},
             {"step": 3, "moe/layer_0/load": [0.333333, 0.666667], "ok": True, "none": None}]
  for r in records:
    rundir.append_metrics(path, r)
  before = read_bytes(path)
  rundir.write_metrics(path, rundir.read_metrics(path))
  assert read_bytes(path) == before
  rundir.write_metrics(path, [])
  assert read_bytes(path) == b""


def test_imports_only_the_standard_library_and_epath():
  with open(rundir.__file__) as f:
    tree = ast.parse(f.read())
  names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
  names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
  assert {n.split(".")[0] for n in names} - {"etils"} <= set(sys.stdlib_module_names), names


def test_copy_file_replaces_the_target_whole(tmp_path):
  src, dst = tmp_path / "tokenizer.json", tmp_path / "out" / "tokenizer.json"
  src.write_bytes(b'{"v": "\xc3\xa9"}' * 1000)
  dst.parent.mkdir()
  dst.write_bytes(b"old")
  rundir.copy_file(str(src), str(dst))
  assert read_bytes(dst) == read_bytes(src) and os.listdir(dst.parent) == ["tokenizer.json"]


def test_cache_dir_and_absolute_of_local_and_remote_paths(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert rundir.cache_dir("runs/a", ".tfds") == str(tmp_path / "runs" / ".tfds")
  assert rundir.cache_dir("gs://b/runs/a", ".tfds") == str(tmp_path / "xdg" / "moe" / "tfds")
  assert rundir.absolute("gs://b/runs/a") == "gs://b/runs/a"
  assert rundir.absolute("runs/a") == str(tmp_path / "runs" / "a")
  assert rundir.join("gs://b/runs", "a", "summary.json") == "gs://b/runs/a/summary.json"
  assert rundir.is_remote("gs://b") and not rundir.is_remote("/tmp/gs/b")
  assert not os.path.exists(tmp_path / "gs:")
