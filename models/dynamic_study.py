"""Dynamic block selection in the char LM's recurrent layer (issue 15): ``python -m bscompile.models.dynamic_study``.

The gated GRU (:class:`~.dynamic_rnn.DynamicBlockGRU`, ``--cell lstm``: the gated LSTM) at keep
1.0 / 0.5 / 0.25 against, at each keep's compute: the dense layer of the same hidden size, a
narrower dense layer of the same compute, and static BP 4x4 and WP at the same compute (density
= the compute fraction). Compute fraction = multiply-adds of the recurrent layer (input and
recurrent products) relative to the dense one of the same hidden size; a gated product costs
``keep + in/block^2`` of its dense product, the gate included (:func:`.dynamic_lm.compute_fraction`
with ``d_in`` = the embedding width: every product of a ``G``-gate cell is ``G`` times that of
the MLP's fc1/fc2, so the ratios are the same). The output layer to the vocabulary is the same
in every model and not counted.

It is a second study of :mod:`.reproduce`'s machinery: the same resumable queue and flags
(``--quick``, ``--only``, ``--iters``, ``--hours``, ``--bench``, ``--report-only``), state in
``~/.cache/bscompile/repro/<setup name>``, results in ``models/results/dynamic_rnn/``. The gated
models are exported in their scan form (ONNX ``Scan``, symbolic length) for ``--bench``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from .charlm import PruneConfig, TrainConfig
from .dynamic_lm import Run as Product
from .dynamic_lm import compute_fraction, dense_width
from .reproduce import RESULTS, Run, Setup, bench_method, by_name, bpc, convergence, run_key, spread
from .reproduce import main as reproduce_main

OUT = RESULTS / "dynamic_rnn"


@dataclass
class DynSetup(Setup):
    """Sizes of the study; ``name`` keys its state directory (change it when sizes change)."""

    name: str = "dyngru512-b64-pystd"
    cell: str = "gru"  # the gated cell is "dyn" + cell
    block: int = 64  # gate cost at hidden 512: 512/64^2 = 12.5% of the recurrent mat-vec
    keeps: tuple[float, ...] = (0.5, 0.25, 1.0)  # in order of importance
    # after those: the gated model at these keeps with the static pruners' start (every tile kept
    # at first, keep lowered from 10% to 60% of training: PruneConfig("keep"))
    gradual_keeps: tuple[float, ...] = (0.5,)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(
        iters=12000, batch=32, seq=32, lr=3e-3, log_every=100, eval_every=1500))
    # 12000 iterations: reproduce's --iters 12000 dense hidden-512 GRU ended at 1.844 validation bpc
    # against 1.848 after 4000 (the same corpus and batches): the baseline has about converged.
    seeds: tuple[int, ...] = (0,)
    sweeps: bool = False

    MODULE: ClassVar[str] = "dynamic_study"
    REFERENCE: ClassVar[str] = "dense"
    BENCH_THREADS: ClassVar[int] = 2  # issue 15's language-model target: batch 1, 2 threads

    def fraction(self, kind: str, hidden: int, keep: float = 1.0) -> float:
        """Recurrent-layer multiply-adds relative to the dense layer of ``hidden_large``."""
        return compute_fraction(Product(kind, hidden, keep), self.emb, self.hidden_large, self.block)

    def plan(self, vocab: int) -> list[Run]:
        """Per seed: dense, then for each keep the gated model and its same-compute BP, dense, WP."""
        H = self.hidden_large
        runs = [("dense", H, PruneConfig("dense"), self.cell, 1.0)]
        for keep in self.keeps:
            runs.append((f"gated keep {keep}", H, PruneConfig("dense"), "dyn" + self.cell, keep))
            if keep >= 1.0:
                continue
            f = self.fraction("dynamic", H, keep)
            bp = PruneConfig("bp", (4, 4), "max", 1.0 - f, prune_linear=False)
            runs += [(f"BP 4x4 @ keep {keep}", H, bp, self.cell, 1.0),
                     (f"dense @ keep {keep}", dense_width(f, self.emb, H), PruneConfig("dense"), self.cell, 1.0),
                     (f"WP @ keep {keep}", H, replace(bp, method="wp", block=(1, 1)), self.cell, 1.0)]
        runs += [(f"gated keep {keep} gradual", H, PruneConfig("keep"), "dyn" + self.cell, keep)
                 for keep in self.gradual_keeps]
        return [Run(n, h, pc, seed, cell, keep, self.block) for seed in self.seeds for n, h, pc, cell, keep in runs]

    def write(self, res: dict[str, Any], out: Path, quick: bool) -> None:
        write(self, res, out, quick)

    def command(self) -> str:
        return (f"nice -n 10 python -m bscompile.models.{self.MODULE}" + (f" --cell {self.cell}" if self.cell != "gru"
                else "") + (" --quick" if self.name.endswith("quick") else "")
                + (f" --iters {self.train.iters}" if "-it" in self.name else ""))


QUICK = DynSetup(
    name="dynamic-quick",
    corpus="pydoc",
    hidden_large=32,
    emb=16,
    block=16,
    train=TrainConfig(iters=24, batch=8, seq=16, lr=3e-3, log_every=12, eval_every=12),
    val_chars=1024,
    export_seq=8,
)


def run_fraction(s: DynSetup, r: dict[str, Any]) -> float:
    """Compute fraction of a finished run: gated by its keep, pruned by its measured density."""
    if r.get("cell", "").startswith("dyn"):
        return s.fraction("dynamic", r["hidden"], r["keep"])
    return s.fraction("dense", r["hidden"]) * (1.0 - r["sparsity"])


def diverged(r: dict[str, Any]) -> bool:
    """Training blew up: the final training bpc is 20% above the best on its curve (a converging run ends near it)."""
    tr = [b for _, b, _, _ in r["train_curve"]]
    return bool(tr) and tr[-1] > 1.2 * min(tr)


def _ms_per_token(r: dict[str, Any]) -> float | None:
    b = r.get("bench")
    return b["ms"] / b["seq"] if b else None


def table(s: DynSetup, g: dict[str, list[dict[str, Any]]], order: list[str]) -> list[str]:
    ref = bpc(g["dense"]) if "dense" in g else None
    rows = []
    for name in order:
        if name not in g:
            continue
        rs, r = g[name], g[name][0]
        rel = f"{(bpc(rs) - ref) / ref * 100:+.2f}%" if ref else "–"
        ms = _ms_per_token(r)
        up = f"{r['bench']['speedup']:.2f}x" if ms else "–"
        ort = f"{r['bench']['speedup_vs_ort']:.2f}x" if ms and "speedup_vs_ort" in r["bench"] else "–"
        iters = r["train_config"]["iters"]
        rows.append(f"| {name}{' (diverged)' if diverged(r) else ''} | {r['cell']} | {r['hidden']} | {r['keep'] if r['cell'].startswith('dyn') else '–'} "
                    f"| {r['sparsity'] * 100:.1f}% | {run_fraction(s, r):.3f} | {bpc(rs):.4f}"
                    + (f" ± {spread(rs):.4f}" if len(rs) > 1 else "") + f" | {len(rs)} | {rel} "
                    f"| {f'{ms * 1e3:.1f}' if ms else '–'} | {up} | {ort} | {r['wall_s'] / iters:.2f} |")
    if not rows:
        return ["(not run yet)"]
    return ["| Run | Cell | Hidden | Keep | Sparsity | Compute fraction | Val bpc | Seeds | Δ bpc vs dense "
            "| bscompile µs/token, batch 1 | Speed-up vs bscompile dense | vs onnxruntime (same file) "
            "| Training s/iter |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|", *rows]


def planned(s: DynSetup, vocab: int, done: set[str]) -> list[str]:
    """The queue: every planned run, its compute fraction and whether it has finished."""
    rows = []
    for r in s.plan(vocab):
        pc = r.prune
        f = s.fraction("dynamic", r.hidden, r.keep) if r.cell.startswith("dyn") else \
            (1 - pc.target if pc.method != "dense" else s.fraction("dense", r.hidden))
        how = "–" if pc.method == "dense" else f"keep 1 → {r.keep} (CubicSL)" if pc.method == "keep" else \
            f"{pc.method.upper()} {pc.block[0]}x{pc.block[1]} to {pc.target:.1%}"
        rows.append(f"| {r.name} | {r.seed} | {r.cell} | {r.hidden} | {how} | {f:.3f} "
                    f"| {'done' if run_key(r.name, r.seed) in done else 'pending'} |")
    return ["| Run | Seed | Cell | Hidden | Pruning (sparsity) | Compute fraction | Status |",
            "|---|---|---|---|---|---|---|", *rows]


def targets(g: dict[str, list[dict[str, Any]]], keeps: tuple[float, ...]) -> list[str]:
    """The issue's targets: keep 0.5 within 2% of dense, and better than static pruning at the same compute."""
    out = []
    for a, keep in [(f"gated keep {k}{how}", k) for k in keeps for how in ("", " gradual")]:
        if a not in g:
            continue
        if any(diverged(r) for r in g[a]):
            out.append(f"{a} diverged (training bpc {min(b for _, b, _, _ in g[a][0]['train_curve']):.2f} at best, "
                       f"{g[a][0]['train_curve'][-1][1]:.2f} at the end): the cell divides the kept gates by their "
                       "mean, and with every raw (signed) gate kept that mean can approach 0: the gates are ill-conditioned "
                       "(an untrained keep-1.0 LM already differs between PyTorch and onnxruntime by 2.6 in its logits "
                       "from float rounding alone; with the gate biases shifted by +2 the two agree to 3e-7). It is "
                       "left out of the comparisons and the plot.")
            continue
        if "dense" in g:
            rel = (bpc(g[a]) - bpc(g["dense"])) / bpc(g["dense"]) * 100
            out.append(f"{'target' if keep == 0.5 else '(not a target)'}: {a} within 2% of dense — "
                       f"{rel:+.2f}% ({'met' if rel <= 2 else 'missed'}).")
        if "dense" in g and a.endswith("gradual"):
            out.append(_before_window(g[a][0], g["dense"][0]))
        for b in (f"BP 4x4 @ keep {keep}", f"WP @ keep {keep}", f"dense @ keep {keep}"):
            if b in g:
                d = bpc(g[a]) - bpc(g[b])
                noise = spread(g[a]) + spread(g[b])
                word = "within the seed spread of" if abs(d) <= noise and noise else \
                    ("better than" if d < 0 else "worse than")
                out.append(f"{a} {bpc(g[a]):.4f} is {word} {b} {bpc(g[b]):.4f} (Δ {d:+.4f} bpc"
                           + (", one seed: no spread" if not noise else f", spreads ±{noise:.4f}") + ").")
    return out


def _before_window(r: dict[str, Any], dense: dict[str, Any]) -> str:
    """How the gradual run trained while it kept every tile, against dense at the same iteration."""
    start = int(r["prune_config"]["start"] * r["train_config"]["iters"])
    at = {run["key"]: {itr: b for itr, b, _, _ in run["train_curve"]} for run in (r, dense)}
    mine, ref = at[r["key"]].get(start), at[dense["key"]].get(start)
    if mine is None or ref is None:
        return f"{r['name']}: no training bpc logged at iteration {start}, where keep starts to fall."
    return (f"{r['name']}: with every tile kept (iterations 1-{start}, gate scores near 1 after the +1 shift) it "
            f"trained {'slower than' if mine > ref else 'as fast as or faster than'} dense: training bpc {mine:.3f} "
            f"against {ref:.3f} at iteration {start}.")


def plot(s: DynSetup, res: dict[str, Any], out: Path) -> None:
    """quality_vs_compute.png (bpc against compute fraction and bscompile time) and learning_curves.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = by_name(res)
    series = {"gated (gate included)": lambda n: n.startswith("gated") and not n.endswith("gradual"),
              "gated, keep lowered gradually": lambda n: n.startswith("gated") and n.endswith("gradual"),
              "BP 4x4": lambda n: n.startswith("BP"),
              "WP": lambda n: n.startswith("WP"), "dense, narrower": lambda n: n.startswith("dense")}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for label, match in series.items():
        names = sorted((n for n in g if match(n) and not any(diverged(r) for r in g[n])), key=lambda n: run_fraction(s, g[n][0]))
        if not names:
            continue
        pts = [(run_fraction(s, g[n][0]), _ms_per_token(g[n][0]), bpc(g[n]), spread(g[n])) for n in names]
        axes[0].errorbar([p[0] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts], fmt="o-",
                         label=label, capsize=3)
        timed = [p for p in pts if p[1] is not None]
        if timed:
            axes[1].plot([p[1] * 1e3 for p in timed], [p[2] for p in timed], "o", label=label)
    axes[0].set(xlabel="compute fraction of the recurrent layer (dense = 1)", ylabel="validation bits per character")
    axes[1].set(xlabel=f"bscompile µs per token (batch 1, {s.BENCH_THREADS} threads)", ylabel="validation bits per character")
    for a in axes:
        a.grid(alpha=0.3)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=8)
    fig.suptitle(f"Char LM, {s.cell.upper()} hidden {s.hidden_large}, tiles {s.block}x{s.block}")
    fig.tight_layout()
    fig.savefig(out / "quality_vs_compute.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for name, rs in g.items():
        for r in rs:
            c = [(it, v) for it, _, _, v in r["train_curve"] if v is not None]
            ax.plot(*zip(*c), ".-" if name.startswith(("dense", "gated")) else ".--", label=f"{name} s{r['seed']}")
    ax.set(xlabel="iteration", ylabel="validation bpc", title="Validation bpc during training",
           xlim=(0, s.train.iters))
    ax.set_ylim(top=min(4.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    plt.close(fig)


def write(s: DynSetup, res: dict[str, Any], out: Path, quick: bool) -> Path:
    """results.json, the plots and results.md in ``out``."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    if res["runs"]:
        plot(s, res, out)
    g = by_name(res)
    t = s.train
    order = [r.name for r in s.plan(res["vocab"]) if r.seed == s.seeds[0]]
    H, bs = s.hidden_large, s.block
    lines = [
        f"# Dynamic block selection in the recurrent layer: char-level {s.cell.upper()} LM"
        + (" (QUICK MODE: mechanics only)" if quick else ""),
        "",
        "Hadifar et al. 2020's gated cell (per step, both gate products keep the top `keep` of their "
        f"{bs}x{bs} weight tiles, chosen by a linear gate of the product's input) against static pruning and",
        "narrower dense layers at the same compute. Lower bits per character (bpc) is better.",
        "",
        f"- Command: `{res['command']}` (resumable: re-run to continue; checkpoints outside the repository),",
        "  then the same command with `--bench` (bscompile timing) and with `--report-only` (these tables)",
        f"- Machine: {res['machine']}; torch {res['torch']}, {res['threads']} training thread(s), shared machine",
        f"- Date: {res['date']}; {len(res['runs'])} of {len(s.plan(res['vocab']))} planned runs finished, "
        f"{res['train_wall_s'] / 3600:.1f} h of training",
        f"- Corpus: {res['corpus']}",
        f"- Model: Embedding({res['vocab']}, {s.emb}) → {s.layers}-layer {s.cell.upper()} (hidden {H}: "
        f"`nn.{s.cell.upper()}`, or `DynamicBlock{s.cell.upper()}` with {bs}x{bs} tiles) → Linear to the "
        "vocabulary.",
        f"- Compute fraction: multiply-adds of the recurrent layer relative to dense hidden {H}; a gated product "
        f"costs `keep + in/{bs}^2` (input product {s.emb}/{bs}^2 = {s.emb / bs ** 2:.1%}, recurrent "
        f"{H}/{bs}^2 = {H / bs ** 2:.1%}); BP/WP: their density; narrower dense: its own multiply-adds. The "
        "output layer is the same in all and not counted.",
        f"- Training: {t.iters} Adam iterations (≈{t.iters * t.batch * t.seq / res['train_chars']:.1f} epochs), "
        f"batch {t.batch} × {t.seq} characters, lr {t.lr} (cosine to 5%), grad clip {t.clip}; seeds "
        f"{list(s.seeds)}. BP/WP: `NarangSL` target mode from 10% to 60% of training, the output layer dense. "
        "*gradual*: the gated model with the same start (`DynamicKeepSparsifier` under `CubicSL`: every tile "
        "kept, the gate biases shifted by +1 so the kept scores' mean starts far from 0, keep lowered to its "
        "value from 10% to 60% of training).",
        f"- bscompile: each model exported to ONNX ({s.export_seq} characters, batch 1; the gated ones in their "
        "scan form, an ONNX `Scan` over a symbolic length), " + bench_method(res["runs"])
        + " µs/token = the time per sequence / its length.",
        "",
        "## Quality vs compute vs time",
        "",
        *table(s, g, order),
        "",
        *[f"- {x}" for x in targets(g, s.keeps)],
        "",
        *(["![quality vs compute](quality_vs_compute.png)", ""] if res["runs"] else []),
        "## Convergence",
        "",
        *convergence(g, [n for n in order if n.startswith(("dense", "gated"))]),
        "",
        *(["![learning curves](learning_curves.png)", ""] if res["runs"] else []),
        "## The queue, in order of importance",
        "",
        *planned(s, res["vocab"], {r["key"] for r in res["runs"]}),
        "",
    ]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    return path


def main(argv: list[str] | None = None) -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--cell", choices=("gru", "lstm"), default="gru", help="the recurrent cell (default gru)")
    args, _ = pre.parse_known_args(argv)
    full, quick, out = DynSetup(), QUICK, OUT
    if args.cell != "gru":
        full = replace(full, name=f"dyn{args.cell}512-b64-pystd", cell=args.cell)
        quick = replace(quick, name=f"dynamic-{args.cell}-quick", cell=args.cell)
        out = OUT / args.cell
    reproduce_main(argv, full, quick, out, __doc__, (pre,))


if __name__ == "__main__":
    main()
