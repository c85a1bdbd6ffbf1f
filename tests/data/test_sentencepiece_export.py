"""A SentencePiece run's tokenizer as a Hugging Face tokenizer.json
(`moe.data.tokenizers.sentencepiece_tokenizer_json`): the same ids as `SentencePieceTokenizer`
on code, digits, whitespace, unseen characters and random strings, the same text back, BOS as in
training; and `python -m moe.convert --to_hf` of a SentencePiece run read by `AutoTokenizer`."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest

tokenizers = pytest.importorskip("tokenizers")

from conftest import one_line_error  # noqa: E402
from moe.data import tokenizers as tok_lib  # noqa: E402

# Texts of every kind the training text has and has not: indentation and runs of spaces, digits,
# newlines, tabs, characters never seen (byte fallback), leading / trailing spaces, nothing.
FIXED = [
    "", " ", "\n", "\n\n\n", "\t", "    ", "x", "é", "日本", "🙂", "\u00a0", "\r\n",
    "def f(x):\n    return x  +  1\n", "x = 12345", "y=0.5e-3 # 99 bottles", "ｘ = １２３",
    "class A:\n\tdef g(self):\n\t\tpass\n", "  leading", "trailing   ", "  both  ",
    "if a  ==  b:\n        print('déjà vu', \"日本語\")  # 🙂 naïve\n",
    "    \n    \n", "a" * 40, "_" * 17 + "=" * 9, "      x      y", "\\n \\t '\\x00'",
]
ALPHABET = (list("abcdefxyz_ ()[]{}=:.,;'\"#+-*/<>\t\n0123456789") +
            ["  ", "    ", "        ", "def ", "self", "return", "é", "ñ", "日本", "🙂", "\r",
             "１", "²", "\u00a0", "λ", "\x00"])


def corpus() -> list[str]:
  """About 12 KB of Python-like text: indentation, operators, numbers, strings, comments."""
  rng = random.Random(0)
  words = ["def", "return", "self", "value", "import", "class", "for", "in", "if", "else",
           "print", "range", "None", "True", "items", "data", "x", "y", "len", "list", "(", ")",
           ":", "=", "==", "+=", "[", "]", "{", "}", ",", ".", "'text'", '"s"', "#", "0", "1",
           "42", "3.14", "__init__", "_private"]
  files = []
  for _ in range(12):
    lines = []
    for _ in range(rng.randint(20, 40)):
      n = rng.randint(1, 9)
      lines.append("    " * rng.randint(0, 3) + " ".join(rng.choice(words) for _ in range(n)))
    files.append("\n".join(lines) + "\n")
  return files


@pytest.fixture(scope="module")
def pair():
  """(SentencePieceTokenizer trained here, the tokenizers.Tokenizer of its tokenizer.json)."""
  sp = tok_lib.SentencePieceTokenizer(tok_lib.train_sentencepiece(corpus(), 330))
  hf = tokenizers.Tokenizer.from_str(tok_lib.sentencepiece_tokenizer_json(sp.model_proto))
  return sp, hf


def random_texts(n: int, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, 60))) for _ in range(n)]


def test_same_ids_and_text_as_sentencepiece(pair):
  sp, hf = pair
  assert hf.get_vocab_size() == sp.vocab_size
  pieces = 0
  for text in FIXED + random_texts(400) + corpus()[:2]:
    ids = sp.encode(text)
    got = hf.encode(text, add_special_tokens=False)
    assert got.ids == ids, (text, [sp.id_to_token(i) for i in ids], got.tokens)
    assert hf.decode(ids) == text == sp.decode(ids), text
    # BOS first when special tokens are added, as a document starts in training.
    assert hf.encode(text).ids == tok_lib.document(sp, ids)[:-1].tolist()
    pieces += len(ids) < len(text.encode("utf-8"))
  assert pieces > 100  # merged pieces, not bytes: the merges were exercised
  # The unseen characters went through byte fallback (the same <0xNN> ids on both sides).
  assert [sp.id_to_token(i) for i in sp.encode("🙂")] == ["<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]


def test_decode_drops_special_ids_and_reads_any_text_pieces(pair):
  sp, hf = pair
  ids = sp.encode("def f(x):\n    return 1\n")
  with_specials = [sp.bos_id] + ids + [sp.eos_id, sp.pad_id, sp.pad_id]
  assert hf.decode(with_specials) == sp.decode(with_specials) == "def f(x):\n    return 1\n"
  # Random sequences of text pieces (not only what encode produces): the same text.
  text_ids = [i for i in range(sp.vocab_size) if not sp._sp.is_byte(i) and not  # noqa: SLF001
              sp._sp.is_control(i) and not sp._sp.is_unknown(i)]  # noqa: SLF001
  rng = np.random.default_rng(0)
  for _ in range(200):
    seq = rng.choice(text_ids, size=int(rng.integers(1, 20))).tolist()
    assert hf.decode(seq) == sp.decode(seq), [sp.id_to_token(i) for i in seq]


def test_documented_differences(pair):
  """The differences the docstring names, exactly: a literal control piece in the text is the
  special id for Hugging Face; "▁" in the text reads as a space on both sides."""
  sp, hf = pair
  text = "a<s>b</s>"
  assert hf.encode(text, add_special_tokens=False).ids == (
      sp.encode("a") + [sp.bos_id] + sp.encode("b") + [sp.eos_id])
  assert sp.decode(sp.encode(text)) == text and sp.bos_id not in sp.encode(text)
  assert hf.encode("a\u2581b", add_special_tokens=False).ids == sp.encode("a\u2581b") == \
      sp.encode("a b")
  assert hf.decode(sp.encode("a\u2581b")) == sp.decode(sp.encode("a\u2581b")) == "a b"


def test_other_sentencepiece_settings_refused(pair):
  from sentencepiece import sentencepiece_model_pb2
  sp, _ = pair
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(sp.model_proto)
  m.normalizer_spec.add_dummy_prefix = True
  with pytest.raises(ValueError, match="add_dummy_prefix=True"):
    tok_lib.sentencepiece_tokenizer_json(m.SerializeToString())


def test_export_of_a_sentencepiece_run_reads_in_autotokenizer(tiny_config, tmp_path):
  """A run on data.tokenizer="sentencepiece" (its data prepared as the trainer does, random
  params) exported with --to_hf: `AutoTokenizer` gives the run's ids, BOS first as in training;
  a summary.json naming another model is refused in one line."""
  transformers = pytest.importorskip("transformers")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from moe.convert import cli as convert
  from moe.data import pipeline as data_lib
  from moe.model.config import model_config_from
  from moe.model.transformer import Transformer
  cfg = tiny_config({"data.tokenizer": "sentencepiece", "data.sp_vocab_size": 330})
  work = str(tmp_path / "run")
  data = data_lib.make_data(cfg, workdir=work)
  sp = data.tokenizer
  assert isinstance(sp, tok_lib.SentencePieceTokenizer)
  cfg.model.vocab_size = sp.vocab_size
  init = jax.jit(Transformer(model_config_from(cfg)).init)
  params = nn.unbox(init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
  convert.save_checkpoint(work, jax.device_get(params))
  with open(os.path.join(work, "config.json"), "w") as f:
    json.dump(cfg.to_dict(), f)
  with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump({"data": {"tokenizer_key": data.info["tokenizer_key"]}}, f)

  out = str(tmp_path / "hf")
  report = []
  config = convert.to_hf(work, out, report=report)
  assert "SentencePiece" in report[0] and data.info["tokenizer_key"] in report[0]
  assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 0)
  assert json.load(open(os.path.join(out, "generation_config.json")))["eos_token_id"] == 2
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (1, 2, 0)
  for prompt in ["def fib(n):\n    return n  # 12 🙂", "  x = 1\n\tself.data"]:
    ids = sp.encode(prompt)
    # The packed training rows hold each document as [BOS] + ids + [EOS].
    doc = next(data_lib.encode_documents(sp, [prompt])).tolist()
    assert auto(prompt).input_ids == [sp.bos_id] + ids == doc[:-1]
    assert auto(prompt, add_special_tokens=False).input_ids == ids
    assert auto.decode(auto(prompt).input_ids, skip_special_tokens=True) == prompt

  with open(os.path.join(work, "summary.json"), "w") as f:
    json.dump({"data": {"tokenizer_key": "sp330-00000000"}}, f)
  with one_line_error("sp330-00000000", "data.tfds_data_dir"):
    convert.to_hf(work, str(tmp_path / "hf2"))
