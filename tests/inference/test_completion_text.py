"""The completion is decoded together with its prompt: with a Metaspace tokenizer (Llama /
Mixtral style, built here with the `tokenizers` package) the completion's leading space survives,
where decoding the completion alone glues it to the prompt."""

from __future__ import annotations

import os

import pytest

tokenizers = pytest.importorskip("tokenizers")

from moe.data.tokenizers import ByteTokenizer, HfTokenizer  # noqa: E402
from moe.inference import generate  # noqa: E402
from test_generate import V, make_gen, tiny  # noqa: E402


@pytest.fixture(scope="module")
def metaspace(tmp_path_factory):
  """Word-level Metaspace tokenizer: "<unk>" "<s>" "</s>" then "▁w0".."▁w33" (V ids in all)."""
  words = ["<unk>", "<s>", "</s>"] + [f"\u2581w{i}" for i in range(V - 3)]
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                         unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Metaspace()
  tok.decoder = tokenizers.decoders.Metaspace()
  tok.add_special_tokens(["<unk>", "<s>", "</s>"])
  folder = str(tmp_path_factory.mktemp("metaspace"))
  tok.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "special_tokens.json"), "w") as f:
    f.write('{"bos_id": 1, "eos_id": null, "pad_id": null}')
  return HfTokenizer(folder)


def test_completion_keeps_its_leading_space(metaspace):
  prompt = metaspace.encode("w5 w17 w3")
  completion = metaspace.encode("w30 w23")
  assert metaspace.decode(completion) == "w30 w23"  # alone: no leading space (the old bug)
  assert generate.completion_text(metaspace, [1] + prompt, completion) == " w30 w23"
  # Byte tokenizer: a character split between prompt and completion is finished there.
  b = ByteTokenizer()
  ids = b.encode("naï")
  assert b.decode(ids[-1:]) == "\ufffd"  # alone: half a character
  assert generate.completion_text(b, ids[:-1], ids[-1:]) == "ï"
  assert generate.completion_text(b, b.encode("ab"), b.encode("c d")) == "c d"


def test_generator_prints_prompt_and_completion_apart(metaspace):
  """The generated words are separated from the prompt in Completion.text and in main's output."""
  gen = make_gen(tiny(False), scale=3.0)
  gen.tokenizer = metaspace
  prompt = "w5 w17 w3"
  c = gen.complete(gen.encode_prompt(prompt), max_new_tokens=4, temperature=0.0)
  assert c.prompt_ids[0] == 1 and len(c.ids) == 4
  words = [metaspace.id_to_token(i) for i in c.ids]
  assert c.text == "".join(w.replace("\u2581", " ") for w in words if w.startswith("\u2581"))
  assert c.text.startswith(" w")
  # Stop strings search the same text.
  first = c.text.split()[0]
  cut = gen.complete(gen.encode_prompt(prompt), max_new_tokens=4, temperature=0.0,
                     stop=[" " + first])
  assert cut.text == "" and cut.stopped == "stop"
