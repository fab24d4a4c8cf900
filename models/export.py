"""ONNX export of (pruned) models and its check against onnxruntime.

We use the TorchScript exporter (``dynamo=False``): it turns ``nn.GRU`` /
``nn.LSTM`` / ``nn.RNN`` into the ONNX ``GRU`` / ``LSTM`` / ``RNN`` ops that the
bscompile frontend maps onto recurrent kernels (the dynamo exporter unrolls them).
PyTorch's GRU becomes ONNX GRU with ``linear_before_reset=1``; gates are
reordered (PyTorch r,z,n → ONNX z,r,h; PyTorch i,f,g,o → ONNX i,o,f,c), which
:func:`onnx_gate_order` undoes so masks can be compared with the file.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper
from torch import nn

#: Row order of the ONNX gates, as indices of PyTorch's gate chunks.
ONNX_GATES = {"GRU": [1, 0, 2], "LSTM": [0, 3, 1, 2], "RNN": [0]}


def export_onnx(
    model: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: str | Path,
    input_names: list[str],
    output_names: list[str],
    opset: int = 17,
    dynamic_axes: dict[str, dict[int, str]] | None = None,
) -> Path:
    """Write ``model`` (in eval mode) to ``path`` with recurrent layers as ONNX recurrent ops."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # batch_first / deprecation chatter of the TorchScript exporter
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            do_constant_folding=True,
            dynamic_axes=dynamic_axes,
        )
    onnx.checker.check_model(str(path))
    return path


def ort_session(path: str | Path, threads: int = 1) -> ort.InferenceSession:
    """onnxruntime's CPU provider with ``threads`` intra-op threads that do not spin when idle."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle spinning steals cores
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def run_onnx(path: str | Path, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Run the file on onnxruntime's CPU provider with one thread."""
    return ort_session(path).run(None, inputs)


def check_onnx(
    model: nn.Module, path: str | Path, inputs: dict[str, torch.Tensor], atol: float = 1e-5, rtol: float = 1e-5
) -> float:
    """Max |PyTorch − onnxruntime| over the first output; raises if above ``atol + rtol·max|output|``
    (float32 rounding grows with the outputs: a longer-trained model's logits are larger)."""
    model.eval()
    with torch.no_grad():
        ref = model(*inputs.values())
    ref = ref[0] if isinstance(ref, (tuple, list)) else ref
    got = run_onnx(path, {k: v.numpy() for k, v in inputs.items()})[0]
    err = float(np.abs(got - ref.numpy()).max())
    tol = atol + rtol * float(np.abs(ref.numpy()).max())
    if not err <= tol:
        raise AssertionError(f"ONNX output differs from PyTorch by {err:.3g} > {tol:.3g}")
    return err


def onnx_recurrent_weights(path: str | Path) -> list[dict[str, object]]:
    """``op``, ``W`` and ``R`` ([num_directions, gates·H, in]) of every recurrent node, in graph order."""
    model = onnx.load(str(path))
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out = []
    for node in model.graph.node:
        if node.op_type in ONNX_GATES:
            out.append({"op": node.op_type, "W": inits.get(node.input[1]), "R": inits.get(node.input[2])})
    return out


def onnx_gate_order(weight: torch.Tensor | np.ndarray, op: str) -> np.ndarray:
    """Reorder the gate chunks of a PyTorch RNN weight into the ONNX order of ``op``."""
    w = np.asarray(weight)
    chunks = np.split(w, len(ONNX_GATES[op]), axis=0)
    return np.concatenate([chunks[i] for i in ONNX_GATES[op]], axis=0)
