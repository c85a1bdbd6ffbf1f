"""Sweep format, member expansion, runner (resume, sharding, failures, extra evals), bad input."""

import glob
import importlib
import json
import os
import re

import ml_collections
import pytest

from configs import default
from moe.sweep import runner as sw
from moe.sweep import spec
from moe.errors import ConfigError
from moe.model.config import model_config_from, validate_model
from moe.train.checks import config_warnings

TABLES = ("experts", "granularity", "capacity", "balancing", "zloss", "routing", "adaptive_k")
N_MEMBERS = {"experts": 5, "granularity": 4, "capacity": 12, "balancing": 6, "zloss": 13,
             "routing": 4, "adaptive_k": 6}


def table_config(name):
  return importlib.import_module(f"configs.ablations.{name}").get_config()


def tiny_sweep(members=None, seeds=(0, 1), **extra):
  c = default.get_config()
  c.sweep = ml_collections.ConfigDict()
  c.sweep.title = "tiny"
  c.sweep.paper = "nobody 2024"
  c.sweep.metric = "eval_cross_entropy"
  c.sweep.members = list(members if members is not None else
                         [{"moe.num_selected": 1}, {"moe.num_selected": 2}])
  c.sweep.seeds = list(seeds)
  c.sweep.published = [{"claim": "k2 better", "source": "x", "order": [1, 0]}]
  for k, v in extra.items():
    c.sweep[k] = v
  return c


class FakeTrainer:
  """Writes the trainer's files; counts calls; can raise or diverge on chosen calls."""

  def __init__(self, interrupt_at=None, raise_for=(), diverge_for=(), preempt_at=None):
    self.calls = []
    self.interrupt_at = interrupt_at
    self.preempt_at = preempt_at
    self.raise_for = raise_for
    self.diverge_for = diverge_for

  def __call__(self, cfg, workdir):
    tag = os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir)))
    self.calls.append((tag, cfg.train.seed, cfg.moe.num_selected))
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
      f.write(json.dumps({"step": 1, "loss": 3.0 - cfg.moe.num_selected}) + "\n")
    if len(self.calls) == self.interrupt_at:
      raise KeyboardInterrupt  # killed mid-run: no summary.json
    if any(tag.startswith(m) for m in self.raise_for):
      raise RuntimeError("boom\nsecond line")
    status = "diverged" if any(tag.startswith(m) for m in self.diverge_for) else "completed"
    if len(self.calls) == self.preempt_at:
      status = "preempted"  # the trainer's answer to SIGTERM: checkpoint saved, stop
    summary = {"status": status, "eval_cross_entropy": 2.0 - 0.1 * cfg.moe.num_selected
               + 0.01 * cfg.train.seed}
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f)
    return summary


def quiet(_):
  pass


def claim(c, **fields):
  """Replaces the tiny sweep's claim by one with these extra fields."""
  c.sweep.published = [{"claim": "k2 better", "source": "x", "order": [1, 0], **fields}]


# ----------------------------------------------------------------------------- the six tables


@pytest.mark.parametrize("name", TABLES)
@pytest.mark.parametrize("scale", ["cpu", "accelerator"])
def test_tables_expand_to_valid_unique_members(name, scale):
  c = table_config(name)
  c.sweep.scale = scale
  s = spec.expand(c, "/tmp/never_written")
  names = [m.name for m in s.members]
  assert len(names) == N_MEMBERS[name] == len(set(names))
  keys = {json.dumps(sorted(m.overrides.items()), default=repr) for m in s.members}
  assert len(keys) == len(names)
  assert all(spec.member_name(m.overrides) == m.name for m in s.members)
  assert all(re.fullmatch(r"[A-Za-z0-9._+-]+", n) for n in names)
  # at least three seeds: each table's count from moe.sweep.power (POWER.md)
  assert s.seeds == list(range(len(s.seeds))) and len(s.seeds) >= 3
  assert len(s.runs) == len(s.seeds) * len(names)
  assert s.title and s.paper and s.published
  assert s.config_file == f"configs/ablations/{name}.py"
  for r in s.runs:
    assert "sweep" not in r.cfg
    assert r.cfg.train.seed == r.seed
    m = next(m for m in s.members if m.name == r.member)
    for path, v in m.overrides.items():
      g, f = path.split(".")
      assert r.cfg[g][f] == v, (path, v)
    validate_model(model_config_from(r.cfg, vocab_size=259))
    assert config_warnings(r.cfg) == [], r.member  # e.g. a top-1 router without a gradient
  for p in s.published:
    assert set(p["order"]) <= set(names) and len(p["order"]) >= 2
  if scale == "cpu":
    assert s.runs[0].cfg.model.d_model == 64
    assert s.runs[0].cfg.data.tfds_data_dir == "/tmp/.tfds"  # as a single run in /tmp/x


def test_table_specifics():
  gran = spec.expand(table_config("granularity"))
  ek = [(r.cfg.moe.num_experts, r.cfg.moe.num_selected, r.cfg.moe.expert_hidden)
        for r in gran.runs[:4]]
  assert [(e, k) for e, k, _ in ek] == [(4, 1), (8, 2), (16, 4), (32, 8)]
  assert len({e * f for e, _, f in ek}) == 1 and len({k * f for _, k, f in ek}) == 1
  cap = spec.expand(table_config("capacity"))
  assert {(r.cfg.moe.num_selected, r.cfg.moe.capacity_factor) for r in cap.runs} == {
      (k, cf) for k in (1, 2) for cf in (0.75, 1.0, 1.25, 2.0, None)}
  assert all(r.cfg.moe.eval_capacity_factor == r.cfg.moe.capacity_factor for r in cap.runs)
  assert cap.eval_overrides == [{"name": "ecf2",
                                 "overrides": {"moe.eval_capacity_factor": 2.0}}]
  exp = spec.expand(table_config("experts"))
  dense = next(r for r in exp.runs if r.member == "dense")
  assert not dense.cfg.moe.enabled and dense.cfg.model.d_ff == dense.cfg.moe.expert_hidden
  assert {r.cfg.moe.num_selected for r in exp.runs} == {1}
  rout = spec.expand(table_config("routing"))
  ec = [r for r in rout.runs if r.cfg.moe.router == "expert_choice"]
  assert ec and all(r.cfg.moe.allow_noncausal_routing for r in ec)
  assert any("leak" in n for n in rout.notes)
  z = spec.expand(table_config("zloss"))
  assert sum(r.cfg.train.learning_rate > 1e-2 for r in z.runs) == 9 * len(z.seeds)  # stress
  assert len(z.seeds) >= 8  # exact tests of divergence counts need discordant seeds
  assert {r.cfg.moe.router_dtype for r in z.runs if r.cfg.model.dtype == "bfloat16"} == {
      "float32", "bfloat16_full"}
  assert any(p["metric"] == "stable_fraction" for p in z.published)
  assert all((p["kind"] == "stability") == (p["metric"] == "stable_fraction")
             for p in z.published)
  assert [p["mechanism"] for p in cap.published] == [False] * 8 + [True]


@pytest.mark.parametrize("name", TABLES)
def test_smoke_mode_keeps_two_members_one_seed_tiny(name):
  c = spec.smoke_config(table_config(name))
  assert not table_config(name).sweep.smoke  # the original is untouched
  s = spec.expand(c)
  assert len(s.members) == 2 and s.seeds == [0] and len(s.runs) == 2
  for r in s.runs:
    assert r.cfg.train.steps == spec.SMOKE_OVERRIDES["train.steps"]
    assert r.cfg.model.d_model == 32 and r.cfg.data.seq_len == 32


# ----------------------------------------------------------------------------- names


def test_member_names_are_short_stable_slugs():
  assert spec.member_name({"moe.num_selected": 2, "moe.capacity_factor": 1.25}) == "k2_cf1.25"
  assert spec.member_name({"moe.capacity_factor": None}) == "cf-dropless"
  assert spec.member_name({"moe.load_balance_weight": 1e-3}) == "lb1e-3"
  assert spec.member_name({"moe.load_balance_weight": 0.0}) == "lb0"
  assert spec.member_name({"moe.enabled": False}) == "dense"
  assert spec.member_name({"moe.bias_balancing": True}) == "bias"
  assert spec.member_name({"moe.router": "expert_choice"}) == "expert-choice"
  assert spec.member_name({"train.warmup_steps": 7}) == "warmup-steps7"
  assert spec.member_name({}) == "base"
  assert spec.format_value(2.5e-4) == "2.5e-4" and spec.format_value(3e5) == "3e5"


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("mutate, needle", [
    (lambda c: c.sweep.members.append({"moe.num_expertz": 4}), "moe.num_expertz"),
    (lambda c: c.sweep.members.append({"nope.x": 4}), "nope.x"),
    (lambda c: c.sweep.members.append({"moe": 4}), "group"),
    (lambda c: setattr(c.sweep, "members", []), "sweep.members is empty"),
    (lambda c: c.sweep.members.append({"moe.num_selected": 1}), "same overrides"),
    (lambda c: c.sweep.members.append({"train.seed": 3}), "train.seed"),
    (lambda c: c.sweep.members.append({"moe.num_experts": "many"}), "moe.num_experts"),
    (lambda c: c.sweep.members.append({"moe.num_selected": 9}), "num_selected"),
    (lambda c: c.sweep.members.append({"moe.num_experts": {"gpu": 4}}), "per-scale"),
    (lambda c: setattr(c.sweep, "seeds", []), "sweep.seeds"),
    (lambda c: setattr(c.sweep, "scale", "tpu"), "sweep.scale"),
    (lambda c: setattr(c.sweep, "published", [{"claim": "", "source": "", "order": [0, 7]}]),
     "published[0].order"),
    (lambda c: setattr(c.sweep, "eval_overrides",
                       [{"name": "x", "overrides": {"moe.eval_cf": 2.0}}]), "moe.eval_cf"),
    (lambda c: claim(c, kind="ranking"), "published[0].kind"),
    (lambda c: claim(c, kind="no_worse"), "published[0].margin"),
    (lambda c: claim(c, margin=0.01), "published[0].margin is for kind 'no_worse'"),
    (lambda c: claim(c, kind="trend"), "at least 3 distinct members"),
    (lambda c: claim(c, effect=-0.1), "published[0].effect must be > 0"),
    (lambda c: claim(c, effect=[0.1, 0.2]), "list of 1 numbers"),
    (lambda c: claim(c, effect="big"), "published[0].effect"),
    (lambda c: claim(c, kind="stability"), "kind 'stability' goes with metric"),
    (lambda c: claim(c, metric="stable_fraction", kind="order"), "goes with metric"),
    (lambda c: claim(c, metric="stable_fraction", effect=1.5), "(0, 1]"),
    (lambda c: claim(c, kind="no_worse", margin=0.01, effect=-0.02), "margin + effect"),
    (lambda c: claim(c, metric="eval_cross_entropy@nope"), "'nope' is no extra evaluation"),
    (lambda c: claim(c, metric="a - b - c"), "published[0].metric"),
    (lambda c: claim(c, mechanism="yes"), "published[0].mechanism"),
    (lambda c: claim(c, effects=0.1), "published[0] must be a dict with keys"),
    (lambda c: setattr(c.sweep, "colour", "red"), "colour"),
])
def test_bad_sweeps_are_one_line_config_errors_before_training(tmp_path, mutate, needle):
  c = tiny_sweep()
  mutate(c)
  fake = FakeTrainer()
  with pytest.raises(ConfigError) as e:
    sw.run(c, str(tmp_path), train_fn=fake, log=quiet)
  assert needle in str(e.value) and "\n" not in str(e.value)
  assert fake.calls == [] and not os.path.exists(tmp_path / "sweep.json")


def test_claims_of_every_kind_are_accepted_with_defaults():
  c = tiny_sweep(members=[{"moe.num_selected": k} for k in (1, 2, 3)],
                 eval_overrides=[{"name": "ecf2", "overrides": {"moe.eval_capacity_factor": 2.0}}])
  c.sweep.published = [
      {"claim": "o", "source": "s", "order": [2, 1, 0], "effect": [0.01, 0.02],
       "published": "1.50 / 1.49 / 1.47"},
      {"claim": "t", "source": "s", "order": [2, 1, 0], "kind": "trend", "effect": 0.01,
       "metric": "eval_cross_entropy - eval_cross_entropy@ecf2", "higher_is_better": True},
      {"claim": "n", "source": "s", "order": ["k1", "k2"], "kind": "no_worse", "margin": 0.02},
      {"claim": "s", "source": "s", "order": [0, 1], "metric": "stable_fraction",
       "higher_is_better": True, "effect": 1},
      {"claim": "m", "source": "s", "order": [1, 0], "mechanism": True,
       "metric": "moe/dropped_fraction"}]
  pub = spec.expand(c).published
  assert [p["kind"] for p in pub] == ["order", "trend", "no_worse", "stability", "order"]
  assert pub[0]["order"] == ["k3", "k2", "k1"] and pub[0]["effect"] == [0.01, 0.02]
  assert pub[0]["published"] == "1.50 / 1.49 / 1.47" and pub[2]["published"] == ""
  assert pub[2]["margin"] == 0.02 and pub[2]["effect"] is None and pub[3]["effect"] == 1.0
  assert [p["mechanism"] for p in pub] == [False] * 4 + [True]
  assert not pub[0]["higher_is_better"] and pub[1]["higher_is_better"]
  # Smoke mode keeps members 0, 1: the trend (3 members) is dropped, the chain's per-pair
  # effects no longer apply.
  smoke = spec.expand(spec.smoke_config(c)).published
  assert [p["claim"] for p in smoke] == ["o", "n", "s", "m"]
  assert smoke[0]["order"] == ["k2", "k1"] and smoke[0]["effect"] is None


def test_same_overrides_in_another_order_are_duplicates():
  c = tiny_sweep(members=[{"moe.num_selected": 1, "moe.num_experts": 4},
                          {"moe.num_experts": 4, "moe.num_selected": 1}])
  c.sweep.published = []
  with pytest.raises(ConfigError, match="same overrides as sweep.members\\[0\\]"):
    spec.expand(c)


def test_no_sweep_group_is_an_error():
  with pytest.raises(ConfigError, match="no `sweep` group"):
    spec.expand(default.get_config())


@pytest.mark.parametrize("shard", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3", ""])
def test_bad_shard_is_an_error_before_training(tmp_path, shard):
  fake = FakeTrainer()
  with pytest.raises(ConfigError, match="shard must be 'i/n'"):
    sw.run(tiny_sweep(), str(tmp_path), shard=shard, train_fn=fake, log=quiet)
  assert fake.calls == []


# ----------------------------------------------------------------------------- runner


def test_interrupted_sweep_resumes_without_rerunning_finished_members(tmp_path):
  c = tiny_sweep()
  fake = FakeTrainer(interrupt_at=2)
  with pytest.raises(KeyboardInterrupt):
    sw.run(c, str(tmp_path), train_fn=fake, log=quiet)
  # Seed-major order: k1/seed0 finished, k2/seed0 was interrupted.
  assert [t for t, _, _ in fake.calls] == ["k1/seed0", "k2/seed0"]
  fake2 = FakeTrainer()
  out = sw.run(c, str(tmp_path), train_fn=fake2, log=quiet)
  assert [t for t, _, _ in fake2.calls] == ["k2/seed0", "k1/seed1", "k2/seed1"]
  assert out["skipped"] == ["k1/seed0"] and len(out["trained"]) == 3
  fake3 = FakeTrainer()
  out = sw.run(c, str(tmp_path), train_fn=fake3, log=quiet)
  assert fake3.calls == [] and len(out["skipped"]) == 4
  for f in ("table.md", "table.csv", "runs.csv", "plot.png"):
    assert os.path.getsize(tmp_path / f) > 0
  assert "PARTIAL" not in (tmp_path / "table.md").read_text()


def test_preempted_run_stops_the_sweep_and_resumes_next_time(tmp_path):
  c = tiny_sweep()
  fake = FakeTrainer(preempt_at=2)
  out = sw.run(c, str(tmp_path), train_fn=fake, log=quiet)
  assert out["preempted"] == ["k2/seed0"] and out["trained"] == ["k1/seed0"]
  assert len(fake.calls) == 2 and "PARTIAL REPORT" in (tmp_path / "table.md").read_text()
  fake2 = FakeTrainer()
  sw.run(c, str(tmp_path), train_fn=fake2, log=quiet)
  assert [t for t, _, _ in fake2.calls] == ["k2/seed0", "k1/seed1", "k2/seed1"]


def test_shards_partition_the_runs(tmp_path):
  c = tiny_sweep(members=[{"moe.num_selected": k} for k in (1, 2, 3)], seeds=(0, 1, 2))
  seen = []
  for i in range(4):
    fake = FakeTrainer()
    out = sw.run(c, str(tmp_path), shard=f"{i}/4", train_fn=fake, log=quiet)
    seen += [(t, s) for t, s, _ in fake.calls]
    text = (tmp_path / "table.md").read_text()
    assert ("PARTIAL REPORT" in text) == (i < 3)
    assert len(out["trained"]) == len(fake.calls)
  assert len(seen) == 9 == len(set(seen))


def test_failed_and_diverged_runs(tmp_path):
  c = tiny_sweep()
  fake = FakeTrainer(raise_for=("k1",), diverge_for=("k2/seed1",))
  out = sw.run(c, str(tmp_path), train_fn=fake, log=quiet)
  assert sorted(out["failed"]) == ["k1/seed0", "k1/seed1"]
  summary = json.loads((tmp_path / "k1" / "seed0" / "summary.json").read_text())
  assert summary["status"] == "failed" and summary["error"] == "RuntimeError: boom"
  text = (tmp_path / "table.md").read_text()
  assert "| `k1` |" in text and "2 failed" in text and "1 completed, 1 diverged" in text
  # Failed runs are retried, diverged ones are not.
  fake2 = FakeTrainer()
  out = sw.run(c, str(tmp_path), train_fn=fake2, log=quiet)
  assert sorted(t for t, _, _ in fake2.calls) == ["k1/seed0", "k1/seed1"]


def test_extra_evaluations(tmp_path):
  c = tiny_sweep(eval_overrides=[{"name": "ecf2",
                                  "overrides": {"moe.eval_capacity_factor": 2.0}}])
  c.moe.eval_capacity_factor = 1.0
  seen = []

  def fake_eval(cfg, workdir):
    seen.append((os.path.basename(workdir), cfg.moe.eval_capacity_factor))
    return {"eval_cross_entropy": 1.5}

  sw.run(c, str(tmp_path), train_fn=FakeTrainer(diverge_for=("k2",)), eval_fn=fake_eval,
         log=quiet)
  assert sorted(seen) == [("seed0", 2.0), ("seed1", 2.0)]  # k1 only: k2 diverged
  got = json.loads((tmp_path / "k1" / "seed0" / "eval_ecf2.json").read_text())
  assert got["metrics"] == {"eval_cross_entropy": 1.5}
  text = (tmp_path / "table.md").read_text()
  assert "@ ecf2" in text and "1.5000 ± 0.0000" in text
  runs = (tmp_path / "runs.csv").read_text().splitlines()
  assert runs[0].split(",")[-2:] == ["eval_cross_entropy@ecf2", "wall_s"]
  assert runs[1].startswith("k1,0,completed,") and runs[1].split(",")[-2] == "1.5"
  assert runs[3].startswith("k2,0,diverged,") and runs[3].split(",")[-2] == ""
  sw.run(c, str(tmp_path), train_fn=FakeTrainer(), eval_fn=fake_eval, log=quiet)
  assert len(seen) == 2  # not re-evaluated


def test_extra_evaluation_without_trainer_entry_point_is_reported(tmp_path, monkeypatch):
  c = tiny_sweep(eval_overrides=[{"name": "ecf2",
                                  "overrides": {"moe.eval_capacity_factor": 2.0}}])
  monkeypatch.setattr(sw, "_default_eval_fn", lambda: None)
  sw.run(c, str(tmp_path), train_fn=FakeTrainer(), log=quiet)
  assert "NOT RUN" in (tmp_path / "table.md").read_text()


def test_existing_run_of_another_config_is_refused(tmp_path):
  sw.run(tiny_sweep(), str(tmp_path), train_fn=FakeTrainer(), log=quiet)
  c = tiny_sweep()
  c.train.learning_rate = 1e-4
  with pytest.raises(ConfigError, match="train.learning_rate"):
    sw.run(c, str(tmp_path), train_fn=FakeTrainer(), log=quiet)


def test_run_of_an_older_version_without_a_new_field_resumes(tmp_path):
  """A config.json written before a field existed: the field at its default keeps the old
  behaviour, so the run is reused; the field set to anything else is a different config."""
  sw.run(tiny_sweep(), str(tmp_path), train_fn=FakeTrainer(), log=quiet)
  for path in glob.glob(str(tmp_path / "*" / "seed*" / "config.json")):
    with open(path) as f:
      saved = json.load(f)
    del saved["moe"]["k_rule"]  # as written before adaptive k
    with open(path, "w") as f:
      json.dump(saved, f)
  trainer = FakeTrainer()
  sw.run(tiny_sweep(), str(tmp_path), train_fn=trainer, log=quiet)
  assert trainer.calls == []  # every run had finished and is reused
  c = tiny_sweep()
  c.moe.k_rule = "top_p"
  with pytest.raises(ConfigError, match="moe.k_rule"):
    sw.run(c, str(tmp_path), train_fn=FakeTrainer(), log=quiet)


# ----------------------------------------------------------------------------- real trainer


@pytest.mark.slow
@pytest.mark.parametrize("name", TABLES)
def test_smoke_every_table_through_the_real_trainer(tmp_path, name):
  c = spec.smoke_config(table_config(name))
  c.unlock()
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  out = sw.run(c, str(tmp_path / name), log=quiet)
  for f in ("table.md", "table.csv", "runs.csv", "plot.png"):
    assert os.path.getsize(tmp_path / name / f) > 0
  assert not out["failed"], (tmp_path / name / "table.md").read_text()


@pytest.mark.slow
def test_real_trainer_resumes_an_interrupted_member(tmp_path):
  from moe.train import trainer as train
  c = spec.smoke_config(table_config("experts"))
  c.unlock()
  c.data.tfds_data_dir = str(tmp_path / "tfds")
  stop = lambda cfg, wd: train.train_and_evaluate(cfg, wd, stop_at_step=2)  # noqa: E731
  out = sw.run(c, str(tmp_path / "t"), train_fn=stop, log=quiet)
  assert out["preempted"] == ["dense/seed0"]
  out = sw.run(c, str(tmp_path / "t"), log=quiet)
  assert out["trained"] == ["dense/seed0", "e2/seed0"]
  summary = json.loads((tmp_path / "t" / "dense" / "seed0" / "summary.json").read_text())
  assert summary["status"] == "completed" and summary["resumed_from_step"] == 2
