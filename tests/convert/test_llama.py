"""Dense Llama / Qwen2 / Qwen3 conversion: tiny random transformers models (norms and biases
perturbed, weights scaled up) imported with the same logits, exported back bit-equal; models
initialised here exported as the closest dense type and loaded by AutoModelForCausalLM; every
setting no dense type expresses refused with one line naming it."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt)")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt)")

import dataclasses  # noqa: E402

import ml_collections  # noqa: E402

from hf_parity import (V, apply_ours, export_is_bit_equal,  # noqa: E402
                       export_matches_transformers, hf_logits, import_and_compare, init_here,
                       perturbed, rel_err, tokens)
from moe.convert.rope import ROPE_FIELDS  # noqa: E402
from moe.model.config import ModelConfig, model_config_from  # noqa: E402
from moe.train import checkpoint as ckpt_lib  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.convert import layouts  # noqa: E402
from moe.errors import ConfigError  # noqa: E402

SHAPE = dict(vocab_size=V, hidden_size=32, intermediate_size=24, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-5, rope_theta=5000.0)

CASES = {
    # Llama with biases on attention and MLP, a head width other than D/H, tied embeddings.
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM,
              dict(attention_bias=True, mlp_bias=True, head_dim=6, tie_word_embeddings=True),
              dict(attention_bias=True, qkv_bias=False, qk_norm=None, tie_embeddings=True)),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {},
              dict(attention_bias=False, qkv_bias=True, qk_norm=None, sliding_window=None)),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM,
              dict(head_dim=10, num_key_value_heads=1),
              dict(attention_bias=False, qkv_bias=False, qk_norm="head", head_dim=10)),
}


@pytest.mark.parametrize("family", sorted(CASES))
def test_dense_logits_match_and_round_trip(family, tmp_path):
  config_cls, model_cls, extra, want = CASES[family]
  torch.manual_seed(0)
  model = perturbed(model_cls(config_cls(**{**SHAPE, **extra})))
  hf_dir, work, spec = import_and_compare(model, tmp_path)
  assert spec["moe"] == {"enabled": False} and spec["model"]["rope_theta"] == 5000.0
  for k, v in want.items():
    assert spec["model"][k] == v, k
  config = export_is_bit_equal(hf_dir, work, tmp_path)
  assert config["model_type"] == family


# Scaled rotary embeddings with small original lengths, so that the scaled frequencies matter
# at the 19 positions compared: Llama 3.1's "llama3", and Qwen's "yarn" (plain, and with every
# optional key: beta_fast / beta_slow, truncate=False where the ramp's ends are fractional, an
# explicit attention_factor).
SCALED_ROPE = [
    ("llama", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, 64),
    ("qwen3", {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}, 64),
    ("qwen2", {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 256,
               "beta_fast": 8.0, "beta_slow": 1.0, "truncate": False, "attention_factor": 1.2},
     2048),
]


@pytest.mark.parametrize("family, rope, max_len", SCALED_ROPE, ids=[c[0] for c in SCALED_ROPE])
def test_scaled_rope_logits_match_and_round_trip(family, rope, max_len, tmp_path):
  config_cls, model_cls, extra, _ = CASES[family]
  torch.manual_seed(5)
  model = perturbed(model_cls(config_cls(**{**SHAPE, **extra, "max_position_embeddings": max_len,
                                            "rope_parameters": {"rope_theta": 500.0, **rope}})),
                    seed=5)
  hf_dir, work, spec = import_and_compare(model, tmp_path)
  m = spec["model"]
  assert (m["rope_type"], m["rope_factor"], m["rope_theta"]) == (rope["rope_type"],
                                                                 rope["factor"], 500.0)
  mc = model_config_from(ml_collections.ConfigDict(spec))
  unscaled = dataclasses.replace(mc, **{f: ModelConfig.__dataclass_fields__[f].default
                                        for f in ROPE_FIELDS})
  toks = tokens()
  assert rel_err(apply_ours(unscaled, ckpt_lib.load_params(work), toks),
                 hf_logits(model, toks)) > 1e-3  # the scaling matters at these positions
  config = export_is_bit_equal(hf_dir, work, tmp_path)
  back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back")).eval()
  assert rel_err(hf_logits(back, toks), hf_logits(model, toks)) < 1e-6
  want, got = model.config.rope_parameters, config["rope_parameters"]
  assert {k: got.get(k) for k in want} == want
  assert {k: got[k] for k in set(got) - set(want)} in ({}, {"beta_fast": 32.0, "beta_slow": 1.0})


def test_qwen2_sliding_window_on_every_layer(tmp_path):
  torch.manual_seed(1)
  cfg = transformers.Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=4,
                                 max_window_layers=0)
  model = perturbed(transformers.Qwen2ForCausalLM(cfg), seed=1)
  _, _, spec = import_and_compare(model, tmp_path)
  assert spec["model"]["sliding_window"] == 4


def _saved(tmp_path, config_cls, model_cls, **kw):
  d = str(tmp_path / "hf")
  model_cls(config_cls(**{**SHAPE, "num_hidden_layers": 2, **kw})).save_pretrained(d)
  return d


@pytest.mark.parametrize("family, kw, needle", [
    ("llama", dict(attention_bias=True, mlp_bias=False), "attention_bias=True with mlp_bias=False"),
    ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type='linear'"),
    ("qwen2", dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}),
     "rope_type='dynamic' is not supported (only 'default', 'llama3', 'yarn')"),
    ("llama", dict(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                    "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    ("llama", dict(hidden_act="gelu"), "hidden_act='gelu'"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "max_window_layers=1"),
    ("qwen3", dict(attention_bias=True), "Qwen3 attention_bias=True"),
])
def test_import_refusals_are_one_line(family, kw, needle, tmp_path):
  config_cls, model_cls = CASES[family][:2]
  d = _saved(tmp_path, config_cls, model_cls, **kw)
  with pytest.raises(ConfigError) as e:
    convert.from_hf(d, str(tmp_path / "ours"))
  assert needle in str(e.value) and "\n" not in str(e.value)


DENSE_HERE = dict(vocab_size=V, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  d_ff=20, max_len=32, norm_eps=1e-5, rope_theta=1000.0)


@pytest.mark.parametrize("extra, family", [
    (dict(), "llama"),
    (dict(attention_bias=True, tie_embeddings=True), "llama"),
    (dict(qkv_bias=True), "qwen2"),
    (dict(sliding_window=5), "qwen2"),
    (dict(qk_norm="head"), "qwen3"),
    (dict(rope_type="llama3", rope_factor=4.0, rope_original_max_len=8), "llama"),
    (dict(qk_norm="head", rope_type="yarn", rope_factor=4.0, rope_original_max_len=8,
          rope_truncate=False, rope_mscale=2.0, rope_mscale_all_dim=1.0), "qwen3"),
])
def test_dense_model_trained_here_exports(extra, family, tmp_path):
  work = str(tmp_path / "run")
  mc = init_here({**DENSE_HERE, **extra}, None, work)
  config = export_matches_transformers(mc, work, tmp_path)
  assert config["model_type"] == family


@pytest.mark.parametrize("extra, needle", [
    (dict(mlp_activation="gelu"), "model.mlp_activation='gelu'"),
    (dict(norm="layer"), "model.norm='layer'"),
    (dict(positions="learned"), "model.positions='learned'"),
    (dict(qk_norm="full"), "model.qk_norm='full'"),
    (dict(logits_soft_cap=30.0), "model.logits_soft_cap=30.0"),
])
def test_dense_export_refusals_name_the_setting(extra, needle):
  model = convert.model_groups({**DENSE_HERE, **extra}, None)["model"]
  with pytest.raises(ConfigError) as e:
    layouts.export_type(model, None)
  assert needle in str(e.value) and "\n" not in str(e.value)
  # Forcing a family that cannot hold a setting names it too.
  base = convert.model_groups(DENSE_HERE, None)["model"]
  with pytest.raises(ConfigError, match="model.qkv_bias=True"):
    layouts.EXPORTERS["llama"]({**base, "qkv_bias": True}, None, None, {})
