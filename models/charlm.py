"""Character-level language model on CPython's own documentation text.

The corpus is ``pydoc_data.topics`` — the reference-manual topics shipped with
every CPython, so training needs no download. Topics are joined in sorted key
order; the first 90 % of characters are training data, the last 10 % validation.
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

from .group_lasso import group_lasso_penalty, prunable_weights
from .schedule import PruneSchedule
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


def load_corpus(val_frac: float = 0.1) -> Corpus:
    """The pydoc topics text, split at a fixed character offset (no shuffling)."""
    from pydoc_data.topics import topics

    text = "".join(topics[k] for k in sorted(topics))
    vocab = "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index[ch] for ch in text], dtype=torch.long)
    cut = int(len(ids) * (1 - val_frac))
    return Corpus(vocab, ids[:cut], ids[cut:], hashlib.sha256(text.encode()).hexdigest()[:16])


class CharLM(nn.Module):
    """Embedding → multi-layer GRU/LSTM → linear to the vocabulary."""

    def __init__(self, vocab: int, emb: int = 64, hidden: int = 256, layers: int = 2, cell: str = "gru") -> None:
        super().__init__()
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.embed = nn.Embedding(vocab, emb)
        self.rnn = rnn(emb, hidden, layers, batch_first=True)
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


@dataclass
class PruneConfig:
    """How a run prunes: ``method`` in dense, wp, bp, gl, glp.

    The schedule is placed by fractions of ``TrainConfig.iters`` (pruning from
    ``start`` to ``end``, slope change at ``ramp``, masks updated ``updates``
    times); the remaining iterations fine-tune the pruned model. GL prunes once,
    at ``end``, to ``target`` by block L2 norm; GLP is BP plus a small λ_g.
    """

    method: str = "dense"
    block: tuple[int, int] = (4, 4)
    reduction: str = "max"
    target: float | None = 0.9
    lam: float = 0.0
    start: float = 0.1
    ramp: float = 0.35
    end: float = 0.6
    updates: int = 60
    prune_linear: bool = True

    def schedule(self, iters: int) -> PruneSchedule:
        if self.method == "gl":  # one-shot at end: the only update is at end_itr
            end = int(self.end * iters)
            return PruneSchedule(end - 1, end - 1, end, 1)
        s, r, e = int(self.start * iters), int(self.ramp * iters), int(self.end * iters)
        return PruneSchedule(s, r, e, max(1, (e - s) // self.updates))


def bits_per_char(model: CharLM, ids: torch.Tensor, streams: int = 16, chunk: int = 256) -> float:
    """Validation bpc: ``streams`` contiguous pieces of ``ids`` read in chunks, state carried."""
    model.eval()
    n = len(ids) // streams
    data = ids[: n * streams].view(streams, n)
    total, state = 0.0, None
    with torch.no_grad():
        for i in range(0, n - 1, chunk):
            x, y = data[:, i : min(i + chunk, n - 1)], data[:, i + 1 : min(i + chunk, n - 1) + 1]
            logits, state = model(x, state, return_state=True)
            total += nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train()
    return total / (streams * (n - 1)) / math.log(2)


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    ps = list(model.parameters())
    return sum(p.numel() for p in ps), sum(int((p != 0).sum()) for p in ps)


def train(
    model: CharLM, corpus: Corpus, cfg: TrainConfig, prune: PruneConfig | None = None, tag: str = ""
) -> tuple[dict[str, Any], BlockPruner | None]:
    """Train (and prune) ``model``; returns a result record and the squashed pruner.

    Pruning follows the usage of :class:`BlockPruner`: ``sparsifier.step()`` right
    after ``optimizer.step()``. Progress goes to stderr every ``log_every`` steps.
    """
    prune = prune or PruneConfig()
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, cfg.iters, eta_min=cfg.lr * 0.05)
    config = make_config(model, linear=prune.prune_linear, exclude=() if prune.prune_linear else ("proj",))
    pruner = None
    if prune.method != "dense":
        if prune.method != "gl" or prune.target is not None:
            reduction = "rms" if prune.method == "gl" else prune.reduction  # rms ∝ block L2 norm
            pruner = BlockPruner(prune.schedule(cfg.iters), prune.block, reduction, prune.target)
            pruner.prepare(model, config)
    gl_weights = prunable_weights(model, config) if prune.method in ("gl", "glp") and prune.lam > 0 else []
    t0, losses, curve = time.time(), [], []
    model.train()
    for itr in range(1, cfg.iters + 1):
        starts = torch.randint(0, len(corpus.train) - cfg.seq - 1, (cfg.batch,), generator=gen)
        idx = starts[:, None] + torch.arange(cfg.seq + 1)
        batch = corpus.train[idx]
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
        losses.append(loss.item())
        if itr % cfg.log_every == 0 or itr == cfg.iters:
            sp = pruner.overall_sparsity() if pruner else 0.0
            tr = sum(losses[-cfg.log_every :]) / len(losses[-cfg.log_every :]) / math.log(2)
            curve.append((itr, tr, sp))
            print(f"[{tag}] itr {itr}/{cfg.iters} train_bpc {tr:.3f} sparsity {sp:.3f} "
                  f"{time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    if pruner is not None:
        pruner.squash_mask()
    n_all, n_nz = count_params(model)
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
        "val_bpc": bits_per_char(model, corpus.val),
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
