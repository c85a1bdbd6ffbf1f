"""The sweep report on hand-made result files: means/stds, statuses, verdicts, runs.csv, plot."""

import csv
import json
import math
import os
import subprocess
import sys

import pytest

from conftest import REPO, one_line_error
from moe.sweep import report

GENERATED = "2024-01-02T03:04:05"


def write(path, obj):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    if isinstance(obj, str):
      f.write(obj)
    else:
      json.dump(obj, f)


def run_files(workdir, member, seed, status, summary=None, records=(), torn=False,
              error=None):
  d = os.path.join(workdir, member, f"seed{seed}")
  if status is not None:
    write(os.path.join(d, "summary.json"), {"status": status, **(summary or {}),
                                            **({"error": error} if error else {})})
  lines = "".join(json.dumps(r) + "\n" for r in records) + ('{"step": 30, "lo' if torn else "")
  write(os.path.join(d, "metrics.jsonl"), lines)
  write(os.path.join(d, "sweep_run.json"), {"machine": "testbox, 2 CPU cores", "wall_s": 10.0,
                                            "finished": "2024-01-01T00:00:0%d" % seed})


@pytest.fixture
def sweep_dir(tmp_path):
  w = str(tmp_path)
  members = [{"name": n, "overrides": {"moe.num_selected": k}}
             for k, n in enumerate("abcde", start=1)]
  write(os.path.join(w, "sweep.json"), {
      "title": "Hand-made table", "paper": "Someone et al. 2099, Table 9",
      "config_file": "configs/ablations/x.py", "metric": "eval_cross_entropy",
      "higher_is_better": False, "scale": "cpu", "smoke": False, "seeds": [0, 1, 2],
      "members": members, "eval_overrides": [], "notes": ["a caveat"],
      "command": "python launch.py --config=configs/ablations/x.py --workdir=runs/x",
      "published": [
          {"claim": "b beats a", "source": "S1", "metric": "eval_cross_entropy",
           "higher_is_better": False, "order": ["b", "a"], "effect": 0.1,
           "published": "0.1 nats"},
          {"claim": "a beats e", "source": "S2", "metric": "eval_cross_entropy",
           "higher_is_better": False, "order": ["a", "e"]},
          {"claim": "e beats a", "source": "S3", "metric": "eval_cross_entropy",
           "higher_is_better": False, "order": ["e", "a"]},
          {"claim": "a beats c", "source": "S4", "metric": "eval_cross_entropy",
           "higher_is_better": False, "order": ["a", "c"]},
          {"claim": "a more stable than b", "source": "S5", "metric": "stable_fraction",
           "higher_is_better": True, "order": ["a", "b"]},
      ]})
  # a: three completed seeds; dropped fraction only in metrics.jsonl (last record wins).
  for seed, (ce, bpb, tps, drop) in enumerate([(1.0, 2.0, 100, 0.1), (1.2, 2.0, 200, 0.2),
                                               (1.4, 2.3, 300, 0.3)]):
    run_files(w, "a", seed, "completed",
              {"eval_cross_entropy": ce, "eval_bits_per_byte": bpb, "tokens_per_s": tps},
              [{"step": 10, "loss": 3.0, "moe/dropped_fraction": 0.9},
               {"step": 20, "loss": 2.5, "moe/dropped_fraction": drop}], torn=(seed == 0))
  # b: two completed, one diverged (NaN loss in its summary).
  run_files(w, "b", 0, "completed", {"eval_cross_entropy": 0.5})
  run_files(w, "b", 1, "completed", {"eval_cross_entropy": 0.6})
  run_files(w, "b", 2, "diverged", {"eval_cross_entropy": float("nan")})
  # c: every seed failed.
  for seed in range(3):
    run_files(w, "c", seed, "failed", error="RuntimeError: boom")
  # d: never ran. e: one completed, one preempted, one missing.
  run_files(w, "e", 0, "completed", {"eval_cross_entropy": 2.0})
  run_files(w, "e", 1, "preempted", {}, [{"step": 10, "loss": 4.0}])
  return w


def test_markdown_means_stds_statuses_and_verdicts(sweep_dir):
  paths = report.write_report(sweep_dir, generated=GENERATED)
  text = open(paths["table.md"]).read()
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
          for line in text.splitlines() if line.startswith("| `")}
  header = [c.strip() for c in next(l for l in text.splitlines()
                                    if l.startswith("| member")).split("|")[2:-1]]
  col = lambda member, name: rows[f"`{member}`"][header.index(name)]  # noqa: E731
  # Header block.
  assert text.startswith("# Hand-made table")
  for needle in ("Someone et al. 2099, Table 9", "--config=configs/ablations/x.py",
                 "testbox, 2 CPU cores", GENERATED, "PARTIAL REPORT", "a caveat"):
    assert needle in text
  # a: CE 1.0/1.2/1.4 -> 1.2 +- 0.2; bpb 2.0/2.0/2.3 -> 2.1 +- sqrt(0.03); tokens/s 200 +- 100;
  # dropped fraction from the last metrics record 0.1/0.2/0.3 -> 0.2 +- 0.1.
  assert col("a", "eval CE (nats)") == "1.2000 ± 0.2000"
  assert col("a", "eval bits/byte") == f"2.1000 ± {math.sqrt(0.03):.4f}"
  assert col("a", "tokens/s") == "200 ± 100"
  assert col("a", "dropped frac (train)") == "0.2000 ± 0.1000"
  assert col("a", "eval loss") == "—"  # completed but never logged
  assert col("a", "runs") == "3 completed"
  # b: the diverged seed is counted, not averaged: 0.5/0.6 -> 0.55 +- sqrt(0.005).
  assert col("b", "runs") == "2 completed, 1 diverged"
  assert col("b", "eval CE (nats)") == f"0.5500 ± {math.sqrt(0.005):.4f}"
  assert col("b", "stable seeds") == f"0.67 ± {math.sqrt(1 / 3):.2f}"
  assert col("c", "runs") == "3 failed" and col("c", "eval CE (nats)") == "failed"
  assert col("d", "runs") == "3 missing" and col("d", "eval CE (nats)") == "missing"
  assert col("e", "runs") == "1 completed, 1 incomplete, 1 missing"
  assert col("e", "eval CE (nats)") == "2.0000 (n=1)"
  # Claims: paired by seed. b vs a over seeds 0, 1 (b diverged on 2): d = 0.5, 0.6, mean 0.55,
  # sd 0.0707, t = 11 with df 1: p = 1/2 - atan(11)/pi = 0.0289; Holm over the two published
  # tests with a p (A and E; B, C have one seed, D none): 2 * 0.0289 = 0.058 > 0.05. The
  # published 0.1 is below the MDE at 2 seeds: not testable.
  assert "| b > a | 2 | 0.5500 [" in text
  assert f"| {0.5 - math.atan(11) / math.pi:.3f} | {2 * (0.5 - math.atan(11) / math.pi):.3f} |" \
      in text
  assert "Published: 0.1 nats; published effect: 0.1000. Verdict: **not testable at this " \
         "scale**." in text
  # a vs e on their one shared seed (0): 2.0 - 1.0, not the 0.8 of the unpaired means.
  assert "| a > e | 1 | 1.0000 | — | — | none at this n | — | — | **not resolved** |" in text
  assert "| e > a | 1 | -1.0000 |" in text
  assert "| a > c | 0 | — |" in text and "Verdict: **n/a**" in text
  # stable: a 3/3, b diverged once: one discordant seed, exact p = 1/2.
  assert "| a > b | 3 | 0.33 (diverged: 0/3 vs 1/3) | 0.500 | 0.500 |" in text
  assert col("b", "published rank") == "A: 1/2; E: 2/2"
  assert col("b", "held here") == "A: not testable at this scale vs a"
  assert col("a", "held here") == "B: not resolved vs e; D: n/a vs c; E: not resolved vs b"
  assert "**Rule.**" in text and "Holm" in text and "noncentral t" in text
  assert "- `c/seed0`: failed: RuntimeError: boom" in text
  assert "- `e/seed1`: incomplete" in text and "- `d/seed2`: missing" in text


def test_csv_and_plot(sweep_dir):
  paths = report.write_report(sweep_dir, generated=GENERATED)
  rows = {r["member"]: r for r in csv.DictReader(open(paths["table.csv"]))}
  assert list(rows) == ["a", "b", "c", "d", "e"]
  assert float(rows["a"]["eval_cross_entropy_mean"]) == pytest.approx(1.2)
  assert float(rows["a"]["eval_cross_entropy_std"]) == pytest.approx(0.2)
  assert rows["a"]["eval_cross_entropy_n"] == "3"
  assert float(rows["b"]["eval_cross_entropy_mean"]) == pytest.approx(0.55)
  assert rows["b"]["n_diverged"] == "1" and rows["c"]["n_failed"] == "3"
  assert rows["d"]["n_missing"] == "3" and rows["d"]["eval_cross_entropy_mean"] == ""
  assert rows["e"]["eval_cross_entropy_std"] == "" and rows["e"]["n_incomplete"] == "1"
  assert json.loads(rows["a"]["overrides"]) == {"moe.num_selected": 1}
  with open(paths["plot.png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_curves_ignore_a_torn_last_line(sweep_dir):
  data = report.collect(sweep_dir)
  a = data["members"][0]
  assert a["runs"][0]["curve"] == [(10, 3.0), (20, 2.5)]


def test_curves_use_cross_entropy_when_logged(tmp_path):
  w = str(tmp_path)
  run_files(w, "a", 0, "completed", {"eval_cross_entropy": 1.0},
            [{"step": 10, "loss": 3.2, "cross_entropy": 3.0},
             {"step": 20, "loss": 2.7, "cross_entropy": 2.5}])
  assert report.load_run(os.path.join(w, "a", "seed0"), [], [])["curve"] == [
      (10, 3.0), (20, 2.5)]


def test_mean_std():
  assert report.mean_std([1.0, float("nan"), 3.0, None]) == (2.0, math.sqrt(2.0), 2)
  assert report.mean_std([2.0]) == (2.0, None, 1) and report.mean_std([]) == (None, None, 0)


def test_runs_csv_has_every_run(sweep_dir):
  paths = report.write_report(sweep_dir, generated=GENERATED)
  rows = list(csv.DictReader(open(paths["runs.csv"])))
  assert [(r["member"], r["seed"]) for r in rows] == [(m, str(s)) for m in "abcde"
                                                      for s in range(3)]
  by = {(r["member"], int(r["seed"])): r for r in rows}
  assert by["a", 1]["status"] == "completed" and float(by["a", 1]["eval_cross_entropy"]) == 1.2
  assert float(by["a", 2]["moe/dropped_fraction"]) == 0.3 and by["a", 2]["eval_loss"] == ""
  assert by["b", 2]["status"] == "diverged" and by["b", 2]["eval_cross_entropy"] == ""
  assert by["b", 2]["stable_fraction"] == "0.0" and by["b", 0]["stable_fraction"] == "1.0"
  assert by["c", 0]["status"] == "failed" and by["d", 0]["status"] == "missing"
  assert float(by["a", 0]["wall_s"]) == 10.0


def test_old_sweep_file_without_claim_kinds_reads_with_defaults(sweep_dir):
  """A sweep.json from before the claim kinds: stable_fraction claims are stability tests."""
  data = report.collect(sweep_dir)
  assert [c["kind"] for c in data["claims"]] == ["order"] * 4 + ["stability"]
  assert not any(c["mechanism"] for c in data["claims"])


def test_command_line_rewrites_the_report(sweep_dir, capsys):
  report.main([f"--workdir={sweep_dir}"])
  assert os.path.exists(os.path.join(sweep_dir, "table.md"))
  assert "table.csv" in capsys.readouterr().out


def test_missing_sweep_file_is_a_clear_error(tmp_path):
  with one_line_error("sweep.json is missing", "run the sweep first"):
    report.write_report(str(tmp_path))


def test_sweep_file_without_a_field_is_a_clear_error(sweep_dir):
  sweep = json.load(open(os.path.join(sweep_dir, "sweep.json")))
  del sweep["members"]
  write(os.path.join(sweep_dir, "sweep.json"), sweep)
  with one_line_error("is not a sweep file", "'members'"):
    report.write_report(sweep_dir)


def test_command_line_errors_are_one_line_with_exit_2(tmp_path, capsys):
  with pytest.raises(SystemExit) as e:
    report.main([f"--workdir={tmp_path / 'nothere'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "sweep.json is missing" in err
  assert not os.path.exists(tmp_path / "nothere")  # a report of nothing writes nothing


def test_command_line_module_missing_workdir_exits_2(tmp_path):
  """`python -m moe.sweep.report --workdir=runs/nothere`: one line on stderr, no traceback."""
  out = subprocess.run([sys.executable, "-m", "moe.sweep.report", "--workdir=runs/nothere"],
                       cwd=tmp_path, env={**os.environ, "PYTHONPATH": REPO},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 2, out.stderr
  assert out.stderr.startswith("error: runs/nothere/sweep.json is missing"), out.stderr
  assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr, out.stderr
