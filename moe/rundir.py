"""The run directory contract: the names of a run's files, and how they are written and read.

A training run's workdir (`launch.py --workdir`, or `<sweep workdir>/<member>/seed<k>/`) holds:

- `metrics.jsonl`: one JSON object per logged step (`moe.train.metrics`), appended as training
  goes; a run killed mid-write may leave a torn last line, which readers skip;
- `summary.json`: status and final metrics, written by the trainer at the end of a run (by the
  sweep runner instead when training raised);
- `config.json`: the config of the run (the sweep runner; `moe.convert` writes the `model` and
  `moe` groups of a converted checkpoint);
- `checkpoints/<step>/`: the checkpoints (`moe.train.checkpoint`);
- `hf_tokenizer/`: the tokenizer a conversion left beside its checkpoint (`moe.convert`), which
  `moe.inference.generate` prefers to the data config's;
- in a sweep, `sweep_run.json` (machine, wall time, error: the runner) and `eval_<name>.json`
  (the extra evaluations); the sweep's own workdir holds `sweep.json`, the expanded sweep.

Files other processes may read while they change (JSON files, the report's tables) are replaced
atomically: written to a temporary file beside them, then renamed over them. Local paths only,
standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Iterator

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
CHECKPOINTS_DIR = "checkpoints"
HF_TOKENIZER_DIR = "hf_tokenizer"
RUN_INFO_FILE = "sweep_run.json"
SWEEP_FILE = "sweep.json"


def eval_file(name: str) -> str:
  """The file of a sweep run's extra evaluation `name`."""
  return f"eval_{name}.json"


# ----------------------------------------------------------------------------- atomic writes


@contextlib.contextmanager
def replacing(path: str) -> Iterator[str]:
  """Yields a temporary path beside `path` (same extension) to write; on success it replaces
  `path`, on an exception it is removed and `path` is left as it was."""
  root, ext = os.path.splitext(path)
  tmp = f"{root}.tmp{os.getpid()}{ext}"
  try:
    yield tmp
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


def write_text_atomic(path: str, text: str) -> None:
  with replacing(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json_atomic(path: str, obj, *, indent: int = 1, default=repr) -> None:
  """`obj` as JSON (keys in insertion order, no trailing newline), replacing `path` atomically.

  `default=repr` writes what JSON cannot hold as its repr; `default=None` raises instead."""
  write_text_atomic(path, json.dumps(obj, indent=indent, default=default))


def read_json(path: str):
  """The JSON value in `path`; None when it is missing, unreadable or not valid JSON."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ----------------------------------------------------------------------------- metrics.jsonl


def append_metrics(path: str, record: dict) -> None:
  """Appends one record as a line of `path`."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")


def read_metrics(path: str) -> list[dict]:
  """The records of `path`; lines that are no JSON object (a torn last line) are skipped, and a
  missing file has none."""
  out = []
  try:
    with open(path) as f:
      for line in f:
        try:
          rec = json.loads(line)
        except ValueError:
          continue
        if isinstance(rec, dict):
          out.append(rec)
  except OSError:
    pass
  return out


def write_metrics(path: str, records: list[dict]) -> None:
  """Replaces `path` atomically by `records`, one line each (as `append_metrics` writes them)."""
  write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
