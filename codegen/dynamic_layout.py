"""Input-dependent block selection (Hadifar et al. 2020): reference semantics and packing.

A dynamic weight site computes, per example ``b`` (``W[out, in]`` in the compiler's
``y = x @ W.T`` convention, tiles of ``bs x bs``, ``nbi = in/bs``, ``nbo = out/bs``,
``N = nbi * nbo``, gate index ``n = ib * nbo + ob``):

- ``g = x @ Wg.T + bg`` (``Wg[N, in]``): one score per tile;
- ``kth`` = the k-th largest score of the row, ``mask = g >= kth``; tiles a static
  block mask prunes are never selected (their score counts as ``-inf``);
- ``r = g * mask``, ``r = r / (sum(r) / n_alive)`` (``n_alive = N`` without a static mask);
- ``y[b, o] = sum_i x[b, i] * W[o, i] * r[b, i // bs, o // bs] + bias[o]``.

Ties: every score equal to the k-th value is kept, so a row may keep more than ``k``
tiles. That is what onnxruntime computes for ``TopK(k, sorted=1)`` -> k-th value ->
``GreaterOrEqual``, whichever of the tied elements its TopK returns. ``-0.0`` and
``0.0`` compare equal, as in IEEE; NaN scores are never selected (``NaN >= kth`` is
false), and a NaN k-th value selects nothing.

This module is NumPy only: it is what the kernels are tested against and how a
dynamic site's constants are packed for them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Gate scores computed per vector tile of the gate product (two AVX2 / one AVX-512 vector).
GATE_ROWS = 16


def keep_count(keep: float, n_alive: int) -> int:
    """``k = ceil(keep * n_alive)``, at least 1; the formula of the authors' ``Sparsify1D``
    (so ``keep`` values like 0.3 round exactly as PyTorch's module does)."""
    if not 0.0 < keep <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return max(1, min(n_alive, int(math.ceil(keep * n_alive))))


@dataclass(frozen=True)
class DynamicShape:
    """The constants a dynamic site is compiled for (everything but the weights)."""

    in_features: int
    out_features: int
    block: int
    k: int

    def __post_init__(self) -> None:
        if self.block <= 0 or self.in_features % self.block or self.out_features % self.block:
            raise ValueError(f"block {self.block} must divide in_features {self.in_features} "
                             f"and out_features {self.out_features}")
        if not 1 <= self.k <= self.num_tiles:
            raise ValueError(f"k = {self.k} must be in [1, N = {self.num_tiles}]")

    @property
    def nbi(self) -> int:
        return self.in_features // self.block

    @property
    def nbo(self) -> int:
        return self.out_features // self.block

    @property
    def num_tiles(self) -> int:
        return self.nbi * self.nbo

    def compute_fraction(self, n_selected: float | None = None) -> float:
        """Multiply-adds relative to the dense product: selected tiles plus the gate."""
        sel = self.k if n_selected is None else n_selected
        return sel / self.num_tiles + self.in_features * self.num_tiles / (self.in_features * self.out_features)


def kth_largest(g: np.ndarray, k: int) -> np.ndarray:
    """The k-th largest value of each row of ``g[B, N]`` in O(N) (introselect), shape ``[B]``."""
    n = g.shape[-1]
    return np.partition(g, n - k, axis=-1)[..., n - k]


def select(g: np.ndarray, k: int, alive: np.ndarray | None = None) -> np.ndarray:
    """``mask[B, N]``: scores at least the row's k-th largest (ties keep more than k).

    ``alive[N]`` (bool, optional) is the static block mask: pruned tiles score ``-inf``."""
    g = np.asarray(g, np.float32)
    gs = g if alive is None else np.where(alive, g, np.float32(-np.inf))
    kth = kth_largest(gs, k)
    return gs >= kth[..., None]


def gate_scale(g: np.ndarray, mask: np.ndarray, n_alive: int) -> np.ndarray:
    """``r = g * mask / (sum(g * mask) / n_alive)`` per row, float32 like the exported graph."""
    r = np.where(mask, np.asarray(g, np.float32), np.float32(0))
    s = r.sum(axis=-1, keepdims=True, dtype=np.float32) / np.float32(n_alive)
    return (r / s).astype(np.float32)


def dynamic_linear(x: np.ndarray, w: np.ndarray, gate_w: np.ndarray, gate_b: np.ndarray,
                   bias: np.ndarray | None, block: int, k: int,
                   alive: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Reference forward pass: ``(y[B, out], r[B, N])``.

    ``w[out, in]``, ``gate_w[N, in]``, ``gate_b[N]``, ``alive[N]`` (or ``None``). The tile
    products are summed in float64, so this is the exact value the kernels approximate."""
    x = np.asarray(x, np.float32)
    out_f, in_f = w.shape
    shp = DynamicShape(in_f, out_f, block, k)
    g = (x @ np.asarray(gate_w, np.float32).T + gate_b).astype(np.float32)
    mask = select(g, k, alive)
    n_alive = shp.num_tiles if alive is None else int(np.count_nonzero(alive))
    r = gate_scale(g, mask, n_alive)
    # partial[b, ib, ob, q] = sum_p x[b, ib*bs + p] * W[ob*bs + q, ib*bs + p]
    xb = x.astype(np.float64).reshape(-1, shp.nbi, block)
    wb = np.asarray(w, np.float64).reshape(shp.nbo, block, shp.nbi, block)
    partial = np.einsum("bip,oqip->bioq", xb, wb)
    y = np.einsum("bioq,bio->boq", partial, r.reshape(-1, shp.nbi, shp.nbo).astype(np.float64))
    y = y.reshape(-1, out_f)
    if bias is not None:
        y = y + bias
    return y.astype(np.float32), r


def pack_tiles(w: np.ndarray, block: int, panel: int | None = None) -> np.ndarray:
    """``W[out, in]`` -> ``tiles[nbo, nbi, bs_in, bs_out]``, or with ``panel < bs``
    ``tiles[nbo, nbi, bs / panel, bs_in, panel]`` (float32, C-contiguous).

    ``tiles[ob, ib, p, q] = W[ob*bs + q, ib*bs + p]`` and with panels
    ``tiles[ob, ib, c, p, q] = W[ob*bs + c*panel + q, ib*bs + p]``: the tiles of one output
    block are adjacent (an output-stationary kernel streams them in order of ``ib``), and
    inside a tile the output rows are innermost, the axis the kernels vectorise (like the
    ``[c, r]`` blocks of :class:`BSRMatrix`). Panels let a kernel that keeps ``panel``
    outputs of several batch rows in registers walk contiguous memory, one panel after
    the other, instead of strided slices of whole tile rows."""
    out_f, in_f = w.shape
    panel = block if panel is None else panel
    if block % panel:
        raise ValueError(f"panel {panel} must divide the block {block}")
    nbo, nbi = out_f // block, in_f // block
    t = np.asarray(w, np.float32).reshape(nbo, block // panel, panel, nbi, block).transpose(0, 3, 1, 4, 2)
    if panel == block:
        t = t[:, :, 0]
    return np.ascontiguousarray(t)


def unpack_tiles(tiles: np.ndarray) -> np.ndarray:
    """Inverse of :func:`pack_tiles`."""
    if tiles.ndim == 4:
        tiles = tiles[:, :, None]
    nbo, nbi, npan, bs, panel = tiles.shape
    return np.ascontiguousarray(tiles.transpose(0, 2, 4, 1, 3).reshape(nbo * npan * panel, nbi * bs))


def pack_gate(gate_w: np.ndarray) -> np.ndarray:
    """``Wg[N, in]`` -> ``[ceil(N/GATE_ROWS), in, GATE_ROWS]`` (zero-padded rows): each
    group of ``GATE_ROWS`` scores is one vector accumulator walking ``in`` contiguously."""
    n, in_f = gate_w.shape
    n_pad = -(-n // GATE_ROWS) * GATE_ROWS
    g = np.zeros((n_pad, in_f), np.float32)
    g[:n] = gate_w
    return np.ascontiguousarray(g.reshape(n_pad // GATE_ROWS, GATE_ROWS, in_f).transpose(0, 2, 1))


def pad_gate_bias(gate_b: np.ndarray, alive: np.ndarray | None = None) -> np.ndarray:
    """Gate bias padded to the packed gate, ``-inf`` on statically pruned tiles and padding.

    Folding the static mask into the bias makes a pruned tile's score ``-inf``, so the
    kernel's selection never picks it and needs no mask of its own."""
    n = gate_b.shape[0]
    n_pad = -(-n // GATE_ROWS) * GATE_ROWS
    out = np.full(n_pad, -np.inf, np.float32)
    out[:n] = gate_b if alive is None else np.where(alive, gate_b, np.float32(-np.inf))
    return out


def tile_panel(schedules) -> int | None:
    """The panel width the tiles are packed in for kernels running ``schedules`` (one per m
    bucket): the narrowest register tile (``rows_tile``, divided by the schedule's
    ``streams``), so every schedule's register tile is a whole number of adjacent panels;
    None (whole tiles) for schedules without one."""
    widths = [s.rows_tile // getattr(s, "streams", 1) for s in schedules if getattr(s, "rows_tile", None)]
    return min(widths) if widths else None
