"""The data pipeline: `make_data(cfg, workdir=...) -> Data`.

1. `moe.data.sources` prepares the text dataset `data.name` with TFDS (array_record) in the data
   dir, chosen by one rule (`data_dir_for`) for single runs and sweeps alike:
   `data.tfds_data_dir` if set, else `$TFDS_DATA_DIR` if set, else `<workdir>/../.tfds`, a folder
   beside the run folders, so every run of a project shares one prepared copy. A sweep applies
   the rule to its own workdir (`moe.sweep.spec.expand`), so its members share that folder too.
2. The tokenizer: bytes (`data.tokenizer="byte"`, vocab 259), SentencePiece
   (`"sentencepiece"`, `data.sp_vocab_size`), trained once on (a bounded sample of) the training
   split and cached in `<data dir>/moe_tokenizers/`, or a Hugging Face tokenizer
   (`"hf:<tokenizer.json or a folder holding one>"`, e.g. an imported model's
   `<workdir>/hf_tokenizer`, which the converted `config.py` sets; packed rows are keyed by a
   digest of the file).
3. Every split is tokenized and packed once into rows of `data.seq_len + 1` tokens
   (`moe.data.packing`), stored as .npy files in
   `<data dir>/moe_packed/<dataset>/<tokenizer>-L<len>/` and memory-mapped. Packing does not
   depend on the seed, so runs share it.
4. Training reads those rows through grain: shuffled with `train.seed` (a new permutation every
   epoch), repeated forever, each global batch of `train.batch_size` consecutive rows of that
   stream; process p of P takes rows [p*b, (p+1)*b) of every global batch (b = batch_size / P), so
   the processes' local batches, concatenated in process order, are exactly the one-process batch.
   The iterator's state is grain's (the index of the next global batch), JSON-serializable and
   independent of the process count; `set_state` resumes with exactly the same batches.
5. `Data.eval_batches()`: `train.eval_batches` global batches of validation rows drawn with a fixed
   permutation (seed 0, not `train.seed`, so every run is evaluated on the same rows); rows are
   reused cyclically if the split is smaller than that.

A batch is a dict of numpy arrays [batch_size / process_count, seq_len]: inputs, targets,
segment_ids, positions (int32), loss_mask, target_bytes (float32); see `moe.data.packing`.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any

from absl import flags
import grain
import numpy as np

from moe import rundir
from moe.data import sources
from moe.data import packing
from moe.data import tokenizers
from moe.errors import ConfigError, check_choice, check_int, check_number, check_str

TOKENIZERS = ("byte", "sentencepiece")
MAX_SP_VOCAB = 1 << 20
MAX_WORKERS = 1024  # grain worker processes
STATE_FORMAT = "moe.data/1"
EVAL_SEED = 0  # the validation rows are the same for every train.seed


def default_data_dir(workdir: str) -> str:
  """`<workdir>/../.tfds`; for a remote workdir (`gs://...`) a local cache folder instead
  (`moe.rundir.cache_dir`): the prepared rows are memory-mapped."""
  return rundir.cache_dir(workdir, ".tfds")


def data_dir_for(tfds_data_dir: str, workdir: str) -> str:
  """The data folder of a run in `workdir` (or of a sweep's members, `workdir` being the
  sweep's): `data.tfds_data_dir` if set, else `$TFDS_DATA_DIR` if set, else
  `default_data_dir(workdir)`."""
  chosen = tfds_data_dir or os.environ.get("TFDS_DATA_DIR") or default_data_dir(workdir)
  return rundir.absolute(os.path.expanduser(chosen))


def validate_data(d) -> None:
  """Every check of the `data` group `d` (one-line ConfigError naming the field), before anything
  is prepared. It reads nothing else: `data.seq_len <= model.max_len` and the split of
  `train.batch_size` over processes are checked by `moe.train.checks.validate_config`; whether
  the folders exist, by the preparation itself."""
  if not isinstance(d.name, str) or not d.name:
    raise ConfigError(f"data.name={d.name!r} must be one of {', '.join(sources.BUILTIN)} or a "
                      "TFDS text dataset name")
  check_str("data.text_dir", d.text_dir)
  if d.name == "textdir" and not d.text_dir:
    raise ConfigError("data.text_dir is empty; data.name='textdir' needs a folder of text files")
  check_str("data.tfds_data_dir", d.tfds_data_dir)
  if isinstance(d.tokenizer, str) and d.tokenizer.startswith(tokenizers.HF_PREFIX):
    tokenizers.hf_tokenizer_path(d.tokenizer)
  else:
    check_choice("data.tokenizer", d.tokenizer, TOKENIZERS + ("hf:<path>",))
  check_int("data.sp_vocab_size", d.sp_vocab_size, tokenizers.MIN_SP_VOCAB, high=MAX_SP_VOCAB)
  check_int("data.seq_len", d.seq_len, 1)  # <= model.max_len, checked by validate_config
  check_number("data.validation_fraction", d.validation_fraction, 0.0, 1.0, low_open=True,
               high_open=True)
  check_int("data.num_workers", d.num_workers, 0, high=MAX_WORKERS)


# ----------------------------------------------------------------------------- preparation


def _make_tokenizer(d, source: sources.TextSource, data_dir: str):
  if d.tokenizer == "byte":
    return tokenizers.ByteTokenizer(), "byte"
  if d.tokenizer.startswith(tokenizers.HF_PREFIX):
    tok = tokenizers.HfTokenizer(tokenizers.hf_tokenizer_path(d.tokenizer))
    if tok.eos_id is None:
      raise ConfigError(f"data.tokenizer={d.tokenizer!r} names no EOS token (documents end with "
                        "one): give its folder a tokenizer_config.json with eos_token")
    return tok, f"hf-{tok.digest}"
  path = os.path.join(data_dir, "moe_tokenizers", f"{source.key}-sp{d.sp_vocab_size}.model")
  try:
    tok = tokenizers.load_or_train_sentencepiece(path, source.documents("train"),
                                                 d.sp_vocab_size)
  except ValueError as e:
    raise ConfigError(f"data.sp_vocab_size={d.sp_vocab_size}: SentencePiece could not be trained "
                      f"on data.name={d.name!r} ({e})") from None
  digest = hashlib.sha256(tok.model_proto).hexdigest()[:8]
  return tok, f"sp{d.sp_vocab_size}-{digest}"


def encode_documents(tok, texts):
  """Each text as [BOS, its token ids..., EOS] (int32; no BOS when the tokenizer has none),
  encoded in chunks of 256 texts."""
  chunk: list[str] = []

  def encode(batch):
    if hasattr(tok, "encode_many"):
      return tok.encode_many(batch)
    return [tok.encode_array(x) for x in batch]

  for text in texts:
    chunk.append(text)
    if len(chunk) == 256:
      for ids in encode(chunk):
        yield tokenizers.document(tok, ids)
      chunk = []
  for ids in encode(chunk):
    yield tokenizers.document(tok, ids)


def _pack_splits(source, tok, tok_key: str, seq_len: int, data_dir: str) -> tuple[str, dict]:
  """The folder of packed rows (built once, atomically) and its info."""
  folder = os.path.join(data_dir, "moe_packed", source.key, f"{tok_key}-L{seq_len}")
  if not os.path.exists(os.path.join(folder, "info.json")):
    tmp = f"{folder}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
    info = {}
    for split in sources.SPLITS:
      rows, segs = packing.pack_documents(encode_documents(tok, source.documents(split)),
                                          seq_len + 1, dtype)
      np.save(os.path.join(tmp, f"{split}_tokens.npy"), rows)
      seg_dtype = np.uint16 if seq_len + 1 < 1 << 16 else np.int32
      np.save(os.path.join(tmp, f"{split}_segments.npy"), segs.astype(seg_dtype))
      info[f"{split}_rows"] = int(rows.shape[0])
      info[f"{split}_tokens"] = int((segs != 0).sum())  # split documents repeat one token
      info[f"{split}_loss_tokens"] = int(((segs[:, :-1] == segs[:, 1:]) & (segs[:, 1:] != 0)).sum())
      info[f"{split}_fill"] = float((segs != 0).mean()) if segs.size else 0.0
    with open(os.path.join(tmp, "info.json"), "w") as f:
      json.dump(info, f)
    try:
      os.rename(tmp, folder)
    except OSError:  # another process finished first
      shutil.rmtree(tmp, ignore_errors=True)
  with open(os.path.join(folder, "info.json")) as f:
    return folder, json.load(f)


class PackedRows:
  """Random access to packed rows as example dicts (memory-mapped .npy files)."""

  def __init__(self, folder: str, split: str, bytes_per_id: np.ndarray):
    self._args = (folder, split, bytes_per_id)
    self._tokens = np.load(os.path.join(folder, f"{split}_tokens.npy"), mmap_mode="r")
    self._segments = np.load(os.path.join(folder, f"{split}_segments.npy"), mmap_mode="r")
    self._bytes = bytes_per_id

  def __reduce__(self):  # grain worker processes reopen the files instead of copying them
    return PackedRows, self._args

  def __len__(self) -> int:
    return int(self._tokens.shape[0])

  def __getitem__(self, index):
    return packing.row_to_example(self._tokens[index], self._segments[index], self._bytes)


# ----------------------------------------------------------------------------- loading


class _ProcessBlocks(grain.MapDataset):
  """Element i of process p: element (i // b) * B + p * b + i % b of `parent` (an infinite map),
  where b is the local and B = b * process_count the global batch size."""

  def __init__(self, parent, local: int, process_index: int, process_count: int):
    super().__init__(parent)
    self._local, self._index, self._count = local, process_index, process_count

  def __len__(self):
    return sys.maxsize

  def __getitem__(self, index):
    if isinstance(index, slice):
      return self.slice(index)
    g, r = divmod(index, self._local)
    return self._parent[(g * self._count + self._index) * self._local + r]

  def __str__(self):
    return f"ProcessBlocks(p={self._index}/{self._count}, b={self._local})"


def _to_json(x):
  if isinstance(x, bytes):
    return {"__b64__": base64.b64encode(x).decode("ascii")}
  if isinstance(x, dict):
    return {str(k): _to_json(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_to_json(v) for v in x]
  if isinstance(x, np.integer):
    return int(x)
  return x


def _from_json(x):
  if isinstance(x, dict):
    if set(x) == {"__b64__"}:
      return base64.b64decode(x["__b64__"])
    return {k: _from_json(v) for k, v in x.items()}
  if isinstance(x, list):
    return [_from_json(v) for v in x]
  return x


class TrainIterator:
  """Infinite iterator of local training batches with a JSON-serializable, exact state."""

  def __init__(self, dataset, identity: dict, num_workers: int):
    self._dataset = dataset
    self._identity = identity
    self._num_workers = num_workers
    it = dataset.to_iter_dataset()
    if num_workers > 0:
      if not flags.FLAGS.is_parsed():  # grain's worker processes read absl flags
        flags.FLAGS.mark_as_parsed()
      it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    self._it = iter(it)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batch = next(self._it)
    if self._num_workers > 0:  # plain arrays: grain's shared-memory blocks are released now
      batch = {k: np.array(v) for k, v in batch.items()}
    return batch

  def close(self) -> None:
    """Stops grain's worker processes (data.num_workers > 0); call before exiting."""
    close = getattr(self._it, "close", None)
    if close is not None:
      close()

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, **self._identity, "grain": _to_json(self._it.get_state())}

  def set_state(self, state: dict[str, Any]) -> None:
    state = json.loads(json.dumps(state))  # accept anything JSON round-trips to
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"data iterator state has format {state.get('format')!r}, "
                       f"expected {STATE_FORMAT!r}")
    for k, v in self._identity.items():
      if state.get(k) != v:
        raise ValueError(f"data iterator state was saved with {k}={state.get(k)!r}, this run "
                         f"has {k}={v!r}")
    self._it.set_state(_from_json(state["grain"]))


@dataclasses.dataclass
class Data:
  tokenizer: Any
  train_iter: TrainIterator
  info: dict
  _eval: list

  def eval_batches(self) -> list[dict[str, np.ndarray]]:
    """The same `train.eval_batches` validation batches (copies) on every call."""
    return [{k: v.copy() for k, v in b.items()} for b in self._eval]


def _eval_batches(rows: PackedRows, num: int, global_batch: int, local: int,
                  process_index: int) -> list[dict[str, np.ndarray]]:
  if num == 0:
    return []
  perm = np.random.default_rng(EVAL_SEED).permutation(len(rows))
  order = perm[np.arange(num * global_batch) % len(rows)].reshape(num, global_batch)
  out = []
  for g in range(num):
    idx = order[g, process_index * local:(process_index + 1) * local]
    examples = [rows[int(i)] for i in idx]
    out.append({k: np.stack([e[k] for e in examples]) for k in examples[0]})
  return out


def _local_data_dir(d, workdir: str) -> str:
  """The data folder of data group `d` (`data_dir_for`), created; remote: a one-line error."""
  data_dir = data_dir_for(d.tfds_data_dir, workdir)
  if rundir.is_remote(data_dir):
    field = "data.tfds_data_dir" if d.tfds_data_dir else "TFDS_DATA_DIR"
    raise ConfigError(f"{field}={data_dir!r} must be a local folder (the prepared rows are "
                      "memory-mapped); leave it empty for a local cache")
  os.makedirs(data_dir, exist_ok=True)
  return data_dir


def make_tokenizer(d, *, workdir: str):
  """(tokenizer, key) of the checked data group `d` for a run in `workdir`: the one `make_data`
  gives, without packing rows (SentencePiece: the model cached in the data dir, trained there
  first when missing). `key` names it in the packed rows' folder and in summary.json's
  `data.tokenizer_key` (`sp<vocab>-<digest of the model>`)."""
  data_dir = _local_data_dir(d, workdir)
  source = sources.load_source(d.name, text_dir=d.text_dir,
                                validation_fraction=float(d.validation_fraction),
                                data_dir=data_dir)
  return _make_tokenizer(d, source, data_dir)


def make_data(cfg, *, workdir: str, process_index: int = 0, process_count: int = 1) -> Data:
  """Prepares (once, cached in the data dir) and opens the data of `cfg.data`.

  `cfg` is a checked config (`validate_data`, run by `moe.train.checks.validate_config`), and
  `train.batch_size` a multiple of `process_count`; errors found only while preparing (an
  unknown dataset, an empty split) are one-line ConfigErrors too."""
  d, t = cfg.data, cfg.train
  data_dir = _local_data_dir(d, workdir)
  start = time.perf_counter()
  source = sources.load_source(d.name, text_dir=d.text_dir,
                                validation_fraction=float(d.validation_fraction),
                                data_dir=data_dir)
  tok, tok_key = _make_tokenizer(d, source, data_dir)
  folder, pack_info = _pack_splits(source, tok, tok_key, d.seq_len, data_dir)
  train_rows = PackedRows(folder, "train", tok.bytes_per_id)
  val_rows = PackedRows(folder, "validation", tok.bytes_per_id)
  if len(train_rows) == 0:
    raise ConfigError(f"data.name={d.name!r}: the train split is empty")
  if len(val_rows) == 0 and t.eval_batches > 0:
    raise ConfigError(f"data.validation_fraction={d.validation_fraction}: the validation split of "
                      f"data.name={d.name!r} is empty; raise it (or set train.eval_batches=0)")

  local = t.batch_size // process_count
  stream = grain.MapDataset.source(train_rows).shuffle(seed=t.seed % 2**32).repeat()
  batched = _ProcessBlocks(stream, local, process_index, process_count).batch(
      local, drop_remainder=True)
  identity = {"dataset": source.key, "tokenizer": tok_key, "seq_len": d.seq_len,
              "seed": t.seed, "global_batch_size": t.batch_size}
  train_iter = TrainIterator(batched, identity, d.num_workers)
  evals = _eval_batches(val_rows, t.eval_batches, t.batch_size, local, process_index)

  info = dict(source.info)
  info.update(pack_info)
  info.update(tokenizer=d.tokenizer, tokenizer_key=tok_key, vocab_size=tok.vocab_size,
              seq_len=d.seq_len, data_dir=data_dir, packed_dir=folder,
              prepare_seconds=round(time.perf_counter() - start, 3),
              eval_rows_reused=bool(t.eval_batches * t.batch_size > len(val_rows)))
  return Data(tokenizer=tok, train_iter=train_iter, info=_to_json(info), _eval=evals)
