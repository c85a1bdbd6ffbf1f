"""Adaptive k in the trainer: the top-p controller's threshold (`moe_bias/.../top_p`) is saved
with the checkpoint and a resumed run continues it bit for bit; the metrics reach the log and the
summary."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from conftest import read_metrics
from moe.train import checkpoint as ckpt_lib
from moe.train import trainer as train

ADAPTIVE = {"moe.k_rule": "top_p_target", "moe.top_p": 0.3, "moe.target_k": 1.6,
            "moe.top_p_rate": 0.02, "moe.router_entropy_weight": 0.01,
            "model.scan_layers": True, "train.steps": 4, "train.log_every": 2,
            "train.eval_every": 4, "train.checkpoint_every": 2}


def _saved_thresholds(workdir):
  directory, step = ckpt_lib.resolve(workdir)
  shapes = ckpt_lib.saved_state_shapes(directory, step)
  assert "moe_bias/blocks/moe/top_p" in shapes, sorted(shapes)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = {"moe_bias": {"blocks": {"moe": {"top_p": jax.ShapeDtypeStruct(
      shapes["moe_bias/blocks/moe/top_p"], np.float32, sharding=sharding)}}}}
  out = ckpt_lib.load_state_items(directory, abstract, where="test")
  return step, np.asarray(out["moe_bias"]["blocks"]["moe"]["top_p"])


@pytest.mark.slow
def test_threshold_is_checkpointed_and_resumes_exactly(tiny_config, tmp_path):
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  train.train_and_evaluate(tiny_config(ADAPTIVE), full)
  half = train.train_and_evaluate(tiny_config(ADAPTIVE), split, stop_at_step=2)
  assert half["status"] == "preempted"
  step_half, p_half = _saved_thresholds(split)
  assert step_half == 2 and p_half.shape == (2,)  # one threshold per (scanned) layer
  assert np.all(p_half != np.float32(0.3))  # the controller moved it
  rest = train.train_and_evaluate(tiny_config(ADAPTIVE), split)
  assert rest["resumed_from_step"] == 2
  (s_a, p_a), (s_b, p_b) = _saved_thresholds(full), _saved_thresholds(split)
  assert s_a == s_b == 4
  np.testing.assert_array_equal(p_a, p_b)
  assert not np.array_equal(p_a, p_half)
  records = read_metrics(full, drop_timing=True)
  assert records == read_metrics(split, drop_timing=True)
  last = records[-1]
  for key in ("moe/layer_0/mean_k", "moe/layer_1/top_p", "moe/mean_k",
              "moe/active_expert_flops_per_token", "eval_moe/mean_k"):
    assert key in last, key
  assert len(last["moe/layer_0/k_hist"]) == 3  # k = 0, 1, 2
  assert 1.0 <= last["moe/mean_k"] <= 2.0
  with open(tmp_path / "full" / "summary.json") as f:
    summary = json.load(f)
  assert 1.0 <= summary["eval_moe/mean_k"] <= 2.0
  assert summary["eval_moe/active_expert_flops_per_token"] > 0
