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


def reasons(weights: list[dict]) -> str:
    return "\n".join(f"  {w['name']}: {w['decision']['reason']}" for w in weights if "decision" in w)
