"""Shared fixtures: a tiny text folder and a tiny config built on configs/default.py."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import random
import sys
import tempfile

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
for _path in (REPO, TESTS):  # the package, and tiny_models / conftest for tests in subfolders
  if _path not in sys.path:
    sys.path.insert(0, _path)

from moe.errors import ConfigError  # noqa: E402  (after REPO is on sys.path; imports no jax)


def pytest_configure(config):
  """One XLA compilation cache per test session (MOE_TEST_JAX_CACHE to reuse one across
  sessions): the many tiny training runs share programs, and subprocesses inherit it."""
  del config
  path = os.environ.get("MOE_TEST_JAX_CACHE") or tempfile.mkdtemp(prefix="moe-jax-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
  import jax
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)


def load_config_file(name: str = "default"):
  """`configs/<name>.py`'s get_config() (the same file launch.py reads)."""
  path = os.path.join(REPO, "configs", f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@contextlib.contextmanager
def one_line_error(*needles, exc=ConfigError, match=None):
  """`pytest.raises(exc, match=match)` whose message is then one line containing each needle;
  yields the ExceptionInfo (`str(e.value)` is the message)."""
  with pytest.raises(exc, match=match) as e:
    yield e
  msg = str(e.value)
  assert "\n" not in msg, msg
  for n in needles:
    assert n in msg, (n, msg)


TIMING_KEYS = ("tokens_per_s", "steps_per_s", "tflops_per_device", "mfu")


def read_metrics(workdir, drop_timing: bool = False) -> list[dict]:
  """Every record of `workdir`/metrics.jsonl (a torn line fails the test); with drop_timing,
  without the machine-dependent TIMING_KEYS (throughput, FLOP/s, MFU)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  if drop_timing:
    records = [{k: v for k, v in r.items() if k not in TIMING_KEYS}
               for r in records]
  return records


def run_smoke_parent(table_module, tmp_path) -> None:
  """Trains a parent table's `:parent` command in smoke mode into tmp_path/parent (data: the
  standard library's tests, any text keeps it short; TFDS folder tmp_path/tfds), asserting that
  no run failed. The parent of a member / seed is tmp_path/parent/<member>/seed<n>."""
  from moe.sweep import runner as sw  # pylint: disable=import-outside-toplevel
  from moe.sweep import spec  # pylint: disable=import-outside-toplevel
  parent_cfg = spec.smoke_config(table_module.get_config("parent"))
  parent_cfg.data.tfds_data_dir = str(tmp_path / "tfds")
  parent_cfg.data.name = "pystdlib_test"
  out = sw.run(parent_cfg, str(tmp_path / "parent"), log=lambda _: None)
  assert not out["failed"]


def write_textdir(root: str, num_files: int = 24, seed: int = 0) -> str:
  """A folder of small Python-like text files (a few KB in all), deterministic."""
  rng = random.Random(seed)
  words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else",
           "print", "range", "None", "True", "items", "data", "x", "y", "len", "list"]
  os.makedirs(root, exist_ok=True)
  for i in range(num_files):
    lines = []
    for j in range(rng.randint(6, 14)):
      n = rng.randint(2, 7)
      lines.append("    " * rng.randint(0, 2) + " ".join(rng.choice(words) for _ in range(n)))
    with open(os.path.join(root, f"file_{i:03d}.py"), "w") as f:
      f.write(f"# module {i}\n" + "\n".join(lines) + "\n")
  return root


@pytest.fixture(scope="session")
def textdir(tmp_path_factory) -> str:
  return write_textdir(str(tmp_path_factory.mktemp("textdir")))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory) -> str:
  """One prepared-data cache for the whole session (datasets are fingerprinted by content)."""
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_overrides(textdir: str, tfds_dir: str) -> dict:
  """D=16, 2 layers, E=4, K=2, L=16, batch 4 on a tiny text folder."""
  return {
      "model.d_model": 16, "model.num_layers": 2, "model.num_heads": 2, "model.num_kv_heads": 2,
      "model.head_dim": 8, "model.d_ff": 32, "model.max_len": 32,
      "moe.num_experts": 4, "moe.num_selected": 2, "moe.expert_hidden": 16,
      "train.steps": 6, "train.batch_size": 4, "train.warmup_steps": 2,
      "train.learning_rate": 1e-2, "train.log_every": 2, "train.eval_every": 3,
      "train.eval_batches": 2, "train.checkpoint_every": 3,
      "data.name": "textdir", "data.text_dir": textdir, "data.tfds_data_dir": tfds_dir,
      "data.seq_len": 16, "data.validation_fraction": 0.25,
  }


def apply_overrides(cfg, overrides: dict):
  for path, value in overrides.items():
    node = cfg
    *groups, leaf = path.split(".")
    for g in groups:
      node = node[g]
    node[leaf] = value
  return cfg


@pytest.fixture
def tiny_config(textdir, tfds_dir):
  """Factory: tiny_config(**{"train.steps": 4, ...}) -> a fresh ConfigDict."""

  def make(overrides: dict | None = None):
    cfg = load_config_file("default")
    apply_overrides(cfg, tiny_overrides(textdir, tfds_dir))
    return apply_overrides(cfg, overrides or {})

  return make


@pytest.fixture
def tiny_flags(textdir, tfds_dir):
  """The tiny config as `--config.x.y=v` flags for launch.py subprocesses."""

  def make(overrides: dict | None = None) -> list[str]:
    d = {**tiny_overrides(textdir, tfds_dir), **(overrides or {})}
    return [f"--config.{k}={v}" for k, v in d.items()]

  return make


@pytest.fixture
def remote_fs(tmp_path_factory):
  """A fake `gs://bucket` kept in a local temporary folder (tests/remote_fs.py): epath, Orbax's
  TensorStore writes and CLU's TensorBoard writers all reach it. Yields a `RemoteFs`:
  `remote_fs.url("run")` -> "gs://bucket/run", `remote_fs.local(url)` -> where it lives."""
  import remote_fs as remote_fs_lib
  with remote_fs_lib.mock_gcs(str(tmp_path_factory.mktemp("gcs"))) as fs:
    yield fs
