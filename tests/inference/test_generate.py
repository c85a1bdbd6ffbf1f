"""Autocomplete: KV-cache decoding against the full forward pass, greedy/temperature/top-p
sampling, seeds, stop strings, routing capture and map, and the one-line errors of `main`."""

from __future__ import annotations

import io
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe.inference import generate
from moe.inference import routing_view
from moe.errors import ConfigError
from moe.model.config import ModelConfig
from moe.layer.config import MoeConfig
from moe.model.transformer import Transformer

V = 37


class LetterTokenizer:
  """id i -> one letter; no BOS/EOS (so generation runs to its limit)."""
  vocab_size = V
  bos_id = None
  eos_id = None

  def encode(self, text):
    return [ord(c) - 97 for c in text]

  def decode(self, ids):
    return "".join(chr(97 + (int(i) % 26)) for i in ids)


def tiny(moe: bool, **kw) -> ModelConfig:
  base = dict(vocab_size=V, d_model=16, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
              d_ff=24, max_len=24)
  base.update(kw)
  if moe:
    base["moe"] = MoeConfig(num_experts=4, num_selected=2, expert_hidden=12,
                            capacity_factor=None, eval_capacity_factor=None)
  return ModelConfig(**base)


def make_gen(cfg: ModelConfig, seed=0, scale=1.0):
  model = Transformer(cfg)
  params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 4), jnp.int32))["params"])
  # Larger output weights: a peaked distribution, so sampling differs visibly from greedy.
  params = jax.tree.map(lambda x: x * scale if x.ndim == 2 and x.shape[-1] == V else x, params)
  return generate.Generator(model, params, {}, LetterTokenizer())


PROMPT = [3, 1, 4, 1, 5, 9, 2]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe_dropless"])
def test_cached_decoding_matches_full_forward(moe):
  gen = make_gen(tiny(moe))
  c = gen.complete(PROMPT, max_new_tokens=9, temperature=0.0)
  assert len(c.ids) == 9 and c.stopped == "length"
  seq = jnp.asarray([PROMPT + c.ids], jnp.int32)
  full = np.asarray(gen.model.apply(gen.variables, seq))[0]
  P = len(PROMPT)
  np.testing.assert_allclose(c.logits, full[P - 1:P - 1 + len(c.ids)], rtol=1e-4, atol=1e-4)
  # Greedy = argmax of the full forward's logits at every step.
  assert c.ids == [int(np.argmax(full[P - 1 + i])) for i in range(len(c.ids))]


def test_sampling_seeded_and_top_p():
  gen = make_gen(tiny(True), scale=3.0)
  greedy = gen.complete(PROMPT, max_new_tokens=12, temperature=0.0).ids
  a = gen.complete(PROMPT, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3).ids
  b = gen.complete(PROMPT, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=3).ids
  c = gen.complete(PROMPT, max_new_tokens=12, temperature=1.0, top_p=1.0, seed=4).ids
  assert a == b  # reproducible
  assert a != c and a != greedy  # the seed and the sampling matter
  tiny_p = gen.complete(PROMPT, max_new_tokens=12, temperature=1.0, top_p=1e-6, seed=5).ids
  assert tiny_p == greedy


def test_sample_token_nucleus_distribution():
  logits = jnp.log(jnp.asarray([0.05, 0.5, 0.3, 0.15], jnp.float32))
  keys = jax.random.split(jax.random.PRNGKey(0), 4000)
  draw = jax.jit(jax.vmap(lambda k: generate.sample_token(logits, k, 1.0, 0.7)))
  got = np.asarray(draw(keys))
  # Nucleus for top_p=0.7: {1 (0.5), 2 (0.3)}: renormalized 0.625 / 0.375.
  assert set(np.unique(got)) == {1, 2}
  assert abs(np.mean(got == 1) - 0.625) < 0.03
  full = np.asarray(jax.jit(jax.vmap(lambda k: generate.sample_token(logits, k, 1.0, 1.0)))(keys))
  np.testing.assert_allclose(np.bincount(full, minlength=4) / 4000, [0.05, 0.5, 0.3, 0.15],
                             atol=0.03)
  assert int(generate.sample_token(logits, keys[0], 0.0, 1.0)) == 1  # greedy
  # A lower temperature sharpens the distribution.
  cold = np.asarray(jax.jit(jax.vmap(lambda k: generate.sample_token(logits, k, 0.3, 1.0)))(keys))
  assert np.mean(cold == 1) > 0.8


def test_stop_strings_cut_the_output():
  gen = make_gen(tiny(False), scale=3.0)
  full = gen.complete(PROMPT, max_new_tokens=12, temperature=0.0)
  assert len(full.text) == 12
  stop = full.text[3:5]
  cut = gen.complete(PROMPT, max_new_tokens=12, temperature=0.0, stop=[stop])
  assert cut.stopped == "stop"
  assert cut.text == full.text[:full.text.find(stop)]
  assert stop not in cut.text


def test_routing_capture_matches_full_forward():
  gen = make_gen(tiny(True))
  c = gen.complete(PROMPT, max_new_tokens=6, temperature=0.0, capture_routing=True)
  seq = jnp.asarray([PROMPT + c.ids], jnp.int32)
  _, mut = gen.model.apply(gen.variables, seq, mutable=["intermediates"])
  ref = generate.routing_per_layer(mut["intermediates"], seq.shape[1])
  assert [n for n, _ in c.routing] == ["layer_0", "layer_1"]
  n = len(PROMPT) + len(c.ids)  # the last generated token is fed once more to see its routing
  for (name, got), (_, want) in zip(c.routing, ref):
    assert got["expert_index"].shape[0] == n
    np.testing.assert_array_equal(np.sort(got["expert_index"], -1),
                                  np.sort(want["expert_index"][:n], -1))
    np.testing.assert_allclose(np.sort(got["combine_weights"], -1),
                               np.sort(want["combine_weights"][:n], -1), atol=1e-5)
    np.testing.assert_allclose(got["combine_weights"].sum(-1), 1.0, atol=1e-5)


def test_routing_view_files_and_load(tmp_path):
  d = {"expert_index": np.array([[0, 1], [2, 0], [2, 3]]),
       "combine_weights": np.array([[0.7, 0.3], [0.6, 0.4], [0.0, 0.9]]),
       "slot": np.array([[0, 0], [0, 1], [-1, 0]])}
  t1, w = routing_view.top1(d)
  assert t1.tolist() == [0, 2, 3] and np.allclose(w, [0.7, 0.6, 0.9])
  load, top1_load = routing_view.expert_load(d, 4)
  np.testing.assert_allclose(load, [2 / 5, 1 / 5, 1 / 5, 1 / 5])
  np.testing.assert_allclose(top1_load, [1 / 3, 0, 1 / 3, 1 / 3])
  paths = routing_view.write_routing_map(str(tmp_path), ["a", "\n", "<b>"], [("layer_0", d)],
                                         num_experts=4, prompt_len=1)
  page = open(paths["html"]).read()
  assert "&lt;b&gt;" in page and page.count('class="t"') >= 3
  assert os.path.getsize(paths["png"]) > 1000
  assert json.load(open(paths["load"]))["layers"]["layer_0"]["load"] == pytest.approx(load)
  with pytest.raises(ValueError, match="routing for 3 tokens, the text 2"):
    routing_view.write_routing_map(str(tmp_path), ["a", "b"], [("layer_0", d)], num_experts=4)


def test_main_one_line_errors(tiny_config, tmp_path):
  cfg = tiny_config()
  with pytest.raises(ConfigError, match="no checkpoint in") as e:
    generate.main(cfg, str(tmp_path / "empty"), prompt="def f")
  assert "\n" not in str(e.value)
  with pytest.raises(ConfigError, match="prompt is empty"):
    generate.main(cfg, str(tmp_path / "empty"), prompt="")
  with pytest.raises(ConfigError, match="top_p"):
    generate.main(cfg, str(tmp_path / "empty"), prompt="x", top_p=0.0)


@pytest.mark.slow
def test_main_with_a_trained_checkpoint(tiny_config, tmp_path):
  """A real (2-step) checkpoint: a completion printed, routing shown, map files written,
  the interactive loop reading stdin, and the same seed giving the same text."""
  from moe.train import trainer as train
  workdir = str(tmp_path / "run")
  cfg = tiny_config({"train.steps": 2, "train.checkpoint_every": 2, "train.eval_every": 2})
  assert train.train_and_evaluate(cfg, workdir)["status"] == "completed"
  out = io.StringIO()
  text = generate.main(cfg, workdir, prompt="def f", show_routing=True, max_new_tokens=6,
                       temperature=0.8, top_p=0.9, seed=1, out=out)
  printed = out.getvalue()
  assert printed.startswith("def f" + text)
  assert "layer_0:" in printed and "layer_1:" in printed and "routing map:" in printed
  for f in (routing_view.HTML_FILE, routing_view.PNG_FILE, routing_view.LOAD_FILE):
    assert os.path.getsize(os.path.join(workdir, f)) > 0
  load = json.load(open(os.path.join(workdir, routing_view.LOAD_FILE)))
  assert load["prompt_tokens"] == 6  # BOS + "def f"
  assert sum(load["layers"]["layer_0"]["load"]) == pytest.approx(1.0)
  again = generate.main(cfg, workdir, prompt="def f", max_new_tokens=6, temperature=0.8,
                        top_p=0.9, seed=1, out=io.StringIO())
  assert again == text
  many = generate.main(cfg, workdir, prompt=None, max_new_tokens=3, temperature=0.0,
                       stdin=io.StringIO("import\n\nclass\n"), out=io.StringIO())
  assert len(many) == 2
