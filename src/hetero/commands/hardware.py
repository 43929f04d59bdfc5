"""`hetero devices`, `hetero profile`, `hetero catalog`: rich tables for people, --json for programs."""
from __future__ import annotations

import json
import sys
import warnings
from typing import Optional

import typer


def _gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x else "-"


def _rate(x: float, unit: str) -> str:
    if not x:
        return "-"
    if unit == "FLOP/s":
        return f"{x / 1e9:,.1f} GFLOP/s" if x < 1e12 else f"{x / 1e12:,.1f} TFLOP/s"
    if unit == "s":
        return f"{x * 1e6:,.2f} µs"
    return f"{x / 1e9:,.2f} GB/s"


def _spec_table(spec, title: str):
    from rich.table import Table

    t = Table(title=title)
    for col in ("device", "kind", "model", "memory", "free", "bandwidth", "peak (nominal)", "details"):
        t.add_column(col)
    for d in spec.devices:
        peak = ", ".join(f"{k} {_rate(v, 'FLOP/s')}" for k, v in d.peak_flops.items())
        details = []
        if d.cores:
            details.append(f"{d.cores} cores" if d.kind == "cpu" else f"{d.cores} SMs/cores")
        if d.threads:
            details.append(f"{d.threads} threads")
        if d.compute_capability:
            details.append(f"sm {d.compute_capability}")
        if d.features:
            details.append(" ".join(d.features))
        if d.caches:
            details.append(" ".join(f"{k} {v >> 10} KiB" for k, v in d.caches.items()))
        if d.shares_memory_with:
            details.append(f"shares memory with {d.shares_memory_with}")
        t.add_row(d.name, d.kind, d.model, _gb(d.memory_bytes), _gb(d.available_bytes),
                  _rate(d.bandwidth, "B/s"), peak, "; ".join(details))
    return t


def _links_table(spec):
    from rich.table import Table

    t = Table(title="links (one direction)")
    for col in ("from", "to", "kind", "bandwidth"):
        t.add_column(col)
    for ln in spec.links:
        t.add_row(ln.src, ln.dst, ln.kind, _rate(ln.bandwidth, "B/s"))
    return t


def _fmt(m) -> str:
    if m is None:
        return "-"
    return f"{_rate(m.median, m.unit)}  [{_rate(m.min, m.unit)} .. {_rate(m.max, m.unit)}]"


def _profile_table(prof):
    from rich.table import Table

    t = Table(title=f"profile of {prof.host} ({prof.mode}, {prof.measured_at}) — median [min .. max]")
    for col in ("device", "figure", "value"):
        t.add_column(col)
    for name, d in prof.devices.items():
        rows = [("memory copy (read+write)", d.mem_bandwidth), ("memory read", d.mem_read_bandwidth),
                ("op overhead", d.op_overhead)]
        rows += [(f"GEMM {p}", m) for p, m in d.gemm_flops.items()]
        rows += [(f"GEMV {p} (weight bytes)", m) for p, m in d.gemv_bandwidth.items()]
        rows += [(f"batched rows {p} (32 rows)", m) for p, m in d.gemm_rows.items()]
        rows += [("host->device pinned", d.h2d_pinned), ("host->device pageable", d.h2d_pageable)]
        for label, m in rows:
            if m is not None:
                t.add_row(name, label, _fmt(m))
    method = prof.versions.get("disk_read", "O_DIRECT")
    if prof.disk_direct is not None:
        t.add_row("disk", f"read ({method})", _fmt(prof.disk_direct))
    if prof.disk_cached is not None:
        t.add_row("disk", "read (page cache)", _fmt(prof.disk_cached))
    t.caption = "versions: " + ", ".join(f"{k} {v}" for k, v in prof.versions.items())
    return t


def _kernels_line(st: dict) -> str:
    """One line on the compiled CPU kernels: what they serve, or why torch's kernels run instead."""
    if not st["active"]:
        return f"kernels: torch — compiled kernels off: {st['reason']}"
    int4 = ", int4 with AVX512-BF16 dot products" if st["int4_bf16_dot"] else ""
    act = f", GGUF-block decode on {st.get('decode_act', 'bf16')} activations"
    return f"kernels: compiled — {'/'.join(st['gemv'])} GEMV, fused decode ops{int4}{act} ({st['build']})"


def register(app: typer.Typer) -> None:
    @app.command()
    def devices(as_json: bool = typer.Option(False, "--json", help="print the HardwareSpec as JSON")):
        """What hardware is here: CPU, RAM, GPUs, the cache disk, and the links between them."""
        from hetero.hardware.inventory import inventory
        from hetero.ops import kernels

        spec = inventory()
        status = kernels.status()
        if as_json:
            print(json.dumps({**spec.to_dict(), "kernels": status}, indent=1))
            return
        from rich.console import Console

        c = Console()
        c.print(_spec_table(spec, f"devices of {spec.host}"))
        c.print(_links_table(spec))
        c.print(_kernels_line(status), markup=False, highlight=False, soft_wrap=True)

    @app.command()
    def profile(
        quick: bool = typer.Option(False, "--quick", help="small sizes, few repeats (~15-30 s)"),
        refresh: bool = typer.Option(False, "--refresh", help="re-measure even when a cached profile exists"),
        as_json: bool = typer.Option(False, "--json", help="print the Profile as JSON"),
    ):
        """Measure this machine (matmul rates, memory and disk bandwidth, overheads); cached per host."""
        from hetero.hardware.profile import get_profile

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            prof = get_profile(refresh=refresh, quick=quick, progress=True)
        for w in caught:
            print(f"warning: {w.message}", file=sys.stderr)
        if as_json:
            print(json.dumps(prof.to_dict(), indent=1))
            return
        from rich.console import Console

        Console().print(_profile_table(prof))

    @app.command()
    def catalog(
        name: Optional[str] = typer.Argument(None, help="compose a machine, e.g. rtx4090+ram64g+nvme"),
        as_json: bool = typer.Option(False, "--json", help="print as JSON"),
    ):
        """Spec-sheet hardware for what-if plans; with NAME, the machine composed from those parts."""
        import dataclasses

        from hetero.hardware.catalog import entries, resolve

        if name is not None:
            spec = resolve(name)
            if as_json:
                print(json.dumps(spec.to_dict(), indent=1))
                return
            from rich.console import Console

            c = Console()
            c.print(_spec_table(spec, spec.source))
            c.print(_links_table(spec))
            return
        parts = entries()
        if as_json:
            print(json.dumps({k: dataclasses.asdict(p) for k, p in parts.items()}, indent=1))
            return
        from rich.console import Console
        from rich.table import Table

        t = Table(title="hardware catalog (compose with +, e.g. catalog:rtx4090+ram64g+nvme; ramNg sets RAM; "
                        "NxGPU for several)")
        for col in ("name", "kind", "what", "memory", "bandwidth", "bf16 peak", "source"):
            t.add_column(col)
        for p in parts.values():
            t.add_row(p.name, p.kind, p.title, _gb(p.memory_bytes), _rate(p.bandwidth, "B/s"),
                      _rate(p.peak_flops.get("bf16", 0.0), "FLOP/s"), p.source)
        Console().print(t)
