"""Tokenizers: byte-level (the default, nothing to train), SentencePiece (trained once, cached)
and a Hugging Face `tokenizer.json` (`data.tokenizer="hf:<path>"`, e.g. an imported model's).

Byte and SentencePiece share the id layout 0 = pad, 1 = bos, 2 = eos (a Hugging Face tokenizer
has its own, and may have no BOS); all three expose `encode(str) -> list[int]`,
`decode(ids) -> str`, `vocab_size`, `pad_id`, `bos_id`, `eos_id`, `num_bytes(ids)` (the UTF-8
bytes the tokens stand for, 0 for special tokens) and `bytes_per_id` (that count per vocabulary id,
a float32 numpy table) for bits per byte.

Export (`python -m moe.convert --to_hf`, `moe.convert.tokenizer_files`): `byte_tokenizer_json` and
`sentencepiece_tokenizer_json` write the byte and SentencePiece tokenizers as Hugging Face
tokenizer.json files that encode to the same ids (BOS prepended as in training).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from typing import Iterable, Sequence

import numpy as np
import sentencepiece as spm

from moe import rundir
from moe.errors import ConfigError

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

  def id_to_token(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))


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


# ----------------------------------------------------------------------------- Hugging Face

HF_PREFIX = "hf:"  # data.tokenizer="hf:<tokenizer.json, or a folder holding one>"
TOKENIZER_JSON = "tokenizer.json"
SPECIAL_TOKENS_JSON = "special_tokens.json"  # {"bos_id", "eos_id", "pad_id"}, written by import
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def hf_tokenizer_path(spec: str, field: str = "data.tokenizer") -> str:
  """The tokenizer.json named by `spec` ("hf:<file or folder>", or the path itself); a one-line
  ConfigError naming `field` when there is none."""
  path = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
  path = os.path.expanduser(path)
  if path and not rundir.is_remote(path) and os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_JSON)
  elif path and rundir.is_remote(path) and not path.endswith(".json"):
    path = rundir.join(path, TOKENIZER_JSON)
  if not path or not rundir.exists(path):
    raise ConfigError(f"{field}={spec!r}: no tokenizer.json there; use byte | sentencepiece | "
                      "hf:<a tokenizer.json, or a folder holding one>")
  return path


def _token_id(tok, value):
  """A tokenizer_config.json entry (a string or {"content": ...}) -> its id, or None."""
  if isinstance(value, dict):
    value = value.get("content")
  return tok.token_to_id(value) if isinstance(value, str) else None


class HfTokenizer:
  """A Hugging Face `tokenizer.json` through the `tokenizers` package, with this project's
  tokenizer interface (`encode`, `encode_array`, `encode_many`, `decode`, `vocab_size`,
  `bos_id` / `eos_id` / `pad_id` (None when it has none), `num_bytes`, `bytes_per_id`).

  Special ids: `special_tokens.json` beside it (written by `python -m moe.convert`), else the
  bos/eos/pad tokens of a `tokenizer_config.json` beside it. `bytes_per_id`: 0 for special
  tokens, 1 for a byte-fallback piece `<0xNN>`, the token's length for byte-level BPE (one
  character per byte: exact), else the UTF-8 length of the piece with the Metaspace "▁" as a
  space (SentencePiece-style: the space a text's first piece gets from the dummy prefix counts
  one byte more than the text has; other vocabularies: approximate)."""

  name = "hf"

  def __init__(self, path: str):
    try:  # only Hugging Face tokenizers need the package
      from tokenizers import Tokenizer
    except ImportError:
      raise ConfigError(f"{path} is a Hugging Face tokenizer; reading it needs the `tokenizers` "
                        "package (pip install tokenizers)") from None
    if not path.endswith(".json"):
      path = rundir.join(path, TOKENIZER_JSON)
    self.path = path
    self.json_text = rundir.read_text(path)
    try:
      self._tok = Tokenizer.from_str(self.json_text)
    except Exception as e:  # noqa: BLE001 - the Rust parser's errors have no common base class
      first = (str(e).splitlines() or [""])[0][:200]
      raise ConfigError(f"{path}: not a Hugging Face tokenizer.json ({first})") from None
    self.digest = hashlib.sha256(self.json_text.encode("utf-8")).hexdigest()[:8]
    folder = path.rsplit("/", 1)[0] if "/" in path else "."
    ids = self._special_ids(folder)
    self.bos_id, self.eos_id, self.pad_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    self.bytes_per_id = self._bytes_table()

  def _special_ids(self, folder: str) -> dict:
    def load(name):
      p = rundir.join(folder, name)
      if not rundir.exists(p):
        return None
      try:
        return rundir.load_json(p, name)
      except ValueError as e:
        raise ConfigError(str(e)) from None

    ours = load(SPECIAL_TOKENS_JSON)
    if isinstance(ours, dict):
      return {k: ours.get(k) for k in ("bos_id", "eos_id", "pad_id")}
    theirs = load("tokenizer_config.json") or {}
    return {f"{k}_id": _token_id(self._tok, theirs.get(f"{k}_token"))
            for k in ("bos", "eos", "pad")}

  def _bytes_table(self) -> np.ndarray:
    spec = json.loads(self.json_text)
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) + json.dumps(
        spec.get("pre_tokenizer"))
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    table = np.zeros(self.vocab_size, np.float32)
    for i in range(self.vocab_size):
      if i in added:
        table[i] = 0.0 if added[i].get("special") else len(added[i]["content"].encode("utf-8"))
        continue
      piece = self._tok.id_to_token(i)
      if piece is None:
        continue
      if _BYTE_PIECE.fullmatch(piece):
        table[i] = 1.0
      elif byte_level:
        table[i] = len(piece)
      else:
        table[i] = len(piece.replace("\u2581", " ").removeprefix("##").encode("utf-8"))
    return table

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def encode_array(self, text: str) -> np.ndarray:
    return np.asarray(self.encode(text), dtype=np.int32)

  def encode_many(self, texts: list[str]) -> list[np.ndarray]:
    out = self._tok.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(e.ids, dtype=np.int32) for e in out]

  def decode(self, ids: Sequence[int]) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)],
                            skip_special_tokens=True)

  def num_bytes(self, ids: Sequence[int]) -> int:
    return int(self.bytes_per_id[np.asarray(ids, dtype=np.int64)].sum())

  def id_to_token(self, i: int) -> str | None:
    return self._tok.id_to_token(int(i))


def document(tok, ids) -> np.ndarray:
  """[BOS (when the tokenizer has one)] + ids + [EOS] as int32: one document of packed rows."""
  bos = [] if tok.bos_id is None else [tok.bos_id]
  return np.concatenate([np.asarray(bos, np.int32), np.asarray(ids, np.int32),
                         np.asarray([tok.eos_id], np.int32)])


# ----------------------------------------------------------------------------- export

BYTE_SPECIALS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2 of ByteTokenizer


def byte_tokenizer_json() -> str:
  """`ByteTokenizer` as a Hugging Face tokenizer.json: byte-level pieces, no merges (byte b ->
  id b + 3), `<pad>` `<s>` `</s>` = 0 1 2, BOS prepended when special tokens are added (as the
  model saw documents in training). Loaded by `transformers.AutoTokenizer` it encodes text to the
  ids `ByteTokenizer.encode` gives."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
  table = _bytes_to_unicode()
  vocab = {s: i for i, s in enumerate(BYTE_SPECIALS)}
  vocab.update({table[b]: b + ByteTokenizer.offset for b in range(256)})
  tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None, fuse_unk=False))
  tok.add_special_tokens(list(BYTE_SPECIALS))
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  tok.decoder = decoders.ByteLevel()
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
  return tok.to_str()


def sentencepiece_tokenizer_json(model_proto: bytes) -> str:
  """A `train_sentencepiece` model as a Hugging Face tokenizer.json that encodes to the ids
  `SentencePieceTokenizer.encode` gives and decodes them back to the same text:

  - a BPE model over the pieces' ids whose merges are every split of a normal piece into two
    pieces, ranked by the merged piece's score (SentencePiece merges the adjacent pair whose
    concatenation is the best-scored piece), `byte_fallback` onto the `<0xNN>` pieces;
  - spaces as "▁" (Metaspace, no prefix space: no dummy prefix, whitespace kept) and, with
    `split_digits`, the digits SentencePiece splits (0-9 and fullwidth ０-９) isolated;
  - "\\n" (a user-defined piece) an added token, the control pieces (`<pad>` `<s>` `</s>`, and
    `<unk>`) special tokens; BOS prepended when special tokens are added, as documents start in
    training (`document`);
  - a decoder that turns "▁" back into spaces and byte pieces into their characters.

  Where it differs from SentencePiece: a text holding a control piece's text literally ("<s>")
  gets the special id (SentencePiece encodes its characters), as every Hugging Face tokenizer
  does with its special tokens; decoding byte pieces that are not valid UTF-8 (never produced by
  encoding a text) puts U+FFFD for each byte of the broken run where SentencePiece keeps the
  valid ones; and in principle a tie SentencePiece breaks by position (two overlapping pairs
  forming the same piece through different splits) is broken by merge rank here, which no test
  text has shown (tests/data/test_sentencepiece_export.py). A model trained with other
  settings than `train_sentencepiece`'s is a ValueError naming the setting."""
  from sentencepiece import sentencepiece_model_pb2
  from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
  from tokenizers import processors
  m = sentencepiece_model_pb2.ModelProto()
  m.ParseFromString(model_proto)
  _check_sentencepiece_settings(m)
  kind = sentencepiece_model_pb2.ModelProto.SentencePiece
  vocab = {p.piece: i for i, p in enumerate(m.pieces)}
  tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(m.pieces, kind),
                             unk_token=m.pieces[m.trainer_spec.unk_id].piece, fuse_unk=False,
                             byte_fallback=True))
  tok.add_tokens([AddedToken(p.piece, special=p.type != kind.USER_DEFINED, normalized=False)
                  for p in m.pieces if p.type in (kind.CONTROL, kind.UNKNOWN, kind.USER_DEFINED)])
  splits = [pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)]
  if m.trainer_spec.split_digits:
    splits.append(pre_tokenizers.Split(Regex("[0-9\uff10-\uff19]"), behavior="isolated"))
  tok.pre_tokenizer = pre_tokenizers.Sequence(splits)
  tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                   decoders.Fuse()])
  bos = m.pieces[m.trainer_spec.bos_id].piece
  tok.post_processor = processors.TemplateProcessing(
      single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, m.trainer_spec.bos_id)])
  return tok.to_str()


def _check_sentencepiece_settings(m) -> None:
  """ValueError unless model proto `m` has the settings `sentencepiece_tokenizer_json` mirrors."""
  t, n = m.trainer_spec, m.normalizer_spec
  wanted = {"model_type": (t.model_type, t.BPE), "byte_fallback": (t.byte_fallback, True),
            "treat_whitespace_as_suffix": (t.treat_whitespace_as_suffix, False),
            "add_dummy_prefix": (n.add_dummy_prefix, False),
            "remove_extra_whitespaces": (n.remove_extra_whitespaces, False),
            "escape_whitespaces": (n.escape_whitespaces, True),
            "normalization (precompiled_charsmap empty)": (bool(n.precompiled_charsmap), False)}
  for name, (got, want) in wanted.items():
    if got != want:
      raise ValueError(f"SentencePiece model with {name}={got!r} has no tokenizer.json form here "
                       f"(train_sentencepiece sets {want!r})")


def _sentencepiece_merges(pieces, kind) -> list[tuple[str, str]]:
  """Every (left, right) pair of pieces whose concatenation is a normal piece, best-scored merged
  piece first (ties: the piece's id, then the split point), as SentencePiece's BPE merges."""
  ids = {p.piece: i for i, p in enumerate(pieces) if p.type in (kind.NORMAL, kind.USER_DEFINED)}
  ranked = []
  for i, p in enumerate(pieces):
    if p.type != kind.NORMAL:
      continue
    for k in range(1, len(p.piece)):
      left, right = p.piece[:k], p.piece[k:]
      if left in ids and right in ids:
        ranked.append((-p.score, i, k, left, right))
  ranked.sort()
  return [(left, right) for *_, left, right in ranked]


def _bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible byte -> printable character table (the ByteLevel pre-tokenizer's)."""
  bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
      range(ord("®"), ord("ÿ") + 1))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))
