"""Scaled rotary positions (`model.rope_type` "llama3" / "yarn"): the inverse frequencies and the
cos/sin scale equal transformers' own functions; MLA's softmax scale takes YaRN's
mscale_all_dim as DeepSeek's attention does; the KV cache still decodes as the full forward;
the scaling changes the function; the fields are refused in one line when wrong.
(Logit parity with whole transformers models: tests/convert/test_llama.py, test_olmoe.py,
test_deepseek.py.)"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from tiny_models import decode_step_by_step, dropless_moe, fwd, init, tiny, tokens
from moe.errors import ConfigError
from moe.model.attention import rope_frequencies, rope_inv_freq, softmax_scale
from moe.model.config import validate_model

LLAMA3 = dict(rope_type="llama3", rope_factor=4.0, rope_original_max_len=12,
              rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
YARN = dict(rope_type="yarn", rope_factor=4.0, rope_original_max_len=12, rope_beta_fast=16.0,
            rope_beta_slow=1.0)
MLA = dict(attention="mla", q_lora_rank=6, kv_lora_rank=7, qk_nope_head_dim=4,
           qk_rope_head_dim=8, v_head_dim=5)


def hf_rope_parameters(cfg) -> dict:
  """The Hugging Face rope_parameters of a config's rope fields (test-side mapping)."""
  rp = {"rope_theta": cfg.rope_theta, "rope_type": cfg.rope_type, "factor": cfg.rope_factor,
        "original_max_position_embeddings": cfg.rope_original_max_len}
  if cfg.rope_type == "llama3":
    rp.update(low_freq_factor=cfg.rope_low_freq_factor,
              high_freq_factor=cfg.rope_high_freq_factor)
  else:
    rp.update(beta_fast=cfg.rope_beta_fast, beta_slow=cfg.rope_beta_slow,
              truncate=cfg.rope_truncate)
    for ours, theirs in (("rope_attention_factor", "attention_factor"), ("rope_mscale", "mscale"),
                         ("rope_mscale_all_dim", "mscale_all_dim")):
      if getattr(cfg, ours) is not None:
        rp[theirs] = getattr(cfg, ours)
  return rp


@pytest.mark.parametrize("kw", [
    LLAMA3, dict(LLAMA3, rope_factor=8.0, rope_high_freq_factor=2.0, rope_theta=500.0),
    YARN, dict(YARN, rope_truncate=False, rope_beta_fast=32.0),
    dict(YARN, rope_mscale=0.707, rope_mscale_all_dim=1.0),
    dict(YARN, rope_attention_factor=1.3, rope_theta=20.0, head_dim=16),
])
def test_frequencies_and_scale_equal_transformers(kw):
  transformers = pytest.importorskip("transformers")
  from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
  cfg = tiny(**kw)
  validate_model(cfg)
  hf = transformers.LlamaConfig(hidden_size=cfg.d_model, num_attention_heads=cfg.num_heads,
                                head_dim=cfg.head_dim, max_position_embeddings=cfg.max_len,
                                rope_parameters=hf_rope_parameters(cfg))
  want_inv, want_scale = ROPE_INIT_FUNCTIONS[cfg.rope_type](hf)
  inv, scale = rope_frequencies(cfg, cfg.head_dim)
  np.testing.assert_allclose(np.asarray(inv), want_inv.numpy(), rtol=2e-7)
  assert scale == pytest.approx(want_scale, rel=1e-12)
  plain = np.asarray(rope_inv_freq(cfg.head_dim, cfg.rope_theta))
  assert np.abs(np.asarray(inv) / plain - 1).max() > 0.5  # the scaling is active


def test_mla_softmax_scale_takes_mscale_all_dim():
  """DeepSeek: (Dn + Dr)^-0.5 * mscale(factor, mscale_all_dim)^2, only with a scaled rope."""
  cfg = tiny(**MLA, **dict(YARN, rope_mscale=1.0, rope_mscale_all_dim=0.5))
  m = 0.1 * 0.5 * math.log(4.0) + 1.0
  assert softmax_scale(cfg, 12) == pytest.approx(12 ** -0.5 * m * m, rel=1e-12)
  assert softmax_scale(tiny(**MLA, **YARN), 12) == pytest.approx(12 ** -0.5, rel=1e-12)
  assert softmax_scale(tiny(**MLA), 12) == pytest.approx(12 ** -0.5, rel=1e-12)


def test_scaling_changes_the_function():
  for extra in ({}, MLA):
    base = tiny(**extra)
    v = init(base)
    a = np.asarray(fwd(base, v, tokens()))
    for kw in (LLAMA3, dict(YARN, rope_mscale_all_dim=1.0, rope_mscale=0.5)):
      b = np.asarray(fwd(dataclasses.replace(base, **kw), v, tokens()))
      assert np.abs(a - b).max() > 1e-3, kw


@pytest.mark.parametrize("cfg", [
    pytest.param(tiny(**LLAMA3), id="mha_llama3"),
    pytest.param(tiny(**MLA, **dict(YARN, rope_mscale=0.707, rope_mscale_all_dim=1.0),
                      rope_interleave=True, moe=dropless_moe(), first_moe_layer=1),
                 id="mla_yarn"),
])
def test_cache_decoding_matches_full_forward(cfg):
  v = init(cfg)
  toks = tokens(15)
  full = np.asarray(fwd(cfg, v, toks))
  logits, _ = decode_step_by_step(cfg, v, toks, 4)
  np.testing.assert_allclose(logits, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw, needles", [
    (dict(rope_type="linear"), ("model.rope_type", "'llama3'", "'yarn'")),
    (dict(rope_factor=8.0), ("model.rope_factor=8.0", "'llama3' / 'yarn'")),
    (dict(LLAMA3, rope_beta_fast=8.0), ("model.rope_beta_fast=8.0", "'yarn' only")),
    (dict(YARN, rope_low_freq_factor=2.0), ("model.rope_low_freq_factor", "'llama3' only")),
    (dict(LLAMA3, rope_high_freq_factor=1.0), ("model.rope_high_freq_factor", "> ")),
    (dict(YARN, rope_beta_fast=0.5), ("model.rope_beta_fast", ">= model.rope_beta_slow")),
    (dict(YARN, rope_factor=0.5), ("model.rope_factor",)),
    (dict(YARN, rope_mscale=0.0), ("model.rope_mscale",)),
    (dict(LLAMA3, positions="learned"), ("model.rope_type='llama3'", "positions")),
])
def test_bad_rope_settings_are_one_line(kw, needles):
  with pytest.raises(ConfigError) as e:
    validate_model(tiny(**kw))
  assert "\n" not in str(e.value)
  for n in needles:
    assert n in str(e.value), (n, str(e.value))
