"""What kind of source text each token is, for the routing analysis's per-kind statistics.

`token_kinds(pieces)` takes the decoded text of consecutive tokens of one document (one piece
per token, `tokenizer.decode([id])`), lexes their concatenation as Python source with one
regular expression, and gives each token the kind of the span holding its first non-space
character (a token of spaces only is "whitespace", also inside a string or a comment). Kinds (`KINDS`):

- "keyword": a word in `keyword.kwlist` (hard keywords; soft keywords such as `match` count as
  identifiers);
- "identifier": any other word (a letter or `_` first, then letters, digits, `_`);
- "number": a digit first (`3`, `0x1f`, `1.5e3` as far as `\\d[\\w.]*` reaches);
- "string": a quoted string on one line, or a triple-quoted one (docstrings included);
- "comment": `#` to the end of the line;
- "operator": any other single non-space character (punctuation, brackets, operators);
- "whitespace": spaces, tabs and newlines (indentation included).

This is a lexer for statistics, not Python's tokenizer: a row of the data pipeline can start or
end inside a string, and then that string's text is lexed as code (the first quote opens a
string that the row never closes, so the rest of the row is lexed as code too). Bytes of a
multi-byte character decode alone to U+FFFD, which lexes as "operator".
"""

from __future__ import annotations

import keyword
import re

import numpy as np

KINDS = ("whitespace", "keyword", "identifier", "number", "string", "comment", "operator")
_KIND_ID = {k: i for i, k in enumerate(KINDS)}
_KEYWORDS = frozenset(keyword.kwlist)
_LEX = re.compile(
    r"(?P<comment>#[^\n]*)"
    r"|(?P<string>'''[\s\S]*?'''|\"\"\"[\s\S]*?\"\"\"|'(?:\\.|[^'\\\n])*'|\"(?:\\.|[^\"\\\n])*\")"
    r"|(?P<number>\d[\w.]*)"
    r"|(?P<word>[^\W\d]\w*)"
    r"|(?P<whitespace>\s+)"
    r"|(?P<operator>\S)")


def char_kinds(text: str) -> np.ndarray:
  """[len(text)] int8: the kind (index into KINDS) of every character of `text`."""
  out = np.zeros(len(text), np.int8)
  for m in _LEX.finditer(text):
    kind = m.lastgroup
    if kind == "word":
      kind = "keyword" if m.group() in _KEYWORDS else "identifier"
    out[m.start():m.end()] = _KIND_ID[kind]
  return out


def token_kinds(pieces: list[str]) -> np.ndarray:
  """[len(pieces)] int8: each token's kind (module docstring), lexing the pieces together."""
  text = "".join(pieces)
  kinds = char_kinds(text)
  out = np.full(len(pieces), _KIND_ID["whitespace"], np.int8)
  pos = 0
  for i, p in enumerate(pieces):
    stripped = len(p) - len(p.lstrip())
    if stripped < len(p):
      out[i] = kinds[pos + stripped]
    pos += len(p)
  return out
