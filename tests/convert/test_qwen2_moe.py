"""Qwen2-MoE conversion: tiny random Qwen2MoeForCausalLM models built with `transformers`,
imported and compared logit for logit in float32, exported back bit-equal; a model initialised
here with shared experts exports as qwen2_moe and loads with AutoModelForCausalLM; refusals."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt) to build "
                            "reference Hugging Face models")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt) to build reference models")

import jax  # noqa: E402
import ml_collections  # noqa: E402

from hf_parity import V, hf_logits, our_logits, rel_err, tokens  # noqa: E402
from moe.convert import cli as convert  # noqa: E402
from moe.convert import layouts  # noqa: E402
from moe.errors import ConfigError  # noqa: E402
from moe.model.config import model_config_from  # noqa: E402
from moe.model.transformer import param_shapes  # noqa: E402
from moe.rundir import CONFIG_FILE, write_json_atomic  # noqa: E402


def qwen2_moe_model(seed=0, **kw):
  torch.manual_seed(seed)
  base = dict(vocab_size=V, hidden_size=32, intermediate_size=24, moe_intermediate_size=12,
              shared_expert_intermediate_size=20, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
              max_position_embeddings=64, rms_norm_eps=1e-5, norm_topk_prob=False,
              rope_parameters={"rope_theta": 5000.0, "rope_type": "default"},
              tie_word_embeddings=False)
  base.update(kw)
  model = transformers.Qwen2MoeForCausalLM(transformers.Qwen2MoeConfig(**base)).eval()
  with torch.no_grad():  # larger weights than the 0.02 init; norms and biases off 1 / 0
    for n, p in model.named_parameters():
      if "norm" in n or n.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
      else:
        p.mul_(5.0)
  return model


CASES = {  # HF config overrides; what the import must give (first_moe_layer, moe_interval)
    "mlp_only_first_renorm": (dict(mlp_only_layers=[0], norm_topk_prob=True), (1, 1)),
    "sparse_step_2_tied": (dict(decoder_sparse_step=2, tie_word_embeddings=True), (1, 2)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_and_round_trip(case, tmp_path):
  kw, (first, interval) = CASES[case]
  model = qwen2_moe_model(**kw)
  hf_dir = str(tmp_path / "hf")
  model.save_pretrained(hf_dir)
  work = str(tmp_path / "ours")
  spec = convert.from_hf(hf_dir, work)
  m, moe = spec["model"], spec["moe"]
  assert (m["first_moe_layer"], m["moe_interval"]) == (first, interval)
  assert m["qkv_bias"] and not m["attention_bias"]
  assert moe["renormalize"] == kw.get("norm_topk_prob", False)
  assert (moe["num_shared_experts"], moe["shared_expert_hidden"]) == (1, 20)
  assert moe["shared_expert_gate"] and moe["capacity_factor"] is None
  toks = tokens(l=23, seed=1)
  ref = hf_logits(model, toks)
  assert rel_err(our_logits(work, toks), ref) < 1e-4
  out = str(tmp_path / "hf_out")
  config = convert.to_hf(work, out)
  assert config["model_type"] == "qwen2_moe"
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  assert isinstance(back, transformers.Qwen2MoeForCausalLM)
  original, again = model.state_dict(), back.state_dict()
  assert set(original) == set(again)
  for name in original:
    np.testing.assert_array_equal(original[name].numpy(), again[name].numpy(), err_msg=name)
  assert rel_err(hf_logits(back, toks), ref) < 1e-6


def _fill(shapes, seed):
  """Random params for `param_shapes` (norm scales around 1), as numpy float32."""
  rng = np.random.default_rng(seed)

  def one(path, s):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    scale = 1.0 / np.sqrt(s.shape[0] if len(s.shape) > 1 else 1.0)
    return (rng.standard_normal(s.shape) * scale).astype(np.float32)

  return jax.tree_util.tree_map_with_path(one, shapes)


def test_model_trained_here_with_shared_experts_exports(tmp_path):
  """Two ungated shared experts of width 10 and an MoE block every 2nd block from block 0:
  exported as Qwen2-MoE (gate 0, doubled down projection, mlp_only_layers), same logits."""
  groups = convert.model_groups(
      dict(vocab_size=V, d_model=32, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=8,
           d_ff=24, max_len=64, rope_theta=5000.0, norm_eps=1e-5, moe_interval=2,
           first_moe_layer=0),
      dict(num_experts=6, num_selected=2, expert_hidden=12, capacity_factor=1.0,
           eval_capacity_factor=None, num_shared_experts=2, shared_expert_hidden=10))
  mc = model_config_from(ml_collections.ConfigDict(groups))
  params = _fill(param_shapes(mc), seed=3)
  work = str(tmp_path / "ours")
  os.makedirs(work)
  convert.save_checkpoint(work, params)
  write_json_atomic(os.path.join(work, CONFIG_FILE), groups, default=None)
  assert layouts.export_type(groups["model"], groups["moe"]) == "qwen2_moe"
  out = str(tmp_path / "hf")
  config = convert.to_hf(work, out)
  assert config["mlp_only_layers"] == [1] and config["shared_expert_intermediate_size"] == 20
  back = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
  toks = tokens(l=17, seed=2)
  ref = our_logits(work, toks)
  assert rel_err(hf_logits(back, toks), ref) < 1e-5
  sd = back.state_dict()
  assert not sd["model.layers.0.mlp.shared_expert_gate.weight"].any()


def test_unsupported_settings_one_line(tmp_path):
  model = qwen2_moe_model(num_hidden_layers=4, mlp_only_layers=[1])  # MoE at 0, 2, 3
  d = str(tmp_path / "hf")
  model.save_pretrained(d)
  with pytest.raises(ConfigError, match=r"MoE blocks at layers \[0, 2, 3\]") as e:
    convert.from_hf(d, str(tmp_path / "x"))
  assert "\n" not in str(e.value)
  cfg = json.load(open(os.path.join(d, "config.json")))
  for key, value, match in (("use_sliding_window", True, "use_sliding_window=True"),
                            ("hidden_act", "gelu", "hidden_act='gelu'")):
    with open(os.path.join(d, "config.json"), "w") as f:
      json.dump({**cfg, "mlp_only_layers": [], key: value}, f)
    with pytest.raises(ConfigError, match=match) as e:
      convert.from_hf(d, str(tmp_path / key))
    assert "\n" not in str(e.value)
  groups = convert.model_groups(dict(vocab_size=V, qk_norm="head"),
                                dict(num_shared_experts=1, score_func="sigmoid"))
  why = layouts.EXPORTERS["qwen2_moe"]
  for model_kw, moe_kw, match in ((dict(qk_norm="head"), {}, "model.qk_norm='head'"),
                                  ({}, dict(score_func="sigmoid"), "moe.score_func='sigmoid'")):
    m = {**groups["model"], "qk_norm": None, **model_kw}
    mo = {**groups["moe"], "score_func": "softmax", **moe_kw}
    with pytest.raises(ConfigError, match=match) as e:
      why(m, mo, None, {})
    assert "\n" not in str(e.value)
