"""The routing analysis (`launch.py --mode=analyze`, moe.inference.analysis*): its numbers on
hand-made routings with known answers, and the command end to end on a tiny trained run."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from conftest import apply_overrides, load_config_file, tiny_overrides
from moe import rundir
from moe.inference import analysis
from moe.inference import analysis_stats as stats
from moe.inference import token_kinds
from test_config import assert_one_line_error, run_launch

E, K = 6, 2
DIGITS = list(range(10))  # token ids 0..9 are "digits", 10..29 other tokens


def routing(first, second) -> stats.LayerRouting:
  idx = np.stack([first, second], 1).astype(np.int32)
  ones = np.ones_like(idx, bool)
  return stats.LayerRouting(expert_index=idx, chosen=ones, kept=ones)


def digit_router(seed=0, n=600):
  """Digits always go to expert 3 (second choice random); other tokens never do."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 30, n)
  others = [e for e in range(E) if e != 3]
  first = np.where(ids < 10, 3, rng.choice(others, n))
  second = np.array([rng.choice([e for e in others if e != f]) for f in first])
  return ids, routing(first, second)


def test_digits_routed_to_one_expert_are_found_specialized():
  ids, r = digit_router()
  voc = stats.vocabulary(r, ids, E, 30, top=10, min_count=1)
  e3 = voc["experts"][3]
  assert sorted(t["id"] for t in e3["top_tokens"]) == DIGITS
  assert e3["score"] == pytest.approx(1.0)
  assert int(np.argmax(voc["expert_score"])) == 3
  assert all(s < 0.9 for e, s in enumerate(voc["expert_score"]) if e != 3)
  assert all(t["ratio"] == pytest.approx(1.0) for t in e3["distinctive_tokens"])
  assert voc["chance"] == pytest.approx(K / E)


def test_saturation_identical_is_one_disjoint_is_zero_partial_is_half():
  _, r = digit_router()
  assert stats.saturation(r, r, E) == pytest.approx(1.0)
  shifted = routing((r.expert_index[:, 0] + 2) % E, (r.expert_index[:, 1] + 2) % E)
  a = routing(np.full(4, 0), np.full(4, 1))
  b = routing(np.full(4, 2), np.full(4, 3))
  c = routing(np.full(4, 1), np.full(4, 5))
  assert stats.saturation(a, b, E) == 0.0
  assert stats.saturation(a, c, E) == pytest.approx(0.5)
  assert stats.saturation(r, shifted, E) < 1.0
  with pytest.raises(ValueError, match="tokens"):
    stats.saturation(a, r, E)


def test_experts_always_chosen_together_are_the_top_coactivation_pair():
  rng = np.random.default_rng(1)
  n = 400
  together = rng.random(n) < 0.5  # half of the tokens choose (1, 4); the rest pairs of others
  pairs = np.array([rng.choice([0, 2, 3, 5], 2, replace=False) for _ in range(n)])
  first = np.where(together, 1, pairs[:, 0])
  second = np.where(together, 4, pairs[:, 1])
  r = routing(first, second)
  co = stats.coactivation(r, E)
  m = np.asarray(co["matrix"])
  assert {(p["from"], p["to"]) for p in co["top_pairs"][:2]} == {(1, 4), (4, 1)}
  assert m[1, 4] == pytest.approx(1.0) and m[4, 1] == pytest.approx(1.0)
  assert np.all(np.diag(m) == 0)


def test_domain_shares_sum_to_one_and_follow_the_routing():
  ids, r = digit_router()
  domain = (ids < 10).astype(int)  # 1 = "digits" domain
  d = stats.domain_shares(r, domain, ["words", "digits"], E)
  shares = np.asarray(d["shares"])
  assert shares.shape == (E, 2)
  np.testing.assert_allclose(shares.sum(1), 1.0)
  assert shares[3, 1] == pytest.approx(1.0)  # expert 3 takes digits only
  assert sum(d["token_share"]) == pytest.approx(1.0)
  names, index = stats.group_labels(["a", "b", "b", "c"], keep=1)
  assert names == ["b", "other"] and index.tolist() == [1, 0, 0, 1]


def test_layer_load_mean_k_and_drops():
  idx = np.array([[0, 1], [0, 2], [0, 1], [3, 1]])
  kept = np.array([[True, True], [True, True], [False, True], [True, False]])
  r = stats.LayerRouting(expert_index=idx, chosen=np.ones_like(kept), kept=kept)
  d = stats.layer_load(r, 4)
  assert d["mean_k"] == 2.0 and d["mean_kept_k"] == 1.5
  assert d["dropped_fraction"] == pytest.approx(0.25)
  assert d["load"] == pytest.approx([2 / 6, 2 / 6, 1 / 6, 1 / 6])
  assert stats.path_domains("json/tests/test_x.py") == ("tests", "json")
  assert stats.path_domains("os.py") == ("library", "os")


def test_token_kinds_of_python_source():
  """Byte pieces and multi-character pieces lex the same; a token takes the kind of its first
  non-space character."""
  src = "def f(x1):\n    # hi\n    return 'a b' + 0x1F  # z\n"
  # a token of spaces only is whitespace, also inside a comment or a string
  want = ("kkkwioiioow" "wwww" "cwcc" "w" "wwww" "kkkkkk" "w" "sswss" "w" "o" "w" "nnnn" "ww"
          "cwc" "w")
  kinds = token_kinds.token_kinds(list(src))
  letter = {"w": "whitespace", "k": "keyword", "i": "identifier", "o": "operator",
            "c": "comment", "s": "string", "n": "number"}
  assert [token_kinds.KINDS[k] for k in kinds] == [letter[c] for c in want]
  pieces = ["def", " f", "(", "x1", "):\n", "    ", "# hi", "\n    return", " 'a b'", " +",
            " 0x1F", "  # z\n"]
  assert "".join(pieces) == src
  assert [token_kinds.KINDS[k] for k in token_kinds.token_kinds(pieces)] == [
      "keyword", "identifier", "operator", "identifier", "operator", "whitespace", "comment",
      "keyword", "string", "operator", "number", "comment"]
  assert token_kinds.token_kinds([]).shape == (0,)


def test_mean_k_by_token_kind():
  """Adaptive routings: tokens of kind 0 choose 1 expert, kind 1 choose 2 (1 kept)."""
  idx = np.array([[0, 1], [2, 3], [0, 2], [1, 3], [0, 1]])
  chosen = np.array([[True, False], [True, False], [True, True], [True, True], [True, False]])
  kept = chosen & np.array([[True, True], [True, True], [True, False], [True, False],
                            [True, True]])
  r = stats.LayerRouting(expert_index=idx, chosen=chosen, kept=kept)
  d = stats.by_kind(r, np.array([0, 0, 1, 1, 0]), ("a", "b", "c"))
  assert d["a"] == {"tokens": 3, "share": 0.6, "mean_k": 1.0, "mean_kept_k": 1.0}
  assert d["b"] == {"tokens": 2, "share": 0.4, "mean_k": 2.0, "mean_kept_k": 1.0}
  assert d["c"]["tokens"] == 0 and d["c"]["mean_k"] is None
  assert stats.layer_load(r, 4)["mean_k"] == pytest.approx(7 / 5)


def test_adaptive_k_slots_not_taken_are_not_choices():
  """The sown `selected` marks a token's k chosen slots: untaken ones are neither chosen nor
  dropped; a chosen slot without a buffer place is dropped."""
  d = {"expert_index": np.array([[0, 1, 2], [1, 2, 0], [2, 0, 1]]),
       "slot": np.array([[0, -1, -1], [0, 0, -1], [-1, 0, 1]]),
       "selected": np.array([[True, False, False], [True, True, False], [True, True, True]])}
  r = stats.layer_routing(d, np.array([True, True, True]))
  load = stats.layer_load(r, 3)
  assert load["mean_k"] == 2.0 and load["mean_kept_k"] == pytest.approx(5 / 3)
  assert load["dropped_fraction"] == pytest.approx(1 / 6)
  assert load["chosen_load"] == pytest.approx([2 / 6, 2 / 6, 2 / 6])


def test_packing_carries_each_tokens_document():
  docs = [np.arange(1, 8), np.arange(10, 30), np.arange(40, 44)]
  tokens, segments, doc, pos = analysis.pack_rows(docs, 9)
  for i, d in enumerate(docs):
    assert set(tokens[doc == i + 1].tolist()) == set(d.tolist())
    assert np.array_equal(d[pos[doc == i + 1]], tokens[doc == i + 1])  # pos: index in the doc
  assert np.array_equal(doc == 0, segments == 0)


def test_token_kinds_lex_whole_documents():
  """A row that starts inside a docstring still reads it as a string: documents are lexed
  whole, then each token takes its kind by position."""
  class Chars:
    def decode(self, ids):
      return "".join(chr(i) for i in ids)
  text = 'def f():\n    """doc\n    text"""\n    return 1\n'
  ids = np.array([ord(c) for c in text])
  _, _, doc, pos = analysis.pack_rows([ids], 12)  # rows cut the docstring
  rows = {"doc": doc, "pos": pos, "docs_ids": [ids]}
  mask = doc.reshape(-1) > 0
  kinds = analysis.token_kinds(rows, Chars(), mask)
  want = token_kinds.token_kinds(list(text))
  assert np.array_equal(kinds, want[pos.reshape(-1)[mask]])
  start = text.index("text")  # inside the docstring, in a later row than its opening quotes
  assert token_kinds.KINDS[want[start]] == "string"


def test_validation_documents_carry_their_source_paths(textdir, tfds_dir):
  from moe.data import sources
  source = sources.load_source("textdir", text_dir=textdir, validation_fraction=0.25,
                               data_dir=tfds_dir)
  named = list(source.named_documents("validation"))
  assert named and [t for _, t in named] == list(source.documents("validation"))
  for path, text in named:
    assert sources.is_validation(path, 0.25)
    with open(os.path.join(textdir, path)) as f:
      assert f.read() == text


# ----------------------------------------------------------------------------- the command


def test_dense_model_refused_in_one_line_before_compiling(tiny_config, tmp_path):
  from conftest import one_line_error
  from test_config import CompileCounter
  with CompileCounter() as compiles, one_line_error("--mode=analyze", "moe.enabled"):
    analysis.run(tiny_config({"moe.enabled": False}), str(tmp_path / "dense"))
  assert compiles.count == 0
  with one_line_error("--analyze_batches"):
    analysis.run(tiny_config(), str(tmp_path / "moe"), batches=0)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, textdir, tfds_dir):
  """6 steps with checkpoints at 3 and 6 (the earlier one for router saturation)."""
  from moe.train import trainer
  cfg = apply_overrides(load_config_file("default"), tiny_overrides(textdir, tfds_dir))
  workdir = str(tmp_path_factory.mktemp("analyze") / "run")
  assert trainer.train_and_evaluate(cfg, workdir)["status"] == "completed"
  return workdir


@pytest.mark.slow
def test_analyze_command_writes_every_section(tiny_run, tmp_path):
  """launch.py --mode=analyze on a trained run: the summary, the files, every JSON section;
  then --text_file; then a dense config refused in one line (exit 2)."""
  p = run_launch([f"--workdir={tiny_run}", "--mode=analyze", "--analyze_batches=2"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "routing analysis of step 6" in p.stdout and "saturation at step 3" in p.stdout
  out = os.path.join(tiny_run, rundir.ANALYSIS_DIR)
  for name in [rundir.ANALYSIS_HTML, rundir.ANALYSIS_JSON, *rundir.ANALYSIS_FIGURES.values()]:
    assert os.path.getsize(os.path.join(out, name)) > 500, name
  with open(os.path.join(out, rundir.ANALYSIS_JSON)) as f:
    result = json.load(f)
  layers = ["layer_0", "layer_1"]
  for section in ("load", "vocabulary", "domains", "coactivation"):
    assert sorted(result[section]) == layers, section
  assert result["tokens"] > 0 and result["text"]["split"] == "validation"
  assert [s["step"] for s in result["saturation"]] == [3]
  assert 0.0 <= result["saturation"][0]["mean"] <= 1.0
  for name in layers:
    assert result["load"][name]["mean_k"] == 2.0  # fixed k: K
    assert sum(result["load"][name]["load"]) == pytest.approx(1.0)
    for grouping in ("kind", "package"):
      np.testing.assert_allclose(
          np.sum(result["domains"][name][grouping]["shares"], 1)[
              np.asarray(result["vocabulary"][name]["expert_score"]) > 0], 1.0)
    assert np.asarray(result["coactivation"][name]["matrix"]).shape == (4, 4)
  text = tmp_path / "notes.py"
  text.write_text("def add(a, b):\n    return a + b\n" * 8)
  p = run_launch([f"--workdir={tiny_run}", "--mode=analyze", f"--text_file={text}"])
  assert p.returncode == 0, p.stderr[-3000:]
  with open(os.path.join(out, rundir.ANALYSIS_JSON)) as f:
    result = json.load(f)
  assert result["text"]["file"] == str(text) and result["tokens"] == 2 + len(text.read_text())
  kinds = result["token_kinds"]["layer_0"]  # BOS + 8 x "def add(a, b):\n    return a + b\n"
  assert kinds["keyword"]["tokens"] == 8 * 9 and kinds["identifier"]["tokens"] == 8 * 7
  assert kinds["keyword"]["mean_k"] == 2.0  # fixed k
  p = run_launch([f"--workdir={tiny_run}", "--mode=analyze", "--config.moe.enabled=False"])
  assert_one_line_error(p, "moe.enabled")
