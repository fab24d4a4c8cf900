"""A DeepSpeech-2-like acoustic model shape for compiler benchmarks at the papers' sizes.

Conv front end over spectrogram frames → bidirectional recurrent layers → fully
connected layers to the characters, as in the models of the block-sparse RNN
paper (hidden 704, 1760, 2560, 3072 for RNN; 2560, 3584 for GRU). Weights are
random: use :func:`bscompile.models.sparsifier.prune_once` to prune to a target.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

PAPER_HIDDEN = (704, 1760, 2560, 3072)


@dataclass
class DeepSpeechConfig:
    """Shape of the model; defaults are small enough for a test, set ``hidden`` for benchmarks."""

    hidden: int = 704
    cell: str = "gru"  # gru, lstm or rnn
    layers: int = 3
    features: int = 161  # spectrogram bins
    conv_channels: int = 256
    conv_kernel: int = 11
    conv_stride: int = 2
    vocab: int = 29  # a-z, space, apostrophe, CTC blank


class DeepSpeech(nn.Module):
    """features [B, T, F] → log-probabilities [B, T', vocab] (T' = T / conv_stride)."""

    def __init__(self, cfg: DeepSpeechConfig = DeepSpeechConfig()) -> None:
        super().__init__()
        self.cfg = cfg
        rnn = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cfg.cell]
        self.conv = nn.Conv1d(cfg.features, cfg.conv_channels, cfg.conv_kernel, cfg.conv_stride, cfg.conv_kernel // 2)
        self.rnn = rnn(cfg.conv_channels, cfg.hidden, cfg.layers, batch_first=True, bidirectional=True)
        self.fc = nn.Linear(2 * cfg.hidden, cfg.hidden)
        self.out = nn.Linear(cfg.hidden, cfg.vocab)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(features.transpose(1, 2))).transpose(1, 2)
        x, _ = self.rnn(x)
        return torch.log_softmax(self.out(torch.relu(self.fc(x))), dim=-1)


def export_pruned(
    path: str | Path,
    cfg: DeepSpeechConfig,
    sparsity: float = 0.9,
    block: tuple[int, int] = (4, 4),
    frames: int = 100,
    batch: int = 1,
    seed: int = 0,
    atol: float = 1e-4,
) -> dict[str, float]:
    """Random-weight model, one-shot BP to ``sparsity`` (RNN and FC weights), ONNX checked.

    Static input ``features`` [batch, frames, F]; returns per-weight sparsity and the
    max |PyTorch − onnxruntime| (``atol`` is looser than the tests' 1e-5 because
    sums over thousands of inputs round differently).
    """
    from .export import check_onnx, export_onnx
    from .sparsifier import make_config, prune_once

    torch.manual_seed(seed)
    model = DeepSpeech(cfg).eval()
    pruner = prune_once(model, sparsity, block, config=make_config(model, exclude=("out",)))
    feats = torch.randn(batch, frames, cfg.features)
    export_onnx(model, (feats,), path, ["features"], ["logprobs"])
    return {**pruner.sparsity(), "max_abs_err": check_onnx(model, path, {"features": feats}, atol=atol)}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Export a block-pruned DeepSpeech-like model to ONNX")
    ap.add_argument("out", type=Path)
    ap.add_argument("--hidden", type=int, default=1760, help=f"paper sizes: {PAPER_HIDDEN}")
    ap.add_argument("--cell", choices=("gru", "lstm", "rnn"), default="rnn")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--block", type=int, nargs=2, default=(4, 4), metavar=("R", "C"))
    ap.add_argument("--frames", type=int, default=100)
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args(argv)
    cfg = DeepSpeechConfig(hidden=a.hidden, cell=a.cell, layers=a.layers)
    print(export_pruned(a.out, cfg, a.sparsity, tuple(a.block), a.frames, a.batch))


if __name__ == "__main__":
    main()
