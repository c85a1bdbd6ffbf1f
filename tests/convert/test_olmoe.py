"""OLMoE and Qwen3-MoE conversion: tiny random transformers models (norms perturbed, weights
scaled up so routing matters) imported with the same logits and exported back bit-equal; MoE
models initialised here exported as the closest type and loaded by AutoModelForCausalLM (dropless
evaluation); routing and layouts no supported type expresses refused with one line naming them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch", reason="needs torch (requirements-test.txt)")
transformers = pytest.importorskip("transformers", reason="needs transformers "
                                   "(requirements-test.txt)")

from hf_parity import (V, export_is_bit_equal, export_matches_transformers,  # noqa: E402
                       import_and_compare, init_here, perturbed)
from moe.convert import cli as convert  # noqa: E402
from moe.convert import layouts  # noqa: E402
from moe.errors import ConfigError  # noqa: E402

SHAPE = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
             num_experts=8, num_experts_per_tok=2, rope_theta=5000.0)


def olmoe(**kw):
  cfg = transformers.OlmoeConfig(**{**SHAPE, "intermediate_size": 12, **kw})
  return transformers.OlmoeForCausalLM(cfg)


def qwen3_moe(**kw):
  cfg = transformers.Qwen3MoeConfig(**{**SHAPE, "intermediate_size": 20,
                                       "moe_intermediate_size": 12, "head_dim": 6, **kw})
  return transformers.Qwen3MoeForCausalLM(cfg)


def test_olmoe_logits_match_and_round_trip(tmp_path):
  torch.manual_seed(0)
  hf_dir, work, spec = import_and_compare(perturbed(olmoe()), tmp_path)
  m, moe = spec["model"], spec["moe"]
  assert m["qk_norm"] == "full" and moe["renormalize"] is False  # norm_topk_prob default
  assert moe["num_experts"] == 8 and moe["capacity_factor"] is None
  assert moe["load_balance_weight"] == 0.01 and moe["z_loss_weight"] == 0.0
  assert export_is_bit_equal(hf_dir, work, tmp_path)["model_type"] == "olmoe"


def test_qwen3_moe_dense_first_block_logits_match_and_round_trip(tmp_path):
  torch.manual_seed(1)
  model = perturbed(qwen3_moe(num_hidden_layers=3, mlp_only_layers=[0], norm_topk_prob=True),
                    seed=1)
  hf_dir, work, spec = import_and_compare(model, tmp_path)
  m, moe = spec["model"], spec["moe"]
  assert (m["qk_norm"], m["first_moe_layer"], m["moe_interval"]) == ("head", 1, 1)
  assert moe["renormalize"] is True and moe["expert_hidden"] == 12 and m["d_ff"] == 20
  assert export_is_bit_equal(hf_dir, work, tmp_path)["model_type"] == "qwen3_moe"


@pytest.mark.parametrize("make, rope", [
    (qwen3_moe, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                 "mscale": 1.0, "mscale_all_dim": 0.5}),
    (olmoe, {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
             "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
], ids=["qwen3_moe_yarn", "olmoe_llama3"])
def test_scaled_rope_logits_match_and_round_trip(make, rope, tmp_path):
  """The MoE families read and write scaled rotary settings through the same parser (yarn's
  mscales here only scale cos/sin: no softmax factor outside MLA, as transformers)."""
  torch.manual_seed(6)
  model = perturbed(make(rope_parameters={"rope_theta": 500.0, **rope}), seed=6)
  hf_dir, work, spec = import_and_compare(model, tmp_path)
  assert spec["model"]["rope_type"] == rope["rope_type"]
  got, want = export_is_bit_equal(hf_dir, work, tmp_path)["rope_parameters"], \
      model.config.rope_parameters
  assert {k: got.get(k) for k in want} == want


def test_qwen3_moe_sparse_step(tmp_path):
  torch.manual_seed(2)
  model = perturbed(qwen3_moe(num_hidden_layers=4, decoder_sparse_step=2), seed=2)
  _, _, spec = import_and_compare(model, tmp_path)
  assert (spec["model"]["first_moe_layer"], spec["model"]["moe_interval"]) == (1, 2)


@pytest.mark.parametrize("make, needle", [
    (lambda: qwen3_moe(num_hidden_layers=4, mlp_only_layers=[2]), "MoE blocks at layers [0, 1, 3]"),
    (lambda: qwen3_moe(mlp_only_layers=[0, 1]), "no MoE block"),
    (lambda: olmoe(clip_qkv=8.0), "clip_qkv=8.0"),
    (lambda: qwen3_moe(attention_bias=True), "attention_bias=True"),
])
def test_import_refusals_are_one_line(make, needle, tmp_path):
  d = str(tmp_path / "hf")
  make().save_pretrained(d)
  with pytest.raises(ConfigError) as e:
    convert.from_hf(d, str(tmp_path / "ours"))
  assert needle in str(e.value) and "\n" not in str(e.value)


MODEL_HERE = dict(vocab_size=V, d_model=24, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=6,
                  d_ff=20, max_len=32, norm_eps=1e-5, rope_theta=1000.0)
MOE_HERE = dict(num_experts=4, num_selected=2, expert_hidden=12, capacity_factor=None,
                eval_capacity_factor=None)


@pytest.mark.parametrize("model, moe, family", [
    (dict(qk_norm="head"), dict(renormalize=False), "qwen3_moe"),
    (dict(qk_norm="head", num_layers=3, moe_interval=2), dict(renormalize=True), "qwen3_moe"),
    (dict(qk_norm="full", head_dim=6, num_heads=4, d_model=24), dict(renormalize=False), "olmoe"),
    (dict(), dict(renormalize=True), "mixtral"),
    # No QK-norm and what Mixtral lacks: Qwen2-MoE with a zero-width shared expert.
    (dict(), dict(renormalize=False), "qwen2_moe"),
    (dict(num_layers=3, moe_interval=2), dict(renormalize=True), "qwen2_moe"),
    # The router logit scale (a stability knob) is folded into the exported router kernels.
    (dict(qk_norm="head"), dict(renormalize=False, router_logit_scale=3.0), "qwen3_moe"),
    (dict(), dict(renormalize=False, router_logit_scale=3.0, router_init_scale=0.1),
     "qwen2_moe"),
])
def test_moe_model_trained_here_exports(model, moe, family, tmp_path):
  work = str(tmp_path / "run")
  mc = init_here({**MODEL_HERE, **model}, {**MOE_HERE, **moe}, work)
  config = export_matches_transformers(mc, work, tmp_path)
  assert config["model_type"] == family
  if mc.moe_interval == 2:
    assert config["mlp_only_layers"] == [1]


@pytest.mark.parametrize("model, moe, needle", [
    (dict(qk_norm="head"), dict(router="expert_choice"), "moe.router='expert_choice'"),
    (dict(qk_norm="head"), dict(priority="bpr"), "moe.priority='bpr'"),
    (dict(qk_norm="head"), dict(bias_balancing=True), "moe.bias_balancing=True"),
    (dict(qk_norm="head"), dict(expert_mlp="gelu"), "moe.expert_mlp='gelu'"),
    (dict(qk_norm="full"), dict(num_shared_experts=1), "moe.num_shared_experts=1"),
    (dict(qk_norm="head", qkv_bias=True), dict(), "model.qkv_bias=True"),
    (dict(qk_norm="head"), dict(score_func="sigmoid"), "moe.score_func='sigmoid'"),
    (dict(), dict(routed_scale=2.5), "moe.routed_scale=2.5"),
    (dict(qk_norm="head"), dict(num_groups=2, groups_selected=1), "moe.num_groups=2"),
])
def test_moe_export_refusals_name_the_setting(model, moe, needle, tmp_path):
  groups = convert.model_groups({**MODEL_HERE, **model}, {**MOE_HERE, **moe})
  with pytest.raises(ConfigError) as e:
    hf_type = layouts.export_type(groups["model"], groups["moe"])
    layouts.EXPORTERS[hf_type](groups["model"], groups["moe"], None, {})
  assert needle in str(e.value) and "\n" not in str(e.value)
