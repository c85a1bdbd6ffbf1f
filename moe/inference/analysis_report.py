"""The files of the routing analysis (`moe.inference.analysis`): figures, one HTML page, JSON.

`write(out_dir, result)` writes into `out_dir` (`<workdir>/analysis/`; names in `moe.rundir`:
`ANALYSIS_JSON`, `ANALYSIS_HTML`, `ANALYSIS_FIGURES`):

- `load.png`: share of the kept assignments per expert, layers x experts;
- `vocabulary.png`: each expert's vocabulary-specialization score, layers x experts;
- `domains.png`: per layer, each expert's share of its tokens from each domain (top-level
  package), under a first row holding the domains' share of all tokens;
- `coactivation.png`: per layer the E x E matrix P(column chosen | row chosen);
- `saturation.png`: per layer, the share of the final top-k sets each checkpoint already chose;
- `report.html`: all of it in one file (figures embedded), with tables of each expert's top and
  distinctive tokens, domain shares and the most frequent expert pairs;
- `analysis.json`: the result (`moe.inference.analysis.run`'s dict).

`summary_lines(result)` is the short summary launch.py prints.
"""

from __future__ import annotations

import base64
import html

from etils import epath
import numpy as np

from moe import rundir
from moe.inference.routing_view import _shown


def _plt():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save(fig, path: str) -> None:
  plt = _plt()
  fig.tight_layout()
  with rundir.replacing(path) as tmp:  # keeps .png: matplotlib picks the format from it
    fig.savefig(tmp, dpi=90)
  plt.close(fig)


def _heatmap(ax, m, *, rows, cols, title, vmax=None, fmt="{:.2f}"):
  m = np.asarray(m, np.float64)
  im = ax.imshow(m, cmap="viridis", vmin=0.0, vmax=vmax if vmax is not None else max(m.max(), 1e-9),
                 aspect="auto", interpolation="nearest")
  ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 8 else 0, fontsize=7)
  ax.set_yticks(range(len(rows)), rows, fontsize=7)
  ax.set_title(title, fontsize=9)
  if m.size <= 400:
    for (i, j), v in np.ndenumerate(m):
      ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=6,
              color="white" if v < 0.6 * (im.get_clim()[1] or 1) else "black")
  return im


def _experts(E: int) -> list[str]:
  return [f"e{e}" for e in range(E)]


def plot_layers_by_experts(path: str, result: dict, values: dict, title: str, vmax=None) -> None:
  plt = _plt()
  names = list(values)
  E = result["num_experts"]
  fig, ax = plt.subplots(figsize=(2 + 0.5 * E, 1.2 + 0.45 * len(names)))
  im = _heatmap(ax, [values[n] for n in names], rows=names, cols=_experts(E), title=title,
                vmax=vmax)
  fig.colorbar(im, ax=ax, fraction=0.03)
  _save(fig, path)


def plot_per_layer(path: str, result: dict, matrices: dict, *, rows, cols, title: str) -> None:
  """One heatmap per layer, two per line (rows / cols: a list or a function of the layer)."""
  plt = _plt()
  names = list(matrices)
  n = len(names)
  first = np.asarray(matrices[names[0]])
  w, h = 1.5 + 0.4 * first.shape[1], 1.5 + 0.3 * first.shape[0]
  ncols = min(n, 2)
  nrows = -(-n // ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(min(w * ncols, 30), h * nrows), squeeze=False)
  for ax in axes.flat[n:]:
    ax.axis("off")
  for ax, name in zip(axes.flat, names):
    _heatmap(ax, matrices[name], rows=rows(name) if callable(rows) else rows,
             cols=cols(name) if callable(cols) else cols, title=f"{name}: {title}", vmax=1.0)
  _save(fig, path)


def plot_saturation(path: str, result: dict) -> None:
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6, 3.5))
  final = result["step"]
  for name in result["load"]:
    steps = [s["step"] for s in result["saturation"]] + [final]
    vals = [s["layers"][name] for s in result["saturation"]] + [1.0]
    ax.plot(steps, vals, marker="o", label=name)
  ax.set_ylim(0, 1.05)
  ax.set_xlabel("checkpoint step")
  ax.set_ylabel(f"share of step {final}'s top-k chosen")
  ax.set_title("router saturation" + ("" if result["saturation"] else
                                      " (no earlier checkpoint kept)"), fontsize=9)
  ax.legend(fontsize=7)
  ax.grid(alpha=0.3)
  _save(fig, path)


def write_figures(out_dir: str, result: dict) -> dict[str, str]:
  names = rundir.ANALYSIS_FIGURES
  paths = {k: rundir.join(out_dir, v) for k, v in names.items()}
  E = result["num_experts"]
  plot_layers_by_experts(paths["load"], result, {n: d["load"] for n, d in result["load"].items()},
                         "share of the kept assignments per expert")
  voc = result["vocabulary"]
  chance = next(iter(voc.values()))["chance"]
  plot_layers_by_experts(paths["vocabulary"], result,
                         {n: d["expert_score"] for n, d in voc.items()},
                         f"vocabulary specialization per expert (chance {chance:.2f})", vmax=1.0)
  dom = {n: np.vstack([[d["package"]["token_share"]], d["package"]["shares"]])
         for n, d in result["domains"].items()}
  plot_per_layer(paths["domains"], result, dom, rows=["all"] + _experts(E),
                 cols=lambda n: result["domains"][n]["package"]["domains"],
                 title="share of the expert's tokens per package")
  plot_per_layer(paths["coactivation"], result,
                 {n: d["matrix"] for n, d in result["coactivation"].items()},
                 rows=_experts(E), cols=_experts(E), title="P(column | row)")
  plot_saturation(paths["saturation"], result)
  return paths


# ----------------------------------------------------------------------------- HTML


def _table(header: list[str], rows: list[list]) -> str:
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _tok(t: dict, key: str) -> str:
  return (f"<code>{html.escape(_shown(t['text']))}</code>"
          f"<small> {t[key]:.2f}</small>" if key in t else "")


def _img(path: str) -> str:
  data = base64.b64encode(epath.Path(path).read_bytes()).decode("ascii")
  return f'<img src="data:image/png;base64,{data}">'


def _layer_tables(result: dict, name: str) -> str:
  voc, dom = result["vocabulary"][name], result["domains"][name]
  rows = []
  for e, x in enumerate(voc["experts"]):
    rows.append([f"e{e}", f"{x['score']:.3f}", f"{result['load'][name]['load'][e]:.3f}",
                 " ".join(_tok(t, "share") for t in x["top_tokens"]),
                 " ".join(_tok(t, "ratio") for t in x["distinctive_tokens"])])
  parts = [f"<h3>{html.escape(name)}: vocabulary</h3>",
           _table(["expert", "score", "load", "top tokens (share of its tokens)",
                   "distinctive tokens (share of the token's occurrences)"], rows)]
  for key in ("kind", "package"):
    d = dom[key]
    rows = [["all tokens"] + [f"{v:.3f}" for v in d["token_share"]]]
    rows += [[f"e{e}"] + [f"{v:.3f}" for v in s] for e, s in enumerate(d["shares"])]
    parts += [f"<h3>{html.escape(name)}: domains by {key}</h3>", _table(["", *d["domains"]], rows)]
  pairs = result["coactivation"][name]["top_pairs"]
  parts.append(f"<p>{html.escape(name)}: most frequent pairs: " + ", ".join(
      f"e{p['from']}&rarr;e{p['to']} {p['share']:.2f}" for p in pairs) + "</p>")
  return "".join(parts)


def _kinds_table(result: dict) -> str:
  """Rows: layers; columns: kinds of token; cells: mean k (mean kept k), and the shares."""
  per_layer = result.get("token_kinds") or {}
  if not per_layer:
    return "<p>No token kinds.</p>"
  first = next(iter(per_layer.values()))
  kinds = list(first)
  rows = [["share of tokens"] + [f"{first[k]['share']:.3f}" for k in kinds]]
  for name, d in per_layer.items():
    rows.append([html.escape(name)] + [
        "—" if d[k]["mean_k"] is None else f"{d[k]['mean_k']:.2f} ({d[k]['mean_kept_k']:.2f})"
        for k in kinds])
  return _table(["", *kinds], rows)


def write_html(path: str, result: dict, figures: dict[str, str]) -> None:
  text = result["text"].get("file") or f"validation split of {result['text']['data']}"
  rows = [[html.escape(n), f"{d['mean_k']:.2f}", f"{d['mean_kept_k']:.2f}",
           f"{d['dropped_fraction']:.2%}",
           f"{max(result['vocabulary'][n]['expert_score']):.3f}",
           f"{result['vocabulary'][n]['token_score_mean']:.3f}"]
          for n, d in result["load"].items()]
  sat = [[s["step"], f"{s['mean']:.3f}"] + [f"{v:.3f}" for v in s["layers"].values()]
         for s in result["saturation"]]
  doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>routing analysis</title>
<style>body{{font-family:sans-serif;max-width:1400px}} td,th{{padding:2px 6px;text-align:left;
vertical-align:top;font-size:13px}} code{{background:#eee;padding:0 2px}} img{{max-width:100%}}
</style></head><body>
<h1>Routing analysis of step {result['step']}</h1>
<p>{html.escape(str(result['workdir']))}: {result['tokens']} tokens of {html.escape(text)},
E={result['num_experts']}, K={result['num_selected']} (k rule {result.get('k_rule', 'fixed')}),
eval capacity factor
{result['eval_capacity_factor']}. Definitions: <code>moe/inference/analysis_stats.py</code>.</p>
<h2>Per layer</h2>
{_table(["layer", "mean k", "mean kept k", "dropped", "best expert score", "token score"], rows)}
<p>Scores: 1.0 = every token an expert takes always goes to it; chance is K/E
({result['num_selected'] / result['num_experts']:.2f}).</p>
{_img(figures['load'])}
<h2>Mean k by kind of token</h2><p>Experts chosen per token (kept after capacity in
parentheses) for each kind of source text (<code>moe/inference/token_kinds.py</code>); with a
fixed k every kind shows K.</p>
{_kinds_table(result)}
<h2>Vocabulary specialization</h2>{_img(figures['vocabulary'])}
<h2>Domain specialization</h2>
<p>Each row: where an expert's tokens come from; compare it with the first row (all tokens).</p>
{_img(figures['domains'])}
<h2>Co-activation</h2><p>Row i, column j: the share of the tokens choosing expert i that also
choose j.</p>{_img(figures['coactivation'])}
<h2>Router saturation</h2><p>Share of the final checkpoint's top-k experts that an earlier
checkpoint already chooses for the same token (1.0 = routing already decided).</p>
{_table(["step", "mean", *result["load"]], sat) if sat else "<p>No earlier checkpoint.</p>"}
{_img(figures['saturation'])}
<h2>Per layer details</h2>
{''.join(_layer_tables(result, n) for n in result["load"])}
</body></html>
"""
  rundir.write_text_atomic(path, doc)


def write(out_dir: str, result: dict) -> dict[str, str]:
  """Figures, report.html and analysis.json into `out_dir`; returns {what: path}."""
  rundir.makedirs(out_dir)
  figures = write_figures(out_dir, result)
  paths = {"html": rundir.join(out_dir, rundir.ANALYSIS_HTML),
           "json": rundir.join(out_dir, rundir.ANALYSIS_JSON), **figures}
  write_html(paths["html"], result, figures)
  rundir.write_json_atomic(paths["json"], {**result, "files": paths}, indent=1, default=None)
  return paths


def summary_lines(result: dict) -> list[str]:
  """Per layer: mean k, drop, the most specialized expert, the most frequent pair; saturation."""
  text = result["text"].get("file") or "the validation split"
  out = [f"routing analysis of step {result['step']} on {result['tokens']} tokens of {text}:"]
  for name, d in result["load"].items():
    score = result["vocabulary"][name]["expert_score"]
    best = int(np.argmax(score))
    pair = (result["coactivation"][name]["top_pairs"] or [None])[0]
    out.append(f"  {name}: mean k {d['mean_k']:.2f}, dropped {d['dropped_fraction']:.2%}, "
               f"most specialized e{best} ({score[best]:.2f}; chance "
               f"{result['vocabulary'][name]['chance']:.2f})"
               + (f", top pair e{pair['from']}->e{pair['to']} {pair['share']:.2f}" if pair else ""))
  for name, d in (result.get("token_kinds") or {}).items():
    ks = {k: v["mean_k"] for k, v in d.items() if v["mean_k"] is not None}
    if ks and max(ks.values()) - min(ks.values()) > 1e-9:  # adaptive k: k varies by kind
      out.append(f"  {name} mean k by token kind: "
                 + ", ".join(f"{k} {v:.2f}" for k, v in ks.items()))
  for s in result["saturation"]:
    out.append(f"  saturation at step {s['step']}: {s['mean']:.1%} of step {result['step']}'s "
               f"top-k already chosen")
  if result.get("files"):
    out.append(f"report: {result['files']['html']}")
  return out
