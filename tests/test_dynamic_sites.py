"""OutlineDynamicSites and the dynamic site end to end: the exported DynamicBlockLinear graph
(both exporters) becomes one dynamic site whose operands are the layer's own parameters;
graphs that are not provably the method stay on the generic path; compiled models equal
onnxruntime (rtol 1e-4, atol 1e-5) on inputs with a clear selection margin."""

import copy

import numpy as np
import onnx
import pytest
import tvm
from onnx import numpy_helper
from test_dynamic import BS, IN, OUT, _export, _model, _ort, clear_margin_inputs
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R
from tvm.script import tirx as T

import bscompile
from bscompile.frontend.onnx import import_onnx
from bscompile.passes.outline_dynamic_sites import OutlineDynamicSites
from bscompile.sites import SIGNATURE, fingerprint, weight_entries
from bscompile.target import resolve_target

CPU = resolve_target("x86_64").kernel_family()


def _folded(model_bytes: bytes, shapes: dict | None = None) -> tvm.IRModule:
    """The imported model, constants folded, without the graph's signature (the Expected modules have none)."""
    mod = import_onnx(onnx.load_from_string(model_bytes), {"x": (2, IN)} if shapes is None else shapes).mod
    return relax.transform.FoldConstant()(mod.without_attr(SIGNATURE))


def _params(m):
    alive = np.ones(IN // BS * (OUT // BS), bool) if m.block_mask is None else m.block_mask.reshape(-1).numpy()
    return (m.weight.detach().numpy(), m.bias.detach().numpy(), m.gate.weight.detach().numpy(),
            m.gate.bias.detach().numpy(), alive)


def _outline_checked(before: tvm.IRModule, m, rows) -> tuple[tvm.IRModule, dict]:
    """The pass applied (and checked idempotent) and the site attributes it must write."""
    w, _, _, _, alive = _params(m)
    n_alive, k = int(alive.sum()), m.k
    frac = k / len(alive) + len(alive) / OUT
    site_attrs = {"kind": "dynamic_linear", "fingerprint": fingerprint(w), "m": rows, "shape": [OUT, IN], "block": BS,
                  "tile": f"{BS}x{BS}", "k": k, "n_alive": n_alive, "keep": round(k / n_alive, 6),
                  "compute_fraction": round(frac, 6),
                  "summary": f"selects {k} of {n_alive} {BS}x{BS} tiles per row; {frac * 100:.0f}% of the dense "
                             "compute with the gate"}
    after = OutlineDynamicSites(CPU)(before)
    tvm.ir.assert_structural_equal(OutlineDynamicSites(CPU)(after), after)  # idempotent
    (entry,) = weight_entries(after)
    site_attrs["name"] = entry["name"]
    assert entry["name"] != f"weight_{fingerprint(w)[:8]}"  # named after the exported initializer
    return after, site_attrs


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("keep,static", [(0.5, False), (0.25, True), (0.04, False)],
                         ids=["keep0.5", "keep0.25-static", "k1"])
def test_outline_dynamic_sites(rng, dynamo, keep, static):
    """At ``k = 1`` (keep 0.04 of 24 tiles) the import drops the slice ``[k-1:]`` of TopK's values:
    the k-th is the values themselves. (Left on the generic path, a gated char LM at keep 0.01 ran its
    input product as an unscheduled batched matmul: 25 ms a call instead of a table lookup.)"""
    m = _model(rng, keep, static)
    before = _folded(_export(m, dynamo))
    w, b, wg, bg, alive = _params(m)
    after, site_attrs = _outline_checked(before, m, 2)

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def dynamic_site(a0: R.Tensor((2, IN), "float32"), a1: R.Tensor((OUT, IN), "float32"),
                         a2: R.Tensor((OUT,), "float32"), a3: R.Tensor((len(alive), IN), "float32"),
                         a4: R.Tensor((len(alive),), "float32"),
                         a5: R.Tensor((len(alive),), "bool")) -> R.Tensor((2, OUT), "float32"):
            R.func_attr({"bscompile.site": site_attrs})
            return R.call_pure_packed("bscompile.site.dynamic_linear", a0, a1, a2, a3, a4, a5,
                                      ty_args=R.Tensor((2, OUT), "float32"))

        @R.function
        def main(x: R.Tensor((2, IN), "float32")) -> R.Tensor((2, OUT), "float32"):
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                x2 = R.reshape(x, R.shape([2, IN]))
                gv = cls.dynamic_site(x2, R.const(w), R.const(b), R.const(wg), R.const(bg), R.const(alive))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(after, Expected)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_outline_dynamic_sites_symbolic_batch(rng, dynamo):
    """The exporters' dynamic batch axis: outlined on a family whose kernel takes a symbolic m,
    the site's m naming the batch (the site function has its own ``batch``)."""
    m = _model(rng, 0.5, False)
    before = _folded(_export(m, dynamo), {})
    w, b, wg, bg, alive = _params(m)
    after, site_attrs = _outline_checked(before, m, "batch")

    @I.ir_module
    class Expected:
        @R.function(private=True)
        def dynamic_site(a0: R.Tensor(("batch", IN), "float32"), a1: R.Tensor((OUT, IN), "float32"),
                         a2: R.Tensor((OUT,), "float32"), a3: R.Tensor((len(alive), IN), "float32"),
                         a4: R.Tensor((len(alive),), "float32"),
                         a5: R.Tensor((len(alive),), "bool")) -> R.Tensor(("batch", OUT), "float32"):
            batch = T.int64()
            R.func_attr({"bscompile.site": site_attrs})
            return R.call_pure_packed("bscompile.site.dynamic_linear", a0, a1, a2, a3, a4, a5,
                                      ty_args=R.Tensor((batch, OUT), "float32"))

        @R.function
        def main(x: R.Tensor(("batch", IN), "float32")) -> R.Tensor(("batch", OUT), "float32"):
            batch = T.int64()
            R.func_attr({"num_input": 1})
            cls = Expected
            with R.dataflow():
                x2 = R.reshape(x, R.shape([batch, IN]))
                gv = cls.dynamic_site(x2, R.const(w), R.const(b), R.const(wg), R.const(bg), R.const(alive))
                R.output(gv)
            return gv

    tvm.ir.assert_structural_equal(after, Expected)


def _edit(model_bytes: bytes, op: str, values: dict[int, object]) -> bytes:
    """Replace constant inputs (position -> value) of the first ``op`` node that has them."""
    model = onnx.load_from_string(model_bytes)
    tensors = {t.name: t for t in model.graph.initializer}
    tensors.update({n.output[0]: n.attribute[0].t for n in model.graph.node if n.op_type == "Constant"})
    for node in model.graph.node:
        if node.op_type == op and all(node.input[i] in tensors for i in values):
            for i, value in values.items():
                t = tensors[node.input[i]]
                t.CopyFrom(numpy_helper.from_array(np.asarray(value, numpy_helper.to_array(t).dtype), t.name))
            return model.SerializeToString()
    raise AssertionError(f"no {op} with constant inputs {list(values)}")


def _unsliced(model_bytes: bytes) -> bytes:
    """The graph with TopK's values compared directly, without the slice that takes the k-th."""
    model = onnx.load_from_string(model_bytes)
    topk = next(n for n in model.graph.node if n.op_type == "TopK")
    sl = next(n for n in model.graph.node if n.op_type == "Slice" and n.input[0] == topk.output[0])
    for node in model.graph.node:
        node.input[:] = [topk.output[0] if i == sl.output[0] else i for i in node.input]
    model.graph.node.remove(sl)
    return model.SerializeToString()


@pytest.mark.parametrize("edit", ["normaliser", "kth", "kth-unsliced", "no-generator", "symbolic-on-static-kernel"])
def test_outline_dynamic_sites_leaves_other_graphs_alone(rng, edit):
    """A normaliser that is not the number of tiles, a slice that does not take the k-th
    value, every score compared with the sorted scores (k = N without the slice: elementwise,
    not a threshold), a family without a dynamic generator, or a symbolic batch on a family whose
    dynamic kernel takes static shapes only: the generic path keeps the graph."""
    m = _model(rng, 1.0 if edit == "kth-unsliced" else 0.5, False)
    model_bytes = _export(m, dynamo=False)
    family = CPU
    if edit == "symbolic-on-static-kernel":
        before = relax.transform.FoldConstant()(import_onnx(onnx.load_from_string(model_bytes), None).mod)
        family = copy.copy(CPU)
        static = copy.copy(CPU.generators["dynamic_linear"])
        static.symbolic_m = False
        family.generators = {**CPU.generators, "dynamic_linear": static}
        tvm.ir.assert_structural_equal(OutlineDynamicSites(family)(before), before)
        assert weight_entries(OutlineDynamicSites(CPU)(before))  # (what the CPU family outlines)
        return
    if edit == "normaliser":
        model_bytes = _edit(model_bytes, "Div", {1: 7.0})
    elif edit == "kth":
        model_bytes = _edit(model_bytes, "Slice", {1: [0], 2: [1]})  # the largest score, not the k-th
    elif edit == "kth-unsliced":
        model_bytes = _unsliced(model_bytes)
    else:
        family = copy.copy(CPU)
        family.generators = {k: g for k, g in CPU.generators.items() if k != "dynamic_linear"}
    before = _folded(model_bytes)
    tvm.ir.assert_structural_equal(OutlineDynamicSites(family)(before), before)


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
@pytest.mark.parametrize("keep,static,batch", [(0.5, False, 1), (0.25, True, 1), (0.5, True, 4), (0.04, False, 3)])
def test_compiled_dynamic_layer_matches_onnxruntime(rng, dynamo, keep, static, batch):
    m = _model(rng, keep, static)
    model_bytes = _export(m, dynamo)
    art = bscompile.compile(onnx.load_from_string(model_bytes), input_shapes={"x": (batch, IN)})
    (entry,) = art.manifest.weights
    assert (entry["kind"], entry["decision"]["layout"], entry["decision"]["block"]) == ("dynamic_linear", "tiles",
                                                                                        f"{BS}x{BS}")
    assert entry["attributes"]["k"] == m.k and entry["stored_bytes"] > 0
    x = clear_margin_inputs(m, rng, batch)
    np.testing.assert_allclose(art.load().run({"x": x})["y"], _ort(model_bytes, x), rtol=1e-4, atol=1e-5)


def test_default_compile_runs_the_dynamic_kernel_at_any_batch(rng):
    """``bscompile model.onnx`` with the exporters' symbolic batch: one dynamic site (no longer
    the generic path), one artifact run at batch 1, 3 and 17 (the m = 1, 2-7/8-31 buckets)
    equal to onnxruntime on inputs with a clear selection margin. (Both exporters give the
    same Relax: test_outline_dynamic_sites_symbolic_batch.)"""
    m = _model(rng, 0.25, True)
    model_bytes = _export(m, dynamo=False)
    art = bscompile.compile(onnx.load_from_string(model_bytes))
    (entry,) = art.manifest.weights
    assert (entry["kind"], entry["decision"]["layout"], entry["m"]) == ("dynamic_linear", "tiles",
                                                                                      "batch")
    assert [b["lo"] for b in entry["decision"]["buckets"]][0] == 1 and len(entry["decision"]["buckets"]) >= 2
    mod = art.load()
    for batch in (1, 3, 17):
        x = clear_margin_inputs(m, rng, batch)
        np.testing.assert_allclose(mod.run({"x": x})["y"], _ort(model_bytes, x), rtol=1e-4, atol=1e-5,
                                   err_msg=f"batch {batch}")


@pytest.mark.parametrize("order,symbolic", [("forward", False), ("random", True)])
def test_cuda_dynamic_site_under_the_emulator(rng, tmp_path, order, symbolic):
    """The CUDA family's dynamic kernel (gate, selection, tile product: three launches) run
    by the CUDA emulator in a subprocess, in two thread/block orders, against onnxruntime;
    compiled for batch 3, or with the exporter's symbolic batch (the grid's row dimension)."""
    import subprocess
    import sys

    m = _model(rng, 0.25, True)
    model_bytes = _export(m, dynamo=False)
    (tmp_path / "dyn.onnx").write_bytes(model_bytes)
    art = bscompile.compile(onnx.load_from_string(model_bytes), target="cuda",
                            input_shapes=None if symbolic else {"x": (3, IN)})
    assert [(w["kind"], isinstance(w["m"], str)) for w in art.manifest.weights] == [("dynamic_linear", symbolic)]
    art.export(tmp_path / "dyn.bsc")
    np.save(tmp_path / "x.npy", clear_margin_inputs(m, rng, 3))
    proc = subprocess.run([sys.executable, "-m", "bscompile.cli", "run", str(tmp_path / "dyn.bsc"), "--emulate", order,
                           "--input", f"x={tmp_path / 'x.npy'}", "--check", str(tmp_path / "dyn.onnx")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "3 launches of 3 kernels" in proc.stdout and "(ok, rtol 0.0001 atol 1e-05)" in proc.stdout, proc.stdout


def test_tuning_a_dynamic_site_records_per_bucket(rng, monkeypatch):
    """``bscompile tune`` measures a dynamic site (symbolic batch) under its generator's
    schedules (fallback off/on, panels, ...) at each bucket's m, on the real kernel: one
    record per bucket, the default schedule as the baseline; the tuned artifact equals
    onnxruntime at batch 1 and 5. (Two buckets, m = 1 and m >= 2, keep the test short:
    every candidate is a compile.)"""
    from bscompile.codegen import family
    from bscompile.records import record_key
    from bscompile.tune import tune_model

    M_BUCKETS = ((1, 1, 1), (2, None, 4))
    monkeypatch.setattr(family, "M_BUCKETS", M_BUCKETS)  # (site_buckets: tuning and ChooseLayout)

    m = _model(rng, 0.5, False)
    model = onnx.load_from_string(_export(m, dynamo=False))
    lines = []
    records = tune_model(model, {"target": "llvm", "sparse": True}, lines.append)
    assert [(r.kind, r.m, r.bucket) for r in records] == [("dynamic_linear", rep, [lo, hi]) for lo, hi, rep in M_BUCKETS]
    assert {(r.layout, r.block) for r in records} == {("tiles", f"{BS}x{BS}")}
    for r in records:
        assert len(r.candidates) >= 2 and all(c["time_us"] is not None for c in r.candidates), r.candidates
        if r.m > 1:  # the masked dense fallback measured on and off
            assert {c["schedules"][0]["dense_fraction"] for c in r.candidates} >= {1.0, 2.0}
        assert r.time_us == min(c["time_us"] for c in r.candidates)
        assert r.dense_time_us == r.candidates[0]["time_us"]  # the default schedule
    art = bscompile.compile(model, records={record_key(r.key, r.m): r for r in records})
    (w,) = art.manifest.weights
    assert w["decision"]["reason"].startswith("tuned: tiles")
    mod = art.load()
    for batch in (1, 5):
        x = clear_margin_inputs(m, rng, batch)
        np.testing.assert_allclose(mod.run({"x": x})["y"], _ort(model.SerializeToString(), x), rtol=1e-4, atol=1e-5)


def test_inspect_shows_dynamic_site_fields(rng, tmp_path):
    """``bscompile inspect``: a dynamic site's block, k, tiles, keep and compute fraction as
    fields (``--json`` has them as the entry's attributes), and its per-bucket schedules."""
    import subprocess
    import sys

    m = _model(rng, 0.25, True)
    path = tmp_path / "dyn.onnx"
    path.write_bytes(_export(m, dynamo=False))
    n_alive = int(m.block_mask.sum())
    frac = m.k / m.num_tiles + m.num_tiles / OUT

    proc = subprocess.run([sys.executable, "-m", "bscompile.cli", "inspect", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lines = out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("dynamic site"))
    assert lines[at].split()[2:7] == ["block", "k", "tiles", "keep", "compute"]
    row = lines[at + 2].split()
    assert row[1:6] == [f"{BS}x{BS}", str(m.k), str(n_alive), f"{m.k / n_alive:g}", f"{frac:.3f}"], out
    assert "m=1: tiles 1x" in out and "no fallback" in out  # the run-time dispatch per bucket


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_sequence_product_is_one_site_over_every_step(rng, dynamo):
    """``y[T, B, out]`` of a layer applied to a whole sequence at once (the gated RNNs' input
    product): one dynamic site with ``m = T * B`` then a reshape, equal to onnxruntime."""
    import io

    import torch

    steps, batch = 3, 2
    m = _model(rng, 0.5, False)
    xt = torch.randn(steps, batch, IN)
    if dynamo:
        pytest.importorskip("onnxscript", reason="the dynamo exporter needs onnxscript (in the 'test' extra)")
        model_bytes = torch.onnx.export(m, (xt,), dynamo=True, input_names=["x"], output_names=["y"],
                                        verbose=False).model_proto.SerializeToString()
    else:
        buf = io.BytesIO()
        torch.onnx.export(m, (xt,), buf, dynamo=False, input_names=["x"], output_names=["y"])
        model_bytes = buf.getvalue()
    art = bscompile.compile(onnx.load_from_string(model_bytes))
    (entry,) = art.manifest.weights
    assert entry["kind"] == "dynamic_linear" and entry["m"] == steps * batch, entry
    x = clear_margin_inputs(m, rng, steps * batch).reshape(steps, batch, IN)
    np.testing.assert_allclose(art.load().run({"x": x})["y"], _ort(model_bytes, x), rtol=1e-4, atol=1e-5)
