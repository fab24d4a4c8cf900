"""Character-level language model on CPython's own documentation (and source) text.

The ``pydoc`` corpus is ``pydoc_data.topics`` — the reference-manual topics shipped
with every CPython, so training needs no download. Topics are joined in sorted key
order; the first 90 % of characters are training data, the last 10 % validation.
The ``pydoc+stdlib`` corpus adds the source of the standard library's top-level
modules (~4.7 M characters, sorted by file name), ten times more text, so that a
hidden-512 model is not data-limited; each part is split 90/10 the same way.
The metric is bits per character (cross-entropy in base 2) on validation text,
read as contiguous streams with the hidden state carried across chunks.

``python -m bscompile.models.charlm --export-bundled`` regenerates the block-pruned
GRU shipped as ``bscompile/data/char_gru_bp4x4.onnx`` (+ ``.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.ao.pruning import CubicSL, LambdaSL

from .group_lasso import group_lasso_penalty
from .keep_schedule import DynamicKeepSparsifier
from .schedule import NarangSL
from .sparsifier import BlockPruner, make_config

BUNDLED = Path(__file__).resolve().parent.parent / "bscompile" / "data" / "char_gru_bp4x4.onnx"


@dataclass
class Corpus:
    """Encoded train/validation split and the vocabulary (sorted characters)."""

    vocab: str
    train: torch.Tensor
    val: torch.Tensor
    sha256: str

    def encode(self, text: str) -> torch.Tensor:
        index = {ch: i for i, ch in enumerate(self.vocab)}
        return torch.tensor([index[ch] for ch in text], dtype=torch.long)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocab[i] for i in ids.tolist())


CORPORA = ("pydoc", "pydoc+stdlib")


def _texts(source: str) -> list[str]:
    from pydoc_data.topics import topics

    texts = ["".join(topics[k] for k in sorted(topics))]
    if source == "pydoc+stdlib":
        import sysconfig

        files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
        texts.append("".join(f.read_text(encoding="utf-8", errors="replace") for f in files))
    elif source != "pydoc":
        raise ValueError(f"unknown corpus {source!r}; choose from {CORPORA}")
    return texts


def load_corpus(val_frac: float = 0.1, source: str = "pydoc") -> Corpus:
    """The corpus text, each part split at a fixed character offset (no shuffling)."""
    texts = _texts(source)
    vocab = "".join(sorted(set("".join(texts))))
    index = {ch: i for i, ch in enumerate(vocab)}
    train, val = [], []
    for text in texts:
        ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
        cut = int(len(ids) * (1 - val_frac))
        train.append(ids[:cut])
        val.append(ids[cut:])
    digest = hashlib.sha256("".join(texts).encode()).hexdigest()[:16]
    return Corpus(vocab, torch.cat(train), torch.cat(val), digest)


CELLS = ("gru", "lstm", "dyngru", "dynlstm")


class CharLM(nn.Module):
    """Embedding → multi-layer GRU/LSTM → linear to the vocabulary.

    ``cell="dyngru"`` / ``"dynlstm"``: the recurrent layer is :class:`~.dynamic_rnn.DynamicBlockGRU` /
    ``DynamicBlockLSTM`` (both gate products block-gated per step, ``block`` x ``block`` tiles, ``keep``
    of them kept; ``time_loop`` as there); ``block``, ``keep`` and ``time_loop`` are ignored otherwise.
    """

    def __init__(self, vocab: int, emb: int = 64, hidden: int = 256, layers: int = 2, cell: str = "gru",
                 block: int = 64, keep: float = 1.0, time_loop: str = "python") -> None:
        super().__init__()
        if cell not in CELLS:
            raise ValueError(f"unknown cell {cell!r}; choose from {CELLS}")
        self.embed = nn.Embedding(vocab, emb)
        if cell.startswith("dyn"):
            from .dynamic_rnn import DynamicBlockGRU, DynamicBlockLSTM

            rnn = DynamicBlockGRU if cell == "dyngru" else DynamicBlockLSTM
            self.rnn = rnn(emb, hidden, layers, batch_first=True, block=block, keep=keep, time_loop=time_loop)
        else:
            self.rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell](emb, hidden, layers, batch_first=True)
        self.proj = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state: Any = None, return_state: bool = False):
        out, state = self.rnn(self.embed(tokens), state)
        logits = self.proj(out)
        return (logits, state) if return_state else logits


@dataclass
class TrainConfig:
    """Optimisation settings. Batches are random windows of the training text."""

    iters: int = 2000
    batch: int = 32
    seq: int = 64
    lr: float = 3e-3
    clip: float = 1.0
    seed: int = 0
    log_every: int = 100
    eval_every: int = 0  # validation bpc every so many iterations (0: only at the end)


@dataclass
class PruneConfig:
    """How a run prunes: ``method`` in dense, wp, bp, gl, glp, keep.

    The schedule is placed by fractions of ``TrainConfig.iters`` (pruning from
    ``start`` to ``end``, slope change at ``ramp``, masks updated ``updates``
    times); the remaining iterations fine-tune the pruned model. BP/WP/GLP use
    :class:`NarangSL` in target mode (in paper mode with ``percentile``); GL trains with λ_g all along and prunes once,
    at ``end``, to ``target`` by block RMS (∝ L2 norm), driven by ``torch.ao``'s own
    ``LambdaSL``; GLP is BP plus a small λ_g. ``keep`` (gated cells): no weight is pruned; the
    selection keeps every tile at first and its keep falls to the model's along ``CubicSL`` from
    ``start`` to ``end`` (:class:`~.keep_schedule.DynamicKeepSparsifier`).
    """

    method: str = "dense"
    block: tuple[int, int] = (4, 4)
    reduction: str = "max"
    target: float = 0.9
    lam: float = 0.0
    start: float = 0.1
    ramp: float = 0.35
    end: float = 0.6
    updates: int = 60
    prune_linear: bool = True
    percentile: float | None = None  # set: the paper's fixed θ from this quantile; the threshold alone decides
    schedule: str = "narang"  # or "cubic": torch.ao's CubicSL (Zhu & Gupta) sets sparsity_level over the window

    def itrs(self, iters: int) -> tuple[int, int, int, int]:
        """(start_itr, ramp_itr, end_itr, freq) for a run of ``iters`` iterations."""
        s, r, e = int(self.start * iters), int(self.ramp * iters), int(self.end * iters)
        return s, r, e, max(1, (e - s) // self.updates)


class StepAt:
    """``LambdaSL`` factor: 0 before sparsifier step ``itr``, then 1 (picklable, unlike a lambda)."""

    def __init__(self, itr: int) -> None:
        self.itr = itr

    def __call__(self, last_epoch: int) -> float:
        return float(last_epoch + 1 >= self.itr)  # scheduler epoch e prepares sparsifier step e + 1


def make_pruner(model: nn.Module, prune: PruneConfig, iters: int) -> tuple[BlockPruner | None, Any]:
    """The sparsifier and ``torch.ao``-style scheduler of a run (``None, None`` when dense)."""
    if prune.method == "dense":
        return None, None
    s, r, e, f = prune.itrs(iters)
    if prune.method == "keep":  # the gated layers' selection, from every tile kept to their keep
        ks = DynamicKeepSparsifier()
        ks.prepare(model, None)
        return ks, CubicSL(ks, init_sl=0.0, init_t=s, delta_t=1, total_t=e - s, initially_zero=True)
    config = make_config(model, linear=prune.prune_linear, exclude=() if prune.prune_linear else ("proj",))
    if prune.method == "gl":
        sp = BlockPruner(prune.target, prune.block, "rms")
        sp.prepare(model, config)
        return sp, LambdaSL(sp, StepAt(e))
    sp = BlockPruner(prune.target if prune.percentile is None else 1.0, prune.block, prune.reduction)
    sp.prepare(model, config)
    if prune.schedule == "cubic":  # sparsity 0 → target along 1 − (1 − t)³ from start to end, masks every step
        return sp, CubicSL(sp, init_sl=0.0, init_t=s, delta_t=1, total_t=e - s, initially_zero=True)
    if prune.schedule != "narang":
        raise ValueError(f"unknown pruning schedule {prune.schedule!r} (narang, cubic)")
    return sp, NarangSL(sp, s, r, e, f, percentile=prune.percentile)


def bits_per_char(model: CharLM, ids: torch.Tensor, streams: int = 16, chunk: int = 256) -> float:
    """Validation bpc: ``streams`` contiguous pieces of ``ids`` read in chunks, state carried."""
    was_training = model.training
    model.eval()
    n = len(ids) // streams
    data = ids[: n * streams].view(streams, n)
    total, state = 0.0, None
    with torch.no_grad():
        for i in range(0, n - 1, chunk):
            x, y = data[:, i : min(i + chunk, n - 1)], data[:, i + 1 : min(i + chunk, n - 1) + 1]
            logits, state = model(x, state, return_state=True)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (streams * (n - 1)) / math.log(2)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(int((p != 0).sum()) for p in ps)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


def train(
    model: CharLM,
    corpus: Corpus,
    cfg: TrainConfig,
    prune: PruneConfig | None = None,
    tag: str = "",
    ckpt: Path | None = None,
    ckpt_every: int = 200,
) -> tuple[dict[str, Any], BlockPruner | None]:
    """Train (and prune) ``model``; returns a result record and the squashed pruner.

    Order per iteration as in ``torch.ao``: ``opt.step(); sparsifier.step();
    scheduler.step()``. With ``ckpt``, the whole state (model, optimizer, LR
    schedule, sparsifier, pruning scheduler, data RNG, curves) is saved there every
    ``ckpt_every`` iterations and training resumes from it, bit-for-bit the same
    batches. Progress goes to stderr every ``log_every`` steps.
    """
    prune = prune or PruneConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters, eta_min=cfg.lr * 0.05)
    pruner, psched = make_pruner(model, prune, cfg.iters)
    gl_weights = [getattr(g["module"], g["tensor_name"]) for g in pruner.groups] \
        if pruner is not None and prune.method in ("gl", "glp") and prune.lam > 0 else []
    done, window, curve, wall = 0, [], [], 0.0
    if ckpt is not None and ckpt.exists():
        st = torch.load(ckpt, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        gen.set_state(st["gen"])
        torch.set_rng_state(st["rng"])
        if pruner is not None:
            pruner.load_state_dict(st["pruner"])
            psched.load_state_dict(st["psched"])
        done, window, curve, wall = st["itr"], st["window"], st["curve"], st["wall"]
        print(f"[{tag}] resumed at itr {done}/{cfg.iters} from {ckpt}", file=sys.stderr, flush=True)
    t0 = time.time() - wall
    model.train()
    for itr in range(done + 1, cfg.iters + 1):
        starts = torch.randint(0, len(corpus.train) - cfg.seq - 1, (cfg.batch,), generator=gen)
        batch = corpus.train[starts[:, None] + torch.arange(cfg.seq + 1)]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        total = loss + group_lasso_penalty(gl_weights, prune.block, prune.lam) if gl_weights else loss
        opt.zero_grad(set_to_none=True)
        total.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        opt.step()
        sched.step()
        if pruner is not None:
            pruner.step()
            psched.step()
        window.append(loss.item())
        if itr % cfg.log_every == 0 or itr == cfg.iters:
            sp = pruner.overall_sparsity() if pruner else 0.0
            tr = sum(window) / len(window) / math.log(2)
            window = []
            evaluate = itr == cfg.iters or (cfg.eval_every and itr % cfg.eval_every == 0)
            val = bits_per_char(model, corpus.val) if evaluate else None
            curve.append((itr, tr, sp, val))
            el = time.time() - t0
            print(f"[{tag}] itr {itr}/{cfg.iters} train_bpc {tr:.3f}" + (f" val_bpc {val:.3f}" if val else "")
                  + f" sparsity {sp:.3f} {el:.0f}s ({el / itr:.3f} s/itr)", file=sys.stderr, flush=True)
        if ckpt is not None and (itr % ckpt_every == 0 or itr == cfg.iters):
            _save_atomic({"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
                          "gen": gen.get_state(), "rng": torch.get_rng_state(),
                          "pruner": pruner.state_dict() if pruner else None,
                          "psched": psched.state_dict() if psched else None,
                          "itr": itr, "window": window, "curve": curve, "wall": time.time() - t0}, ckpt)
    if pruner is not None:
        pruner.squash_mask()
    n_all, n_nz = count_params(model)
    vals = [v for *_, v in curve if v is not None]
    result = {
        "tag": tag,
        "method": prune.method,
        "block": list(prune.block),
        "reduction": prune.reduction,
        "hidden": model.rnn.hidden_size,
        "params": n_all,
        "nonzero_params": n_nz,
        "sparsity": pruner.overall_sparsity() if pruner else 0.0,
        "layer_sparsity": pruner.sparsity() if pruner else {},
        "val_bpc": vals[-1] if vals else bits_per_char(model, corpus.val),
        "train_curve": curve,
        "prune_history": {k: v["history"] for k, v in pruner.state.items()} if pruner else {},
        "wall_s": time.time() - t0,
        "train_config": asdict(cfg),
        "prune_config": asdict(prune),
    }
    return result, pruner


class _LogitsOnly(nn.Module):
    """Export wrapper: tokens → logits, zero initial state."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens)


def export_bundled(path: Path = BUNDLED, iters: int = 1800, threads: int = 1, seq: int = 50) -> dict[str, Any]:
    """Train, BP-prune (4×4, 90 %) and export the demo GRU LM with its JSON sidecar."""
    from .export import check_onnx, export_onnx

    torch.set_num_threads(threads)
    corpus = load_corpus()
    model = CharLM(len(corpus.vocab), emb=64, hidden=256, layers=2, cell="gru")
    cfg = TrainConfig(iters=iters, log_every=100)
    result, _ = train(model, corpus, cfg, PruneConfig("bp", (4, 4), "max", 0.9), tag="bundled")
    tokens = corpus.val[:seq].view(1, seq)
    wrapped = _LogitsOnly(model).eval()
    export_onnx(wrapped, (tokens,), path, ["tokens"], ["logits"])
    err = check_onnx(wrapped, path, {"tokens": tokens})
    meta = {
        "model": "char-level GRU LM: Embedding(V,64) -> GRU(64,256,2 layers) -> Linear(256,V)",
        "vocab": corpus.vocab,
        "inputs": {"tokens": ["int64", [1, seq]]},
        "outputs": {"logits": ["float32", [1, seq, len(corpus.vocab)]]},
        "pruning": "BP, 4x4 blocks, max-|w| reduction, target 90% on GRU and linear weights",
        "val_bpc": round(result["val_bpc"], 4),
        "sparsity": {k: round(v, 4) for k, v in result["layer_sparsity"].items()},
        "overall_sparsity": round(result["sparsity"], 4),
        "params": result["params"],
        "nonzero_params": result["nonzero_params"],
        "onnx_vs_torch_max_abs_err": err,
        "corpus": f"pydoc_data.topics of Python {platform.python_version()} (sha256 {corpus.sha256}), last 10% = val",
        "train_config": result["train_config"],
        "train_wall_s": round(result["wall_s"], 1),
        "torch": torch.__version__,
        "command": f"python -m bscompile.models.charlm --export-bundled --iters {iters}",
    }
    path.with_suffix(".json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export-bundled", action="store_true", help="regenerate bscompile/data/char_gru_bp4x4.*")
    ap.add_argument("--out", type=Path, default=BUNDLED)
    ap.add_argument("--iters", type=int, default=1800)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if not args.export_bundled:
        ap.error("nothing to do (use --export-bundled, or python -m bscompile.models.reproduce)")
    meta = export_bundled(args.out, args.iters, args.threads)
    print(json.dumps({k: meta[k] for k in ("val_bpc", "overall_sparsity", "onnx_vs_torch_max_abs_err")}))


if __name__ == "__main__":
    main()
