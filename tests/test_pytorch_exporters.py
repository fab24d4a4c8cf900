"""Recurrent layers exported by both PyTorch exporters compile and match PyTorch itself."""

import io

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch", reason="torch is in the 'test' extra")

import bscompile  # noqa: E402


def _export(module, x, dynamo: bool) -> onnx.ModelProto:
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (in the 'test' extra)")
        return torch.onnx.export(module, (x,), dynamo=True).model_proto
    buf = io.BytesIO()
    torch.onnx.export(module, (x,), buf, dynamo=False, input_names=["input"], output_names=["y", "h"])
    return onnx.load_from_string(buf.getvalue())


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("cls", ["GRU", "LSTM", "RNN"])
def test_exported_recurrent_matches_pytorch(cls, dynamo, rng):
    torch.manual_seed(int(rng.integers(2**31)))
    m = getattr(torch.nn, cls)(12, 24, num_layers=2, bidirectional=True, batch_first=True).eval()
    with torch.no_grad():  # block-prune the recurrent weights so the sparse kernels run
        for name, p in m.named_parameters():
            if name.startswith("weight_hh"):
                keep = (torch.rand(p.shape[0] // 4, p.shape[1] // 4) < 0.3).repeat_interleave(4, 0).repeat_interleave(4, 1)
                p.mul_(keep)
    x = torch.randn(3, 7, 12)
    model = _export(m, x, dynamo)
    mod = bscompile.compile(model).load()
    got = mod.run({mod.inputs[0].name: x.numpy()})
    y, state = m(x)
    want = [y, *(state if isinstance(state, tuple) else (state,))]  # y, h (, c)
    assert len(got) == len(want), [o.name for o in mod.outputs]
    for spec, ref in zip(mod.outputs, want):
        np.testing.assert_allclose(got[spec.name], ref.detach().numpy(), rtol=1e-4, atol=1e-5, err_msg=spec.name)
