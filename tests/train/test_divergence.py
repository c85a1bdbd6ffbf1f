"""Divergence beyond a non-finite loss (`moe.train.divergence`) on synthetic loss curves and
through the trainer; `train.decay_router=False` exempts the router from weight decay."""

from __future__ import annotations

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import read_metrics
from moe.train import divergence as dv
from moe.train import step as step_lib
from moe.train import trainer as train

RULE = dv.Rule(spike_factor=1.5, spike_window=20, max_loss_spikes=3, blowup_margin=1.0,
               start_step=10)


def smooth(n=400, seed=0):
  """A training curve: 5.5 falling to ~1.5, with 2% multiplicative batch noise."""
  rng = np.random.default_rng(seed)
  s = np.arange(1, n + 1)
  return (1.5 + 4.0 * np.exp(-s / 40)) * (1 + 0.02 * rng.standard_normal(n))


def test_a_smooth_curve_is_stable():
  for seed in range(5):
    m = dv.judge(smooth(seed=seed), RULE)
    assert m.reason is None and m.spikes == 0, (seed, m.summary())


def test_a_blow_up_is_diverged_though_finite():
  curve = smooth()
  curve[250:] = 3.6 + 0.05 * np.sin(np.arange(150))  # lost what it learned, never non-finite
  m = dv.judge(curve, RULE)
  assert m.reason and "blow-up" in m.reason, m.summary()
  step = int(m.reason.split("step ")[1].split(":")[0])
  assert 251 <= step <= 251 + RULE.spike_window  # once the median has moved
  # the same rise by less than the margin is not a blow-up
  curve[250:] = 1.5 + 0.8
  assert dv.judge(curve, RULE).reason is None


def test_spikes_are_counted_once_each():
  curve = smooth()
  for start, length in ((100, 1), (160, 3), (220, 2)):  # 3 spikes, 6 spike steps
    curve[start:start + length] *= 2.0
  m = dv.judge(curve, RULE)
  assert m.spikes == 3 and m.spike_steps == [101, 161, 221] and m.reason is None
  curve[300] *= 2.0  # a fourth: more than max_loss_spikes=3
  m = dv.judge(curve, RULE)
  assert m.spikes == 4 and m.reason and "4 loss spikes by step 301" in m.reason
  # half as high: below spike_factor x median, no spike
  assert dv.judge(smooth() * np.where(np.arange(400) == 100, 1.3, 1.0), RULE).spikes == 0


def test_warmup_and_a_short_history_count_nothing():
  curve = smooth()
  curve[5] *= 3.0  # in warmup (step 6 <= start_step 10)
  curve[12] *= 3.0  # after warmup, but fewer than spike_window values before it
  assert dv.judge(curve, RULE).spikes == 0
  assert dv.judge(curve, dv.Rule(spike_window=5, start_step=10)).spikes == 1


def test_non_finite_values_are_left_to_the_loop():
  curve = smooth()
  curve[200] = math.nan
  curve[201] = math.inf
  m = dv.judge(curve, RULE)
  assert m.reason is None and all(math.isfinite(x) for x in m.history)


def test_state_round_trip_decides_as_one_pass():
  curve = smooth()
  curve[150] *= 2
  curve[300:] = 4.0
  whole = dv.judge(curve, RULE)
  first = dv.Monitor(RULE)
  first.observe_window(170, curve[:170])
  second = dv.Monitor(RULE, json.loads(json.dumps(first.state())))
  second.observe_window(400, curve[170:])
  # the jump at step 301 is a spike (2.6x), then a blow-up once the median follows
  assert second.state() == whole.state() and "blow-up" in whole.reason and whole.spikes == 2
  assert dv.Monitor(RULE, {"window": []}).spikes == 0  # an older log item: a fresh monitor


def test_trainer_ends_a_finite_spiking_run_diverged(tiny_config, tmp_path):
  # Every step whose loss rises above the previous step's is a spike; none is allowed.
  cfg = tiny_config({"train.steps": 12, "train.learning_rate": 0.3, "train.warmup_steps": 0,
                     "train.spike_window": 1, "train.spike_factor": 1.0001,
                     "train.max_loss_spikes": 0, "train.blowup_margin": 0.0,
                     "train.log_every": 2, "train.eval_every": 100,
                     "train.checkpoint_every": 100})
  summary = train.train_and_evaluate(cfg, str(tmp_path))
  assert summary["status"] == "diverged" and summary["step"] < 12, summary
  assert summary["loss_spikes"] == 1 and "loss spikes" in summary["diverged_reason"]
  records = read_metrics(str(tmp_path))
  assert all(math.isfinite(r["loss"]) for r in records)  # finite: only the new rule stops it
  assert records[-1]["step"] == summary["step"] and records[-1]["loss_spikes"] == 1
  assert not os.path.isdir(tmp_path / "checkpoints" / str(summary["step"]))


def test_trainer_reports_no_spikes_on_a_normal_run(tiny_config, tmp_path):
  summary = train.train_and_evaluate(tiny_config({"train.steps": 4}), str(tmp_path))
  assert summary["status"] == "completed"
  assert summary["loss_spikes"] == 0 and summary["diverged_reason"] is None
  assert [r["loss_spikes"] for r in read_metrics(str(tmp_path)) if "loss" in r] == [0, 0]


@pytest.mark.parametrize("decay_router", [True, False])
def test_decay_router_false_exempts_only_the_router(decay_router):
  params = {"block_0": {"moe": {"router": {"kernel": jnp.ones((4, 3))},
                                "experts": {"w_in": jnp.ones((3, 4, 5))}}},
            "embed": {"embedding": jnp.ones((7, 4))}, "norm": {"scale": jnp.ones((4,))}}
  mask = step_lib.decay_mask(params, decay_router)
  assert mask["block_0"]["moe"]["router"]["kernel"] is decay_router
  assert mask["block_0"]["moe"]["experts"]["w_in"] and mask["embed"]["embedding"]
  assert not mask["norm"]["scale"]
  tc = {"steps": 10, "warmup_steps": 0, "learning_rate": 0.1, "min_lr_ratio": 1.0,
        "grad_clip": 0.0, "b1": 0.9, "b2": 0.95, "weight_decay": 0.5, "trainable": "all",
        "decay_router": decay_router}

  class Tc(dict):
    __getattr__ = dict.__getitem__

  tx, _, _ = step_lib.make_optimizer(Tc(tc), params)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  router = float(new["block_0"]["moe"]["router"]["kernel"][0, 0])
  assert router == (pytest.approx(1 - 0.1 * 0.5) if decay_router else 1.0)
  assert float(new["block_0"]["moe"]["experts"]["w_in"][0, 0, 0]) == pytest.approx(0.95)
