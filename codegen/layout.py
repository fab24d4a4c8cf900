"""Block layouts of weight matrices and the sparsity statistics the cost model reads.

Every weight is normalised to the ``W[N, K]`` convention (output features x input
features, ``y = x @ W.T``), so one kernel family serves MatMul, Gemm and the W / R
inputs of ONNX recurrent ops.

A dense matrix is stored in the same structure as a block-sparse one: a BSR matrix
whose blocks are ``r`` rows by the full (padded) width. One kernel generator thus
covers dense and sparse weights, and "bscompile's own dense path" is the very same
code with every block present.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Rows per block of the dense layout (two AVX2 vectors): one constant, because every
#: stage that packs or decodes a dense weight site must agree on it.
DENSE_ROWS = 16

#: Block edge lengths the analysis considers (rows and columns independently).
CANDIDATE_EDGES: tuple[int, ...] = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True)
class BlockShape:
    """An r x c block: r output rows by c input columns."""

    r: int
    c: int

    def __str__(self) -> str:
        return f"{self.r}x{self.c}"

    @classmethod
    def parse(cls, text: str) -> "BlockShape":
        r, c = (int(v) for v in text.lower().split("x"))  # ValueError unless "RxC"
        if r < 1 or c < 1:
            raise ValueError(f"block shape {text!r} has an empty side")
        return cls(r, c)


@dataclass(frozen=True)
class BlockStats:
    """Occupancy of one block shape over one matrix."""

    block: BlockShape
    nnz_blocks: int
    total_blocks: int
    padded_shape: tuple[int, int]

    @property
    def block_density(self) -> float:
        return self.nnz_blocks / max(self.total_blocks, 1)


def padded(n: int, b: int) -> int:
    return -(-n // b) * b


def _pad_to(w: np.ndarray, n_pad: int, k_pad: int) -> np.ndarray:
    n, k = w.shape
    if (n, k) == (n_pad, k_pad):
        return w
    return np.pad(w, ((0, n_pad - n), (0, k_pad - k)))


def all_block_stats(w: np.ndarray, edges: tuple[int, ...] = CANDIDATE_EDGES) -> list[BlockStats]:
    """:func:`block_stats` for every ``r x c`` in ``edges x edges`` (powers of two).

    Occupancy grids are built hierarchically: the grid of ``2r x c`` blocks ORs pairs
    of rows of the ``r x c`` grid, so the whole sweep costs about two passes over
    the matrix instead of one per shape.
    """
    n, k = w.shape
    top = max(edges)
    nz = _pad_to(w != 0, padded(n, top), padded(k, top))
    out = []
    col_grid = nz
    c = 1
    while c <= top:
        grid = col_grid
        r = 1
        while r <= top:
            if r in edges and c in edges:
                rows, cols = -(-n // r), -(-k // c)
                out.append(BlockStats(BlockShape(r, c), int(grid[:rows, :cols].sum()), rows * cols,
                                      (rows * r, cols * c)))
            grid = grid[0::2] | grid[1::2] if r < top else grid  # (an elementwise OR: .any(axis) is ~10x slower)
            r *= 2
        col_grid = col_grid[:, 0::2] | col_grid[:, 1::2] if c < top else col_grid
        c *= 2
    order = {(r, c): i for i, (r, c) in enumerate((r, c) for r in edges for c in edges)}
    return sorted(out, key=lambda st: order[(st.block.r, st.block.c)])


def block_stats(w: np.ndarray, block: BlockShape) -> BlockStats:
    """Count the blocks of ``block`` shape that hold at least one non-zero."""
    n, k = w.shape
    n_pad, k_pad = padded(n, block.r), padded(k, block.c)
    nz = _pad_to(w != 0, n_pad, k_pad)
    occupied = nz.reshape(n_pad // block.r, block.r, k_pad // block.c, block.c).any(axis=(1, 3))
    return BlockStats(block, int(occupied.sum()), occupied.size, (n_pad, k_pad))


@dataclass
class BSRMatrix:
    """A weight in block-sparse-row form, blocks stored transposed (``[nnzb, c, r]``).

    Blocks are stored column-major inside (``c`` rows of ``r`` values) so that the
    kernels' innermost loop runs over the ``r`` output rows of a block with unit
    stride: that is the axis they vectorise.
    """

    shape: tuple[int, int]  # logical (N, K), before padding
    block: BlockShape
    data: np.ndarray  # [nnzb, c, r] float32
    indices: np.ndarray  # [nnzb] int32, block-column index
    indptr: np.ndarray  # [n_pad / r + 1] int32

    @property
    def padded_shape(self) -> tuple[int, int]:
        return padded(self.shape[0], self.block.r), padded(self.shape[1], self.block.c)

    @property
    def num_block_rows(self) -> int:
        return self.padded_shape[0] // self.block.r

    @property
    def nnz_blocks(self) -> int:
        return int(self.indices.shape[0])

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.indices.nbytes + self.indptr.nbytes

    @classmethod
    def from_dense(cls, w: np.ndarray, block: BlockShape) -> "BSRMatrix":
        """Keep the blocks of ``w`` that hold a non-zero (zero-padded to the block grid)."""
        w = np.asarray(w, dtype=np.float32)
        r, c = block.r, block.c
        n_pad, k_pad = padded(w.shape[0], r), padded(w.shape[1], c)
        # As scipy's BSR of the dense matrix (blocks holding a non-zero, sorted by column),
        # without its COO/CSR detour, which costs ~5x more on a large weight.
        tiles = _pad_to(w, n_pad, k_pad).reshape(n_pad // r, r, k_pad // c, c)
        rows, cols = np.nonzero((tiles != 0).any(axis=(1, 3)))
        data = np.ascontiguousarray(tiles[rows, :, cols, :].transpose(0, 2, 1))  # [nnzb, c, r]
        indices = cols.astype(np.int32)
        indptr = np.searchsorted(rows, np.arange(n_pad // r + 1)).astype(np.int32)
        if data.shape[0] == 0:  # all-zero weight: keep one zero block so buffers are non-empty
            data = np.zeros((1, block.c, block.r), np.float32)
            indices = np.zeros(1, np.int32)
            indptr = np.zeros(n_pad // block.r + 1, np.int32)
        return cls((w.shape[0], w.shape[1]), block, data, indices, indptr)

    @classmethod
    def dense(cls, w: np.ndarray, rows_per_block: int) -> "BSRMatrix":
        """Every block present, each ``rows_per_block`` rows by the whole width."""
        w = np.asarray(w, dtype=np.float32)
        n, k = w.shape
        n_pad = padded(n, rows_per_block)
        nbr = n_pad // rows_per_block
        data = _pad_to(w, n_pad, k).reshape(nbr, rows_per_block, k).transpose(0, 2, 1)
        return cls(
            (n, k),
            BlockShape(rows_per_block, k),
            np.ascontiguousarray(data),
            np.zeros(nbr, np.int32),
            np.arange(nbr + 1, dtype=np.int32),
        )

    @property
    def stats(self) -> BlockStats:
        """This layout's block statistics, as the cost models and schedules read them."""
        nbr, nbc = self.num_block_rows, self.padded_shape[1] // self.block.c
        return BlockStats(self.block, self.nnz_blocks, nbr * nbc, self.padded_shape)

    def to_dense(self) -> np.ndarray:
        """The matrix ``[N, K]`` (blocks are stored ``[c, r]``: transposed for SciPy's BSR)."""
        import scipy.sparse  # (only tests and tools call this: no SciPy import for every compile)

        bsr = scipy.sparse.bsr_array((self.data.transpose(0, 2, 1), self.indices, self.indptr), shape=self.padded_shape)
        return bsr.toarray()[: self.shape[0], : self.shape[1]]


@dataclass(frozen=True)
class LayoutKey:
    """What a kernel depends on: everything of a layout but its block count and values, and for
    an "unrolled" kernel its sparsity pattern (``indptr``, ``indices`` bytes) too."""

    shape: tuple[int, int]
    block: BlockShape
    pattern: tuple[bytes, bytes] | None = None

    @classmethod
    def of(cls, mat: BSRMatrix, with_pattern: bool = False) -> "LayoutKey":
        pattern = (mat.indptr.astype(np.int32).tobytes(), mat.indices.astype(np.int32).tobytes()) \
            if with_pattern else None
        return cls(tuple(mat.shape), mat.block, pattern)

    @property
    def static_nnz(self) -> int | None:
        """The block count of a pattern's kernels, static; None: symbolic (any weight of the layout)."""
        return len(self.pattern[1]) // 4 if self.pattern else None

    def skeleton(self) -> BSRMatrix:
        """A stand-in matrix with this layout (block counts are symbolic in the kernels) or pattern."""
        n_pad, _ = (padded(self.shape[0], self.block.r), padded(self.shape[1], self.block.c))
        nbr = n_pad // self.block.r
        if self.pattern:
            indptr, indices = (np.frombuffer(b, np.int32) for b in self.pattern)
            return BSRMatrix(self.shape, self.block, np.zeros((len(indices), self.block.c, self.block.r), np.float32),
                             indices, indptr)
        return BSRMatrix(self.shape, self.block, np.zeros((1, self.block.c, self.block.r), np.float32),
                         np.zeros(1, np.int32), np.zeros(nbr + 1, np.int32))
