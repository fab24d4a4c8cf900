"""Human-readable tables of what the compiler found and chose, per weight."""

from __future__ import annotations


def _kb(n: float) -> str:
    return f"{n / 1024:,.1f}"


def weight_table(weights: list[dict]) -> str:
    """Format manifest weight entries (:func:`bscompile.sites.weight_entries`) as an aligned table."""
    head = ["weight", "shape", "density", "structure", "layout", "KiB dense", "KiB stored", "est. speed-up"]
    rows = []
    for w in weights:
        sp, dec = w.get("sparsity", {}), w.get("decision", {})
        layout = dec.get("layout", "?")
        if layout not in ("dense", "?"):
            layout = f"{layout} {dec['block']}"
        est = dec.get("dense_est_time_us", 0) / max(dec.get("est_time_us", 0), 1e-9) if dec else 0
        rows.append([
            w["name"], "x".join(map(str, w["shape"])), f"{sp.get('density', 1) * 100:.1f}%",
            sp.get("structure", "?"), layout, _kb(w["dense_bytes"]),
            _kb(w.get("stored_bytes", w["dense_bytes"])) if "stored_bytes" in w else "-",
            f"{est:.1f}x" if dec else "-",
        ])
    return _table(head, rows)


def _table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows])


def input_table(inputs) -> str:
    """The model's inputs (:class:`bscompile.sites.TensorSpec`), naming the symbolic dims: any size
    >= 1 runs there without recompiling; ``--input-shape`` specialises them."""
    lines = []
    for s in inputs:
        dims = ", ".join(map(str, s.shape))
        sym = [str(d) for d in s.shape if isinstance(d, str)]
        lines.append(f"input {s.name}[{dims}] {s.dtype}" + (f"  symbolic: {', '.join(sym)}" if sym else "  static"))
    return "\n".join(lines)


def buckets_text(w: dict) -> str:
    """A symbolic-m site's run-time dispatch: ``m=1: rows; m=2-7: block; m>=8: batch``."""
    parts = []
    for b in w.get("decision", {}).get("buckets", []):
        rng = f"={b['lo']}" if b["hi"] == b["lo"] else f">={b['lo']}" if b["hi"] is None else f"={b['lo']}-{b['hi']}"
        sched = b["schedules"][0] if b["schedules"] else {}
        if "rows_tile" in sched:  # a dynamic site: register tile, and whether the masked dense fallback may run
            fb = "fallback" if sched["dense_fraction"] <= 1 else "no fallback"
            parts.append(f"m{rng}: tiles {sched['m_tile']}x{sched['rows_tile']} {fb}")
            continue
        parts.append(f"m{rng}: {sched.get('variant', 'default')}" + (f"/{sched['m_tile']}" if "m_tile" in sched else ""))
    return "; ".join(parts)


def reasons(weights: list[dict]) -> str:
    return "\n".join(f"  {w['name']}: {w['decision']['reason']}" + (f" [{buckets_text(w)}]" if buckets_text(w) else "")
                     for w in weights if "decision" in w)


def dynamic_table(weights: list[dict]) -> str:
    """The dynamic sites (input-dependent block selection) as fields: tile, tiles kept per row
    (``k`` of the tiles a static mask leaves), keep, and the compute fraction (selected
    tiles plus the gate, relative to the dense product), and ``m``: the rows, or for a gated
    time loop its batch, steps and cell; empty without dynamic sites."""
    head = ["dynamic site", "block", "k", "tiles", "keep", "compute fraction", "m"]
    rows = [[w["name"], a["tile"], a["k"], a["n_alive"], f"{a['keep']:g}", f"{a['compute_fraction']:.3f}",
             w["m"] if w["kind"] == "dynamic_linear" else f"{w['m']} x {a['seq']} steps ({a['cell']['kind']})"]
            for w in weights if w["kind"] in ("dynamic_linear", "dynamic_recurrent") for a in [w["attributes"]]]
    return _table(head, rows) if rows else ""
