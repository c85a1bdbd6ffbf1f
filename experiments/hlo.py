"""Collectives read from compiled HLO text: which ones a program runs and how many bytes they move.

Standard library only, so bench scripts may import it before JAX starts (bench_sharding.py sets
XLA_FLAGS first). The benchmarks import it as `hlo` (this folder is on their sys.path); the tests
as `experiments.hlo` (a namespace package from the repository root).
"""

from __future__ import annotations

import math
import re

_SHAPE = re.compile(r"\b(pred|s8|s16|s32|s64|u8|u16|u32|u64|bf16|f16|f32|f64)\[([\d,]*)\]")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")


def hlo_collectives(hlo_text: str) -> list[dict]:
  """Every collective instruction of a compiled HLO module: [{op, shapes, bytes}].

  `shapes` are the instruction's result shapes (for an all-to-all the same as its operands');
  `bytes` their total size on one device. Async pairs (`*-start`/`*-done`) count once, at start.
  """
  out = []
  for line in hlo_text.splitlines():
    m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([\w\-]+)\(", line)
    if not m:
      continue
    result, op = m.group(1), m.group(2)
    base = op[:-len("-start")] if op.endswith("-start") else op
    if base not in COLLECTIVES or op.endswith("-done"):
      continue
    shapes = [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in
              _SHAPE.findall(result)]
    if op.endswith("-start") and len(shapes) > 1:
      shapes = shapes[len(shapes) // 2:]  # (operands..., results...) tuple of an async start
    nbytes = sum(_BYTES[t] * math.prod(s) for t, s in shapes)
    out.append({"op": base, "shapes": shapes, "bytes": nbytes})
  return out


def all_to_all_bytes(hlo_text: str) -> int:
  """Bytes one device sends through all-to-all in this HLO module (sum of operand sizes)."""
  return sum(c["bytes"] for c in hlo_collectives(hlo_text) if c["op"] == "all-to-all")
