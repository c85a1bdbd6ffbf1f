"""The one parser of rotary settings every family uses (`moe.convert.rope`): the older
`rope_scaling` / `type` spelling, the fallbacks transformers applies, one-line refusals, and
export writing back what import read (no torch needed; logit parity: test_llama.py,
test_deepseek.py)."""

from __future__ import annotations

import pytest

from conftest import one_line_error
from moe.convert import cli as convert
from moe.convert.rope import rope_config, rope_fields
from moe.model.config import ModelConfig, validate_model

V3_STYLE = {"max_position_embeddings": 163840, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                             "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                             "type": "yarn"}}
LLAMA31 = {"max_position_embeddings": 131072, "rope_theta": 500000.0,
           "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
QWEN_YARN = {"max_position_embeddings": 32768,
             "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6,
                                 "original_max_position_embeddings": 32768}}


@pytest.mark.parametrize("hf", [V3_STYLE, LLAMA31, QWEN_YARN], ids=["v3", "llama31", "qwen"])
def test_real_configs_read_and_write_back(hf):
  """The rope settings of real checkpoints' config.json: valid model fields, written back as the
  same rope_parameters (yarn adds its default betas when they were absent)."""
  fields = rope_fields(hf, "test")
  validate_model(ModelConfig(max_len=hf["max_position_embeddings"], **fields))
  model = convert.model_groups(dict(max_len=hf["max_position_embeddings"], **fields),
                               None)["model"]
  back = rope_config(model)
  original = dict(hf.get("rope_parameters") or hf["rope_scaling"])
  original["rope_type"] = original.pop("type", original.get("rope_type"))
  original.setdefault("rope_theta", hf.get("rope_theta"))
  got = back["rope_parameters"]
  assert {k: got[k] for k in original} == original
  assert {k: got[k] for k in set(got) - set(original)} in ({}, {"beta_fast": 32.0,
                                                               "beta_slow": 1.0})
  assert back["rope_theta"] == original["rope_theta"]
  assert rope_fields({"max_position_embeddings": hf["max_position_embeddings"], **back},
                     "again") == fields


def test_fallbacks_as_transformers():
  """yarn without a factor: max_position_embeddings / original; a top-level
  original_max_position_embeddings wins; beta 0 and mscale 0 count as absent; a default rope
  keeps the family's base when none is given."""
  got = rope_fields({"max_position_embeddings": 64, "original_max_position_embeddings": 8,
                     "rope_parameters": {"rope_type": "yarn", "rope_theta": 50.0, "beta_fast": 0,
                                         "original_max_position_embeddings": 16,
                                         "mscale": 0, "mscale_all_dim": 0}}, "t")
  assert got["rope_original_max_len"] == 8 and got["rope_factor"] == 8.0
  assert got["rope_beta_fast"] == 32.0 and got["rope_mscale"] is None
  assert got["rope_mscale_all_dim"] is None
  assert rope_fields({}, "t", 1e6) == {"rope_theta": 1e6, "rope_type": "default"}
  # A config written before the rope fields existed exports a default rope.
  assert rope_config({"rope_theta": 7.0, "max_len": 8}) == {
      "rope_theta": 7.0, "rope_parameters": {"rope_theta": 7.0, "rope_type": "default"}}


@pytest.mark.parametrize("rp, needles", [
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]},
     ("where: rope_type='longrope' is not supported", "'llama3'", "'yarn'")),
    ({"type": "linear", "factor": 2.0}, ("rope_type='linear'",)),
    ({"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 16},
     ("rope_type='llama3' needs rope_parameters['low_freq_factor']",)),
    ({"full_attention": {"rope_type": "default"}, "sliding_attention": {"rope_type": "default"}},
     ("per layer type",)),
    ({"rope_type": "default", "partial_rotary_factor": 0.25}, ("partial_rotary_factor=0.25",)),
])
def test_unsupported_rope_is_one_line(rp, needles):
  with one_line_error(*needles):
    rope_fields({"rope_parameters": rp, "max_position_embeddings": 32}, "where")
