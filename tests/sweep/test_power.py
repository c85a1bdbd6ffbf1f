"""moe.sweep.power: the seed count a budget affords and the detectable effects it projects."""

import math

import numpy as np
import pytest

from moe.sweep import power, stats, verdicts


def _data(wall_s=30.0, seeds=3, gaps=(0.02, 0.03, 0.01), effect=0.01):
  """Two members a, b; b's eval CE = a's + gap per seed (so a > b holds); every run wall_s."""
  def runs(offsets):
    return [{"seed": s, "status": "completed", "values": {"eval_cross_entropy": 1.5 + o},
             "extra": {}, "wall_s": wall_s} for s, o in enumerate(offsets)]
  members = [{"name": "a", "overrides": {}, "runs": runs([0.0] * seeds)},
             {"name": "b", "overrides": {}, "runs": runs(list(gaps))}]
  published = [{"claim": "a beats b", "source": "test", "published": "x", "effect": effect,
                "order": ["a", "b"]}]
  claims = verdicts.evaluate(members, published)
  return {"sweep": {"title": "t", "seeds": list(range(seeds))}, "members": members,
          "claims": claims}


def test_seed_cost_and_afforded_count():
  data = _data(wall_s=30.0)  # 2 members x 30 s = 1 one-core minute a seed
  assert power.seed_cost_minutes(data) == pytest.approx(1.0)
  p = power.plan(data, minutes=60, cores=2)
  assert p["seeds"] == 120 and p["runs"] == 240 and p["wall_minutes"] == pytest.approx(60.0)
  # a budget below MIN_SEEDS seeds still runs MIN_SEEDS; no timed run: no plan
  assert power.plan(data, minutes=0.5, cores=1)["seeds"] == power.MIN_SEEDS
  assert power.afforded_seeds(None, 60, 2) is None


def test_detectable_effects_follow_the_measured_sd():
  gaps = (0.02, 0.03, 0.01)
  p = power.plan(_data(gaps=gaps, effect=0.01), minutes=10, cores=1)  # 10 seeds
  t = p["tests"][0]
  sd = float(np.std(gaps, ddof=1))
  assert t["sd"] == pytest.approx(sd)
  assert t["mde_run"] == pytest.approx(stats.mde(sd, 3))
  assert t["mde_afforded"] == pytest.approx(stats.mde(sd, 10)) and t["mde_afforded"] < t["mde_run"]
  assert t["seeds_for_target"] == stats.seeds_needed(sd, 0.01)
  assert stats.mde(sd, t["seeds_for_target"]) <= 0.01 < stats.mde(sd, t["seeds_for_target"] - 1)


def test_stability_claims_use_the_exact_test():
  members = [{"name": n, "overrides": {}, "runs": [
      {"seed": s, "status": "completed", "values": {"stable_fraction": 1.0}, "extra": {},
       "wall_s": 60.0} for s in range(3)]} for n in ("a", "b")]
  published = [{"claim": "a more stable", "source": "t", "published": "x",
                "metric": "stable_fraction", "higher_is_better": True, "order": ["a", "b"]}]
  data = {"sweep": {"title": "t", "seeds": [0, 1, 2]}, "members": members,
          "claims": verdicts.evaluate(members, published)}
  t = power.plan(data, minutes=8, cores=2)["tests"][0]  # 2 minutes a seed: 8 seeds
  assert math.isinf(t["mde_run"])  # 3 seeds can never reach p < 0.05
  assert t["mde_afforded"] == pytest.approx(stats.stability_mde(8))


def test_render_and_cli_errors(tmp_path, capsys):
  data = _data()
  text = power.render(data, power.plan(data), 60, 2, "runs/x")
  assert "**120 seeds**" in text and "| A | a > b | order |" in text
  with pytest.raises(SystemExit) as e:
    power.main(["--workdir", str(tmp_path)])
  assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_parent_cost_is_added_per_seed():
  table, parent = _data(wall_s=30.0), _data(wall_s=15.0)  # 1 + 0.5 one-core minutes a seed
  assert power.plan(table, minutes=60, cores=2, parent=parent)["seeds"] == 80
