"""Block-wise dynamic sparseness (Hadifar et al. 2020) as a PyTorch layer.

:class:`DynamicBlockLinear` is a Linear whose ``bs x bs`` weight tiles are switched on
per example by a cheap gate (the semantics are spelled out in
:mod:`bscompile.codegen.dynamic_layout`, which is the NumPy reference). Its forward
pass uses only ops that both ONNX exporters map to standard ONNX (``Gemm``/``MatMul``,
``TopK`` with a constant ``k`` and ``sorted=1``, ``Gather``/``Slice``,
``GreaterOrEqual``, ``Cast``, ``Mul``, ``ReduceSum``, ``Div``, ``Reshape``), in the
"threshold form" of the authors' ``Sparsify1D``: the k-th value of ``TopK`` is the
threshold, so ties keep more than ``k`` tiles.

The block-wise product is written as per-input-block partial products
``P[ib, b, ob, q] = x[b, ib, :] @ W_tile[ib, ob]`` (one batched MatMul over ``ib``)
scaled by ``r[b, ib, ob]`` and summed over ``ib``: onnxruntime computes every tile (the dense cost); the compiler's
kernels compute only the selected ones.
"""

from __future__ import annotations

import torch
from torch import nn

from bscompile.codegen.dynamic_layout import keep_count


class DynamicBlockLinear(nn.Module):
    """``y = x @ (W * expand(r(x))).T + bias`` with ``r`` the normalised top-k tile gates.

    ``weight`` is ``[out, in]`` like :class:`torch.nn.Linear` (so block pruners and
    state dicts treat it as one); the gate is ``gate = Linear(in, N)`` with
    ``N = (in / block) * (out / block)`` and gate index ``ib * (out / block) + ob``.
    A static block mask (:meth:`set_block_mask`) removes tiles for good: they score
    ``-inf`` in the selection, ``k`` and the normalisation count the remaining tiles
    only, and their weights are zeroed so the exported file shows them pruned.

    The normalisation divides by the mean of the kept raw (signed) gates. With few tiles
    dropped that mean can come near 0: at ``keep=1.0`` a char-LM GRU diverged from the first
    iterations and even its untrained outputs are dominated by float rounding
    (models/results/dynamic_rnn); the method is meant for ``keep`` well below 1.
    """

    def __init__(self, in_features: int, out_features: int, block: int = 128, keep: float = 0.5,
                 bias: bool = True) -> None:
        super().__init__()
        if block <= 0 or in_features % block or out_features % block:
            raise ValueError(f"block {block} must divide in_features {in_features} and out_features {out_features}")
        self.in_features, self.out_features, self.block, self.keep = in_features, out_features, block, keep
        self.nbi, self.nbo = in_features // block, out_features // block
        self.num_tiles = self.nbi * self.nbo
        keep_count(keep, self.num_tiles)  # validates keep
        lin = nn.Linear(in_features, out_features, bias=bias)  # nn.Linear's initialisation
        self.weight = lin.weight
        self.bias = lin.bias
        self.gate = nn.Linear(in_features, self.num_tiles)
        self.register_buffer("block_mask", None)
        self.n_alive = self.num_tiles  # a Python int, so exporters see a constant
        self.register_load_state_dict_post_hook(lambda mod, _keys: mod._count_alive())

    def _count_alive(self) -> None:
        self.n_alive = self.num_tiles if self.block_mask is None else int(self.block_mask.sum())

    @property
    def k(self) -> int:
        return keep_count(self.keep, self.n_alive)

    def set_block_mask(self, mask: torch.Tensor | None) -> None:
        """Static block mask ``[in/block, out/block]`` (True = tile kept), or ``None``."""
        if mask is None:
            self.block_mask = None
            self._count_alive()
            return
        mask = torch.as_tensor(mask, dtype=torch.bool)
        if mask.shape != (self.nbi, self.nbo):
            raise ValueError(f"block mask must be [{self.nbi}, {self.nbo}], got {list(mask.shape)}")
        if not mask.any():
            raise ValueError("a block mask must keep at least one tile")
        self.block_mask = mask.clone()
        self._count_alive()
        with torch.no_grad():  # weight[o, i] belongs to tile (i // bs, o // bs)
            full = mask.t().repeat_interleave(self.block, 0).repeat_interleave(self.block, 1)
            self.weight.mul_(full.to(self.weight.dtype))

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """``r[B, N]``: the normalised gates (zero on tiles not selected)."""
        g = self.gate(x)
        gs = g if self.block_mask is None else g.masked_fill(~self.block_mask.reshape(-1), float("-inf"))
        kth = torch.topk(gs, self.k, dim=-1, largest=True, sorted=True).values[..., self.k - 1 :]
        r = g * (gs >= kth).to(g.dtype)
        return r / (r.sum(dim=-1, keepdim=True) / self.n_alive)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        r = self.gates(x2).reshape(-1, self.nbi, self.nbo, 1).transpose(0, 1)  # [nbi, B, nbo, 1]
        # w3[ib, p, o] = weight[o, ib*bs + p]; one batched product per input block, batch
        # over ib (broadcasting over the examples would copy the weight once per example)
        w3 = self.weight.t().reshape(self.nbi, self.block, self.out_features)
        part = torch.matmul(x2.reshape(-1, self.nbi, self.block).transpose(0, 1), w3)  # [nbi, B, out]
        part = part.reshape(self.nbi, -1, self.nbo, self.block)
        y = (part * r).sum(dim=0).reshape(list(lead) + [self.out_features])  # TorchScript: no *lead
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}, "
                f"keep={self.keep}, k={self.k}, tiles={self.num_tiles}, bias={self.bias is not None}")
