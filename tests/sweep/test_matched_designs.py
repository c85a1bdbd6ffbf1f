"""The ablation tables' matched designs: expert choice spends token choice's expert FLOPs, top-2
FLOP-matched by width, dropless where the paper is, one parent per seed, best-eval selection, and
every claim carries its source and published text."""

import importlib
import json
import os

import jax
import numpy as np
import pytest

from conftest import run_smoke_parent
from moe.layer import routing
from moe.rundir import METRICS_FILE, SUMMARY_FILE
from moe.sweep import report, spec

ALL_TABLES = ("capacity", "routing", "experts", "granularity", "balancing", "upcycling",
              "finetune_freeze")


def expanded(name, scale="cpu", arg=""):
  c = importlib.import_module(f"configs.ablations.{name}").get_config(*([arg] if arg else []))
  c.sweep.scale = scale
  return spec.expand(c)


def run_of(sweep, member_prefix):
  return next(r for r in sweep.runs if r.member.startswith(member_prefix))


def tokens_per_group(cfg) -> int:
  """T of one routing group on one device: the whole batch when moe.group_size is None."""
  return cfg.moe.group_size or cfg.train.batch_size * cfg.data.seq_len


def expert_assignments(cfg, train: bool) -> int:
  """Token copies the experts process per group: E*C (expert choice), K*T (dropless top-K) or
  at most E*C (top-K with a capacity buffer)."""
  m, t = cfg.moe, tokens_per_group(cfg)
  cf = m.capacity_factor if train else m.eval_capacity_factor
  c = routing.capacity_for(t, m.num_experts, m.num_selected, cf, m.min_capacity)
  if m.router == "expert_choice":
    return m.num_experts * c
  return m.num_selected * t if c is None else min(m.num_experts * c, m.num_selected * t)


@pytest.mark.parametrize("scale", ["cpu", "accelerator"])
def test_expert_choice_spends_token_choices_expert_flops(scale):
  s = expanded("routing", scale)
  ec, tc = run_of(s, "expert-choice"), run_of(s, "cf-dropless")
  assert ec.cfg.moe.router == "expert_choice" and tc.cfg.moe.capacity_factor is None
  k_times_t = tc.cfg.moe.num_selected * tokens_per_group(tc.cfg)
  for train in (True, False):  # evaluation capacity = training capacity
    assert expert_assignments(ec.cfg, train) == expert_assignments(tc.cfg, train) == k_times_t
  # The previous design (train factor 1.25, eval 2.0) did not match: the check can fail.
  old = ec.cfg.copy_and_resolve_references()
  old.moe.capacity_factor, old.moe.eval_capacity_factor = 1.25, 2.0
  assert expert_assignments(old, True) != k_times_t != expert_assignments(old, False)


def test_expert_choice_routing_counts_k_times_t_assignments():
  """The layer's own routing functions, on random logits: E*C selections == K*T."""
  t, e, k = 64, 8, 2
  logits = jax.random.normal(jax.random.PRNGKey(0), (1, t, e))
  c = routing.capacity_for(t, e, k, 1.0)
  ec = routing.expert_choice_routing(logits, capacity=c)
  tc = routing.top_k_routing(logits, num_selected=k, capacity=None)
  assert int(np.sum(np.asarray(ec.slot) >= 0)) == e * c == k * t
  assert int(np.sum(np.asarray(tc.slot) >= 0)) == k * t
  capped = routing.top_k_routing(logits * 5, num_selected=k, capacity=routing.capacity_for(
      t, e, k, 0.5))
  assert int(np.sum(np.asarray(capped.slot) >= 0)) < k * t  # a capacity limit drops


@pytest.mark.parametrize("scale", ["cpu", "accelerator"])
def test_top2_flop_matched_by_half_width(scale):
  s = expanded("capacity", scale)
  top1 = run_of(s, "k1_cf1.25").cfg.moe
  param = next(r for r in s.runs if r.member == "k2_cf1.25_ecf1.25").cfg.moe
  flop = next(r for r in s.runs if r.member.startswith("k2_cf1.25_ecf1.25_f")).cfg.moe
  active = lambda m: m.num_selected * m.expert_hidden  # noqa: E731
  assert active(flop) == active(top1) and active(param) == 2 * active(top1)
  assert flop.num_experts == top1.num_experts and flop.capacity_factor == 1.25


@pytest.mark.parametrize("name", ["granularity", "balancing"])
def test_dropless_where_olmoe_is(name):
  s = expanded(name)
  assert all(r.cfg.moe.capacity_factor is None and r.cfg.moe.eval_capacity_factor is None
             for r in s.runs)


def test_loss_free_baseline_is_auxiliary_weight_1e3():
  s = expanded("balancing")
  wang = [p for p in s.published if p["source"].startswith("Wang")
          and p["metric"] == "eval_cross_entropy" and p["effect"] is not None]
  assert wang
  for p in wang:
    bias, aux = (next(m for m in s.members if m.name == n).overrides for n in p["order"])
    assert bias["moe.bias_balancing"] and bias["moe.load_balance_weight"] == 0.0
    assert aux["moe.load_balance_weight"] == 1e-3 and "moe.bias_balancing" not in aux


@pytest.mark.parametrize("name", ["upcycling", "finetune_freeze"])
def test_one_parent_per_seed(name):
  table, parents = expanded(name), expanded(name, arg="parent")
  assert len(parents.runs) == len(table.seeds) >= 3
  readers = [r for r in table.runs if r.cfg.train.init_from]
  want = {r.seed: os.path.join(r.member, f"seed{r.seed}").split("/")[-2:]
          for r in parents.runs}
  assert readers and all(r.cfg.train.init_from.split("/")[-2:] == want[r.seed]
                         for r in readers)
  assert len({r.cfg.train.init_from for r in readers}) == len(table.seeds)


@pytest.mark.parametrize("scale", ["cpu", "accelerator"])
def test_upcycling_compute_matched_and_crossover_members(scale):
  from moe.model.config import model_config_from
  from moe.model.flops import flops_per_token
  s = expanded("upcycling", scale)
  extra = run_of(s, "base").cfg.train.steps
  dense = sorted((r.cfg.train.steps, r.cfg) for r in s.runs
                 if not r.cfg.moe.enabled and r.seed == 0)
  scratch = sorted(r.cfg.train.steps for r in s.runs
                   if r.cfg.moe.enabled and not r.cfg.train.init_from and r.seed == 0)
  assert dense[0][0] == extra and scratch == [m * extra for m in (1, 2, 3, 4)]
  upcycled = next(r.cfg for r in s.runs if r.cfg.train.upcycle)
  train_flops = lambda c: c.train.steps * flops_per_token(  # noqa: E731
      model_config_from(c, vocab_size=259), c.data.seq_len).train
  # the longer dense member does the upcycled model's training FLOPs, within 5%
  assert 0.95 < train_flops(dense[1][1]) / train_flops(upcycled) < 1.05
  assert train_flops(dense[0][1]) / train_flops(upcycled) < 0.8  # the same steps: not matched


def test_finetune_few_moe_blocks_many_evaluations_best_eval_metric():
  s = expanded("finetune_freeze")
  assert s.metric == "min_eval_cross_entropy"
  cfg = s.runs[0].cfg
  assert cfg.model.moe_interval >= 2 and cfg.data.name == "textdir"
  assert cfg.train.steps // cfg.train.eval_every >= 10


def test_min_metric_is_the_best_evaluation(tmp_path):
  rows = [{"step": 20, "eval_cross_entropy": 2.0}, {"step": 30, "loss": 9.0},
          {"step": 40, "eval_cross_entropy": 1.5}, {"step": 60, "eval_cross_entropy": 1.7}]
  (tmp_path / METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / SUMMARY_FILE).write_text(json.dumps({"status": "completed",
                                                   "eval_cross_entropy": 1.7}))
  keys = ["eval_cross_entropy", "min_eval_cross_entropy", "min_nothing"]
  values = report.load_run(str(tmp_path), [], keys)["values"]
  assert values["eval_cross_entropy"] == 1.7  # the last evaluation
  assert values["min_eval_cross_entropy"] == 1.5 and values["min_nothing"] is None


@pytest.mark.parametrize("name", ALL_TABLES)
def test_every_claim_has_source_and_published_text(name):
  for p in expanded(name).published:
    assert p["source"] and p["claim"]
    if p["mechanism"]:
      continue
    assert p["published"], p["claim"]  # the paper's numbers, or "not read"
    if "not read" in p["published"] and not any(ch.isdigit() for ch in p["published"]):
      assert p["effect"] is None, p["claim"]  # no number read, no effect size


@pytest.mark.slow
def test_finetune_table_smoke_with_its_parent(tmp_path):
  """Both commands of the fine-tuning table, in smoke mode, through the real trainer: MoE in
  few blocks, the small test folder, and the best-evaluation metric in the report."""
  from moe.sweep import runner as sw
  ft = importlib.import_module("configs.ablations.finetune_freeze")
  run_smoke_parent(ft, tmp_path)
  table = spec.smoke_config(ft.get_config())
  table.data.tfds_data_dir = str(tmp_path / "tfds")
  parent_dir = str(tmp_path / "parent" / "base" / "seed0")
  table.sweep.members = [{**m, "train.init_from": parent_dir} for m in table.sweep.members]
  logs = []
  out = sw.run(table, str(tmp_path / "table"), log=logs.append)
  assert not out["failed"], "\n".join(logs)
  data = report.collect(str(tmp_path / "table"))
  best = [r["values"]["min_eval_cross_entropy"] for m in data["members"] for r in m["runs"]]
  assert len(best) == 2 and all(v is not None and v > 0 for v in best)
