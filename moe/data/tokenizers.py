"""Tokenizers: byte-level (the default, nothing to train) and SentencePiece (trained once, cached).

Both share the id layout 0 = pad, 1 = bos, 2 = eos and expose `encode(str) -> list[int]`,
`decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `num_bytes(ids)` (the UTF-8
bytes the tokens stand for, 0 for special tokens) and `bytes_per_id` (that count per vocabulary id,
a float32 numpy table) for bits per byte.
"""

from __future__ import annotations

import io
import os
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
MIN_SP_VOCAB = 320  # 256 byte pieces + 4 specials + "\n" + room for the corpus' characters


class ByteTokenizer:
  """UTF-8 bytes: byte b -> id b + 3; ids 0/1/2 are pad/bos/eos. vocab_size 259."""

  name = "byte"
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  offset = 3
  vocab_size = 256 + offset

  def __init__(self):
    table = np.ones(self.vocab_size, np.float32)
    table[: self.offset] = 0.0
    self.bytes_per_id = table

  def encode(self, text: str) -> list[int]:
    return self.encode_array(text).tolist()

  def encode_array(self, text: str) -> np.ndarray:
    raw = np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return raw.astype(np.int32) + self.offset

  def decode(self, ids: Sequence[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[ids >= self.offset] - self.offset
    return bytes(ids.astype(np.uint8).tolist()).decode("utf-8", errors="replace")

  def num_bytes(self, ids: Sequence[int]) -> int:
    return int(self.bytes_per_id[np.asarray(ids, dtype=np.int64)].sum())


class SentencePieceTokenizer:
  """A SentencePiece BPE model trained for source code: no normalization, whitespace kept as is,
  "\\n" a piece of its own, unseen characters fall back to bytes, so decode(encode(s)) == s for
  any string and the pieces' bytes add up to the UTF-8 length of the text."""

  name = "sentencepiece"
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self, model_proto: bytes):

    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.model_proto = model_proto
    self.vocab_size = int(self._sp.vocab_size())
    table = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      if self._sp.is_control(i) or self._sp.is_unknown(i):
        continue
      if self._sp.is_byte(i):
        table[i] = 1.0
      else:
        table[i] = len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    self.bytes_per_id = table

  @classmethod
  def load(cls, path: str) -> "SentencePieceTokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text))

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), dtype=np.int32)

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    return [np.asarray(x, dtype=np.int32) for x in self._sp.encode(texts, num_threads=2)]

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    return self._sp.decode(ids)

  def num_bytes(self, ids: Sequence[int]) -> int:
    return int(self.bytes_per_id[np.asarray(ids, dtype=np.int64)].sum())


def train_sentencepiece(texts: Iterable[str], vocab_size: int, *,
                        max_chars: int = 4_000_000) -> bytes:
  """Trains a BPE model on at most `max_chars` characters of `texts`; returns the model proto.

  Lines are the training sentences ("\\n" is a user-defined piece, so it is never merged).
  Raises ValueError (with SentencePiece's reason) when the vocabulary cannot be built.
  """

  def lines():
    budget = max_chars
    for text in texts:
      for line in text.split("\n"):
        if budget <= 0:
          return
        budget -= len(line) + 1
        if line:
          yield line

  out = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines(), model_writer=out, vocab_size=vocab_size, model_type="bpe",
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3, byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, user_defined_symbols=["\n"],
        allow_whitespace_only_pieces=True, split_digits=True, character_coverage=0.9995,
        max_sentence_length=1 << 16, hard_vocab_limit=False, num_threads=2, minloglevel=2)
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    raise ValueError(reason) from e
  return out.getvalue()


def load_or_train_sentencepiece(path: str, texts: Iterable[str],
                                vocab_size: int) -> SentencePieceTokenizer:
  """The cached model at `path`, training and writing it (atomically) the first time."""
  if not os.path.exists(path):
    proto = train_sentencepiece(texts, vocab_size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
      f.write(proto)
    os.replace(tmp, path)
  return SentencePieceTokenizer.load(path)
