"""ONNX's own backend test cases for GRU, LSTM, RNN, Gemm and MatMul, through bscompile."""

import numpy as np
import pytest
from onnx.backend.test.case.node import collect_testcases

import bscompile

OPS = {"GRU", "LSTM", "RNN", "Gemm", "MatMul"}
CASES = [c for c in collect_testcases() if c.model is not None
         and {n.op_type for n in c.model.graph.node} <= OPS | {"Constant"}
         and {n.op_type for n in c.model.graph.node} & OPS]


def test_cases_were_collected():
    names = {c.name for c in CASES}
    for expected in ("test_gru_defaults", "test_lstm_with_peepholes", "test_simple_rnn_defaults",
                     "test_gemm_all_attributes", "test_matmul_2d", "test_gru_seq_length"):
        assert expected in names


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_backend_case(case):
    mod = bscompile.compile(case.model).load()
    for inputs, expected in case.data_sets:
        feeds = dict(zip([s.name for s in mod.inputs], inputs))
        outs = list(mod.run(feeds).values())
        assert len(outs) == len(expected)
        for got, want in zip(outs, expected):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
