"""`data.tokenizer="hf:<path>"`: a Hugging Face tokenizer.json in the data pipeline (packed rows
of its ids, its EOS, bits per byte from its pieces), and the one-line errors of a bad value."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from conftest import one_line_error  # noqa: E402
from moe.data import pipeline as data_lib  # noqa: E402
from moe.data import tokenizers as tok_lib  # noqa: E402
from test_pipeline import _cfg, _text_cfg, _write_textdir  # noqa: E402


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("texts"))
  return root, _write_textdir(root)


def byte_level_bpe(folder, corpus, vocab_size=300, config=True) -> str:
  """A small byte-level BPE (GPT-2 / Qwen style, no BOS, EOS `<|endoftext|>`) saved in `folder`."""
  tok = tokenizers.Tokenizer(tokenizers.models.BPE())
  tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(corpus, trainer)
  os.makedirs(folder, exist_ok=True)
  tok.save(os.path.join(folder, "tokenizer.json"))
  if config:
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}, f)
  return folder


def test_hf_tokenizer_packs_its_own_ids(tmp_path, texts):
  root, split = texts
  corpus = [open(os.path.join(root, rel), encoding="utf-8").read() for rel in split["train"]]
  folder = byte_level_bpe(str(tmp_path / "tok"), corpus)
  tok = tok_lib.HfTokenizer(folder)
  assert tok.bos_id is None and tok.eos_id == tok.pad_id == 0 and 256 < tok.vocab_size <= 300
  for text in corpus[:3] + ["déjà vu 日本語\n"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.num_bytes(ids) == len(text.encode("utf-8"))  # byte-level pieces: exact
  doc = next(data_lib.encode_documents(tok, corpus[:1]))
  np.testing.assert_array_equal(doc, tok.encode(corpus[0]) + [0])  # no BOS, EOS last
  assert len(doc) < len(corpus[0].encode("utf-8")) / 1.5  # merged pieces, not bytes

  data_dir = tmp_path / "tfds"
  cfg = _text_cfg(data_dir, (root, split), tokenizer=f"hf:{folder}")
  data_lib.validate_data(cfg.data)
  d = data_lib.make_data(cfg, workdir=str(data_dir / "run"))
  assert d.info["vocab_size"] == tok.vocab_size
  assert os.path.basename(d.info["packed_dir"]).startswith(f"hf-{tok.digest}-L")
  b = next(d.train_iter)
  assert b["targets"].max() < tok.vocab_size
  np.testing.assert_array_equal(b["target_bytes"],
                                tok.bytes_per_id[b["targets"]] * b["loss_mask"])
  # The same file given directly (not its folder) is the same tokenizer.
  same = _text_cfg(data_dir, (root, split), tokenizer=f"hf:{folder}/tokenizer.json")
  assert data_lib.make_data(same, workdir=str(data_dir / "run")).info["packed_dir"] == \
      d.info["packed_dir"]


def test_bad_hf_tokenizer_values_are_one_line_errors(tmp_path, texts):
  with one_line_error("data.tokenizer='hf:/no/such/place'", "byte | sentencepiece | hf:"):
    data_lib.validate_data(_cfg(tmp_path, tokenizer="hf:/no/such/place").data)
  with one_line_error("data.tokenizer='hf:'"):
    data_lib.validate_data(_cfg(tmp_path, tokenizer="hf:").data)
  bad = tmp_path / "bad"
  bad.mkdir()
  (bad / "tokenizer.json").write_text("{not json")
  with one_line_error("tokenizer.json", "not a Hugging Face tokenizer.json"):
    tok_lib.HfTokenizer(str(bad))
  folder = byte_level_bpe(str(tmp_path / "no_eos"), ["a b c"], vocab_size=260, config=False)
  cfg = _text_cfg(tmp_path / "tfds", texts, tokenizer=f"hf:{folder}")
  with one_line_error("names no EOS token", "eos_token"):
    data_lib.make_data(cfg, workdir=str(tmp_path / "run"))


def test_model_vocab_must_hold_the_hf_tokenizer(tmp_path):
  """An imported model's explicit vocab_size against another, larger tokenizer: one line."""
  from moe.model.config import check_vocab_size
  folder = byte_level_bpe(str(tmp_path / "tok"), ["alpha beta gamma"] * 4, vocab_size=270)
  tok = tok_lib.HfTokenizer(folder)
  cfg = _cfg(tmp_path, tokenizer=f"hf:{folder}")
  cfg.model.vocab_size = tok.vocab_size - 1
  with one_line_error(f"model.vocab_size={tok.vocab_size - 1}", f"hf:{folder}"):
    check_vocab_size(cfg, tok.vocab_size)
  cfg.model.vocab_size = tok.vocab_size
  check_vocab_size(cfg, tok.vocab_size)
