"""CPU kernels of dynamic sites (gate, radix selection, tile lists, tile product) vs the NumPy reference.

Inputs are redrawn until every row separates its k-th and (k+1)-th gate score by a clear
margin (float32 gate sums in the kernel and in NumPy differ by ~1e-6; a row closer to a
tie may legitimately select differently). Exact ties are tested separately with gate
scores that are bit-identical in both. Tolerances: rtol 1e-4 and atol 2e-5 x max |y|
(float32 sums of up to 512 products vs a float64 reference; an indexing or selection
bug is off by O(|y|)).
"""

import dataclasses
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tvm

from bscompile.codegen import cpu_dynamic as cd
from bscompile.codegen import dynamic_layout as dl
from bscompile.codegen.family import M_BUCKETS
from bscompile.target import resolve_target


def _build(fin, fout, bs, k, m, sched, n_alive=None):
    func = cd.dynamic_linear_kernel(fin, fout, bs, k, m, sched, n_alive).with_attr("global_symbol", "k")
    return tvm.compile(tvm.IRModule({"k": func}), target=resolve_target("llvm").tvm_target())["k"]


def _run(fn, x, w, gw, gb, bias, bs, panel, alive=None):
    y = tvm.runtime.empty((x.shape[0], w.shape[0]), "float32")
    args = (x, dl.pack_tiles(w, bs, panel), dl.pack_gate(gw), dl.pad_gate_bias(gb, alive), bias)
    fn(*[tvm.runtime.tensor(a) for a in args], y)
    return y.numpy()


def _margin_rows(rng, m, fin, gw, gb, k, alive=None, margin=1e-3, shift=0.0):
    rows = []
    while len(rows) < m:
        x = rng.standard_normal((4 * m, fin)).astype(np.float32)
        g = x.astype(np.float64) @ gw.T.astype(np.float64) + gb
        if alive is not None:
            g = np.where(alive, g, -np.inf)
        srt = -np.sort(-g, axis=1)
        nxt = srt[:, k] if k < g.shape[1] else np.full(len(g), -np.inf)
        kept = np.where(np.isfinite(srt[:, :k]), srt[:, :k], 0).sum(1)
        rows.extend(x[(srt[:, k - 1] - nxt > margin) & (np.abs(kept) > 0.5)])
    return np.stack(rows[:m])


CASES = [
    # (in, out, block, keep, m, schedule overrides, static mask, gate bias shift)
    (256, 384, 64, 0.5, 1, {}, False, 0.0),
    (256, 384, 64, 0.5, 2, {"prefetch": True, "m_tile": 1}, False, 0.0),  # software prefetch of the next tile
    (256, 384, 64, 0.25, 3, {}, False, 0.0),  # m_tile 3
    (256, 384, 64, 0.5, 8, {"m_tile": 8, "rows_tile": 16}, False, 0.0),  # 4 panels per tile
    (256, 384, 64, 0.5, 7, {"m_tile": 3, "rows_tile": 64}, False, 0.0),  # 3 rows x 4 vectors, last group padded
    (256, 512, 64, 0.5, 4, {"chunks": 2, "gate_parallel": True}, False, 0.0),  # parallel, balanced chunks
    (256, 512, 64, 0.25, 4, {"chunks": 3, "gate_parallel": False}, False, 0.0),  # one launch, gate per thread
    (256, 384, 32, 0.5, 16, {}, False, 0.0),  # union ~ everything, rows gathered in groups of 4
    (256, 384, 64, 0.5, 8, {"dense_fraction": 0.0}, False, 0.0),  # always masked dense
    (256, 384, 64, 0.5, 8, {"dense_fraction": 2.0, "m_tile": 4}, False, 0.0),  # never: gathered rows, padding
    (256, 384, 64, 0.75, 2, {}, False, -1.5),  # negative k-th scores (radix select on negative keys)
    (256, 384, 64, 0.5, 2, {"chunks": 3}, True, 0.0),  # static block mask: -inf scores, n_alive
    (128, 256, 32, 1.0, 1, {}, False, 2.0),  # keep everything
    (256, 512, 64, 0.5, 1, {"chunks": 2, "claim": True}, False, 0.0),  # threads claim gate groups and blocks
    (256, 512, 64, 0.25, 3, {"chunks": 2, "claim": True}, True, 0.0),  # claimed, row groups, static mask
    (256, 512, 64, 0.5, 1, {"chunks": 2, "claim": True, "prefetch": True}, False, 0.0),
    (256, 512, 64, 0.5, 1, {"chunks": 2, "claim": True, "streams": 2}, False, 0.0),  # a tile read as two streams
    (256, 384, 64, 0.25, 1, {"streams": 4}, True, 0.0),  # four streams, static mask
]


@pytest.mark.parametrize("fin,fout,bs,keep,m,over,static,shift", CASES, ids=lambda v: str(v).replace(" ", ""))
def test_dynamic_kernel_matches_numpy(rng, fin, fout, bs, keep, m, over, static, shift):
    nbi, nbo = fin // bs, fout // bs
    n = nbi * nbo
    alive = None
    if static:
        alive = rng.random(n) >= 0.3
        alive[0] = True
    n_alive = n if alive is None else int(alive.sum())
    k = dl.keep_count(keep, n_alive)
    shape = dl.DynamicShape(fin, fout, bs, k)
    sched = dataclasses.replace(cd.default_schedule(shape, m), **over)
    fn = _build(fin, fout, bs, k, m, sched, n_alive)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    gw = (rng.standard_normal((n, fin)) / np.sqrt(fin)).astype(np.float32)
    gb = (rng.standard_normal(n) + shift).astype(np.float32)
    bias = rng.standard_normal(fout).astype(np.float32)
    x = _margin_rows(rng, m, fin, gw, gb, k, alive)
    y = _run(fn, x, w, gw, gb, bias, bs, dl.tile_panel([sched]), alive)
    ref, r = dl.dynamic_linear(x, w, gw, gb, bias, bs, k, alive)
    assert ((r != 0).sum(1) == k).all()
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max(), err_msg=str(sched))


def test_symbolic_m_dispatches_per_bucket(rng):
    """One kernel for any m (the buckets of ``M_BUCKETS``, each with its default schedule:
    whole tiles at m = 1, panels and row groups beyond, tiles packed in the narrowest
    panel) against NumPy at m = 1, 3 (row groups with a tail), 17 and 40, from one build."""
    fin, fout, bs, keep = 256, 512, 64, 0.25
    n = (fin // bs) * (fout // bs)
    k = dl.keep_count(keep, n)
    shape = dl.DynamicShape(fin, fout, bs, k)
    cases = tuple((lo, hi, cd.default_schedule(shape, rep, 8)) for lo, hi, rep in M_BUCKETS)
    assert cases[0][2].rows_tile != cases[-1][2].rows_tile  # the m = 1 case reads whole-tile registers over panels
    panel = dl.tile_panel([c[2] for c in cases])
    fn = _build(fin, fout, bs, k, None, cases)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    gw = (rng.standard_normal((n, fin)) / np.sqrt(fin)).astype(np.float32)
    gb = rng.standard_normal(n).astype(np.float32)
    bias = rng.standard_normal(fout).astype(np.float32)
    for m in (1, 3, 17, 40):
        x = _margin_rows(rng, m, fin, gw, gb, k)
        ref, _ = dl.dynamic_linear(x, w, gw, gb, bias, bs, k)
        np.testing.assert_allclose(_run(fn, x, w, gw, gb, bias, bs, panel), ref, rtol=1e-4,
                                   atol=2e-5 * np.abs(ref).max(), err_msg=f"m={m}")


@pytest.mark.parametrize("threads", [1, 3])
def test_claimed_work_is_complete_with_any_pool_size(rng, threads, tmp_path):
    """``claim`` splits its items between two threads by flags; with one pool thread the
    first iteration takes everything, with three the third gets nothing but still meets the
    barrier. Run in a fresh process with ``TVM_NUM_THREADS`` set, at m = 1 (a symbolic
    kernel: whole-tile registers over narrower panels) and m = 3, against NumPy."""
    fin, fout, bs, keep = 256, 512, 64, 0.5
    n = (fin // bs) * (fout // bs)
    k = dl.keep_count(keep, n)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    gw = (rng.standard_normal((n, fin)) / np.sqrt(fin)).astype(np.float32)
    gb = rng.standard_normal(n).astype(np.float32)
    bias = rng.standard_normal(fout).astype(np.float32)
    xs = {m: _margin_rows(rng, m, fin, gw, gb, k) for m in (1, 3)}
    np.savez(tmp_path / "in.npz", w=w, gw=gw, gb=gb, bias=bias, x1=xs[1], x3=xs[3])
    script = f"""
import dataclasses, numpy as np, tvm
from bscompile.codegen import cpu_dynamic as cd, dynamic_layout as dl
from bscompile.target import resolve_target
d = np.load({str(tmp_path / "in.npz")!r})
shape = dl.DynamicShape({fin}, {fout}, {bs}, {k})
claim = lambda m, rt: dataclasses.replace(cd.default_schedule(shape, m, 16), chunks=2, claim=True, rows_tile=rt)
cases = ((1, 1, claim(1, 64)), (2, None, claim(4, 16)))
func = cd.dynamic_linear_kernel({fin}, {fout}, {bs}, {k}, None, cases).with_attr("global_symbol", "k")
fn = tvm.compile(tvm.IRModule({{"k": func}}), target=resolve_target("llvm").tvm_target())["k"]
args = [tvm.runtime.tensor(a) for a in
        (dl.pack_tiles(d["w"], {bs}, 16), dl.pack_gate(d["gw"]), dl.pad_gate_bias(d["gb"]), d["bias"])]
out = {{}}
for m in (1, 3):
    y = tvm.runtime.empty((m, {fout}), "float32")
    fn(tvm.runtime.tensor(d[f"x{{m}}"]), *args, y)
    out[f"y{{m}}"] = y.numpy()
np.savez({str(tmp_path / "out.npz")!r}, **out)
"""
    env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = np.load(tmp_path / "out.npz")
    for m in (1, 3):
        ref, _ = dl.dynamic_linear(xs[m], w, gw, gb, bias, bs, k)
        np.testing.assert_allclose(got[f"y{m}"], ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max(), err_msg=f"m={m}")


def test_exact_ties_keep_every_tied_tile(rng):
    """Scores bit-identical in kernel and NumPy (zero gate weights): 5 tiles tie at the
    k-th value, so 5 tiles are kept for k = 3, as onnxruntime's TopK + GreaterOrEqual do."""
    fin, fout, bs, k = 128, 256, 32, 3
    n = (fin // bs) * (fout // bs)
    gb = rng.uniform(-2, -1, n).astype(np.float32)
    tied = rng.choice(n, 5, replace=False)
    gb[tied] = 0.625
    gw = np.zeros((n, fin), np.float32)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    bias = np.zeros(fout, np.float32)
    x = rng.standard_normal((2, fin)).astype(np.float32)
    sched = cd.default_schedule(dl.DynamicShape(fin, fout, bs, k), 2)
    fn = _build(fin, fout, bs, k, 2, sched)
    ref, r = dl.dynamic_linear(x, w, gw, gb, bias, bs, k)
    assert ((r != 0).sum(1) == 5).all()
    np.testing.assert_allclose(_run(fn, x, w, gw, gb, bias, bs, sched.rows_tile), ref, rtol=1e-4, atol=2e-5 * np.abs(ref).max())


def test_schedule_and_static_mask_are_checked():
    with pytest.raises(ValueError, match="does not tile"):
        cd.dynamic_linear_kernel(128, 256, 32, 4, 3, cd.DynamicSchedule(2, 24, 1, False))
    with pytest.raises(ValueError, match="n_alive"):
        cd.dynamic_linear_kernel(128, 256, 32, 4, 1, cd.DynamicSchedule(1, 32, 1, False), n_alive=3)


def test_packing_must_follow_the_schedule(rng):
    """Tiles packed for another panel width are refused by the call, never misread."""
    fin, fout, bs, k = 128, 256, 32, 4
    fn = _build(fin, fout, bs, k, 2, cd.DynamicSchedule(2, 16, 1, False))
    n = (fin // bs) * (fout // bs)
    w = rng.standard_normal((fout, fin)).astype(np.float32)
    gw = rng.standard_normal((n, fin)).astype(np.float32)
    x = rng.standard_normal((2, fin)).astype(np.float32)
    with pytest.raises(Exception, match="ndim|shape"):
        _run(fn, x, w, gw, np.zeros(n, np.float32), np.zeros(fout, np.float32), bs, bs)


@tvm.ir.instrument.pass_instrument
class _AfterStorageRewrite:
    """Keeps the module as StorageRewrite leaves it."""

    def __init__(self):
        self.mod = None

    def run_after_pass(self, mod, info):
        if info.name == "tirx.StorageRewrite":
            self.mod = mod


@pytest.mark.parametrize("m", [1, 4])
@pytest.mark.parametrize("variant", ["default", "serial", "gate_parallel", "claim"])
def test_register_tile_keeps_its_own_buffer(m, variant):
    """The accumulator tile of the product must not share another buffer's memory.

    StorageRewrite hands a buffer first used after another one died (in the same function
    or parallel loop) that one's memory; the accumulators then live in a workspace LLVM
    cannot keep in registers, and every FMA step stores them (measured 2x slower at batch 1).
    Checked on the lowered TIR: the buffer the tile FMAs (``acc += tiles * x``) write is an
    allocation of exactly ``m_tile x rows_tile`` floats."""
    fin, fout, bs = 1024, 2048, 64  # 512 gate scores: buffers large enough to be workspaces
    shape = dl.DynamicShape(fin, fout, bs, 8)
    base = dataclasses.replace(cd.default_schedule(shape, m, 16, 2), chunks=2)
    sched = {"default": base, "serial": dataclasses.replace(base, chunks=1),
             "gate_parallel": dataclasses.replace(base, gate_parallel=not base.gate_parallel, claim=False),
             "claim": dataclasses.replace(base, gate_parallel=False, claim=True)}[variant]
    func = cd.dynamic_linear_kernel(fin, fout, bs, 8, m, sched).with_attr("global_symbol", "k")
    keep = _AfterStorageRewrite()
    with tvm.transform.PassContext(instruments=[keep]):
        tvm.compile(tvm.IRModule({"k": func}), target=resolve_target("llvm").tvm_target())
    text = "\n".join(fn.script() for fn in keep.mod.functions.values())
    # the tile FMA: ``acc[...] = acc[...] + tiles[...] * T.Broadcast(xv, ...)``
    targets = set(re.findall(r"^\s*(\w+)\[[^\]]*\] = \1\[.*\btiles\[", text, re.M))
    assert targets, "no tile FMA found in the lowered kernel"
    for name in targets:
        alloc = re.search(rf"^\s*{name} = T\.alloc_buffer\(\((\d+),\)(?:, \"float32x(\d+)\")?", text, re.M)
        floats = int(alloc.group(1)) * int(alloc.group(2) or 1) if alloc else None  # (vector types after rewrite)
        assert floats == sched.m_tile * sched.rows_tile, \
            f"{sched}: the register tile is not its own buffer: " + \
            (re.search(rf"^\s*{name} = .*$", text, re.M) or [""])[0].strip()
