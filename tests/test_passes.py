"""Each bscompile pass alone, in TVM's style: Before / Expected modules compared with
``tvm.ir.assert_structural_equal``, plus the programs each pass must leave alone and
a second run that must change nothing (every pass is idempotent)."""

import json
from pathlib import Path

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile.frontend.recurrent  # noqa: F401 - registers the "recurrent" site kind
from bscompile.codegen.family import Bucket
from bscompile.codegen.layout import CANDIDATE_EDGES, DENSE_ROWS, BSRMatrix
from bscompile.passes.analyze_sparsity import AnalyzeSparsity
from bscompile.passes.choose_layout import ChooseLayout
from bscompile.passes.conv1d_to_matmul import Conv1dToMatmul
from bscompile.passes.fold_embedding_products import FoldEmbeddingProducts
from bscompile.passes.lower_weight_sites import LowerWeightSites
from bscompile.passes.outline_linear_sites import OutlineLinearSites
from bscompile.passes.report_generic_products import GENERIC_PRODUCTS, ReportGenericProducts, generic_products
from bscompile.records import TuningRecord, record_key
from bscompile.sites import LAYOUT, SITE, SPARSITY, attr, const_array, fingerprint, named_const, weight_entries
from bscompile.target import resolve_target

FAMILY = resolve_target("x86_64").kernel_family()

# Small fixed weights: structure matters here, not values.
W = np.arange(15, dtype=np.float32).reshape(5, 3) - 7  # canonical W[N=5, K=3]
B = np.linspace(-1, 1, 5).astype(np.float32)
FP = fingerprint(W)
# 4x4 blocks, 1 in 8 kept: sparse enough that a symbolic-m site is BSR
W64 = (np.kron(np.arange(256).reshape(16, 16) % 8 == 0, np.ones((4, 4))) * 0.5).astype(np.float32)


def _stats(w):
    from bscompile.codegen.layout import all_block_stats

    return all_block_stats(w)


def _named_weights(mod, name):
    """``mod`` with its 2-D constants named ``name``, as the frontend names an initializer."""

    @relax.expr_functor.mutator
    class Namer(relax.PyExprMutator):
        def visit_generic_const_(self, c):
            return named_const(c.value, name) if len(c.ty.shape) == 2 else c

    out = mod.clone()
    out["main"] = Namer(mod).visit_expr(mod["main"])
    return out


def _twice_is_once(pass_, mod):
    once = pass_(mod)
    tvm.ir.assert_structural_equal(pass_(once), once)
    return once


# --- OutlineLinearSites -------------------------------------------------------------------


def test_outline_linear_sites_biased_matmul_of_3d_input():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 4, 3), "float32")) -> R.Tensor((2, 4, 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                z = R.add(y, R.const(B))
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def linear_site(a0: R.Tensor((8, 3), "float32"), a1: R.Tensor((5, 3), "float32"),
                        a2: R.Tensor((5,), "float32")) -> R.Tensor((8, 5), "float32"):
            R.func_attr({"bscompile.site": {"kind": "linear", "name": "fc.weight", "fingerprint": FP, "m": 8,
                                            "shape": [5, 3]}})
            return R.call_pure_packed("bscompile.site.linear", a0, a1, a2, ty_args=R.Tensor((8, 5), "float32"))

        @R.function
        def main(x: R.Tensor((2, 4, 3), "float32")) -> R.Tensor((2, 4, 5), "float32"):
            cls = Expected
            with R.dataflow():
                x2 = R.reshape(x, R.shape([8, 3]))
                y2 = cls.linear_site(x2, R.const(W), R.const(B))
                z = R.reshape(y2, R.shape([2, 4, 5]))
                R.output(z)
            return z

    after = _twice_is_once(OutlineLinearSites(), _named_weights(Before, "fc.weight"))
    tvm.ir.assert_structural_equal(after, Expected)


def test_outline_linear_sites_symbolic_rows():
    """x[b, t, K] with symbolic b and t: the site function has a variable of its own for
    its rows (``m``; Relax functions share no symbolic vars), bound to ``b * t`` by the call."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("b", "t", 3), "float32")) -> R.Tensor(("b", "t", 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                z = R.add(y, R.const(B))
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def linear_site(a0: R.Tensor(("m", 3), "float32"), a1: R.Tensor((5, 3), "float32"),
                        a2: R.Tensor((5,), "float32")) -> R.Tensor(("m", 5), "float32"):
            m = T.int64()
            R.func_attr({"bscompile.site": {"kind": "linear", "name": "fc.weight", "fingerprint": FP, "m": "m",
                                            "shape": [5, 3]}})
            return R.call_pure_packed("bscompile.site.linear", a0, a1, a2, ty_args=R.Tensor((m, 5), "float32"))

        @R.function
        def main(x: R.Tensor(("b", "t", 3), "float32")) -> R.Tensor(("b", "t", 5), "float32"):
            b = T.int64()
            t = T.int64()
            cls = Expected
            with R.dataflow():
                x2 = R.reshape(x, R.shape([b * t, 3]))
                y2 = cls.linear_site(x2, R.const(W), R.const(B))
                z = R.reshape(y2, R.shape([b, t, 5]))
                R.output(z)
            return z

    after = _twice_is_once(OutlineLinearSites(), _named_weights(Before, "fc.weight"))
    tvm.ir.assert_structural_equal(after, Expected)


def test_choose_layout_symbolic_m_writes_buckets():
    """A symbolic m gets one layout and per-bucket schedules covering m >= 1, neighbours with
    equal schedules merged; deciding again changes nothing."""
    from bscompile.codegen.family import M_BUCKETS

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor(("n", 64), "float32")) -> R.Tensor(("n", 64), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W64.T)))
                R.output(y)
            return y

    mod = AnalyzeSparsity()(OutlineLinearSites()(Before))
    layout = attr(_twice_is_once(ChooseLayout(FAMILY), mod)["linear_site"], LAYOUT)
    assert layout["schedules"] == [] and layout["layout"] == "bsr"
    buckets = layout["buckets"]
    assert buckets[0]["lo"] == 1 and buckets[-1]["hi"] is None
    assert all(a["hi"] + 1 == b["lo"] for a, b in zip(buckets, buckets[1:]))
    assert all(a["schedules"] != b["schedules"] for a, b in zip(buckets, buckets[1:]))
    assert {b["m"] for b in buckets} <= {rep for _, _, rep in M_BUCKETS}
    for b in buckets:  # the family's default at the bucket's m
        (sched,) = b["schedules"]
        stats = next(s for s in _stats(W64) if str(s.block) == layout["block"])
        assert sched == FAMILY.default_schedule(attr(mod["linear_site"], SITE), stats, b["m"]).to_json()


def test_outline_linear_sites_unnamed_weight_without_bias():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((4, 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def linear_site(a0: R.Tensor((4, 3), "float32"), a1: R.Tensor((5, 3), "float32"),
                        a2: R.Tensor((5,), "float32")) -> R.Tensor((4, 5), "float32"):
            R.func_attr({"bscompile.site": {"kind": "linear", "name": "weight_" + FP[:8], "fingerprint": FP,
                                            "m": 4, "shape": [5, 3]}})
            return R.call_pure_packed("bscompile.site.linear", a0, a1, a2, ty_args=R.Tensor((4, 5), "float32"))

        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((4, 5), "float32"):
            cls = Expected
            with R.dataflow():
                y = cls.linear_site(x, R.const(W), R.const(np.zeros(5, np.float32)))
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(OutlineLinearSites()(Before), Expected)


def test_outline_linear_sites_weight_batch_of_one():
    """``matmul(x[4, 3], C[1, 3, 5])`` (a batch of one matrix, as some exporters give it) is rewritten as
    the product by ``C[3, 5]`` followed by the product's own shape, ``[1, 4, 5]``. (Left to TVM's generic
    matmul, ``x[64, 64] @ C[1, 64, 2048]`` took 23.9 ms a call through ``run()``; as a site, 196 us.)"""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((1, 4, 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)[None]))
                z = R.add(y, R.const(B))
                R.output(z)
            return z

    @I.ir_module
    class TwoD:
        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((1, 4, 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                z = R.add(y, R.const(B))
                w = R.reshape(z, R.shape([1, 4, 5]))
                R.output(w)
            return w

    after = _twice_is_once(OutlineLinearSites(), Before)
    assert after["main"].body.blocks[0].bindings[0].value.op != tvm.ir.Op.get("relax.matmul")  # (a site call)
    tvm.ir.assert_structural_equal(after, OutlineLinearSites()(TwoD))


def test_outline_linear_sites_leaves_other_products_alone():
    """Run-time weights, a batch of two constant matrices, a symbolic K and a non-float32 product stay
    as they are (a symbolic batch becomes a site: tests/test_symbolic.py; a bias added on the
    left: the test above)."""
    w3 = np.ones((2, 3, 5), np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 3), "float32"), w: R.Tensor((3, 5), "float32"),
                 xb: R.Tensor((2, 4, 3), "float32"), xh: R.Tensor((4, 3), "float16"),
                 xk: R.Tensor((4, "k"), "float32")):
            with R.dataflow():
                a = R.matmul(x, w)
                b = R.matmul(xb, R.const(w3))
                e = R.matmul(xh, R.const(np.ascontiguousarray(W.T).astype(np.float16)))
                f = R.matmul(xk, R.const(np.ascontiguousarray(W.T)))
                R.output(a, b, e, f)
            return (a, b, e, f)

    tvm.ir.assert_structural_equal(OutlineLinearSites()(Before), Before)


def test_report_generic_products():
    """Products by a batch of two constant matrices (no site takes them) are recorded with their
    operands' shapes, a symbolic dim by its name, twice the same one as one entry of count 2 (an
    unrolled loop's steps), an einsum by a constant too, a product by a 2-D constant until it is a site;
    a product of two run-time values is not; nothing else changes."""
    w3 = np.ones((2, 3, 5), np.float32)

    @I.ir_module
    class Before:
        @R.function
        def main(xb: R.Tensor((2, "n", 3), "float32"), w: R.Tensor((3, 5), "float32")):
            with R.dataflow():
                a = R.matmul(xb, R.const(w3))
                b = R.matmul(xb, w)
                c = R.matmul(xb, R.const(w3))
                d = R.einsum((xb, R.const(np.ascontiguousarray(W.T))), "bij,jk->bik")
                e = R.matmul(xb, R.const(np.ascontiguousarray(W.T)))  # (a site once outlined)
                R.output(a, b, c, d, e)
            return (a, b, c, d, e)

    expected = Before.with_attr(GENERIC_PRODUCTS, json.dumps(
        [{"op": "matmul", "function": "main", "shapes": [[2, "n", 3], [2, 3, 5]], "count": 2},
         {"op": "einsum", "function": "main", "shapes": [[2, "n", 3], [3, 5]], "count": 1},
         {"op": "matmul", "function": "main", "shapes": [[2, "n", 3], [3, 5]], "count": 1}]))
    tvm.ir.assert_structural_equal(_twice_is_once(ReportGenericProducts(), Before), expected)

    # once a site, a product is not reported
    sited = generic_products(OutlineLinearSites()(Before))
    assert sited == json.loads(str(expected.attrs[GENERIC_PRODUCTS]))[:2] and len(sited) == 2


def test_outline_linear_sites_bias_on_the_left_stays_an_add():
    """``add(B, matmul(x, C))``: the product becomes a site with a zero bias and the add stays
    (the kernel adds its bias first, which only keeps the rounding of ``add(matmul, B)``)."""

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((4, 5), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                z = R.add(R.const(B), y)
                R.output(z)
            return z

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def linear_site(a0: R.Tensor((4, 3), "float32"), a1: R.Tensor((5, 3), "float32"),
                        a2: R.Tensor((5,), "float32")) -> R.Tensor((4, 5), "float32"):
            R.func_attr({"bscompile.site": {"kind": "linear", "name": "fc.weight", "fingerprint": FP, "m": 4,
                                            "shape": [5, 3]}})
            return R.call_pure_packed("bscompile.site.linear", a0, a1, a2, ty_args=R.Tensor((4, 5), "float32"))

        @R.function
        def main(x: R.Tensor((4, 3), "float32")) -> R.Tensor((4, 5), "float32"):
            cls = Expected
            with R.dataflow():
                y = cls.linear_site(x, R.const(W), R.const(np.zeros(5, np.float32)))
                z = R.add(R.const(B), y)
                R.output(z)
            return z

    after = _twice_is_once(OutlineLinearSites(), _named_weights(Before, "fc.weight"))
    tvm.ir.assert_structural_equal(after, Expected)


# --- FoldEmbeddingProducts -----------------------------------------------------------------

# A 4-row table of small integers: its product by W (integers) plus B (halves) is exact in float32.
E = (np.arange(12, dtype=np.float32).reshape(4, 3) % 5) - 2


def _embedding_then_product(table, axes=(1, 0, 2), take_axis=0):
    """tokens[2, 3] -> rows of ``table`` -> permute_dims ``axes`` -> [6, 3] -> x @ W.T + B."""

    @I.ir_module
    class Module:
        @R.function
        def main(tok: R.Tensor((2, 3), "int64"), e: R.Tensor((4, 3), "float32")) -> R.Tensor((6, 5), "float32"):
            with R.dataflow():
                rows = R.take(table if table is not None else e, tok, axis=take_axis)
                t = R.permute_dims(rows, axes)
                x = R.reshape(t, R.shape([6, 3]))
                y = R.matmul(x, R.const(np.ascontiguousarray(W.T)))
                z = R.add(y, R.const(B))
                R.output(z)
            return z

    return OutlineLinearSites()(_named_weights(Module, "fc.weight"))


def test_fold_embedding_products():
    """The product of every row of the table, gathered by the tokens under the same permutation:
    the linear site is gone."""

    @I.ir_module
    class Expected:
        @R.function
        def main(tok: R.Tensor((2, 3), "int64"), e: R.Tensor((4, 3), "float32")) -> R.Tensor((6, 5), "float32"):
            with R.dataflow():
                i = R.permute_dims(tok, [1, 0])
                i2 = R.reshape(i, R.shape([6]))
                z = R.take(R.const(E @ W.T + B), i2, axis=0)
                R.output(z)
            return z

    after = _twice_is_once(FoldEmbeddingProducts(), _embedding_then_product(R.const(E)))
    tvm.ir.assert_structural_equal(after, Expected)


@pytest.mark.parametrize("case", ["runtime table", "last axis moved", "other take axis", "table too big"])
def test_fold_embedding_products_leaves_alone(case, monkeypatch):
    from bscompile.passes import fold_embedding_products

    if case == "runtime table":
        before = _embedding_then_product(None)
    elif case == "last axis moved":  # rows [2, 3, 3] -> [3, 3, 2]: a feature axis moves
        before = _embedding_then_product(R.const(E[:3].copy()), axes=(2, 1, 0))
    elif case == "other take axis":  # columns of a [3, 4] table
        before = _embedding_then_product(R.const(np.ascontiguousarray(E[:3, :].T.copy()[:, :4])), take_axis=1)
    else:
        monkeypatch.setattr(fold_embedding_products, "FOLD_MAX_BYTES", 4 * 5 * 4 - 1)  # 4 rows x 5 - 1 byte
        before = _embedding_then_product(R.const(E))
    tvm.ir.assert_structural_equal(FoldEmbeddingProducts()(before), before)


# A gated product (OutlineDynamicSites' site) fed by a 3-row table: in 4 = out 4, 2x2 tiles (N = 4,
# gate index ib * 2 + ob), k = 2. Integers chosen so that every row's kept scores sum to a power of
# two times n_alive = 4: the gate scales and so the whole product are exact in float32.
GE = np.array([[1, 0, -1, 1], [-2, 2, -2, 2], [0, 1, -1, -1]], np.float32)
GWG = np.array([[2, 0, -1, 2], [0, -2, 2, -2], [0, 0, 0, -1], [-1, -2, 2, 0]], np.float32)
GBG = np.array([2, -1, 2, 2], np.float32)  # scores per row: [7 -5 1 -1], [4 -13 0 -4], [1 -3 3 -2]
GW = (np.arange(16, dtype=np.float32).reshape(4, 4) % 5) - 2
GB = np.array([0.5, -0.5, 1, 0], np.float32)


def _gated_rows(table, w, b, gate_w, gate_b, k, bs):
    """The gated product of each row, written out tile by tile (the method's definition)."""
    out = []
    nbi, nbo = w.shape[1] // bs, w.shape[0] // bs
    for x in table.astype(np.float64):
        g = gate_w @ x + gate_b
        kept = np.where(g >= np.sort(g)[-k], g, 0)
        r = kept / (kept.sum() / len(g))
        y = b.astype(np.float64)
        for ib in range(nbi):
            for ob in range(nbo):
                y[ob * bs:(ob + 1) * bs] += r[ib * nbo + ob] * (w[ob * bs:(ob + 1) * bs, ib * bs:(ib + 1) * bs] @
                                                               x[ib * bs:(ib + 1) * bs])
        out.append(y)
    return np.array(out, np.float32)


def _embedding_then_gated_product(table, gate_w=GWG, gate_b=GBG):
    """tokens[2, 3] -> rows of ``table`` -> [6, 4] -> the dynamic site."""
    site = {"kind": "dynamic_linear", "name": "ih.weight", "m": 6, "shape": [4, 4], "block": 2, "tile": "2x2", "k": 2,
            "n_alive": 4, "keep": 0.5}

    @I.ir_module
    class Module:
        @R.function(private=True)
        def dynamic_site(a0: R.Tensor((6, 4), "float32"), a1: R.Tensor((4, 4), "float32"),
                         a2: R.Tensor((4,), "float32"), a3: R.Tensor((4, 4), "float32"), a4: R.Tensor((4,), "float32"),
                         a5: R.Tensor((4,), "bool")) -> R.Tensor((6, 4), "float32"):
            R.func_attr({"bscompile.site": site})
            return R.call_pure_packed("bscompile.site.dynamic_linear", a0, a1, a2, a3, a4, a5,
                                      ty_args=R.Tensor((6, 4), "float32"))

        @R.function
        def main(tok: R.Tensor((2, 3), "int64")) -> R.Tensor((6, 4), "float32"):
            cls = Module
            with R.dataflow():
                rows = R.take(R.const(table), tok, axis=0)
                x = R.reshape(rows, R.shape([6, 4]))
                y = cls.dynamic_site(x, R.const(GW), R.const(GB), R.const(gate_w), R.const(gate_b),
                                     R.const(np.ones(4, bool)))
                R.output(y)
            return y

    return Module


def test_fold_embedding_products_gated():
    """A dynamic site fed by table rows: the table's gated product is the constant gathered."""

    @I.ir_module
    class Expected:
        @R.function
        def main(tok: R.Tensor((2, 3), "int64")) -> R.Tensor((6, 4), "float32"):
            with R.dataflow():
                i = R.reshape(tok, R.shape([6]))
                y = R.take(R.const(_gated_rows(GE, GW, GB, GWG, GBG, 2, 2)), i, axis=0)
                R.output(y)
            return y

    after = _twice_is_once(FoldEmbeddingProducts(), _embedding_then_gated_product(GE))
    tvm.ir.assert_structural_equal(after, Expected)


def test_fold_embedding_products_leaves_a_near_tie_alone():
    """A row whose k-th score and the next are one float32 ulp apart, or tie (less than a float32
    gate summed in another order could make up): onnxruntime might select other tiles than a
    constant would hold, so the site stays. Far from a tie, the same gate folds."""
    gate = (np.eye(4, dtype=np.float32), np.zeros(4, np.float32))  # the scores are the table's rows
    table = np.array([[4, 1, 2, 0], [0, 2, 1, 3], [0, 0, 0, 0]], np.float32)
    for row in ([5, np.nextafter(np.float32(3), np.float32(4)), 3, 0], [5, 3, 3, 0]):  # k-th 3.0000002 / 3
        table[2] = row
        before = _embedding_then_gated_product(table, *gate)
        tvm.ir.assert_structural_equal(FoldEmbeddingProducts()(before), before)
    table[2] = [5, 3.001, 3, 0]
    assert "dynamic_site" not in [gv.name_hint for gv in FoldEmbeddingProducts()(
        _embedding_then_gated_product(table, *gate)).functions]


# --- Conv1dToMatmul -----------------------------------------------------------------------


def test_conv1d_to_matmul():
    k = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)  # O=2, C=3, taps=2

    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 3, 6), "float32")) -> R.Tensor((1, 2, 3), "float32"):
            with R.dataflow():
                y = R.nn.conv1d(x, R.const(k), strides=[2], padding=[1, 0])
                R.output(y)
            return y

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 3, 6), "float32")) -> R.Tensor((1, 2, 3), "float32"):
            with R.dataflow():
                xp = R.nn.pad(x, [0, 0, 0, 0, 1, 0])
                t0 = R.strided_slice(xp, [2], [0], [5], [2], assume_inbound=True)
                t1 = R.strided_slice(xp, [2], [1], [6], [2], assume_inbound=True)
                cols = R.stack([t0, t1], axis=3)
                cols1 = R.permute_dims(cols, [0, 2, 1, 3])
                cols2 = R.reshape(cols1, R.shape([1, 3, 6]))
                y0 = R.matmul(cols2, R.const(np.ascontiguousarray(k.reshape(2, 6).T)))
                y = R.permute_dims(y0, [0, 2, 1])
                R.output(y)
            return y

    tvm.ir.assert_structural_equal(_twice_is_once(Conv1dToMatmul(), Before), Expected)


def test_conv1d_to_matmul_leaves_grouped_dilated_and_runtime_kernels_alone():
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 4, 9), "float32"), w: R.Tensor((2, 4, 3), "float32")):
            with R.dataflow():
                g = R.nn.conv1d(x, R.const(np.ones((2, 2, 3), np.float32)), groups=2)
                d = R.nn.conv1d(x, R.const(np.ones((2, 4, 3), np.float32)), dilation=[2])
                r = R.nn.conv1d(x, w)
                R.output(g, d, r)
            return (g, d, r)

    tvm.ir.assert_structural_equal(Conv1dToMatmul()(Before), Before)


# --- AnalyzeSparsity ----------------------------------------------------------------------


def _site_module(w, layout=None, sparsity=None, runtime_weight=False, bias=None):
    """``main(x) = linear_site(x, W, b)`` with the given attributes, built as the passes build it."""
    n, k = w.shape
    site = {"kind": "linear", "name": "fc", "fingerprint": fingerprint(w), "m": 2, "shape": [n, k]}
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, k), "float32"))
    params = [x]
    if runtime_weight:
        wv = relax.Var("w", relax.TensorType((n, k), "float32"))
        params.append(wv)
    with bb.function("main", params):
        from bscompile.sites import emit_site

        b = np.zeros(n, np.float32) if bias is None else bias
        operands = [x, wv if runtime_weight else relax.const(w), relax.const(b)]
        out = bb.emit(emit_site(bb, site, operands, relax.TensorType((2, n), "float32"), "linear_site"))
        bb.emit_func_output(out)
    mod = bb.get()
    gv = mod.get_global_var("linear_site")
    func = mod[gv]
    if sparsity is not None:
        func = func.with_attr(SPARSITY, sparsity)
    if layout is not None:
        func = func.with_attr(LAYOUT, layout)
    mod[gv] = func
    return mod


def _reference_block_counts(w):
    """Occupied/total blocks and padded shape per r x c, by direct loops over the blocks."""
    out = {}
    n, k = w.shape
    for r in CANDIDATE_EDGES:
        for c in CANDIDATE_EDGES:
            rows, cols = -(-n // r), -(-k // c)
            occupied = sum(bool(np.any(w[i * r:(i + 1) * r, j * c:(j + 1) * c])) for i in range(rows)
                           for j in range(cols))
            out[f"{r}x{c}"] = [occupied, rows * cols, rows * r, cols * c]
    return out


def test_analyze_sparsity_attaches_measurements(rng):
    # 4x4 blocks (8x8 .. 32x32 need padding), only at even block rows and columns: every larger
    # shape stores a pruned 4x4 block next to the one kept at (0, 0), so 4x4 is the detected one
    even = np.add.outer(np.arange(6) % 2, np.arange(5) % 2) == 0
    keep = (rng.random((6, 5)) < 0.5) & even
    keep[0, 0] = True
    mask = np.kron(keep, np.ones((4, 4)))
    w = (rng.standard_normal((24, 20)) * mask).astype(np.float32)
    before = _site_module(w)
    after = _twice_is_once(AnalyzeSparsity(), before)
    # the pass adds this attribute and nothing else
    want = {"density": np.count_nonzero(w) / w.size, "structure": "block 4x4", "detected": "4x4",
            "blocks": _reference_block_counts(w)}
    assert attr(after["linear_site"], SPARSITY) == want
    expected = before.clone()
    expected["linear_site"] = before["linear_site"].with_attr(SPARSITY, want)
    tvm.ir.assert_structural_equal(after, expected)


def test_analyze_sparsity_leaves_runtime_weights_alone():
    before = _site_module(W, runtime_weight=True)
    tvm.ir.assert_structural_equal(AnalyzeSparsity()(before), before)


# --- ChooseLayout -------------------------------------------------------------------------


def _analysed(w):
    return AnalyzeSparsity()(_site_module(w))


def test_choose_layout_sparse_dense_and_runtime_weights(rng):
    sparse_w = np.kron(rng.random((32, 32)) < 0.1, np.ones((8, 8))).astype(np.float32) * 0.5
    dense_w = rng.standard_normal((256, 256)).astype(np.float32)
    got = {}
    for name, mod in [("sparse", _analysed(sparse_w)), ("dense", _analysed(dense_w)),
                      ("runtime", _site_module(W, runtime_weight=True))]:
        after = _twice_is_once(ChooseLayout(FAMILY), mod)
        got[name] = attr(after["linear_site"], LAYOUT)
    assert got["sparse"]["layout"] == "bsr" and got["sparse"]["block"] in ("8x8", "8x16", "8x32", "16x8", "4x8")
    assert got["sparse"]["est_time_us"] < got["sparse"]["dense_est_time_us"]
    assert got["dense"]["layout"] == "dense" and got["dense"]["block"] == f"{DENSE_ROWS}x256"
    assert got["runtime"]["layout"] == "dense" and "run time" in got["runtime"]["reason"]


def test_choose_layout_options_and_records(rng):
    w = np.kron(rng.random((16, 16)) < 0.1, np.ones((4, 4))).astype(np.float32)
    w[:4, :4] = 1
    mod = _analysed(w)
    dense = attr(ChooseLayout(FAMILY, sparse=False)(mod)["linear_site"], LAYOUT)
    assert (dense["layout"], dense["reason"]) == ("dense", "dense path requested")
    forced = attr(ChooseLayout(FAMILY, force_block=BSRMatrix.dense(w, 2).block)(mod)["linear_site"], LAYOUT)
    assert forced["layout"] == "bsr" and forced["block"] == "2x64"
    rec = TuningRecord(fingerprint(w), "fc", "linear", 2, "x86_64", "bsr", "2x4",
                       {"m_tile": 2, "parallel": False, "unroll_c": True, "variant": "rows", "m_vec": 8}, 3.0, 9.0)
    tuned = attr(ChooseLayout(FAMILY, records={record_key(rec.key, 2): rec})(mod)["linear_site"], LAYOUT)
    assert (tuned["layout"], tuned["block"], tuned["schedules"]) == ("bsr", "2x4", [rec.schedule])


# 8x8 blocks, 1 in 7 kept (fixed): BSR 8x8 at m = 2 (large enough that skipping blocks pays more
# than a call costs); and a weight without a zero: dense.
W_BSR = (np.kron(np.arange(256).reshape(32, 8) % 7 == 0, np.ones((8, 8))) * np.linspace(0.5, 1.5, 64)).astype(np.float32)
W_DENSE = (np.linspace(-1, 1, 48 * 256).reshape(48, 256) + 2).astype(np.float32)


def _two_sites() -> tvm.IRModule:
    """``main(x[2, 64]) = dense_site(bsr_site(x, W_BSR, 0), W_DENSE, 0)`` ([256, 64] then [48, 256]), analysed."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64), "float32"))
    with bb.function("main", [x]):
        from bscompile.sites import emit_site

        h = x
        for name, w in (("bsr_site", W_BSR), ("dense_site", W_DENSE)):
            n, k = w.shape
            site = {"kind": "linear", "name": name, "fingerprint": fingerprint(w), "m": 2, "shape": [n, k]}
            h = bb.emit(emit_site(bb, site, [h, relax.const(w), relax.const(np.zeros(n, np.float32))],
                                  relax.TensorType((2, n), "float32"), name))
        bb.emit_func_output(h)
    return AnalyzeSparsity()(bb.get())


def test_choose_layout_writes_the_layout_attribute():
    """Before: two analysed sites. Expected: the same module with ``bscompile.layout`` on each
    site function, spelled out here from the family's machine model (BSR 8x8 for the pruned
    weight, dense for the one without zeros, whose best sparse shape is estimated no faster);
    nothing else changes, and a second run changes nothing."""
    from bscompile.passes.choose_layout import MARGIN, dense_stats

    before = _two_sites()

    def us(t):  # the attribute's unit and precision
        return round(t * 1e6, 3)

    def stats(w, block):
        return next(st for st in _stats(w) if str(st.block) == block)

    def est(gv, st):
        return FAMILY.estimate_time(attr(before[gv], SITE), st, 2)

    t_bsr, t_dense0 = us(est("bsr_site", stats(W_BSR, "8x8"))), us(est("bsr_site", dense_stats(256, 64)))
    t_best, t_dense1 = us(est("dense_site", stats(W_DENSE, "16x32"))), us(est("dense_site", dense_stats(48, 256)))
    expected = before.clone()
    expected["bsr_site"] = before["bsr_site"].with_attr(LAYOUT, {
        "layout": "bsr", "block": "8x8", "schedules": [], "est_time_us": t_bsr, "dense_est_time_us": t_dense0,
        "reason": f"bsr 8x8 keeps 14.5% of blocks; est {t_bsr:.1f} us vs dense {t_dense0:.1f} us "
                  f"({t_dense0 / t_bsr:.1f}x)"})
    expected["dense_site"] = before["dense_site"].with_attr(LAYOUT, {
        "layout": "dense", "block": f"{DENSE_ROWS}x256", "schedules": [], "est_time_us": t_dense1,
        "dense_est_time_us": t_dense1,
        "reason": f"dense: best sparse (16x32, 100% blocks) est {t_best:.1f} us is not {1 / MARGIN:.2f}x under "
                  f"dense {t_dense1:.1f} us"})
    after = _twice_is_once(ChooseLayout(FAMILY), before)
    tvm.ir.assert_structural_equal(after, expected)
    assert t_bsr < MARGIN * t_dense0 and t_best > MARGIN * t_dense1  # the decisions follow from the estimates


def test_choose_layout_keeps_a_decision_already_made():
    made = {"layout": "bsr", "block": "1x1", "schedules": [], "est_time_us": 1.0, "dense_est_time_us": 2.0,
            "reason": "by hand"}
    before = _site_module(W, layout=made, sparsity=attr(_analysed(W)["linear_site"], SPARSITY))
    tvm.ir.assert_structural_equal(ChooseLayout(FAMILY)(before), before)


# --- LowerWeightSites ---------------------------------------------------------------------


def test_lower_weight_sites_dense_layout():
    layout = {"layout": "dense", "block": "16x3", "schedules": [], "est_time_us": 1.0, "dense_est_time_us": 1.0,
              "reason": "r"}
    before = _site_module(W, layout=layout)
    after = _twice_is_once(LowerWeightSites(FAMILY), before)

    mat = BSRMatrix.dense(W, DENSE_ROWS)
    packed = np.zeros((1, 3, DENSE_ROWS), np.float32)  # one 16 x K block, stored [c, r]
    packed[0, :, :5] = W.T
    np.testing.assert_array_equal(mat.data, packed)
    site = attr(before["linear_site"], SITE)
    sched = FAMILY.default_schedule(site, mat.stats, 2)
    kernel = FAMILY.kernel(site, [mat], [Bucket(2, 2, 2, (sched,))]).with_attr(SITE, site).with_attr(
        LAYOUT, {**layout, "schedules": [sched.to_json()], "stored_bytes": mat.nbytes})
    bb = relax.BlockBuilder()
    gv = bb.add_func(kernel, "linear_dense")
    x = relax.Var("x", relax.TensorType((2, 3), "float32"))
    with bb.function("main", [x]):
        out = bb.emit(relax.call_tir(gv, relax.Tuple([
            x, relax.const(packed), relax.const(np.zeros(1, np.int32)), relax.const(np.array([0, 1], np.int32)),
            relax.const(np.zeros(DENSE_ROWS, np.float32))]), relax.TensorType((2, 5), "float32")))
        bb.emit_func_output(out)
    tvm.ir.assert_structural_equal(after, bb.get())
    (entry,) = weight_entries(after)
    assert entry["stored_bytes"] == packed.nbytes + 4 + 8


def test_lower_weight_sites_bsr_site_matches_numpy(rng):
    """A BSR 8x8 site of a ragged 36x44 weight (padded to 40x48): the site call becomes one
    ``call_tir`` of a kernel carrying the site's attributes (layout completed with the
    family's default schedule and the stored bytes), whose constants are SciPy's BSR arrays
    of the padded weight (blocks stored transposed, [c, r]) and the bias padded to 40 rows;
    built and run, it equals ``x @ W.T + b`` in NumPy."""
    import scipy.sparse

    keep = rng.random((5, 6)) < 0.4
    keep[0, 0] = True
    w = (np.kron(keep, np.ones((8, 8))) * rng.standard_normal((40, 48)))[:36, :44].astype(np.float32)
    bias = rng.standard_normal(36).astype(np.float32)
    layout = {"layout": "bsr", "block": "8x8", "schedules": [], "est_time_us": 1.0, "dense_est_time_us": 2.0,
              "reason": "by hand"}
    before = _site_module(w, layout=layout, bias=bias)
    after = _twice_is_once(LowerWeightSites(FAMILY), before)

    # structure: main is one call_tir of the kernel; the site function is gone
    assert {gv.name_hint for gv in after.functions} == {"main", "linear_bsr"}
    (block,) = after["main"].body.blocks
    (binding,) = block.bindings
    call = binding.value
    assert isinstance(call, relax.Call) and call.op.name == "relax.call_tir"
    assert after["main"].body.body.same_as(binding.var)
    kernel = after[call.args[0]]
    assert isinstance(kernel, tvm.tirx.PrimFunc)
    assert attr(kernel, SITE) == attr(before["linear_site"], SITE)
    ref = scipy.sparse.bsr_matrix(np.pad(w, ((0, 4), (0, 4))), blocksize=(8, 8))
    ref.sort_indices()
    args = call.args[1].fields
    assert args[0].same_as(after["main"].params[0])
    data, indices, indptr, padded_bias = (const_array(a) for a in args[1:])
    np.testing.assert_array_equal(indptr, ref.indptr)
    np.testing.assert_array_equal(indices, ref.indices)
    np.testing.assert_array_equal(data, ref.data.transpose(0, 2, 1))
    np.testing.assert_array_equal(padded_bias, np.pad(bias, (0, 4)))
    site = attr(before["linear_site"], SITE)
    stats = next(st for st in _stats(w) if str(st.block) == "8x8")
    assert attr(kernel, LAYOUT) == {**layout, "schedules": [FAMILY.default_schedule(site, stats, 2).to_json()],
                                    "stored_bytes": data.nbytes + indices.nbytes + indptr.nbytes}

    # numbers: build for the host and run
    with tvm.target.Target("llvm"):
        ex = tvm.compile(after, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    x = rng.standard_normal((2, 44)).astype(np.float32)
    y = vm["main"](tvm.runtime.tensor(x)).numpy()
    np.testing.assert_allclose(y, x.astype(np.float64) @ w.T.astype(np.float64) + bias, rtol=1e-5, atol=1e-5)


def test_lower_weight_sites_leaves_undecided_sites_alone():
    before = _site_module(W)
    tvm.ir.assert_structural_equal(LowerWeightSites(FAMILY)(before), before)


# --- RecordWeights -------------------------------------------------------------------------


def test_record_weights_writes_the_manifest_entries_and_keeps_a_record():
    """A lowered dense site: the module gains ``bscompile.weights`` (the entry's name, kind,
    shape, layout and stored bytes) and nothing else; a record already there is kept."""
    import json

    from bscompile.passes.record_weights import RecordWeights
    from bscompile.sites import WEIGHTS, recorded_weights

    layout = {"layout": "dense", "block": "16x3", "schedules": [], "est_time_us": 1.0, "dense_est_time_us": 1.0,
              "reason": "r"}
    lowered = LowerWeightSites(FAMILY)(_site_module(W, layout=layout))
    after = _twice_is_once(RecordWeights(), lowered)
    (entry,) = recorded_weights(after)
    assert (entry["name"], entry["kind"], entry["shape"], entry["m"]) == ("fc", "linear", [5, 3], 2)
    assert entry["decision"]["layout"] == "dense" and entry["stored_bytes"] == 3 * DENSE_ROWS * 4 + 4 + 8
    tvm.ir.assert_structural_equal(after, lowered.with_attr(WEIGHTS, json.dumps([entry])))
    kept = lowered.with_attr(WEIGHTS, "[]")  # e.g. recorded before kernels were merged
    tvm.ir.assert_structural_equal(RecordWeights()(kept), kept)


# --- the whole pipeline -------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gru_lens", "lstm_bidir", "deepspeech", "linear", "bundled char GRU"])
@pytest.mark.parametrize("target", ["x86_64", "cuda"])
def test_every_pass_is_idempotent_on_whole_models(name, target, rng):
    """Each of bscompile's passes, run again on its own output in the pipeline's order, changes
    nothing: symbolic batch and length, sequence lengths, convolutions, bidirectional layers,
    an embedding (checked token ids, the folded embedding product)."""
    import onnx
    import onnx_models

    import bscompile
    from bscompile.frontend.onnx import import_onnx
    from bscompile.passes.pipeline import bscompile_passes

    if name == "bundled char GRU":
        model = onnx.load(Path(bscompile.__file__).parent / "data" / "char_gru_bp4x4.onnx")
    else:
        model, _ = onnx_models.symbolic_model(name, rng)
    mod = import_onnx(model, None).mod
    for pass_ in bscompile_passes(resolve_target(target).kernel_family()):
        once = pass_(mod)
        try:
            tvm.ir.assert_structural_equal(pass_(once), once)
        except ValueError as err:
            raise AssertionError(f"{pass_.info.name} changed its own output: {str(err)[:2000]}") from None
        mod = once
