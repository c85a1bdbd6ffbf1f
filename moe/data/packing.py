"""Packing token documents into fixed-length rows, and a row into a training example.

A document is `bos + tokens + eos`. Rows hold `row_len = seq_len + 1` tokens; documents are laid
down greedily in order, each piece a new segment (1, 2, 3, ... within the row; 0 = padding).
A document longer than the room left is split: the piece fills the row and the next piece starts
the next row with the piece's LAST token again (one token of overlap), so every next-token
prediction of the document (token i -> i+1) happens exactly once, inside one segment. Positions
restart at 0 for every piece, so they stay below `seq_len` (the model's max_len must be at least
`seq_len`). A row never starts a piece in its last slot (a 1-token piece predicts nothing): that
slot is padded instead.

An example from a row r (length L+1): inputs = r[:-1], targets = r[1:], segment_ids and positions
of the inputs, loss_mask 1 where the target is in the input's segment (never across a boundary,
never on padding), target_bytes = the bytes the target token stands for where loss_mask is 1.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np


def pack_documents(docs: Iterable[np.ndarray], row_len: int,
                   dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
  """Packs token arrays (each already bos + ... + eos) into `tokens`, `segments` [N, row_len]."""
  if row_len < 2:
    raise ValueError(f"row_len must be >= 2, got {row_len}")
  rows_tok: list[np.ndarray] = []
  rows_seg: list[np.ndarray] = []
  tok = np.zeros(row_len, dtype)
  seg = np.zeros(row_len, np.int32)
  fill, nseg = 0, 0

  def flush():
    nonlocal tok, seg, fill, nseg
    rows_tok.append(tok)
    rows_seg.append(seg)
    tok = np.zeros(row_len, dtype)
    seg = np.zeros(row_len, np.int32)
    fill, nseg = 0, 0

  for doc in docs:
    doc = np.asarray(doc)
    n = len(doc)
    if n < 2:
      continue
    start = 0
    while True:
      space = row_len - fill
      if space < 2:
        flush()
        continue
      take = min(n - start, space)
      nseg += 1
      tok[fill:fill + take] = doc[start:start + take]
      seg[fill:fill + take] = nseg
      fill += take
      if start + take >= n:
        break
      start += take - 1  # the next piece repeats this piece's last token
      flush()
  if fill:
    flush()
  if not rows_tok:
    return np.zeros((0, row_len), dtype), np.zeros((0, row_len), np.int32)
  return np.stack(rows_tok), np.stack(rows_seg)


def positions_from_segments(seg: np.ndarray) -> np.ndarray:
  """0, 1, 2, ... restarting where the segment id changes; 0 on padding. Works on [..., L]."""
  seg = np.asarray(seg)
  idx = np.broadcast_to(np.arange(seg.shape[-1]), seg.shape)
  start = np.ones(seg.shape, bool)
  start[..., 1:] = seg[..., 1:] != seg[..., :-1]
  first = np.maximum.accumulate(np.where(start, idx, 0), axis=-1)
  return np.where(seg != 0, idx - first, 0).astype(np.int32)


def row_to_example(tokens: np.ndarray, segments: np.ndarray,
                   bytes_per_id: np.ndarray) -> dict[str, np.ndarray]:
  """One packed row [L+1] (or a batch [..., L+1]) -> the example dict of [L] arrays."""
  tokens = np.asarray(tokens, np.int32)
  segments = np.asarray(segments, np.int32)
  seg_in, seg_out = segments[..., :-1], segments[..., 1:]
  targets = tokens[..., 1:]
  mask = (seg_in == seg_out) & (seg_in != 0)
  return {
      "inputs": tokens[..., :-1],
      "targets": targets,
      "segment_ids": seg_in,
      "positions": positions_from_segments(seg_in),
      "loss_mask": mask.astype(np.float32),
      "target_bytes": np.where(mask, bytes_per_id[targets], 0.0).astype(np.float32),
  }
