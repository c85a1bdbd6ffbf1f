"""The run directory contract: the names of a run's files, and how they are written and read.

A training run's workdir (`launch.py --workdir`, or `<sweep workdir>/<member>/seed<k>/`) holds:

- `metrics.jsonl`: one JSON object per logged step (`moe.train.metrics`), appended as training
  goes; a run killed mid-write may leave a torn last line, which readers skip;
- `summary.json`: status and final metrics, written by the trainer at the end of a run (by the
  sweep runner instead when training raised);
- `config.json`: the resolved config of the run (`moe.runconfig`: written when training starts,
  read back when no `--config` is given; `moe.convert` writes the `model` and `moe` groups of a
  converted checkpoint);
- `checkpoints/<step>/`: the checkpoints (`moe.train.checkpoint`);
- `load.png`: each MoE layer's load per expert over training (`moe.train.load_plot`), and
  `profile/`: the `jax.profiler` trace of `train.profile_steps` (TensorBoard's profile plugin);
- `devices.json`: the machine each stretch of the run computed on (device kind and count,
  processes, CPU cores), which sets the bits (`moe.train.machine`);
- `.lock`: held (`fcntl.flock`) by the training run using the workdir (`moe.train.lock`);
- `hf_tokenizer/`: the tokenizer a conversion left beside its checkpoint (`moe.convert`), which
  `moe.inference.generate` prefers to the data config's;
- `eval_<what>_step<N>.json`: `launch.py --mode=eval`'s result for checkpoint N;
- `analysis/`: `launch.py --mode=analyze`'s routing analysis (`moe.inference.analysis`):
  `report.html`, `analysis.json` and the figures `ANALYSIS_FIGURES`;
- in a sweep, `sweep_run.json` (machine, wall time, error: the runner) and `eval_<name>.json`
  (the extra evaluations); the sweep's own workdir holds `sweep.json`, the expanded sweep.

Paths: every function here takes a `str` or an `etils.epath.Path`, local or remote (`gs://...`,
any scheme epath knows), and reads and writes through `etils.epath`. `is_remote` tells them apart;
`absolute` makes a local path absolute and leaves a remote one as it is (never `./gs:/...`).

Files other processes may read while they change (JSON files, the report's tables) are replaced
atomically (`replacing`):

- local: written to a temporary file beside them, then renamed over them (`os.replace`);
- remote: object stores have no rename, but an object is replaced atomically by one upload, so
  the new bytes are written to a local temporary file first and then uploaded in a single write;
  a failure before the upload leaves the old object as it was.

`metrics.jsonl` on a remote path cannot be appended to (objects are immutable): `append_metrics`
then reads the records, adds one and rewrites the whole object in one write. That costs one
download and one upload of the file per record (records come every `train.log_every` steps and
are a few KB), and a remote metrics.jsonl never has a torn line.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
DEVICES_FILE = "devices.json"
LOCK_FILE = ".lock"
HF_TOKENIZER_DIR = "hf_tokenizer"
LOAD_PLOT_FILE = "load.png"
PROFILE_DIR = "profile"
RUN_INFO_FILE = "sweep_run.json"
SWEEP_FILE = "sweep.json"
ANALYSIS_DIR = "analysis"
ANALYSIS_HTML = "report.html"
ANALYSIS_JSON = "analysis.json"
ANALYSIS_FIGURES = {"load": "load.png", "vocabulary": "vocabulary.png",
                    "domains": "domains.png", "coactivation": "coactivation.png",
                    "saturation": "saturation.png"}

PathLike = Union[str, os.PathLike]


def eval_file(name: str) -> str:
  """The file of a sweep run's extra evaluation `name`."""
  return f"eval_{name}.json"


def eval_result_file(what: str, step: int) -> str:
  """The file `launch.py --mode=eval` writes: the evaluation of `what` (validation, train,
  file-<name>) at checkpoint `step`."""
  return eval_file(f"{what}_step{step}")


# ----------------------------------------------------------------------------- paths


def is_remote(path: PathLike) -> bool:
  """True for a URI such as `gs://bucket/run` (anything with a `scheme://`)."""
  return "://" in os.fspath(path)


def absolute(path: PathLike) -> str:
  """A local path made absolute; a remote one unchanged (os.path.abspath would make
  `gs://b/x` into `<cwd>/gs:/b/x`)."""
  path = os.fspath(path)
  return path if is_remote(path) else os.path.abspath(path)


def join(path: PathLike, *names: str) -> str:
  """`path/names...` as a string, for local and remote paths alike."""
  return os.fspath(epath.Path(path).joinpath(*names))


def cache_dir(workdir: PathLike, name: str) -> str:
  """A cache shared by the runs beside `workdir` (prepared data, compiled programs).

  Local workdir: `<workdir>/../<name>`. Remote workdir: a local folder,
  `$XDG_CACHE_HOME/moe/<name>` (default `~/.cache/moe/<name>`), because the caches are read by
  memory-mapping and by many small reads that want a local disk."""
  if not is_remote(workdir):
    return os.path.join(os.path.dirname(absolute(workdir)), name)
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "moe", name.lstrip("."))


def makedirs(path: PathLike) -> None:
  epath.Path(path).mkdir(parents=True, exist_ok=True)


def exists(path: PathLike) -> bool:
  return epath.Path(path).exists()


def isdir(path: PathLike) -> bool:
  return epath.Path(path).is_dir()


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def replacing(path: PathLike) -> Iterator[str]:
  """Yields a local temporary path (same extension as `path`) to write; on success it replaces
  `path` atomically (module docstring), on an exception it is removed and `path` is left as it
  was. Local: the temporary file lies beside `path`; remote: in the local temporary folder."""
  path = os.fspath(path)
  root, ext = os.path.splitext(path)
  if is_remote(path):
    fd, tmp = tempfile.mkstemp(prefix="moe-upload-", suffix=ext)
    os.close(fd)
  else:
    tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    if is_remote(path):
      # One upload, streamed from the finished local file: the object is replaced as a whole
      # when the upload completes.
      with open(tmp, "rb") as src, epath.Path(path).open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 24)
      os.remove(tmp)
    else:
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text_atomic(path: PathLike, text: str) -> None:
  """`text` as UTF-8, replacing `path` atomically."""
  with replacing(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(text)


def write_json_atomic(path: PathLike, obj, *, indent: int = 1, default=repr) -> None:
  """`obj` as JSON (keys in insertion order, no trailing newline), replacing `path` atomically.

  `default=repr` writes what JSON cannot hold as its repr; `default=None` raises instead."""
  write_text_atomic(path, json.dumps(obj, indent=indent, default=default))


def copy_file(src: PathLike, dst: PathLike) -> None:
  """Copies the file `src` to the file `dst` (either local or remote), replacing it atomically."""
  with replacing(dst) as tmp, epath.Path(src).open("rb") as f, open(tmp, "wb") as out:
    shutil.copyfileobj(f, out, 1 << 24)


def read_text(path: PathLike) -> str:
  """The UTF-8 text of `path` (raises OSError / ValueError like `open`)."""
  with epath.Path(path).open("r", encoding="utf-8") as f:
    return f.read()


def read_json(path: PathLike):
  """The JSON value in `path`; None when it is missing, unreadable or not valid JSON."""
  try:
    return json.loads(read_text(path))
  except (OSError, ValueError):
    return None


def load_json(path: PathLike, what: str):
  """The JSON value in `path`; a missing or invalid file is a one-line ValueError naming `what`
  (for files a user points at, where None would hide the mistake)."""
  try:
    return json.loads(read_text(path))
  except OSError as e:
    raise ValueError(f"{what} {os.fspath(path)} cannot be read ({e.strerror or e})") from None
  except ValueError as e:
    raise ValueError(f"{what} {os.fspath(path)} is not valid JSON ({e})") from None


# ----------------------------------------------------------------------------- metrics.jsonl


def append_metrics(path: PathLike, record: dict) -> None:
  """Appends one record as a line of `path` (remote: rewrites the object, module docstring)."""
  if is_remote(path):
    write_metrics(path, read_metrics(path) + [record])
    return
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(path: PathLike) -> list[dict]:
  """The records of `path`; lines that are no JSON object (a torn last line) are skipped, and a
  missing file has none."""
  out = []
  try:
    text = read_text(path)
  except (OSError, ValueError):
    return out
  for line in text.split("\n"):
    try:
      rec = json.loads(line)
    except ValueError:
      continue
    if isinstance(rec, dict):
      out.append(rec)
  return out


def write_metrics(path: PathLike, records: list[dict]) -> None:
  """Replaces `path` atomically by `records`, one line each (as `append_metrics` writes them)."""
  write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
