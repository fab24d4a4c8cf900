"""Recurrent layers with input-dependent block selection (Hadifar et al. 2020, ``GatedLSTMCell``).

Per step both gate products of the cell are :class:`~.dynamic.DynamicBlockLinear` products:
``gates = ih(x_t) + hh(h_{t-1})`` with ``ih`` gated by ``g_ih = Linear(in -> (in/bs)*(G*H/bs))``
and ``hh`` by ``g_hh = Linear(H -> (H/bs)*(G*H/bs))`` (``G`` = 4 for LSTM, 3 for GRU), each
followed by ``Sparsify1D(keep)``; biases are never gated. The cell update is PyTorch's
(gate order i,f,g,o and r,z,n; the GRU's ``n = tanh(x_n + r * (W_hn h + b_hn))``), so with
every gate score equal (all tiles kept, ``r = 1``) the layers compute exactly ``nn.LSTM`` /
``nn.GRU`` with the same weights (:meth:`load_dense` copies them).

``ih`` depends on ``x_t`` only, so it runs for all steps at once before the time loop. The
loop itself has three exportable forms:

* eager / tracing (``torch.onnx.export(dynamo=False)`` on the module): a Python loop,
  unrolled to a fixed length;
* ``torch.jit.script``: the same loop becomes an ONNX ``Loop`` (symbolic length);
* ``time_loop="scan"``: ``torch._higher_order_ops.scan``, which the dynamo exporter
  (``torch.onnx.export(dynamo=True)``) writes as an ONNX ``Scan`` (symbolic length); with the
  Python loop the dynamo exporter unrolls and specialises the length.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from .dynamic import DynamicBlockLinear


class _Layer(nn.Module):
    """One layer: the two gated products of a cell with ``gates`` gates of ``hidden`` each."""

    def __init__(self, input_size: int, hidden_size: int, gates: int, block: int, keep: float) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.ih = DynamicBlockLinear(input_size, gates * hidden_size, block=block, keep=keep)
        self.hh = DynamicBlockLinear(hidden_size, gates * hidden_size, block=block, keep=keep)


    def gate(self, g: Tensor, i: int) -> Tensor:
        """Gate chunk ``i`` by a constant slice (``chunk`` traces to a Split of computed sizes,
        which TVM's ONNX importer cannot shape)."""
        return g[:, i * self.hidden_size : (i + 1) * self.hidden_size]


class _LSTMLayer(_Layer):
    def __init__(self, input_size: int, hidden_size: int, block: int, keep: float) -> None:
        super().__init__(input_size, hidden_size, 4, block, keep)

    def cell(self, xi: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor]:
        s = xi + self.hh(h)
        i, f, g, o = self.gate(s, 0), self.gate(s, 1), self.gate(s, 2), self.gate(s, 3)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    def forward(self, x: Tensor, h: Tensor, c: Tensor, scan: bool) -> Tuple[Tensor, Tensor, Tensor]:
        xi = self.ih(x)  # [T, B, 4H]: every step's input product at once
        if scan:
            return self._scan(xi, h, c)
        outs: List[Tensor] = []
        for t in range(xi.size(0)):
            h, c = self.cell(xi[t], h, c)
            outs.append(h)
        return torch.stack(outs), h, c

    @torch.jit.unused
    def _scan(self, xi: Tensor, h: Tensor, c: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        from torch._higher_order_ops.scan import scan

        def step(carry, x_t):
            h, c = self.cell(x_t, *carry)
            return (h, c), h.clone()  # scan forbids an output aliasing the carry

        (h, c), out = scan(step, (h.clone(), c.clone()), xi)  # nor a carry aliasing an input
        return out, h, c


class _GRULayer(_Layer):
    def __init__(self, input_size: int, hidden_size: int, block: int, keep: float) -> None:
        super().__init__(input_size, hidden_size, 3, block, keep)

    def cell(self, xi: Tensor, h: Tensor) -> Tensor:
        hh = self.hh(h)
        r = torch.sigmoid(self.gate(xi, 0) + self.gate(hh, 0))
        z = torch.sigmoid(self.gate(xi, 1) + self.gate(hh, 1))
        n = torch.tanh(self.gate(xi, 2) + r * self.gate(hh, 2))
        return (1 - z) * n + z * h

    def forward(self, x: Tensor, h: Tensor, scan: bool) -> Tuple[Tensor, Tensor]:
        xi = self.ih(x)
        if scan:
            return self._scan(xi, h)
        outs: List[Tensor] = []
        for t in range(xi.size(0)):
            h = self.cell(xi[t], h)
            outs.append(h)
        return torch.stack(outs), h

    @torch.jit.unused
    def _scan(self, xi: Tensor, h: Tensor) -> Tuple[Tensor, Tensor]:
        from torch._higher_order_ops.scan import scan

        def step(h, x_t):
            h = self.cell(x_t, h)
            return h, h.clone()

        h, out = scan(step, h.clone(), xi)  # nor a carry aliasing an input
        return out, h


class _DynamicBlockRNN(nn.Module):
    MODE = ""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False,
                 block: int = 128, keep: float = 0.5, time_loop: str = "python") -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if time_loop not in ("python", "scan"):
            raise ValueError(f"time_loop must be 'python' or 'scan', got {time_loop!r}")
        layer = _LSTMLayer if self.MODE == "LSTM" else _GRULayer
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.block, self.keep = batch_first, block, keep
        self.scan = time_loop == "scan"
        self.layers = nn.ModuleList(
            [layer(input_size if i == 0 else hidden_size, hidden_size, block, keep) for i in range(num_layers)])

    def _zeros(self, x: Tensor) -> Tensor:
        return x.new_zeros(self.num_layers, x.size(1), self.hidden_size)

    @torch.no_grad()
    def load_dense(self, rnn: nn.Module) -> None:
        """Copy the weights of a unidirectional ``nn.LSTM`` / ``nn.GRU`` of the same shape (the gates keep theirs)."""
        for i, layer in enumerate(self.layers):
            layer.ih.weight.copy_(getattr(rnn, f"weight_ih_l{i}"))
            layer.hh.weight.copy_(getattr(rnn, f"weight_hh_l{i}"))
            layer.ih.bias.copy_(getattr(rnn, f"bias_ih_l{i}"))
            layer.hh.bias.copy_(getattr(rnn, f"bias_hh_l{i}"))

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, block={self.block}, keep={self.keep}, scan={self.scan}")


class DynamicBlockLSTM(_DynamicBlockRNN):
    """``nn.LSTM`` (unidirectional, no dropout) with both gate products block-gated per step.

    ``forward(x, hx=None) -> (output, (h_n, c_n))`` exactly as ``nn.LSTM``."""

    MODE = "LSTM"

    def forward(self, x: Tensor, hx: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor, Tuple[Tensor, Tensor]]:
        if self.batch_first:
            x = x.transpose(0, 1)
        if hx is None:
            h0, c0 = self._zeros(x), self._zeros(x)
        else:
            h0, c0 = hx
        hs: List[Tensor] = []
        cs: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, h, c = layer(x, h0[i], c0[i], self.scan)
            hs.append(h)
            cs.append(c)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, (torch.stack(hs), torch.stack(cs))


class DynamicBlockGRU(_DynamicBlockRNN):
    """``nn.GRU`` (unidirectional, no dropout) with both gate products block-gated per step.

    ``forward(x, hx=None) -> (output, h_n)`` exactly as ``nn.GRU``."""

    MODE = "GRU"

    def forward(self, x: Tensor, hx: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.batch_first:
            x = x.transpose(0, 1)
        h0 = self._zeros(x) if hx is None else hx
        hs: List[Tensor] = []
        for i, layer in enumerate(self.layers):
            x, h = layer(x, h0[i], self.scan)
            hs.append(h)
        if self.batch_first:
            x = x.transpose(0, 1)
        return x, torch.stack(hs)
