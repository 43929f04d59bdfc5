"""The bench report: a markdown file plus PNG figures (matplotlib, no display needed).

    render(result, "out/")   ->  out/report.md, roofline.png, predicted_vs_measured.png,
                                 placement.png, footprint_tok_s.png

`result` is what `hetero bench --json` prints (model, plan, predicted, measured, error, peers, and
optionally roofline, calibration, sweep). The directory is written under a temporary name and renamed
into place, so a failed render never leaves half a report.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

FIGURES = ("roofline.png", "predicted_vs_measured.png", "placement.png", "footprint_tok_s.png")
PREC_COLOR = {"fp32": "#4c72b0", "bf16": "#55a868", "fp16": "#8172b2", "int8": "#dd8452", "int4": "#c44e52"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def operating_points(spec, plan: dict, measured: dict) -> list[dict]:
    """Each unit's (FLOP/byte, achieved FLOP/s) in decode and in prefill, from measured times."""
    from hetero.cost import kv_bytes

    P, C = plan["workload"]["prompt_tokens"], plan["workload"]["context"]
    pts = []
    for u in plan["units"]:
        name, prec, nbytes = u["name"], u["precision"], max(1, u["bytes"])
        for phase, tokens, ctx, key in (("decode", 1, C, "unit_decode_ms"), ("prefill", P, P // 2, "unit_prefill_ms")):
            if name == "head" and phase == "prefill":
                tokens = 1
            ms = measured.get(key, {}).get(name)
            if not ms:
                continue
            flops = tokens * spec.unit_flops_per_token(name, max(1, ctx))
            rows = nbytes if name != "embed" else min(nbytes, tokens * nbytes / spec.vocab_size)
            moved = rows + kv_bytes(spec, name, prec, C if phase == "decode" else tokens, 1)
            pts.append({"unit": name, "phase": phase, "precision": prec, "intensity": flops / max(1, moved),
                        "flops_s": flops / (ms / 1e3)})
    return pts


def roofline(result: dict, path: Path, spec=None) -> None:
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    roofs = result.get("roofline", {}).get("cpu", {})
    x = np.logspace(-1, 4, 200)
    for p, g in roofs.get("gemm", {}).items():
        bw = roofs.get("gemv", {}).get(p)
        if bw:
            ax.plot(x, np.minimum(g, x * bw), color=PREC_COLOR.get(p, "gray"), lw=1.5, label=f"roof {p}")
    if spec is not None:
        for pt in operating_points(spec, result["plan"], result["measured"]):
            ax.scatter(pt["intensity"], pt["flops_s"], s=14, color=PREC_COLOR.get(pt["precision"], "gray"),
                       marker="o" if pt["phase"] == "decode" else "^", alpha=0.7)
    ax.scatter([], [], marker="o", color="k", label="unit, decode")
    ax.scatter([], [], marker="^", color="k", label="unit, prefill")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte moved)")
    ax.set_ylabel("FLOP/s")
    ax.set_title(f"roofline of this machine (cpu) with {result['model']}'s units")
    ax.legend(fontsize=7, loc="lower right")
    _save(plt, fig, path)


def scatter(result: dict, path: Path) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    cal = result.get("calibration") or {}
    series = []
    if cal.get("before"):
        series = [("before calibration", cal["before"], "#999999"), ("after", cal["after"], "#c44e52")]
    else:
        series = [("this run", [{
            "predicted_decode_tok_s": result["predicted"]["decode_tok_s"],
            "measured_decode_tok_s": result["measured"]["decode_tok_s"],
            "predicted_prefill_tok_s": result["predicted"]["prefill_tok_s"],
            "measured_prefill_tok_s": result["measured"]["prefill_tok_s"]}], "#c44e52")]
    for ax, metric in zip(axes, ("decode", "prefill")):
        hi, lo = 0.0, float("inf")
        for lab, rows, color in series:
            xs = [r[f"measured_{metric}_tok_s"] for r in rows]
            ys = [r[f"predicted_{metric}_tok_s"] for r in rows]
            ax.scatter(xs, ys, s=18, color=color, label=lab)
            hi, lo = max([hi, *xs, *ys]), min([lo, *xs, *ys])
        lo = max(lo * 0.8, 1e-3)
        hi = hi * 1.25
        ax.plot([lo, hi], [lo, hi], "k-", lw=0.8)
        ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="k", alpha=0.08, label="±10%")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(f"measured {metric} tok/s")
        ax.set_ylabel(f"predicted {metric} tok/s")
        ax.legend(fontsize=7)
    _save(plt, fig, path)


def placement(result: dict, path: Path) -> None:
    plt = _plt()
    units = result["plan"]["units"]
    fig, (a1, a2) = plt.subplots(2, 1, figsize=(max(6, 0.25 * len(units) + 2), 5), sharex=True)
    xs = range(len(units))
    colors = [PREC_COLOR.get(u["precision"], "gray") for u in units]
    hatches = ["//" if u["residency"] == "disk" else (".." if u["residency"] == "ram" else "") for u in units]
    bars = a1.bar(xs, [u["bytes"] / 1e6 for u in units], color=colors)
    for b, h in zip(bars, hatches):
        b.set_hatch(h)
    a1.set_ylabel("weights (MB)")
    a1.set_title("placement: colour = precision, hatched = streamed from disk; device: "
                 + ", ".join(sorted({u["device"] for u in units})), fontsize=9)
    pred = [u["predicted_ms"] for u in units]
    meas = [result["measured"].get("unit_decode_ms", {}).get(u["name"], 0.0) for u in units]
    w = 0.4
    a2.bar([x - w / 2 for x in xs], pred, w, color="#999999", label="predicted")
    a2.bar([x + w / 2 for x in xs], meas, w, color="#c44e52", label="measured")
    a2.set_ylabel("ms per decode step")
    a2.legend(fontsize=7)
    a2.set_xticks(list(xs))
    a2.set_xticklabels([u["name"].replace("layers.", "L") for u in units], rotation=90, fontsize=6)
    for p, c in PREC_COLOR.items():
        if any(u["precision"] == p for u in units):
            a1.bar([0], [0], color=c, label=p)
    a1.legend(fontsize=7)
    _save(plt, fig, path)


def plane(result: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    fp = result["measured"]["footprint_bytes"].get("cpu", 0) / 1e9
    ax.scatter([fp], [result["measured"]["decode_tok_s"]], s=60, color="#c44e52", marker="*", label="hetero")
    for p in result.get("peers", []):
        if "skipped" in p:
            continue
        ax.scatter([p["footprint_bytes"]["cpu"] / 1e9], [p["decode_tok_s"]["median"]], s=30, label=p["peer"])
    ax.set_xlabel("measured peak footprint (GB, RSS + cached model pages)")
    ax.set_ylabel("decode tok/s")
    ax.set_title(f"{result['model']}: footprint vs speed (up and left is better)", fontsize=9)
    ax.legend(fontsize=7)
    _save(plt, fig, path)


def _pct(x) -> str:
    return "—" if x is None else f"{x * 100:+.1f}%"


def markdown(result: dict) -> str:
    pr, me, er = result["predicted"], result["measured"], result["error"]
    sp = me.get("spread", {})
    lines = [f"# hetero bench: {result['model']}", "",
             f"prompt {result['plan']['workload']['prompt_tokens']} tokens, context "
             f"{result['plan']['workload']['context']}, {me.get('repeats', '?')} repeats (median; spread = "
             "(max − min) / median)", "",
             "| metric | predicted | measured | error | spread |", "|---|---|---|---|---|"]
    for k, unit in (("ttft_s", "s"), ("prefill_tok_s", "tok/s"), ("decode_tok_s", "tok/s")):
        lines.append(f"| {k} | {pr[k]:.4g} {unit} | {me[k]:.4g} {unit} | {_pct(er.get(k))} | {sp.get(k, 0) * 100:.0f}% |")
    for d, v in me.get("footprint_bytes", {}).items():
        p = pr.get("footprint_bytes", {}).get(d)
        lines.append(f"| footprint {d} | {p / 1e6 if p else 0:.1f} MB | {v / 1e6:.1f} MB | "
                     f"{_pct(er.get('footprint_bytes', {}).get(d))} | |")
    if result.get("peers"):
        lines += ["", "## Peers (same prompt ids, same tokens, side by side)", "",
                  "| peer | prefill tok/s | decode tok/s | footprint | note |", "|---|---|---|---|---|"]
        lines.append(f"| hetero | {me['prefill_tok_s']:.1f} | {me['decode_tok_s']:.2f} | "
                     f"{me['footprint_bytes'].get('cpu', 0) / 1e6:.0f} MB | this plan |")
        for p in result["peers"]:
            if "skipped" in p:
                lines.append(f"| {p['peer']} | — | — | — | skipped: {p['skipped']} |")
            else:
                lines.append(f"| {p['peer']} | {p['prefill_tok_s']['median']:.1f} | {p['decode_tok_s']['median']:.2f} "
                             f"| {p['footprint_bytes']['cpu'] / 1e6:.0f} MB | {p.get('note', '')} |")
    cal = result.get("calibration")
    if cal:
        s = cal["summary"]
        lines += ["", "## Calibration", "", "| | decode median abs | decode worst | prefill median abs | prefill worst |",
                  "|---|---|---|---|---|"]
        for k in ("before", "after", "leave_one_out"):
            if k in s:
                d, p = s[k]["decode_error"], s[k]["prefill_error"]
                lines.append(f"| {k} | {_pct(d['median_abs'])} | {_pct(d['max_abs'])} | {_pct(p['median_abs'])} "
                             f"| {_pct(p['max_abs'])} |")
    lines += ["", "## Per unit (ms)", "", "| unit | placement | decode pred | decode meas | prefill pred | prefill meas |",
              "|---|---|---|---|---|---|"]
    for u in result["plan"]["units"]:
        n = u["name"]
        lines.append(f"| {n} | {u['device']}/{u['precision']}/{u['residency']} | {u['predicted_ms']:.3f} | "
                     f"{me.get('unit_decode_ms', {}).get(n, 0):.3f} | {u['prefill_ms']:.3f} | "
                     f"{me.get('unit_prefill_ms', {}).get(n, 0):.3f} |")
    lines += ["", "## Figures", ""] + [f"![{f[:-4]}]({f})" for f in FIGURES]
    return "\n".join(lines) + "\n"


def render(result: dict, out_dir: str | Path) -> Path:
    """Write report.md and the figures into `out_dir` (replaced whole, atomically per directory)."""
    from hetero.model.sources import resolve_spec

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would outlive the rename
    try:
        try:
            spec = resolve_spec(result["model"])
        except Exception:
            spec = None  # the roofline still draws its roofs
        roofline(result, tmp / FIGURES[0], spec)
        scatter(result, tmp / FIGURES[1])
        placement(result, tmp / FIGURES[2])
        plane(result, tmp / FIGURES[3])
        (tmp / "report.md").write_text(markdown(result))
        if out.exists():
            old = out.with_name(f".{out.name}.old.{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
