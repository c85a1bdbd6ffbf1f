"""Tests of the data pipeline: TFDS builders, splits, tokenizers, packing, the resumable loader."""

import collections
import json
import os
import platform

import numpy as np
import pytest

from configs.default import get_config
from conftest import one_line_error
from moe.data import pipeline as data_lib
from moe.data import sources
from moe.data import packing
from moe.data import tokenizers


def _cfg(data_dir, **data):
  cfg = get_config()
  cfg.data.tfds_data_dir = str(data_dir)
  cfg.data.seq_len = 32
  cfg.train.batch_size = 4
  cfg.train.eval_batches = 2
  for k, v in data.items():
    group, field = k.split("__") if "__" in k else ("data", k)
    setattr(cfg[group], field, v)
  return cfg


_WORDS = ["alpha", "beta", "gamma", "déjà", "vu", "naïve", "日本語", "λx", "→", "\t", "  ", "\n"]


def _write_textdir(root, fraction=0.3, seed=0):
  """Small generated files with both splits non-empty under the path-hash rule."""
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  split = {"train": [], "validation": []}
  i = 0
  while len(split["train"]) < 6 or len(split["validation"]) < 3:
    rel = f"sub{i % 3}/file_{i}.txt"
    n = int(rng.integers(5, 400))
    text = " ".join(rng.choice(_WORDS, size=n)) + f"\n# end {i}\n"
    os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
    with open(os.path.join(root, rel), "w", encoding="utf-8") as f:
      f.write(text)
    split["validation" if sources.is_validation(rel, fraction) else "train"].append(rel)
    i += 1
  with open(os.path.join(root, "binary.bin"), "wb") as f:  # not UTF-8: skipped
    f.write(b"\xff\xfe\x00\x01")
  os.makedirs(os.path.join(root, ".hidden"))
  with open(os.path.join(root, ".hidden", "x.txt"), "w") as f:
    f.write("hidden")
  return split


@pytest.fixture(scope="module")
def textdir(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("texts"))
  return root, _write_textdir(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def stdlib_data(data_dir):
  """The real default dataset, built once (offline) into a temporary data dir."""
  return data_lib.make_data(_cfg(data_dir, seq_len=64), workdir=str(data_dir / "run"))


def _text_cfg(data_dir, textdir, **kw):
  return _cfg(data_dir, name="textdir", text_dir=textdir[0], validation_fraction=0.3, **kw)


# ----------------------------------------------------------------------------- sources and splits


def test_stdlib_splits_are_stable_disjoint_and_complete():
  root = sources.stdlib_root()
  for kind in ("pystdlib", "pystdlib_test"):
    a, stats = sources.split_files(root, kind, 0.05)
    b, _ = sources.split_files(root, kind, 0.05)
    assert a == b
    train, val = set(a["train"]), set(a["validation"])
    assert train and val and not train & val
    listed = {rel for rel, _, _ in sources.list_files(root, kind)}
    assert train | val == listed - {r for r in listed if sources.read_text(root, r) is None}
    assert len(listed) - len(train | val) == stats["skipped_not_utf8"]
    assert all(r.endswith(".py") for r in listed)
    assert not any("site-packages" in r or "dist-packages" in r for r in listed)
    if kind == "pystdlib":
      assert not any(r.startswith("test/") or "/tests/" in f"/{r}" or "/test/" in f"/{r}"
                     for r in listed)
      pretrain = listed
    else:
      assert all(r.startswith("test/") for r in listed)
      assert not pretrain & listed
  # A larger fraction only moves files into validation.
  small, _ = sources.split_files(root, "pystdlib", 0.05)
  large, _ = sources.split_files(root, "pystdlib", 0.2)
  assert set(small["validation"]) < set(large["validation"])


def test_split_rule_is_a_path_hash():
  paths = [f"dir{i % 7}/f{i}.py" for i in range(4000)]
  val = [p for p in paths if sources.is_validation(p, 0.1)]
  assert 300 < len(val) < 500  # ~10%
  assert val == [p for p in paths if sources.is_validation(p, 0.1)]
  assert set(val) <= {p for p in paths if sources.is_validation(p, 0.3)}


def test_stdlib_builder_prepares_offline_and_matches_the_split(stdlib_data, data_dir):
  info = stdlib_data.info
  assert info["python_version"] == platform.python_version()
  assert info["train_files"] > 100 and info["validation_files"] > 0
  assert info["train_bytes"] > 1_000_000
  assert os.path.isdir(info["tfds_dir"]) and info["tfds_dir"].startswith(str(data_dir))
  assert any(f.endswith(".array_record-00000-of-00001") or ".array_record" in f
             for f in os.listdir(info["tfds_dir"]))
  # The prepared records are exactly the files of each split.
  import tensorflow_datasets as tfds
  builder = tfds.builder_from_directory(info["tfds_dir"])
  splits, _ = sources.split_files(sources.stdlib_root(), "pystdlib", 0.05)
  for split in ("train", "validation"):
    src = builder.as_data_source(split=split)
    paths = sorted(src[i]["path"].decode() for i in range(len(src)))
    assert paths == splits[split]
  # Byte tokens: a file of n bytes is n + 2 tokens with bos/eos, n + 1 predictions.
  for split in ("train", "validation"):
    assert info[f"{split}_loss_tokens"] == info[f"{split}_bytes"] + info[f"{split}_files"]


# ----------------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trips_unicode():
  tok = tokenizers.ByteTokenizer()
  text = "def f(x):\n\treturn 'héllo ☃ 日本語 🙂'\x7f"
  ids = tok.encode(text)
  assert tok.vocab_size == 259 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  assert min(ids) >= 3 and max(ids) < 259
  assert ids == [b + 3 for b in text.encode("utf-8")]
  assert tok.decode(ids) == text
  assert tok.decode([tok.bos_id] + ids + [tok.eos_id, tok.pad_id]) == text
  assert tok.num_bytes([tok.bos_id] + ids + [tok.eos_id]) == len(text.encode("utf-8"))


def test_sentencepiece_trains_on_a_tiny_corpus_and_round_trips():
  rng = np.random.default_rng(1)
  corpus = [" ".join(rng.choice(_WORDS[:8], size=200)) + "\n    indent\n" for _ in range(20)]
  proto = tokenizers.train_sentencepiece(corpus, 330)
  tok = tokenizers.SentencePieceTokenizer(proto)
  assert tok.vocab_size <= 330 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  for text in corpus[:3] + ["unseen: Ωmega 🙂 \t\ttabs   spaces\n\n", " lead", "trail  "]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8"))
  assert len(tok.encode(corpus[0])) < len(corpus[0].encode("utf-8")) / 2  # it merged pieces


def test_sentencepiece_through_make_data_is_cached(data_dir, textdir):
  cfg = _text_cfg(data_dir, textdir, tokenizer="sentencepiece", sp_vocab_size=330)
  d1 = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  model = [f for f in os.listdir(data_dir / "moe_tokenizers") if f.endswith("-sp330.model")]
  assert len(model) == 1
  mtime = os.path.getmtime(data_dir / "moe_tokenizers" / model[0])
  d2 = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  assert os.path.getmtime(data_dir / "moe_tokenizers" / model[0]) == mtime
  assert d1.tokenizer.model_proto == d2.tokenizer.model_proto
  assert d1.info["vocab_size"] == d1.tokenizer.vocab_size <= 330
  b = next(d1.train_iter)
  np.testing.assert_array_equal(
      b["target_bytes"], d1.tokenizer.bytes_per_id[b["targets"]] * b["loss_mask"])
  assert b["target_bytes"].sum() > b["loss_mask"].sum()  # pieces stand for several bytes


# ----------------------------------------------------------------------------- packing


def _reference_example(row, seg, bytes_per_id):
  """Loop-by-loop statement of the example semantics."""
  n = len(row) - 1
  out = {k: np.zeros(n, np.float32 if k in ("loss_mask", "target_bytes") else np.int32)
         for k in ("inputs", "targets", "segment_ids", "positions", "loss_mask", "target_bytes")}
  pos = 0
  for i in range(n):
    out["inputs"][i], out["targets"][i], out["segment_ids"][i] = row[i], row[i + 1], seg[i]
    if seg[i] == 0:
      pos = 0
    elif i > 0 and seg[i] == seg[i - 1]:
      pos += 1
    else:
      pos = 0
    out["positions"][i] = pos if seg[i] else 0
    same = seg[i] != 0 and seg[i] == seg[i + 1]
    out["loss_mask"][i] = float(same)
    out["target_bytes"][i] = bytes_per_id[row[i + 1]] if same else 0.0
  return out


@pytest.mark.parametrize("seed", range(6))
def test_packing_keeps_every_prediction_once_and_never_crosses_documents(seed):
  rng = np.random.default_rng(seed)
  row_len = int(rng.integers(2, 40))
  n_docs = int(rng.integers(1, 30))
  next_id = 1
  docs = []
  for _ in range(n_docs):  # unique token values: (input, target) pairs name their document
    n = int(rng.choice([2, 3, int(rng.integers(2, 3 * row_len + 5))]))
    docs.append(np.arange(next_id, next_id + n))
    next_id += n
  tokens, segs = packing.pack_documents(docs, row_len)
  assert tokens.shape == segs.shape and tokens.shape[1] == row_len
  bytes_per_id = rng.integers(0, 4, size=next_id).astype(np.float32)
  ex = packing.row_to_example(tokens, segs, bytes_per_id)
  pairs = []
  for r in range(tokens.shape[0]):
    ref = _reference_example(tokens[r], segs[r], bytes_per_id)
    for k, v in ref.items():
      np.testing.assert_array_equal(ex[k][r], v, err_msg=k)
    s = segs[r]
    used = s[s != 0]
    assert list(np.unique(used)) == list(range(1, len(np.unique(used)) + 1))  # 1, 2, 3 ...
    assert np.all(np.diff(used) >= 0) and np.all(s[len(used):] == 0)  # padding only at the end
    assert ex["positions"][r].max() < row_len - 1
    m = ex["loss_mask"][r] > 0
    pairs += list(zip(ex["inputs"][r][m].tolist(), ex["targets"][r][m].tolist()))
  expected = [(int(d[i]), int(d[i + 1])) for d in docs for i in range(len(d) - 1)]
  assert sorted(pairs) == sorted(expected)  # every prediction exactly once
  # No loss pair ever joins two documents (ids are consecutive within a document only).
  assert all(t == i + 1 for i, t in pairs)


def test_packing_fills_rows_densely():
  docs = [np.arange(1, 1001)]
  tokens, segs = packing.pack_documents(docs, 65)
  assert tokens.shape[0] == int(np.ceil((1000 - 1) / 64))  # one token of overlap per row
  assert (segs != 0).sum() == 1000 + tokens.shape[0] - 1


# ----------------------------------------------------------------------------- loader


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_batches_have_the_contract_shapes(stdlib_data):
  b = next(stdlib_data.train_iter)
  assert set(b) == {"inputs", "targets", "segment_ids", "positions", "loss_mask", "target_bytes"}
  for k, v in b.items():
    assert v.shape == (4, 64), k
  assert all(b[k].dtype == np.int32 for k in ("inputs", "targets", "segment_ids", "positions"))
  assert b["loss_mask"].dtype == b["target_bytes"].dtype == np.float32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  np.testing.assert_array_equal(b["target_bytes"], b["loss_mask"] * (b["targets"] >= 3))
  text = stdlib_data.tokenizer.decode(b["inputs"][0])
  assert text  # Python source


def test_resume_from_state_gives_the_same_batches(data_dir, textdir):
  cfg = _text_cfg(data_dir, textdir, seq_len=16)
  d = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  rows = d.info["train_rows"]
  _take(d.train_iter, 3)
  state = json.loads(json.dumps(d.train_iter.get_state()))
  n = 2 * rows // 4 + 3  # crosses epoch boundaries
  expected = _take(d.train_iter, n)
  fresh = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  fresh.train_iter.set_state(state)
  _assert_batches_equal(_take(fresh.train_iter, n), expected)
  # Another seed gives another order; a state from it is refused.
  other = data_lib.make_data(_text_cfg(data_dir, textdir, seq_len=16, train__seed=7),
                             workdir=str(data_dir / "run"))
  assert not np.array_equal(next(other.train_iter)["inputs"], expected[0]["inputs"])
  with pytest.raises(ValueError, match="seed"):
    other.train_iter.set_state(state)


def test_every_epoch_is_a_permutation_of_the_rows(data_dir, textdir):
  cfg = _text_cfg(data_dir, textdir, seq_len=16, train__batch_size=1)
  d = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  rows = d.info["train_rows"]
  key = lambda b: (b["inputs"].tobytes() + b["targets"].tobytes()
                   + b["segment_ids"].tobytes())
  stream = [key(b) for b in _take(d.train_iter, 2 * rows)]
  packed = data_lib.PackedRows(d.info["packed_dir"], "train", d.tokenizer.bytes_per_id)
  every_row = collections.Counter(key({k: v[None] for k, v in packed[i].items()})
                                  for i in range(len(packed)))
  assert collections.Counter(stream[:rows]) == every_row == collections.Counter(stream[rows:])
  assert stream[:rows] != stream[rows:]  # reshuffled per epoch


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_shards_concatenate_to_the_single_process_batch(data_dir, textdir,
                                                                process_count):
  cfg = _text_cfg(data_dir, textdir, seq_len=16, train__batch_size=8, train__eval_batches=3)
  full = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  shards = [data_lib.make_data(cfg, workdir=str(data_dir / "run"), process_index=p,
                               process_count=process_count) for p in range(process_count)]
  full_batches = _take(full.train_iter, 5)
  shard_batches = [_take(s.train_iter, 5) for s in shards]
  for g in range(5):
    joined = {k: np.concatenate([sb[g][k] for sb in shard_batches]) for k in full_batches[g]}
    _assert_batches_equal([joined], [full_batches[g]])
    assert all(sb[g]["inputs"].shape[0] == 8 // process_count for sb in shard_batches)
  for g, fb in enumerate(full.eval_batches()):
    joined = {k: np.concatenate([s.eval_batches()[g][k] for s in shards]) for k in fb}
    _assert_batches_equal([joined], [fb])
  # The state is the global batch index: a 1-process state resumes a 2-process shard.
  state = full.train_iter.get_state()
  nxt = _take(full.train_iter, 2)
  shards[1].train_iter.set_state(state)
  local = 8 // process_count
  for g, b in enumerate(_take(shards[1].train_iter, 2)):
    assert np.array_equal(b["inputs"], nxt[g]["inputs"][local:2 * local])


def test_eval_batches_are_fixed(data_dir, textdir):
  cfg = _text_cfg(data_dir, textdir, seq_len=16, train__eval_batches=3)
  d = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  a = d.eval_batches()
  a[0]["inputs"][:] = -1  # callers cannot change later results
  next(d.train_iter)
  b = d.eval_batches()
  other = data_lib.make_data(_text_cfg(data_dir, textdir, seq_len=16, train__eval_batches=3,
                                       train__seed=5), workdir=str(data_dir / "run"))
  assert len(b) == 3 and all(x["inputs"].shape == (4, 16) for x in b)
  _assert_batches_equal(b, other.eval_batches())
  _assert_batches_equal(b, d.eval_batches())
  assert sum(x["loss_mask"].sum() for x in b) > 0


def test_textdir_info_counts_files(data_dir, textdir):
  d = data_lib.make_data(_text_cfg(data_dir, textdir), workdir=str(data_dir / "run"))
  split = textdir[1]
  assert d.info["train_files"] == len(split["train"])
  assert d.info["validation_files"] == len(split["validation"])
  assert d.info["skipped_not_utf8"] == 1  # binary.bin; the hidden folder is never listed


# ----------------------------------------------------------------------------- errors


def _one_line_error(cfg, match, **kw):
  with one_line_error(match=match) as e:
    data_lib.make_data(cfg, workdir=kw.pop("workdir", "/tmp/unused_run"), **kw)
  return str(e.value)


def test_bad_config_gives_one_line_errors(tmp_path, data_dir):
  msg = _one_line_error(_cfg(data_dir, name="no_such_dataset_xyz"), "data.name")
  assert "pystdlib" in msg and "textdir" in msg
  _one_line_error(_cfg(data_dir, name="textdir", text_dir=""), "data.text_dir")
  _one_line_error(_cfg(data_dir, name="textdir", text_dir=str(tmp_path / "missing")),
                  "data.text_dir")
  (tmp_path / "empty").mkdir()
  _one_line_error(_cfg(data_dir, name="textdir", text_dir=str(tmp_path / "empty")),
                  "data.text_dir")


@pytest.mark.parametrize("data, needles", [
    (dict(name=""), ("data.name", "pystdlib")),
    (dict(tokenizer="bpe"), ("data.tokenizer", "'byte', 'sentencepiece'", "'bpe'")),
    (dict(tokenizer="sentencepiece", sp_vocab_size=100), ("data.sp_vocab_size", "[320, ")),
    (dict(seq_len=0), ("data.seq_len", ">= 1")),
    (dict(validation_fraction=0.0), ("data.validation_fraction", "(0.0, 1.0)")),
    (dict(num_workers=-1), ("data.num_workers", "[0, 1024]")),
])
def test_validate_data_checks_the_data_group(data_dir, data, needles):
  """The static checks (moe.train.checks.validate_config runs them before make_data)."""
  with one_line_error(*needles):
    data_lib.validate_data(_cfg(data_dir, **data).data)
  data_lib.validate_data(_cfg(data_dir).data)


def test_tfds_dataset_that_cannot_be_prepared_is_a_one_line_error(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  class Unreachable:
    url_infos = None  # no download hosts declared: nothing to check before preparing

    def is_prepared(self):
      return False

    def download_and_prepare(self, **kw):
      raise ConnectionError("Failed to establish a new connection:\n[Errno -3] name resolution")

  monkeypatch.setattr(tfds, "builder", lambda name, data_dir: Unreachable())
  msg = _one_line_error(_cfg(tmp_path, name="tiny_shakespeare"), "data.name='tiny_shakespeare'")
  assert "ConnectionError" in msg and "pystdlib" in msg


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_and_resume(data_dir, textdir):
  cfg = _text_cfg(data_dir, textdir, seq_len=16)
  inline = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  cfg.data.num_workers = 2
  workers = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  try:
    _assert_batches_equal(_take(workers.train_iter, 4), _take(inline.train_iter, 4))
    state = json.loads(json.dumps(workers.train_iter.get_state()))
    expected = _take(workers.train_iter, 3)
    workers.train_iter.set_state(state)
    _assert_batches_equal(_take(workers.train_iter, 3), expected)
    _assert_batches_equal(expected, _take(inline.train_iter, 3))
  finally:
    workers.train_iter.close()
