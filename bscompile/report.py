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
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    fmt = lambda r: "  ".join(str(c).ljust(wd) for c, wd in zip(r, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * wd for wd in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines)


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
        parts.append(f"m{rng}: {sched.get('variant', 'default')}" + (f"/{sched['m_tile']}" if "m_tile" in sched else ""))
    return "; ".join(parts)


def reasons(weights: list[dict]) -> str:
    return "\n".join(f"  {w['name']}: {w['decision']['reason']}" + (f" [{buckets_text(w)}]" if buckets_text(w) else "")
                     for w in weights if "decision" in w)
