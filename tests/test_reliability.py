"""Regression tests for the bug classes the fuzzing campaign (bench/fuzz.py) found: every
bad input, model, artifact or argument ends in one line ``bscompile: error: ...`` and
exit 2, never an internal error, a signal, a traceback or a wrong answer."""

import hashlib
from pathlib import Path
import io
import json
import re
import tarfile

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import OPSET, mlp, ort_run
from test_cli_and_artifact import run_cli

import bscompile
from bscompile import limits
from bscompile.cli import main
from bscompile.errors import ArtifactError, BscompileError, InputError, UnsupportedModelError


def one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip() and not ln.startswith("[bscompile] ")]
    assert len(lines) == 1 and lines[0].startswith("bscompile: error: "), stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("rel")
    rng = np.random.default_rng(3)
    model, _ = mlp([16, 24, 8], 2, ["4x4", "dense"], rng)
    onnx.save(model, d / "mlp.onnx")
    bscompile.compile(model).export(d / "mlp.bsc")
    np.save(d / "x.npy", rng.standard_normal((2, 16)).astype(np.float32))
    return d


@pytest.mark.parametrize("args,message", [
    (["m.onnx", "--block", "3y"], "argument --block: expected RxC"),
    (["m.onnx", "--block", "0x4"], "argument --block"),
    (["m.onnx", "--block", "257x1"], "argument --block"),
    (["m.onnx", "--input-shape", "x=0,3"], "positive dimensions"),
    (["run", "m.bsc", "--bench", "-3"], "expected a positive integer"),
    (["demo", "--runs", "0"], "expected a positive integer"),
    (["compile", "m.onnx", "--frob\nnicate"], "unrecognized arguments: --frob\\nnicate"),
    (["nosuchcommand\x1b[2J"], "no such file: nosuchcommand\\x1b[2J"),
    (["--verbose", "m.onnx", "x\u2028y\x85"], "unrecognized arguments: x\\u2028y\\x85"),  # str.splitlines breaks
    ([], "the following arguments are required"),
])
def test_usage_errors_are_one_line_exit_2(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    line = one_error_line(capsys.readouterr().err)
    assert message in line


def test_folder_as_model_and_artifact(tmp_path, capsys):
    assert main(["compile", str(tmp_path)]) == 2
    assert "not a file" in one_error_line(capsys.readouterr().err)
    assert main(["run", str(tmp_path), "--random"]) == 2
    assert "is a folder" in one_error_line(capsys.readouterr().err)


def _graph_model(nodes, inputs, outputs, inits=(), opset=OPSET):
    return helper.make_model(helper.make_graph(nodes, "g", inputs, outputs, list(inits)),
                             opset_imports=[helper.make_opsetid("", opset)])


X = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
Y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])


def test_control_characters_in_names_stay_on_one_line(tmp_path, capsys):
    model = _graph_model([helper.make_node("FooBar", ["x"], ["y"], name='fc0"\ntransB')], [X], [Y])
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "unsupported op 'FooBar' at node 'fc0\"\\ntransB'" in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("text", [b"graph-name", b"node-name", b"doc-string"])
def test_names_that_are_not_utf8_are_refused(text, tmp_path, capsys):
    """Found by the fuzzer: ONNX's strings are not checked when parsed, and protobuf hands one
    that is not UTF-8 out as bytes ('str + bytes' deep in the importer, an internal error)."""
    model = _graph_model([helper.make_node("Relu", ["x"], ["y"], name="node-name", doc_string="doc-string")],
                         [X], [Y])
    model.graph.name = "graph-name"
    blob = model.SerializeToString()
    assert blob.count(text) == 1
    blob = blob.replace(text, text[:3] + b"\xfa" + text[4:])  # (the same length: the framing holds)
    (tmp_path / "m.onnx").write_bytes(blob)
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert "is not a valid ONNX model (a name or string is not UTF-8 text)" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.bsc").exists()
    with pytest.raises(BscompileError, match="not UTF-8"):
        bscompile.compile(onnx.load_from_string(blob))


def test_reshape_valid_only_for_some_symbolic_sizes_is_refused(tmp_path, capsys, rng):
    """Found by the fuzzer: an input dim of unknown size reshaped to ``[-1, 4]`` compiled to
    ``[batch * d // 4, 4]``, and a run with ``d = 1`` divided by zero (SIGFPE) in the reshape."""
    shape = numpy_helper.from_array(np.array([-1, 4], np.int64), "shape")
    model = _graph_model([helper.make_node("Reshape", ["x", "shape"], ["r"], name="flat"),
                          helper.make_node("Relu", ["r"], ["y"], name="relu")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", None])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [shape])
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert ("node 'flat' (Reshape) turns [batch, x_d1] into [batch * x_d1 // 4, 4], which holds only for some "
            "sizes of its symbolic dims") in one_error_line(capsys.readouterr().err)
    x = rng.standard_normal((3, 8)).astype(np.float32)
    np.testing.assert_allclose(bscompile.compile(model, input_shapes={"x": (3, 8)}).load().run({"x": x})["y"],
                               ort_run(model, {"x": x})["y"], rtol=1e-6)


@pytest.mark.parametrize("lens_dim, batch_dim", [("n", 2), (2, "b"), ("n", "b")])
def test_recurrent_operand_matching_the_batch_for_some_sizes_only_is_refused(tmp_path, capsys, rng, lens_dim,
                                                                              batch_dim):
    """Found by the fuzzer: a GRU whose ``sequence_lens`` has a symbolic size and ``X`` a static
    batch (or the other way round) compiled, and a run with another size was a shape error inside
    the kernel (an internal error). Same symbol on both sides compiles and matches onnxruntime."""
    h, inp = 4, 3
    weights = [numpy_helper.from_array(rng.standard_normal((1, 3 * h, n)).astype(np.float32), name)
               for name, n in (("W", inp), ("R", h))]

    def gru(batch, lens):
        return _graph_model([helper.make_node("GRU", ["x", "W", "R", "", "lens"], ["y"], hidden_size=h, name="gru")],
                            [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, batch, inp]),
                             helper.make_tensor_value_info("lens", TensorProto.INT32, [lens])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], weights)

    onnx.save(gru(batch_dim, lens_dim), tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert (f"node 'gru': input sequence_lens has shape [{lens_dim}], expected [{batch_dim}]: they match only for "
            "some sizes of the symbolic dims") in one_error_line(capsys.readouterr().err)
    model = gru("b", "b")
    feeds = {"x": rng.standard_normal((5, 3, inp)).astype(np.float32),
             "lens": rng.integers(0, 6, 3).astype(np.int32)}
    np.testing.assert_allclose(bscompile.compile(model).load().run(feeds)["y"], ort_run(model, feeds)["y"],
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["MatMul", "Gemm", "Conv"])
def test_contraction_over_a_symbolic_dim_against_another_size_is_refused(op, capsys, tmp_path, rng):
    """A matmul's reduction dim (a convolution's input channels) symbolic on one side and static
    on the other compiled: Relax shape inference rejects only provably unequal dims, and the
    kernel read out of bounds for every other size (measured: k = 100 gave inf in the output)."""
    if op == "Conv":
        w = rng.standard_normal((4, 8, 1)).astype(np.float32)
        x_shape, fixed = [1, "k", 5], (1, 8, 5)
    else:
        w = rng.standard_normal((8, 4)).astype(np.float32)
        x_shape, fixed = [3, "k"], (3, 8)
    model = _graph_model([helper.make_node(op, ["x", "w"], ["y"], name="layer")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                         [numpy_helper.from_array(w, "w")])
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert (f"node 'layer' ({op}) contracts {x_shape} with {list(w.shape)} over dims k and 8, which match only for "
            "some sizes of the symbolic dims").replace("'k'", "k") in one_error_line(capsys.readouterr().err)
    x = rng.standard_normal(fixed).astype(np.float32)
    np.testing.assert_allclose(bscompile.compile(model, input_shapes={"x": fixed}).load().run({"x": x})["y"],
                               ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", ["Add", "Concat"])
def test_operands_agreeing_only_for_some_symbolic_sizes_are_refused(op, capsys, tmp_path, rng):
    """``[n, 8] + [2, 8]`` (or their concat along axis 1) has an unknown shape in Relax; reduced
    to a scalar it reached lowering and was an internal error (``emit_te``). The node is named;
    with ``b`` symbolic in ``n`` too it compiles and matches onnxruntime."""
    attrs = {"axis": 1} if op == "Concat" else {}

    def model(b_rows):
        return _graph_model([helper.make_node(op, ["a", "b"], ["s"], name="join", **attrs),
                             helper.make_node("ReduceSum", ["s"], ["y"], keepdims=0, name="sum")],
                            [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 8]),
                             helper.make_tensor_value_info("b", TensorProto.FLOAT, [b_rows, 8])],
                            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])

    onnx.save(model(2), tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert (f"node 'join' ({op}): the shapes of its operands [n, 8], [2, 8] match only for some sizes of the "
            "symbolic dims") in one_error_line(capsys.readouterr().err)
    feeds = {k: rng.standard_normal((3, 8)).astype(np.float32) for k in "ab"}
    np.testing.assert_allclose(bscompile.compile(model("n")).load().run(feeds)["y"], ort_run(model("n"), feeds)["y"],
                               rtol=1e-5, atol=1e-5)


def test_output_of_data_dependent_shape_names_its_node(capsys, tmp_path):
    """NonZero's output size depends on the data: refused, naming the node that makes it."""
    model = _graph_model([helper.make_node("NonZero", ["x"], ["y"], name="nz")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 8])],
                         [helper.make_tensor_value_info("y", TensorProto.INT64, None)])
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-q"]) == 2
    assert ("output 'y' (of node 'nz', NonZero) has no known shape after import: a shape that depends on the "
            "data") in one_error_line(capsys.readouterr().err)


@pytest.mark.parametrize("opset", [1, 6, 99, -1])
def test_unknown_opsets_are_refused(opset):
    model = _graph_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [X], [Y], opset=opset)
    with pytest.raises(UnsupportedModelError, match=f"unsupported ai.onnx opset {opset}"):
        bscompile.compile(model)


def test_int32_overflow_and_memory_are_refused_before_allocation(monkeypatch):
    huge = TensorProto(name="w", dims=[100000, 100000], data_type=TensorProto.FLOAT)  # no data: 40 GB declared
    model = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 100000])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100000])], [huge])
    with pytest.raises(UnsupportedModelError, match=r"weight 'w' has shape \[100000, 100000\]: 10000000000 elements "
                                                    "overflow the int32 indexing"):
        bscompile.compile(model)
    relu = _graph_model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])], [Y])
    with pytest.raises(UnsupportedModelError, match=r"input 'x' has shape \[3000000000, 3\]"):
        bscompile.compile(relu, input_shapes={"x": (3_000_000_000, 3)})
    monkeypatch.setattr(limits, "available_memory", lambda: 10 * 2**20)
    w = numpy_helper.from_array(np.zeros((1024, 2048), np.float32), "w")  # 8 MiB, twice that while compiling
    model = _graph_model([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1024])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], [w])
    with pytest.raises(UnsupportedModelError, match=r"need 0.01 GiB .* 0.01 GiB of memory is available"):
        bscompile.compile(model)


def test_non_finite_weights_and_inputs_are_refused(files):
    """Pruned zeros are skipped and TVM's max drops NaN: NaN/inf cannot propagate as in onnxruntime."""
    model = onnx.load(files / "mlp.onnx")
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 5] = np.inf
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, model.graph.initializer[0].name))
    with pytest.raises(UnsupportedModelError, match=r"weight 'fc0.weight' holds inf at \[3, 5\]; .*finite"):
        bscompile.compile(model)
    mod = bscompile.load(files / "mlp.bsc")
    x = np.load(files / "x.npy")
    x[1, 2] = np.nan
    with pytest.raises(InputError, match=r"input 'x' holds nan at \[1, 2\]; inputs must be finite"):
        mod.run({"x": x})


def _members(path):
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _write(path, members):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    path.write_bytes(buf.getvalue())


def test_broken_artifacts_are_one_line_artifact_errors(files, tmp_path):
    data = (files / "mlp.bsc").read_bytes()
    cases = {"empty.bsc": b"", "short.bsc": data[:700], "junk.bsc": b"\x00" * 3000}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(ArtifactError) as err:
            bscompile.load(tmp_path / name)
        assert "\n" not in str(err.value), name
    members = _members(files / "mlp.bsc")
    manifest = json.loads(members["manifest.json"])
    for bad in ([], {"format_version": 1, "inputs": "x"}, dict(manifest, inputs=[{"name": 1}])):
        _write(tmp_path / "m.bsc", dict(members, **{"manifest.json": json.dumps(bad).encode()}))
        with pytest.raises(ArtifactError, match="invalid manifest|not supported"):
            bscompile.load(tmp_path / "m.bsc")


def test_manifest_that_lies_about_inputs_is_an_artifact_error(files, tmp_path):
    members = _members(files / "mlp.bsc")
    manifest = json.loads(members["manifest.json"])
    manifest["inputs"][0]["shape"] = [3, 16]  # and re-signed: the checksum still matches the module
    manifest["module_sha256"] = hashlib.sha256(members[manifest["module_file"]]).hexdigest()
    _write(tmp_path / "m.bsc", dict(members, **{"manifest.json": json.dumps(manifest).encode()}))
    mod = bscompile.load(tmp_path / "m.bsc")
    with pytest.raises(ArtifactError, match="the module does not take the inputs its manifest lists"):
        mod.run({"x": np.zeros((3, 16), np.float32)})


@pytest.mark.parametrize("edit,message", [
    ({"module_file": "../../escaped.so"}, "invalid manifest .module_file '../../escaped.so' is not a file name"),
    ({"module_file": "/tmp/escaped.so"}, "invalid manifest .module_file '/tmp/escaped.so' is not a file name"),
    ({"inputs": []}, "the module does not take the inputs its manifest lists"),
    ({"outputs": []}, "the module returns 1 outputs; its manifest lists 0"),
    ({"inputs": [{"name": "x", "shape": [2, -16], "dtype": "float32"}]}, r"invalid manifest .tensor 'x' has shape"),
])
def test_manifest_edited_with_a_valid_checksum_is_an_artifact_error(files, tmp_path, edit, message):
    """The checksum covers the module, not the manifest: a module file name with folders was joined
    to the loader's temporary folder (a file written anywhere), a count of inputs or outputs that
    the module does not have was an internal error or dropped outputs silently."""
    members = _members(files / "mlp.bsc")
    manifest = json.loads(members["manifest.json"])
    module = members.pop(manifest["module_file"])
    manifest.update(edit)
    members[manifest["module_file"]] = module
    _write(tmp_path / "m.bsc", dict(members, **{"manifest.json": json.dumps(manifest).encode()}))
    with pytest.raises(ArtifactError, match=message):
        mod = bscompile.load(tmp_path / "m.bsc")
        mod.run({s.name: s.random() for s in mod.inputs})
    assert not Path("/escaped.so").exists() and not Path("/tmp/escaped.so").exists()  # (from the loader's temp folder)


@pytest.mark.parametrize("case,message", [
    ("undefined", r"^node 'add' \(Add\) reads 'ghost', which no graph input, initializer or earlier node defines"),
    ("order", r"^node 'add' \(Add\) reads 'h', which no graph input"),
    ("output", r"^graph output 'zzz' is produced by no node$"),
    ("string", r"^initializer 's' holds strings"),
    ("slice", r"^node 'sl' \(Slice\) cannot be imported: its result would have shape \[2, -3\]"),
    ("concat", r"^node 'cc' \(Concat\) cannot be imported: relax\.concat: the input axis 9 is out of range\."),
])
def test_malformed_graphs_name_the_node_and_the_name(case, message):
    """TVM's importer answered these with a bare KeyError ('ghost') or a TVM dtype error."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    nodes = [helper.make_node("Add", ["x", "ghost" if case == "undefined" else "h"], ["y"], name="add"),
             helper.make_node("Relu", ["x"], ["h"], name="relu")]
    if case != "order":
        nodes.reverse()
    outs, inits = [y], []
    if case == "output":
        outs = [y, helper.make_tensor_value_info("zzz", TensorProto.FLOAT, [2])]
    if case == "string":
        inits = [helper.make_tensor("s", TensorProto.STRING, [1], [b"a"])]
        nodes.append(helper.make_node("Identity", ["s"], ["t"], name="id"))
    if case == "concat":  # TVM's message began with a dump of the op's definition ("In ir.Op(span=None, ...")
        nodes = [helper.make_node("Concat", ["x", "x"], ["y"], name="cc", axis=9)]
    if case == "slice":  # start 20 (8) > end 5: TVM inferred a negative extent, then failed inside its passes
        inits = [numpy_helper.from_array(np.array([v], np.int64), n) for v, n in ((20, "st"), (5, "en"), (1, "ax"))]
        x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
        nodes = [helper.make_node("Slice", ["x", "st", "en", "ax"], ["y"], name="sl")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs, inits),
                              opset_imports=[helper.make_opsetid("", OPSET)])
    with pytest.raises(UnsupportedModelError, match=message):
        bscompile.compile(model)


def test_outputs_are_written_only_where_asked(files, tmp_path, capsys):
    """``-o`` onto the model, a folder, a FIFO (as ``/dev/null`` is a device: the artifact was renamed
    over it), or below a file, are one-line errors that leave the path as it was; an output named
    ``../y`` is written inside ``--output DIR``."""
    import os

    model = tmp_path / "m.onnx"
    model.write_bytes((files / "mlp.onnx").read_bytes())
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "folder").mkdir()
    for out, message in ((model, "is the input"), (tmp_path / "fifo", "is not a regular file"),
                         (tmp_path / "folder", "is not a regular file"), (model / "x.bsc", "is not a directory")):
        assert main(["compile", "-q", str(model), "-o", str(out)]) == 2
        assert message in one_error_line(capsys.readouterr().err)
    onnx.checker.check_model(onnx.load(model))
    assert (tmp_path / "fifo").is_fifo() and sorted(os.listdir(tmp_path / "folder")) == []
    graph = onnx.load(model)
    graph.graph.output[0].name = graph.graph.node[-1].output[0] = "../y"
    onnx.save(graph, tmp_path / "esc.onnx")
    assert main(["compile", "-q", str(tmp_path / "esc.onnx"), "-o", str(tmp_path / "esc.bsc")]) == 0
    (tmp_path / "out").mkdir()
    assert main(["run", str(tmp_path / "esc.bsc"), "--random", "--output", str(tmp_path / "out")]) == 0
    assert os.listdir(tmp_path / "out") == ["_.._y.npy"] and not (tmp_path / "y.npy").exists()


def test_tvm_and_onnxruntime_noise_is_hidden_errors_are_one_line(files, tmp_path):
    """Through the real console entry point (fd-level stderr): TVM's "Fast mode segfaults"
    warnings only with --verbose; a failed compile leaves one line (no TVM destructor warning);
    --check on a model onnxruntime cannot run is one line, no onnxruntime log lines."""
    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    model = _graph_model([helper.make_node("Gather", ["table", "ids"], ["y"], name="G")],
                         [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])], [table])
    onnx.save(model, tmp_path / "g.onnx")
    rc, _, err = run_cli("g.onnx", "-q", cwd=tmp_path)
    assert rc == 0 and err == "", err
    rc, _, err = run_cli("--verbose", "g.onnx", "-q", cwd=tmp_path)
    assert rc == 0 and "Fast mode segfaults" in err
    shape = numpy_helper.from_array(np.array([5, 7], np.int64), "shape")  # 32 values into 35: TVM's importer
    broken = _graph_model([helper.make_node("Reshape", ["x", "shape"], ["y"], name="rs")],  # fails half-way
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, 7])], [shape])
    onnx.save(broken, tmp_path / "broken.onnx")
    rc, _, err = run_cli("broken.onnx", "-q", cwd=tmp_path)
    assert rc == 2 and "node 'rs' (Reshape) cannot be imported" in one_error_line(err)
    assert not (tmp_path / "broken.bsc").exists()
    old = onnx.load(files / "mlp.onnx")
    old.graph.node[0].op_type = "Relu"  # a model onnxruntime rejects (Relu takes one input)
    onnx.save(old, tmp_path / "other.onnx")
    rc, _, err = run_cli("run", files / "mlp.bsc", "--input", f"x={files / 'x.npy'}", "--check", "other.onnx",
                     cwd=tmp_path)
    assert rc == 2 and "--check: onnxruntime cannot run other.onnx" in one_error_line(err)


def test_undefined_element_type_is_refused():
    """Found by atheris: an input of element type 0 (undefined) was a KeyError (internal error)."""
    bad = helper.make_tensor_value_info("x", TensorProto.UNDEFINED, [2, 3])
    model = _graph_model([helper.make_node("Relu", ["x"], ["y"], name="r")], [bad], [Y])
    with pytest.raises(UnsupportedModelError, match="unsupported tensor element type 0"):
        bscompile.compile(model)


def test_out_of_range_token_with_dynamic_axes_is_one_error(tmp_path, capsys, rng):
    """An embedding exported with dynamic axes (symbolic batch and seq): the index check used to
    be skipped for symbolic shapes, so an out-of-range token id was an out-of-bounds read again."""
    vocab, dim = 11, 4
    inits = [numpy_helper.from_array(rng.standard_normal((vocab, dim)).astype(np.float32), "E"),
             numpy_helper.from_array(rng.standard_normal((dim, 6)).astype(np.float32), "W")]
    model = _graph_model([helper.make_node("Gather", ["E", "tokens"], ["e"], name="embed/Gather_3", axis=0),
                          helper.make_node("MatMul", ["e", "W"], ["y"], name="mm")],
                         [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["batch", "seq"])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 6])], inits)
    bscompile.compile(model).export(tmp_path / "emb.bsc")
    mod = bscompile.load(tmp_path / "emb.bsc")
    for shape in ((2, 5), (1, 3)):
        ids = rng.integers(-vocab, vocab, shape)
        ids.flat[:2] = (-vocab, vocab - 1)  # both ends of the range, negative ids with ONNX semantics
        np.testing.assert_allclose(mod.run({"tokens": ids})["y"], ort_run(model, {"tokens": ids})["y"],
                                   rtol=1e-5, atol=1e-6)
    message = rf"input 'tokens' holds index {{}} outside \[-{vocab}, {vocab}\) at node embed_Gather_3"
    for bad in (vocab, -vocab - 1, 10**9):
        ids = rng.integers(0, vocab, (3, 7))
        ids[1, 4] = bad
        with pytest.raises(InputError, match="^" + message.format(bad) + "$"):
            mod.run({"tokens": ids})
        np.save(tmp_path / "ids.npy", ids)
        assert main(["run", str(tmp_path / "emb.bsc"), "--input", f"tokens={tmp_path / 'ids.npy'}"]) == 2
        assert re.fullmatch("bscompile: error: " + message.format(bad), one_error_line(capsys.readouterr().err))


def test_external_data_is_checked_before_it_is_read(files, tmp_path, monkeypatch, capsys):
    """Weights in a separate file: a missing or short file is one line, and the memory limit
    is applied (from the dims) before any external byte is read."""
    model = onnx.load(files / "mlp.onnx")
    onnx.save(onnx.load(files / "mlp.onnx"), tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)
    data = (tmp_path / "w.bin").read_bytes()
    x = np.load(files / "x.npy")
    out = bscompile.compile(tmp_path / "m.onnx").load().run({"x": x})["y"]
    np.testing.assert_allclose(out, ort_run(model, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    (tmp_path / "w.bin").write_bytes(data[:len(data) // 2])
    assert main(["compile", str(tmp_path / "m.onnx")]) == 2
    assert re.search(r"external data file 'w.bin' holds \d+ bytes; the model needs \d+$",
                     one_error_line(capsys.readouterr().err))
    (tmp_path / "w.bin").unlink()
    assert main(["compile", str(tmp_path / "m.onnx")]) == 2
    assert "external data file 'w.bin' is missing" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "m.bsc").exists()
    (tmp_path / "sub").mkdir()  # the weights file outside the model's folder (../w.bin), though long enough
    (tmp_path / "w.bin").write_bytes(data)
    onnx.save(onnx.load(files / "mlp.onnx"), tmp_path / "sub" / "m.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="w.bin", size_threshold=0)
    outside = onnx.load(tmp_path / "sub" / "m.onnx", load_external_data=False)
    for init in outside.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = "../w.bin"
    onnx.save(outside, tmp_path / "sub" / "m.onnx")
    assert main(["compile", str(tmp_path / "sub" / "m.onnx")]) == 2
    assert "external data file '../w.bin' is outside the model's folder" in one_error_line(capsys.readouterr().err)
    (tmp_path / "w.bin").write_bytes(data)
    monkeypatch.setattr(limits, "available_memory", lambda: 1024)
    monkeypatch.setattr(onnx.external_data_helper, "_read_external_data_bytes",
                        lambda *a: pytest.fail("external data read before the memory check"))
    with pytest.raises(UnsupportedModelError, match=r"of memory is available"):
        bscompile.compile(tmp_path / "m.onnx")


def test_repeated_calls_keep_every_input_check(files):
    """run()'s fast path (same names, shapes, dtypes as the last call) still refuses bad inputs."""
    mod = bscompile.load(files / "mlp.bsc")
    x = np.load(files / "x.npy")
    first = next(iter(mod.run({"x": x}).values()))
    for bad in (np.inf, -np.inf, np.nan):
        xb = x.copy()
        xb[0, 7] = bad
        with pytest.raises(InputError, match=r"input 'x' holds .* at \[0, 7\]; inputs must be finite"):
            mod.run({"x": xb})
    with pytest.raises(InputError, match=r"input 'x' has dtype float64, expected float32"):
        mod.run({"x": x.astype(np.float64)})
    with pytest.raises(InputError, match=r"inputs do not match the model: unknown \['z'\]"):
        mod.run({"z": x})
    big = np.full_like(x, 3e38)  # finite, though a sum of it would overflow
    mod.run({"x": big})
    again = next(iter(mod.run({"x": 2 * x}).values()))
    np.testing.assert_allclose(next(iter(mod.run({"x": x}).values())), first, rtol=1e-6, atol=1e-6)
    assert not np.array_equal(again, first)  # a fresh result, not the first call's buffer rewritten


def test_recurrent_state_shapes_that_contradict_the_batch_are_one_line(tmp_path, capsys, rng):
    """A GRU whose ``sequence_lens`` (or ``initial_h``) disagrees with X's batch is refused while
    importing with one line naming the node and the input (it reached TVM's lowering, an
    internal error, found by bench/fuzz.py)."""
    from onnx_models import gru_with_lens

    model = gru_with_lens(rng, hidden=8, inp=4)
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 3
    model.graph.input[1].type.tensor_type.shape.dim[0].dim_value = 2
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.bsc"), "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "bscompile: error: node 'gru': input sequence_lens has shape [2], expected [3]"
    assert not (tmp_path / "m.bsc").exists()


def test_recurrent_weight_of_the_wrong_shape_is_one_line(tmp_path, capsys, rng):
    """A GRU whose R does not match its hidden size and directions is refused with one line
    naming the node, before any of its weights is read."""
    from onnx_models import gru_with_lens

    model = gru_with_lens(rng, hidden=8, inp=4)
    r_name = next(n for n in model.graph.node if n.op_type == "GRU").input[2]
    r = next(t for t in model.graph.initializer if t.name == r_name)
    r.CopyFrom(onnx.numpy_helper.from_array(rng.standard_normal((1, 24, 7)).astype(np.float32), r_name))
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.bsc"), "-q"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.strip() == "bscompile: error: node 'gru': R has shape (1, 24, 7), expected (1, 24, 8)"
    assert not (tmp_path / "m.bsc").exists()
    gru = next(n for n in model.graph.node if n.op_type == "GRU")
    gru.input[2] = ""  # R left out: was "'NoneType' object has no attribute 'ty'"
    with pytest.raises(UnsupportedModelError, match=r"^node 'gru' \(GRU\): inputs X, W and R are required$"):
        bscompile.compile(model)


def test_large_inputs_are_checked_in_every_chunk():
    """Inputs over 16K elements are checked for NaN/inf in 16K-element chunks (no temporary array):
    a bad value in the last, partial chunk is found on the full check and on run()'s fast path; finite
    values whose squares overflow are accepted."""
    node = helper.make_node("Relu", ["x"], ["y"], name="relu")
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 64])])
    mod = bscompile.compile(helper.make_model(g, opset_imports=[helper.make_opsetid("", OPSET)])).load()
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float32)  # 19200 elements: 2 chunks
    np.testing.assert_array_equal(mod.run({"x": x})["y"], np.maximum(x, 0))
    for at in ((0, 3), (299, 63), (256, 0)):  # first chunk, the last element, the second chunk's start
        for bad in (np.nan, np.inf):
            xb = x.copy()
            xb[at] = bad
            with pytest.raises(InputError, match=rf"holds {bad} at \[{at[0]}, {at[1]}\]"):
                mod.run({"x": xb})  # same shape as the last good call: the fast path
            with pytest.raises(InputError, match=rf"holds {bad} at \[{at[0]}, {at[1]}\]"):
                mod.run({"x": np.vstack([xb, x[:1]])})  # another shape: the full check
    huge = np.full((300, 64), 3e38, np.float32)
    np.testing.assert_array_equal(mod.run({"x": huge})["y"], huge)


_RECORD = {"key": "0" * 40, "name": "W1", "kind": "linear", "m": 2, "target": "llvm", "layout": "bsr", "block": "4x4",
           "schedule": {"m_tile": 1, "parallel": False, "unroll_c": True, "variant": "rows", "m_vec": 8},
           "time_us": 1.0, "dense_time_us": 2.0}


def test_records_of_every_site_kind_load_back(files, tmp_path):
    """What `bscompile tune` writes loads back: a dynamic site's record names its own layout
    ("tiles") and a row tile of a whole 384-row block (AVX-512 at m = 1)."""
    from bscompile.records import TuningRecord, load_records, save_records

    dynamic = {**_RECORD, "key": "1" * 40, "kind": "dynamic_linear", "layout": "tiles", "block": "",
               "schedule": {"m_tile": 1, "rows_tile": 384, "chunks": 2, "gate_parallel": False, "dense_fraction": 2.0,
                            "prefetch": False, "claim": True, "streams": 2}}
    save_records(tmp_path / "r.json", [TuningRecord(**_RECORD), TuningRecord(**dynamic)])
    assert [r.layout for r in load_records(tmp_path / "r.json").values()] == ["bsr", "tiles"]
    bscompile.compile(str(files / "mlp.onnx"), records=str(tmp_path / "r.json"))  # (schedules the family takes)


@pytest.mark.parametrize("edit,message", [
    ({"schedule": {**_RECORD["schedule"], "m_tile": 10**9}}, r"schedule m_tile=1000000000 is out of range"),
    ({"layout": "banana"}, r"layout 'banana' is not one of dense, bsr, tiles"),
    ({"block": "0x0"}, r"block shape '0x0'"),
    ({"m": "two"}, r"m must be an int >= 1"),
    ({"schedule": {}}, r"^tuning record 'W1' \(m=2\) holds a schedule the cpu kernels do not take"),
    ({"kind": "banana"}, r"^tuning record 'W1' \(m=2\) holds a schedule the cpu kernels do not take"),
    (None, r"is not a bscompile tuning records file \(UnicodeDecodeError"),
])
def test_hand_edited_tuning_records_are_one_line_errors(files, tmp_path, edit, message):
    """Records are input too: a schedule of 10^9 rows a tile made the code generator unroll for
    ever, an unknown schedule or layout was a TypeError from inside the compiler, a binary file a
    UnicodeDecodeError."""
    path = tmp_path / "r.json"
    if edit is None:
        path.write_bytes(bytes(range(256)))
    else:
        path.write_text(json.dumps({"format": 3, "records": [{**_RECORD, **edit}]}))
    with pytest.raises(BscompileError, match=message):
        bscompile.compile(str(files / "mlp.onnx"), records=str(path))


@pytest.mark.parametrize("target,message", [
    ('{"kind":"llvm","mtriple":"banana"}', "target triple 'banana' is not supported"),
    ('{"kind":"llvm","mtriple":"riscv64-linux-gnu"}', "target triple 'riscv64-linux-gnu' is not supported"),
    ('{"kind":"cuda","arch":"sm_1"}', "unknown CUDA architecture 'sm_1'"),
])
def test_target_json_outside_what_bscompile_builds_is_one_line(files, tmp_path, target, message):
    """An unknown triple crashed LLVM (SIGSEGV); another architecture's compiled, then failed to link
    with the host's g++ (an internal error); an unknown CUDA arch in JSON was a KeyError. In a
    subprocess: a crash must fail this test, not the test run."""
    rc, _, err = run_cli(files / "mlp.onnx", "--target", target, "-o", tmp_path / "x.bsc")
    assert rc == 2 and not (tmp_path / "x.bsc").exists(), (rc, err)
    assert message in one_error_line(err)


def test_api_misuse_is_one_line_bscompile_errors(files):
    """What a Python user gets wrong raises the project's errors in one line: it raised TypeError
    (unhashable ndarray, NoneType), ValueError, AttributeError, or read an int as a path, compiled an
    empty ModelProto into an artifact with no outputs, truncated a 2.7 dim, timed 0 calls as NaN."""
    model = str(files / "mlp.onnx")
    mod = bscompile.load(files / "mlp.bsc")
    x = np.load(files / "x.npy")
    cases = [(lambda: mod.run(x), InputError, "inputs: a dict"), (lambda: mod.run(None), InputError, "inputs: a dict"),
             (lambda: bscompile.compile(None), BscompileError, "model: a path or an onnx.ModelProto, not NoneType"),
             (lambda: bscompile.compile(onnx.load(model).SerializeToString()), BscompileError, "not bytes"),
             (lambda: bscompile.compile(onnx.ModelProto()), BscompileError, "no graph nodes or no outputs"),
             (lambda: bscompile.load(None), ArtifactError, "artifact: a path"),
             (lambda: bscompile.compile(model, input_shapes={"x": (2.7, 16)}), BscompileError, "not a sequence of ints"),
             (lambda: bscompile.compile(model, input_shapes={"x": "2,16"}), BscompileError, "not a sequence of ints"),
             (lambda: bscompile.compile(model, block=4), BscompileError, "block: 'RxC'"),
             (lambda: bscompile.compile(model, records={"a": 1}), BscompileError, "dict of TuningRecord"),
             (lambda: mod.benchmark({"x": x}, number=0), InputError, "must be ints >= 1")]
    for call, error, message in cases:
        with pytest.raises(error, match=re.escape(message)) as err:
            call()
        assert "\n" not in str(err.value)
    assert mod.run({"x": x})["y"].shape == (2, 8)  # (and the module still runs)
