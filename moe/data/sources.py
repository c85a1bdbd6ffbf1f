"""Text sources: the built-in TFDS datasets over local files, and real TFDS text datasets.

Built-in (`data.name`), each with `train` / `validation` splits:
  pystdlib       the running interpreter's standard library `*.py` files outside its `test`
                 package and outside any `test`/`tests` folder (pretraining);
  pystdlib_test  the `*.py` files of the standard library's `test` package (fine-tuning);
  textdir        every UTF-8 text file under `data.text_dir` (hidden files and folders skipped).
`site-packages` / `dist-packages` are never read. A file goes to `validation` when the hash of its
relative path falls below `data.validation_fraction`, so the split is disjoint and stable by
path. Files that are not valid UTF-8 are skipped and counted in the metadata.

They are one `tfds.core.GeneratorBasedBuilder` (`moe_text_files`) whose builder config is named
after the source and a fingerprint of its file listing (paths, sizes, mtimes), the split fraction
and the Python version, so a changed folder is prepared afresh and an unchanged one is reused. It is
prepared with `file_format="array_record"` and read back by random access (`as_data_source`).

Any other name must be a dataset `tfds.list_builders()` knows; its first text feature is used.
A copy already prepared in the data dir is used as it is: array_record by random access, TFRecord
(the format of most prepared copies, which grain cannot read by index) by reading each split once
in order, which is all packing needs (`moe.data.pipeline` packs a split once into its own rows).
Otherwise it is prepared there (array_record), which downloads it: first its download hosts
(the URLs of the builder's checksums) are tried for at most `NETWORK_CHECK_S` seconds, so an
offline machine gets a one-line error at once instead of urllib3's minutes of retries.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import logging
import os
import platform
import queue
import socket
import sysconfig
import threading
import time
from typing import Iterator
import urllib.parse
import urllib.request

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from etils import epath  # pylint: disable=g-import-not-at-top
import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

from moe.errors import ConfigError

BUILTIN = ("pystdlib", "pystdlib_test", "textdir")
SPLITS = ("train", "validation")
SKIP_DIRS = ("site-packages", "dist-packages", "__pycache__")
# Real TFDS datasets can be huge: at most this many characters of a split are read and packed.
MAX_SPLIT_CHARS = {"train": 256_000_000, "validation": 8_000_000}
# How long an unprepared TFDS dataset's download hosts are tried before giving up (no network).
NETWORK_CHECK_S = 4.0


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def is_validation(relpath: str, fraction: float) -> bool:
  """Stable split rule: the path's hash, as a fraction of 2**64, below `fraction`."""
  h = int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "big")
  return h / 2.0**64 < fraction


def _selected(relpath: str, kind: str) -> bool:
  parts = relpath.split("/")
  if kind == "textdir":
    return not any(p.startswith(".") for p in parts)
  if not relpath.endswith(".py"):
    return False
  if kind == "pystdlib_test":
    return parts[0] == "test"
  return not any(p in ("test", "tests") for p in parts[:-1])


def list_files(root: str, kind: str) -> list[tuple[str, int, int]]:
  """(relative path, size, mtime_ns) of the candidate files of `kind` under `root`, sorted."""
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
    for name in filenames:
      full = os.path.join(dirpath, name)
      rel = os.path.relpath(full, root).replace(os.sep, "/")
      if not _selected(rel, kind) or not os.path.isfile(full):
        continue
      st = os.stat(full)
      out.append((rel, st.st_size, st.st_mtime_ns))
  out.sort()
  return out


def read_text(root: str, relpath: str) -> str | None:
  """The file as text, or None when it is not valid UTF-8 (or holds NUL bytes)."""
  with open(os.path.join(root, relpath), "rb") as f:
    raw = f.read()
  if b"\x00" in raw:
    return None
  try:
    return raw.decode("utf-8")
  except UnicodeDecodeError:
    return None


def split_files(root: str, kind: str, fraction: float) -> tuple[dict[str, list[str]], dict]:
  """The files of each split (sorted relative paths) and their counts/bytes."""
  splits = {s: [] for s in SPLITS}
  stats = {f"{s}_{k}": 0 for s in SPLITS for k in ("files", "bytes")}
  stats["skipped_not_utf8"] = 0
  for rel, _, _ in list_files(root, kind):
    text = read_text(root, rel)
    if text is None:
      stats["skipped_not_utf8"] += 1
      continue
    split = "validation" if is_validation(rel, fraction) else "train"
    splits[split].append(rel)
    stats[f"{split}_files"] += 1
    stats[f"{split}_bytes"] += len(text.encode("utf-8"))
  return splits, stats


@dataclasses.dataclass
class TextFilesConfig(tfds.core.BuilderConfig):
  root: str = ""
  kind: str = "textdir"
  validation_fraction: float = 0.05


class MoeTextFiles(tfds.core.GeneratorBasedBuilder):
  """The text files of one folder as a `text`/`path` dataset with train/validation splits."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Files of a folder, split by path hash."}
  BUILDER_CONFIGS = []

  def __init__(self, *, config: TextFilesConfig, splits: dict, stats: dict, **kwargs):
    self._splits, self._stats = splits, stats
    super().__init__(config=config, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # tfds' default lookup needs the `importlib_resources` backport for classes outside its own
    # package; this builder has no checksums or other files beside its code.
    return epath.Path(__file__)

  def _info(self):
    c = self.builder_config
    meta = {"kind": c.kind, "root": c.root, "validation_fraction": c.validation_fraction,
            "python_version": platform.python_version(),
            "python_implementation": platform.python_implementation(), **self._stats}
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{c.kind}: text files under {c.root}",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "path": tfds.features.Text()}),
        metadata=tfds.core.MetadataDict(meta))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {s: self._generate_examples(s) for s in SPLITS}

  def _generate_examples(self, split):
    c = self.builder_config
    for rel in self._splits[split]:
      yield rel, {"text": read_text(c.root, rel), "path": rel}


class SequentialSplit:
  """A split of a prepared TFDS dataset without random access (TFRecord), read in file order."""

  def __init__(self, builder, split: str):
    self._builder, self._split = builder, split

  def __len__(self) -> int:
    return int(self._builder.info.splits[self._split].num_examples)

  def __iter__(self) -> Iterator[dict]:
    ds = self._builder.as_dataset(split=self._split, shuffle_files=False)
    return iter(tfds.as_numpy(ds))


@dataclasses.dataclass
class TextSource:
  """A prepared text dataset: `documents(split)` yields its texts in a fixed order."""

  key: str  # filesystem-safe name for caches derived from it (tokenizer, packed rows)
  info: dict
  _sources: dict
  _field: str
  _max_chars: dict

  def documents(self, split: str) -> Iterator[str]:
    return (text for _, text in self.named_documents(split))

  def named_documents(self, split: str) -> Iterator[tuple[str | None, str]]:
    """(path, text) of each document, in `documents`' order: the file's path relative to the
    folder for the built-in datasets (their `path` feature), None for TFDS datasets."""
    source = self._sources[split]
    budget = self._max_chars.get(split)
    examples = iter(source) if isinstance(source, SequentialSplit) else (
        source[i] for i in range(len(source)))
    for example in examples:
      text = example[self._field]
      text = text.decode("utf-8") if isinstance(text, bytes) else str(text)
      path = example.get("path") if hasattr(example, "get") else None
      yield (path.decode("utf-8") if isinstance(path, bytes) else path), text
      if budget is not None:
        budget -= len(text)
        if budget <= 0:
          return


@contextlib.contextmanager
def _quiet():
  """TFDS reports every preparation through absl logging and progress bars; keep errors only."""
  tfds.display_progress_bar(False)
  loggers = [logging.getLogger("absl"), logging.getLogger("tensorflow_datasets")]
  levels = [lg.level for lg in loggers]
  for lg in loggers:
    lg.setLevel(logging.ERROR)
  try:
    yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)


def _quiet_prepare(builder, *, silent: bool) -> None:
  """Prepares (a no-op when already prepared); `silent` also hides tfds' two stdout lines."""
  out = contextlib.redirect_stdout(io.StringIO()) if silent else contextlib.nullcontext()
  with _quiet(), out:
    builder.download_and_prepare(file_format="array_record")


def _files_source(name: str, root: str, fraction: float, data_dir: str) -> TextSource:
  kind = name
  listing = list_files(root, kind)
  fp = hashlib.sha256(repr((kind, os.path.abspath(root), fraction, platform.python_version(),
                            listing)).encode()).hexdigest()[:16]
  if kind == "textdir" and not listing:
    raise ConfigError(f"data.text_dir={root!r} holds no text files")
  splits, stats = split_files(root, kind, fraction)
  if kind == "textdir" and not splits["train"]:
    raise ConfigError(f"data.text_dir={root!r} holds no UTF-8 text files for the train split "
                      f"(validation_fraction={fraction})")
  config = TextFilesConfig(name=f"{kind}-{fp}", root=os.path.abspath(root), kind=kind,
                           validation_fraction=fraction)
  with _quiet():  # tfds warns that the config is not one of BUILDER_CONFIGS
    builder = MoeTextFiles(config=config, splits=splits, stats=stats, data_dir=data_dir)
  _quiet_prepare(builder, silent=True)
  info = dict(builder.info.metadata)
  info.update(name=name, tfds_name=f"{builder.name}/{config.name}", tfds_dir=builder.data_dir)
  sources = {s: builder.as_data_source(split=s) for s in SPLITS}
  return TextSource(key=config.name, info=info, _sources=sources, _field="text", _max_chars={})


def _endpoint(url: str) -> tuple[str, int] | None:
  """(host, port) a download of `url` connects to first: its proxy when one is set for it."""
  parts = urllib.parse.urlsplit(url)
  if not parts.hostname:
    return None
  proxy = urllib.request.getproxies().get(parts.scheme)
  if proxy and not urllib.request.proxy_bypass(parts.hostname):
    parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
  try:
    port = parts.port or (443 if parts.scheme == "https" else 80)
  except ValueError:  # a malformed port
    return None
  return (parts.hostname, port) if parts.hostname else None


def reachable(endpoints, timeout: float) -> bool:
  """Whether a TCP connection to any of `endpoints` opens within `timeout` seconds in all (name
  resolution included): each try runs in a daemon thread; one still trying at the deadline is left
  behind, not waited for."""
  results: queue.Queue = queue.Queue()

  def attempt(host, port):
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      results.put(True)
    except OSError:
      results.put(False)

  for e in endpoints:
    threading.Thread(target=attempt, args=e, daemon=True).start()
  deadline = time.monotonic() + timeout
  for _ in endpoints:
    try:
      if results.get(timeout=max(0.0, deadline - time.monotonic())):
        return True
    except queue.Empty:
      return False
  return False


def _check_network(name: str, builder, data_dir: str) -> None:
  """One-line ConfigError at once when none of the download hosts of `builder` (not prepared in
  `data_dir`) can be reached. A builder that declares no URLs is left to TFDS."""
  urls = sorted(builder.url_infos or {})
  endpoints = sorted({e for e in map(_endpoint, urls) if e is not None})
  if not endpoints or reachable(endpoints, NETWORK_CHECK_S):
    return
  hosts = ", ".join(sorted({urllib.parse.urlsplit(u).hostname or u for u in urls}))
  raise ConfigError(
      f"data.name={name!r} is not prepared in {data_dir} and its download hosts ({hosts}) cannot "
      f"be reached within {NETWORK_CHECK_S:g} s (no network?); prepare it where a network exists "
      f"(python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', data_dir='DIR')"
      ".download_and_prepare(file_format='array_record')\") and point data.tfds_data_dir (or "
      "TFDS_DATA_DIR) at DIR")


def _prepared_builder(name: str, data_dir: str):
  """The TFDS builder of `name`, prepared in `data_dir` (downloading it when it is not)."""
  try:
    # Not tfds.list_builders(): it imports TensorFlow and every dataset module (seconds).
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ConfigError(f"data.name={name!r} is neither built in ({', '.join(BUILTIN)}) nor a "
                      "dataset tensorflow_datasets knows (tfds.list_builders())") from None
  except Exception as e:  # pylint: disable=broad-except  (e.g. an unknown builder config)
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"data.name={name!r}: {type(e).__name__}: {reason}") from None
  try:
    if not builder.is_prepared():
      _check_network(name, builder, data_dir)
      _quiet_prepare(builder, silent=False)
  except ConfigError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [""])[0][:200]
    raise ConfigError(f"data.name={name!r}: TFDS could not download/prepare it into {data_dir} "
                      f"({type(e).__name__}: {reason}); prepare it there beforehand or use a "
                      f"built-in dataset ({', '.join(BUILTIN)})") from None
  return builder


def _text_field(builder, name: str) -> str:
  features = builder.info.features
  fields = [k for k, v in features.items() if isinstance(v, tfds.features.Text)]
  if not fields:
    raise ConfigError(f"data.name={name!r} has no text feature (features: {list(features)})")
  return "text" if "text" in fields else fields[0]


def _open_split(builder, real: str):
  """Random access (array_record) or a sequential reader (TFRecord) over one split."""
  file_format = builder.info.file_format
  if file_format in tfds.core.file_adapters.FileFormat.with_random_access():
    return builder.as_data_source(split=real)
  return SequentialSplit(builder, real)


def _source_key(builder) -> str:
  return "tfds-" + "".join(ch if ch.isalnum() or ch in "-_" else "_"
                           for ch in builder.info.full_name)


def _tfds_source(name: str, data_dir: str) -> TextSource:
  builder = _prepared_builder(name, data_dir)
  field = _text_field(builder, name)
  available = list(builder.info.splits.keys())
  names = {"train": "train",
           "validation": "validation" if "validation" in available else "test"}
  for s, real in names.items():
    if real not in available:
      raise ConfigError(f"data.name={name!r} has no {real!r} split for {s} (has {available})")
  file_format = builder.info.file_format
  sources = {s: _open_split(builder, real) for s, real in names.items()}
  info = {"name": name, "tfds_name": f"{builder.name}/{builder.info.full_name}",
          "tfds_dir": builder.data_dir, "text_field": field, "splits_used": names,
          "file_format": getattr(file_format, "value", str(file_format)),
          "max_chars_read": dict(MAX_SPLIT_CHARS),
          **{f"{s}_documents": len(src) for s, src in sources.items()}}
  return TextSource(key=_source_key(builder), info=info, _sources=sources, _field=field,
                    _max_chars=dict(MAX_SPLIT_CHARS))


def split_documents(name: str, split: str, data_dir: str) -> Iterator[str]:
  """The texts of any split of the (prepared) TFDS dataset `name`, e.g. "test", in stored order
  and read up to the validation budget (`MAX_SPLIT_CHARS["validation"]`): what
  `launch.py --mode=eval --eval_split=<split>` evaluates beyond the two splits a run packs."""
  if name in BUILTIN:
    raise ConfigError(f"--eval_split={split!r}: data.name={name!r} has only the splits "
                      f"{list(SPLITS)}")
  builder = _prepared_builder(name, data_dir)
  available = list(builder.info.splits.keys())
  if split not in available:
    raise ConfigError(f"--eval_split={split!r}: data.name={name!r} has the splits {available}")
  source = TextSource(key=_source_key(builder), info={}, _sources={split: _open_split(builder, split)},
                      _field=_text_field(builder, name),
                      _max_chars={split: MAX_SPLIT_CHARS["validation"]})
  return source.documents(split)


def load_source(name: str, *, text_dir: str, validation_fraction: float,
                data_dir: str) -> TextSource:
  """Prepares (once) and opens the dataset `data.name` in `data_dir`."""
  if name in ("pystdlib", "pystdlib_test"):
    return _files_source(name, stdlib_root(), validation_fraction, data_dir)
  if name == "textdir":
    if not text_dir:
      raise ConfigError("data.text_dir is empty; data.name='textdir' needs a folder of text files")
    if not os.path.isdir(text_dir):
      raise ConfigError(f"data.text_dir={text_dir!r} is not an existing folder")
    return _files_source(name, text_dir, validation_fraction, data_dir)
  return _tfds_source(name, data_dir)


