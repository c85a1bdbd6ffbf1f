"""Markdown rendering and the console summary of experiments/accelerator_check.py.

Works from the results dict alone (no JAX), so --from-json re-renders a saved run.
"""

from __future__ import annotations

import math

from accel_common import DATASHEET_BF16_TFLOPS, SECTION, SECTIONS, TOLERANCE


def fmt_row(cells) -> str:
  return "| " + " | ".join(str(c) for c in cells) + " |"


def _f(v, spec=".1f", none="-"):
  return none if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def render_head(r: dict) -> list[str]:
  m, secs = r.get("meta", {}), r.get("sections", {})
  limit = secs.get("device", {}).get("device", {}).get("bytes_limit")
  pk = "; ".join(f"{k} {v}" for k, v in m.get("packages", {}).items())
  out = [SECTION, ""]
  if m.get("smoke"):
    out += ["**Smoke run** (`--smoke`: tiny shapes, not a measurement).", ""]
  out.append(f"Measured {m.get('date', '?')} on {m.get('device_count', '?')} x "
             f"{m.get('device_kind', '?')} (backend {m.get('backend', '?')}"
             + (f", {limit / 2 ** 30:.0f} GiB usable by XLA at "
                f"XLA_PYTHON_CLIENT_MEM_FRACTION={m.get('mem_fraction') or 'default'}"
                if limit else "")
             + f"), host {m.get('host', '?')}; {m.get('versions', '?')}"
             + (f"; {pk}" if pk else "") + ".")
  out.append(f"Command: `{m.get('command', '?')}`. Load average before/after: "
             f"{m.get('load_before', '?')} / {m.get('load_after', '?')}. Total "
             f"{_f(m.get('wall_s'), '.0f')} s (time box {_f(m.get('budget_s'), '.0f')} s)"
             + ("; stopped by the watchdog" if m.get("watchdog_exit") else "")
             + f". XLA_FLAGS: `{m.get('xla_flags') or '(none)'}`.")
  if m.get("nvidia_smi_before") and not m["nvidia_smi_before"].startswith("unavailable"):
    out.append(f"nvidia-smi (name, driver, memory, SM clock, max SM clock, power limit, "
               f"temperature) before: `{m['nvidia_smi_before']}`; after: "
               f"`{m.get('nvidia_smi_after', '?')}`.")
  status = ", ".join(f"{n} {secs.get(n, {}).get('status', 'not run')} "
                     f"({_f(secs.get(n, {}).get('seconds'), '.0f')} s)" for n in SECTIONS)
  out += ["", f"Sections: {status}."]
  if m.get("forbidden_modules_loaded"):
    out.append(f"Modules that should not load but did: {m['forbidden_modules_loaded']}.")
  return out


def render_device(d: dict) -> list[str]:
  out = ["", "### 1. Device peak and bandwidth", ""]
  if not d.get("matmul"):
    return out + [f"Not measured ({d.get('status', 'not run')})."]
  n = d.get("matmul_n")
  out += [fmt_row([f"jnp.dot {n}x{n}x{n}", "TFLOP/s", "ms per call"]), fmt_row(["---"] * 3)]
  for name, v in d["matmul"].items():
    note = v.get("skipped") or v.get("error")
    out.append(fmt_row([name, note or _f(v.get("tflops")), "" if note else _f(v.get("ms"), ".3f")]))
  p = d.get("peak_bf16_tflops")
  f32 = [d["matmul"].get(k, {}).get("tflops") for k in ("f32, default precision",
                                                         "f32, precision=highest")]
  if all(f32):
    out += ["", f"f32 at default precision runs {f32[0] / f32[1]:.1f}x the speed of "
            "precision=highest (well above 1: XLA uses TF32 or bf16 passes for f32 matmuls by "
            "default, hence 'highest' in the float32 correctness check)."]
  out += ["", f"Measured bf16 peak (the better bf16 row, used below): {_f(p)} TFLOP/s"
          + (f" = {100 * p / DATASHEET_BF16_TFLOPS:.0f}% of the datasheet "
             f"{DATASHEET_BF16_TFLOPS:.0f} TFLOP/s dense bf16" if p else "")
          + ". Median of rounds of back-to-back calls after warm-up (2 n^3 FLOPs per call)."]
  bw = d.get("bandwidth", {})
  if "elementwise_gbps" in bw:
    out.append(f"Bandwidth: y = 2*x on {bw['elementwise_mib']} MiB f32: "
               f"{bw['elementwise_gbps']:.0f} GB/s (bytes read + written); host->device "
               f"{bw['h2d_gbps']:.1f} GB/s, device->host {bw['d2h_gbps']:.1f} GB/s "
               f"({bw['host_mib']} MiB).")
  return out


def render_correctness(c: dict) -> list[str]:
  out = ["", "### 2. Dispatch strategies vs 'reference' (output and gradients)", ""]
  if not c.get("rows"):
    return out + [f"Not run ({c.get('status', 'not run')})."]
  s = c["shape"]
  out.append(f"G={s['G']} groups x T={s['T']} tokens ({s['tokens']}), D={s['D']}, F={s['F']}, "
             f"E={s['E']}, K={s['K']}, SwiGLU, 5% padding tokens. {c['method']}. Relative error "
             f"||a - b|| / ||b||; pass: every entry <= {c['tolerance']['float32']:g} (float32) "
             f"or {c['tolerance']['bfloat16']:g} (bfloat16). {c.get('passed', 0)} of "
             f"{c.get('checked', 0)} checked rows pass.")
  out += ["", fmt_row(["strategy", "dtype", "routing", "out", "d x", "d w_in", "d w_gate",
                       "d w_out", "d combine", "result", "max vs f32 reference"]),
          fmt_row(["---"] * 11)]
  for row in c["rows"]:
    routing = row["routing"] + (f" (C={row['capacity']}, {100 * row['dropped_fraction']:.1f}% "
                                "dropped)" if row.get("capacity") else "")
    if "errors" not in row:
      note = row.get("skipped") or row.get("error", "?")
      out.append(fmt_row([row["strategy"], row["dtype"], routing] + ["-"] * 6 + [note, "-"]))
      continue
    e = row["errors"]
    errs = [_f(e.get(k), ".1e") for k in ("out", "grad_x", "grad_w_in", "grad_w_gate",
                                          "grad_w_out", "grad_combine_weights")]
    out.append(fmt_row([row["strategy"], row["dtype"], routing] + errs
                       + ["pass" if row.get("pass") else "**FAIL**",
                          _f(row.get("max_error_vs_f32_reference"), ".1e")]))
  floor = c.get("noise_floor_bf16_vs_f32", {})
  if floor:
    out += ["", "For scale, bfloat16 'reference' vs float32 'reference' (max over output and "
            "gradients): " + ", ".join(f"{k} {max(v.values()):.1e}" for k, v in floor.items())
            + "; the last column compares each bfloat16 row with the float32 reference the "
            "same way."]
  return out


def render_layer_bench(b: dict) -> list[str]:
  out = ["", "### 3. MoE layer forward+backward, bfloat16", ""]
  if not b.get("rows"):
    return out + [f"Not run ({b.get('status', 'not run')})."]
  out.append(f"{b['method']}. Dense = SwiGLU FFN of width K*F with the same FLOPs. TFLOP/s counts "
             f"{b['flops_formula']}; % of the measured bf16 peak ({_f(b['peak_used_tflops'])} "
             f"TFLOP/s). Entries estimated above {b['mem_limit_gb']:.0f} GB or 2 s per step are "
             "skipped; 'compiled GB' = XLA's temp + argument + output sizes (what the program "
             "needs on the device); 'XLA FLOPs / "
             "active' = the compiled program's own FLOP count over the active FLOPs (a while "
             "loop's body, as in 'grouped', is counted once; far above 1 means padding or a "
             "dense rewrite, e.g. of ragged_dot's weight gradient).")
  out += ["", fmt_row(["shape", "strategy", "routing", "fwd+bwd ms", "MoE / dense", "TFLOP/s",
                       "% of peak", "XLA FLOPs / active", "compile s", "compiled GB", "note"]),
          fmt_row(["---"] * 11)]
  for row in b["rows"]:
    routing = row["routing"] + (f" (C={row['capacity']})" if row.get("capacity") else "")
    hlo = row.get("hlo_mentions") if row["strategy"] == "ragged" else None
    hlo = hlo and "HLO mentions " + ", ".join(f"{k} x{v}" for k, v in hlo.items())
    note = "; ".join(x for x in (row.get("variant"), row.get("skipped"), row.get("error"), hlo)
                     if x)
    out.append(fmt_row([row["shape"], row["strategy"], routing, _f(row.get("ms")),
                        _f(row.get("ratio"), ".2f"), _f(row.get("tflops")),
                        _f(row.get("pct_peak"), ".0f"), _f(row.get("xla_flops_over_active"), ".2f"),
                        _f(row.get("compile_s")),
                        _f(row.get("compiled_gb")), note]))
  gpu = b.get("auto_table", {}).get("gpu")
  out += ["", "`moe.layer.dispatch.AUTO` (what `auto` picks; read from the code)"
          + (f": on GPU {gpu[0]} with a capacity, {gpu[1]} dropless." if gpu else ".")]
  for shape, auto in b.get("auto", {}).items():
    best = b.get("fastest", {}).get(shape, {})
    picks = "; ".join(f"{label}: {_measured(b, shape, routing, best.get(routing))}"
                      for label, routing in (("with a capacity", "cf 1.25"),
                                             ("dropless", "dropless")))
    agree = ["as `auto` does" if auto[r] == best.get(r) else
             f"`auto` picks {_measured(b, shape, r, auto[r])}" for r in ("cf 1.25", "dropless")]
    out.append(f"- {shape}: `auto` should pick the fastest plain strategy measured, {picks}. "
               f"With a capacity {agree[0]}; dropless {agree[1]}.")
  return out


def _measured(b: dict, shape: str, routing: str, strategy) -> str:
  """'gather (1.44x dense, 291.0 TFLOP/s, 45% of peak)' from the plain row of section 3."""
  if strategy is None:
    return "none measured"
  row = next((r for r in b.get("rows", []) if r["shape"] == shape and r["routing"] == routing
              and r["strategy"] == strategy and not r.get("variant")), {})
  if "ms" not in row:
    return f"{strategy} (not measured: {row.get('skipped') or row.get('error') or 'no row'})"
  return (f"{strategy} ({_f(row.get('ratio'), '.2f')}x dense, {_f(row.get('tflops'))} TFLOP/s, "
          f"{_f(row.get('pct_peak'), '.0f')}% of peak)")


def render_train(t: dict) -> list[str]:
  out = ["", "### 4. Training run", ""]
  c = t.get("config")
  if not c:
    return out + [f"Not run ({t.get('status', 'not run')})."]
  out.append(f"Decoder-only `moe.model.transformer.Transformer`: D={c['d_model']}, "
             f"{c['layers']} blocks (scanned), {c['heads']} heads of {c['head_dim']}, every block "
             f"MoE with E={c['E']}, K={c['K']}, F={c['F']} (SwiGLU), dispatch auto, capacity "
             f"factor 1.25, vocab {c['vocab']} (tied embeddings), bf16 compute, f32 params; "
             f"AdamW (moe.train.step, lr {c['lr']}, warmup {c['warmup']}, cosine, clip 1.0); "
             f"{c['data']} made on device. Status: {t.get('status', '?')}.")
  if "n_active" not in t:
    return out
  out += ["", fmt_row(["metric", "value"]), fmt_row(["---"] * 2)]
  out += [fmt_row([k, v]) for k, v in train_rows(t, c)]
  return out


def _pct(v):
  return "-" if not v else f"{100 * v:.1f} %"


def train_rows(t: dict, c: dict) -> list[tuple[str, str]]:
  return [
      ("parameters (active / total)", f"{t['n_active'] / 1e6:.1f}M / {t['n_total'] / 1e6:.1f}M"),
      ("batch", f"{t.get('batch')} x {c['seq']} = {t.get('tokens_per_step')} tokens"),
      ("compile s (init s)", f"{_f(t.get('compile_s'))} ({_f(t.get('init_s'))})"),
      ("compiled GB / peak GB in use",
       f"{_f(t.get('compiled_gb'))} / {_f(t.get('peak_gb_in_use'))}"),
      ("first step s (excluded)", _f(t.get("first_step_s"), ".2f")),
      ("timed steps, ms per step", f"{t.get('timed_steps', '-')}, {_f(t.get('step_ms'))}"),
      ("tokens/s", _f(t.get("tokens_per_s"), ".0f")),
      ("model FLOPs per token", f"{t['flops_per_token'] / 1e6:.0f}M = {t['flops_formula']}"),
      ("TFLOP/s", _f(t.get("tflops"))),
      ("MFU vs measured bf16 peak", _pct(t.get("mfu_measured_peak"))),
      (f"MFU vs datasheet {DATASHEET_BF16_TFLOPS:.0f}", _pct(t.get("mfu_datasheet"))),
      ("loss at step 0 -> last step",
       f"{_f(t.get('loss_first'), '.3f')} -> {_f(t.get('loss_last'), '.3f')} (step "
       f"{t.get('last_step', '-')}; cross-entropy {_f(t.get('ce_first'), '.3f')} -> "
       f"{_f(t.get('ce_last'), '.3f')})"),
      ("loss every 10 steps", ", ".join(f"{v:.2f}" for v in t.get("loss_every_10", []))),
      ("finite and falling", str(t.get("loss_finite_and_falling"))),
      ("dropped fraction (last step, mean over layers)",
       _f(t.get("dropped_fraction_last"), ".3f"))]


def render(r: dict) -> str:
  secs = r.get("sections", {})
  out = render_head(r)
  out += render_device(secs.get("device", {}))
  out += render_correctness(secs.get("correctness", {}))
  out += render_layer_bench(secs.get("layer_bench", {}))
  out += render_train(secs.get("train", {}))
  errors = r.get("errors", [])
  if errors:
    out += ["", "Errors (one line each; tracebacks in the JSON):", ""]
    out += [f"- {e['where']}: `{e['error']}`" for e in errors]
  return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------
# Console summary


def headline(name: str, s: dict) -> str:
  if name == "device" and s.get("peak_bf16_tflops"):
    bw = s.get("bandwidth", {}).get("elementwise_gbps")
    return (f"bf16 peak {s['peak_bf16_tflops']:.1f} TFLOP/s "
            f"({100 * s['peak_bf16_tflops'] / DATASHEET_BF16_TFLOPS:.0f}% of 989), "
            f"elementwise {_f(bw, '.0f')} GB/s")
  if name == "correctness" and s.get("rows"):
    worst = {d: max((r["max_error"] for r in s["rows"] if r["dtype"] == d and "max_error" in r),
                    default=None) for d in TOLERANCE}
    return (f"{s.get('passed', 0)}/{s.get('checked', 0)} pass; max rel err f32 "
            f"{_f(worst['float32'], '.1e')}, bf16 {_f(worst['bfloat16'], '.1e')}")
  if name == "layer_bench" and s.get("rows"):
    parts = []
    for shape, best in s.get("fastest", {}).items():
      auto = s.get("auto", {}).get(shape, {})
      parts.append(f"E={shape.split('E=')[1]}: fastest "
                   f"{best.get('cf 1.25', '-')}/{best.get('dropless', '-')}, auto "
                   f"{auto.get('cf 1.25', '-')}/{auto.get('dropless', '-')}")
    return "; ".join(parts)
  if name == "train" and s.get("tokens_per_s"):
    return (f"{s['tokens_per_s']:.0f} tok/s, {s.get('tflops', 0):.1f} TFLOP/s, MFU "
            f"{_pct(s.get('mfu_measured_peak'))} of measured / {_pct(s.get('mfu_datasheet'))} "
            f"of datasheet peak, loss {s['loss_first']:.2f} -> {s['loss_last']:.2f}")
  return ""


def print_summary(r: dict) -> None:
  print("\nsummary:")
  print(fmt_row(["section", "status", "s", "headline"]))
  for name in SECTIONS:
    s = r.get("sections", {}).get(name, {})
    print(fmt_row([name, s.get("status", "not run")[:60], _f(s.get("seconds"), ".0f"),
                   headline(name, s)]))
  print(f"total {_f(r.get('meta', {}).get('wall_s'), '.0f')} s; errors: "
        f"{len(r.get('errors', []))}", flush=True)
