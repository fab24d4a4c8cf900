"""FuseDynamicRecurrences: the frontend's real loop over a gated GRU cell becomes one
``dynamic_recurrent`` site (Before/Expected), and the loops it must leave alone.

End-to-end numerics of fused loops (LSTM and GRU, Scan and Loop exports, 1/7/50 steps, 1-3 pool
threads) against onnxruntime are in test_dynamic_rnn.py."""

import copy

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

from bscompile.codegen.recurrent_cells import CellSpec
from bscompile.passes.fuse_dynamic_recurrences import FuseDynamicRecurrences
from bscompile.sites import fingerprint
from bscompile.target import resolve_target

CPU = resolve_target("x86_64").kernel_family()
H, BS = 4, 2  # hidden, tile: W_hh [3H, H] = [12, 4] in 2x2 tiles, N = 2 * 6 = 12 gate scores


def _weights(rng):
    return (rng.standard_normal((3 * H, H)).astype(np.float32), rng.standard_normal(3 * H).astype(np.float32),
            rng.standard_normal((12, H)).astype(np.float32), rng.standard_normal(12).astype(np.float32),
            np.ones(12, bool))


def _dyn_site(w) -> dict:
    return {"kind": "dynamic_linear", "name": "hh", "fingerprint": fingerprint(w), "m": 1, "shape": [3 * H, H],
            "block": BS, "tile": f"{BS}x{BS}", "k": 6, "n_alive": 12, "keep": 0.5, "compute_fraction": 1.5,
            "summary": "selects 6 of 12 2x2 tiles per row; 150% of the dense compute with the gate"}


def _before(rng, *, candidate_gate: str = "r", reversed_output: int = 0) -> tuple[tvm.IRModule, tuple]:
    """main(x[T, 1, 3H], h0[1, H]) running PyTorch's GRU cell (gate columns r, z, n) over a
    dynamic site in the frontend's loop functions. ``candidate_gate="z"`` multiplies the
    candidate's recurrent part by z instead of r: not a GRU."""
    w, b, wg, bg, alive = consts = _weights(rng)
    site = _dyn_site(w)
    loop_attr = {"reversed_outputs": [reversed_output]}

    @I.ir_module
    class Before:
        @T.prim_func(private=True)
        def write(buf_h: T.handle, t_h: T.handle, y_h: T.handle):
            n = T.int64()
            buf = T.match_buffer(buf_h, (n, 1, H), "float32")
            t = T.match_buffer(t_h, (), "int64")
            y = T.match_buffer(y_h, (1, H), "float32")
            if 0 <= t[()] and t[()] < n:
                for i in range(H):
                    buf[t[()], 0, i] = y[0, i]

        @R.function(private=True)
        def dynamic_site(a0: R.Tensor((1, H), "float32"), a1: R.Tensor((3 * H, H), "float32"),
                         a2: R.Tensor((3 * H,), "float32"), a3: R.Tensor((12, H), "float32"),
                         a4: R.Tensor((12,), "float32"), a5: R.Tensor((12,), "bool")) -> R.Tensor((1, 3 * H), "float32"):
            R.func_attr({"bscompile.site": site})
            return R.call_pure_packed("bscompile.site.dynamic_linear", a0, a1, a2, a3, a4, a5,
                                      ty_args=R.Tensor((1, 3 * H), "float32"))

        @R.function(private=True)
        def loop_step(t: R.Tensor((), "int64"), last: R.Tensor((), "int64"), s0: R.Tensor((1, H), "float32"),
                      x0: R.Tensor(("L", 1, 3 * H), "float32")) -> R.Tuple(R.Tensor((1, H), "float32"),
                                                                              R.Tensor((1, H), "float32")):
            cls = Before
            with R.dataflow():
                xt = R.take(x0, t, axis=0)
                hh = cls.dynamic_site(R.reshape(s0, R.shape([1, H])), R.const(w), R.const(b), R.const(wg),
                                      R.const(bg), R.const(alive))
                r = R.sigmoid(R.add(R.strided_slice(xt, [1], [0], [H]), R.strided_slice(hh, [1], [0], [H])))
                z = R.sigmoid(R.add(R.strided_slice(hh, [1], [H], [2 * H]), R.strided_slice(xt, [1], [H], [2 * H])))
                gate = r if candidate_gate == "r" else z
                n = R.tanh(R.add(R.strided_slice(xt, [1], [2 * H], [3 * H]),
                                 R.multiply(gate, R.strided_slice(hh, [1], [2 * H], [3 * H]))))
                h1 = R.add(R.multiply(R.subtract(R.const(1.0, "float32"), z), n), R.multiply(z, s0))
                out = (h1, h1)
                R.output(out)
            return out

        @R.function(private=True)
        def loop(t: R.Tensor((), "int64"), stop: R.Tensor((), "int64"), n: R.Tensor((), "int64"),
                 s0: R.Tensor((1, H), "float32"), x0: R.Tensor(("L", 1, 3 * H), "float32"),
                 o0: R.Tensor(("L", 1, H), "float32")) -> R.Tuple(R.Tensor((1, H), "float32"),
                                                                   R.Tensor(("L", 1, H), "float32")):
            L = T.int64()
            cls = Before
            if R.less(t, stop):
                res = cls.loop_step(t, R.subtract(R.subtract(n, t), R.const(1, "int64")), s0, x0)
                o1 = R.call_tir_inplace(cls.write, (o0, t, res[1]), out_ty=R.Tensor((L, 1, H), "float32"),
                                        inplace_indices=[0])
                out = cls.loop(R.add(t, R.const(1, "int64")), stop, n, res[0], x0, o1)
            else:
                out = (s0, o0)
            return out

        @R.function(private=True)
        def loop_chunks(t: R.Tensor((), "int64"), n: R.Tensor((), "int64"), s0: R.Tensor((1, H), "float32"),
                        x0: R.Tensor(("L", 1, 3 * H), "float32"),
                        o0: R.Tensor(("L", 1, H), "float32")) -> R.Tuple(R.Tensor((1, H), "float32"),
                                                                          R.Tensor(("L", 1, H), "float32")):
            R.func_attr({"bscompile.loop": loop_attr})
            cls = Before
            if R.less(t, n):
                stop = R.minimum(R.add(t, R.const(256, "int64")), n)
                res = cls.loop(t, stop, n, s0, x0, o0)
                out = cls.loop_chunks(stop, n, res[0], x0, res[1])
            else:
                out = (s0, o0)
            return out

        @R.function
        def main(x: R.Tensor(("L", 1, 3 * H), "float32"),
                 h0: R.Tensor((1, H), "float32")) -> R.Tuple(R.Tensor(("L", 1, H), "float32"),
                                                              R.Tensor((1, H), "float32")):
            L = T.int64()
            cls = Before
            with R.dataflow():
                n = R.reshape(R.shape_to_tensor(R.shape([L])), R.shape([]))
                bufs = R.zeros(R.shape([L, 1, H]), "float32")
                res = cls.loop_chunks(R.const(0, "int64"), n, h0, x, bufs)
                out = (res[1], res[0])
                R.output(out)
            return out

    return relax.transform.Normalize()(Before), consts


def test_fuse_gated_gru_loop(rng):
    before, (w, b, wg, bg, alive) = _before(rng)
    after = FuseDynamicRecurrences(CPU)(before)
    cell = CellSpec("gru", H, linear_before_reset=True, gate_order=(1, 0, 2)).to_json()  # ONNX z, r, h
    dyn = _dyn_site(w)
    site = {**dyn, "kind": "dynamic_recurrent", "m": 1, "seq": "L", "cell": cell,
            "summary": "GRU time loop; " + dyn["summary"]}

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def dynamic_recurrent_site(a0: R.Tensor(("L", 1, 3 * H), "float32"), a1: R.Tensor((1, H), "float32"),
                                   a2: R.Tensor((1, H), "float32"), a3: R.Tensor((3 * H, H), "float32"),
                                   a4: R.Tensor((3 * H,), "float32"), a5: R.Tensor((12, H), "float32"),
                                   a6: R.Tensor((12,), "float32"), a7: R.Tensor((12,), "bool"),
                                   ) -> R.Tuple(R.Tensor(("L", 1, H), "float32"), R.Tensor((1, H), "float32"),
                                                R.Tensor((1, H), "float32")):
            L = T.int64()
            R.func_attr({"bscompile.site": site})
            return R.call_pure_packed("bscompile.site.dynamic_recurrent", a0, a1, a2, a3, a4, a5, a6, a7,
                                      ty_args=R.Tuple(R.Tensor((L, 1, H), "float32"), R.Tensor((1, H), "float32"),
                                                      R.Tensor((1, H), "float32")))

        @R.function
        def main(x: R.Tensor(("L", 1, 3 * H), "float32"),
                 h0: R.Tensor((1, H), "float32")) -> R.Tuple(R.Tensor(("L", 1, H), "float32"),
                                                              R.Tensor((1, H), "float32")):
            cls = Expected
            with R.dataflow():
                fused = cls.dynamic_recurrent_site(x, h0, h0, R.const(w), R.const(b), R.const(wg), R.const(bg),
                                                   R.const(alive))
                res = (fused[1], fused[0])  # the loop's (h_n, y)
                out = (res[1], res[0])
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(after, Expected)
    tvm.ir.assert_structural_equal(FuseDynamicRecurrences(CPU)(after), after)  # idempotent


@pytest.mark.parametrize("edit", ["not_a_gru", "reversed_output", "no_generator"])
def test_fuse_leaves_other_loops_alone(rng, edit):
    """A candidate gated by z (not a GRU), a scan output written backwards, a family without a
    ``dynamic_recurrent`` generator: the loop stays as it was."""
    before, _ = _before(rng, candidate_gate="z" if edit == "not_a_gru" else "r",
                        reversed_output=int(edit == "reversed_output"))
    family = CPU
    if edit == "no_generator":
        family = copy.copy(CPU)
        family.generators = {k: g for k, g in CPU.generators.items() if k != "dynamic_recurrent"}
    tvm.ir.assert_structural_equal(FuseDynamicRecurrences(family)(before), before)
    if edit == "no_generator":  # (both families have the generator: the loop goes)
        for fam in (CPU, resolve_target("cuda").kernel_family()):
            assert "loop_chunks" not in [gv.name_hint for gv in FuseDynamicRecurrences(fam)(before).functions]
