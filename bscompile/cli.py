"""The ``bscompile`` command line. ``bscompile MODEL.onnx ...`` is ``bscompile compile MODEL.onnx ...``.

Every user error is one line on stderr and exit status 2; nothing is written on
failure (artifacts are written to a temp file and renamed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import numpy as np

COMMANDS = ("compile", "run", "inspect", "package", "demo", "targets", "tune")


class _Parser(argparse.ArgumentParser):
    """Usage errors are one line (``bscompile: error: ...``) and exit 2, like every other error."""

    def error(self, message: str):
        self.exit(2, f"bscompile: error: {one_line(message)} (see `{self.prog} --help`)\n")


def _shape_arg(text: str) -> tuple[str, tuple[int, ...]]:
    try:
        name, dims = text.rsplit("=", 1)
        shape = tuple(int(d) for d in dims.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,..., got '{text}'") from None
    if not name or any(d <= 0 for d in shape):
        raise argparse.ArgumentTypeError(f"expected NAME=D0,D1,... with positive dimensions, got '{text}'")
    return name, shape


def _block_arg(text: str) -> str:
    from bscompile.codegen.layout import CANDIDATE_EDGES

    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and 1 <= int(p) <= 8 * max(CANDIDATE_EDGES) for p in parts):
        raise argparse.ArgumentTypeError(f"expected RxC with 1 <= R, C <= {8 * max(CANDIDATE_EDGES)} "
                                         f"(e.g. 4x4), got '{text}'")
    return text.lower()


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got '{text}'")
    return int(text)


def _input_arg(text: str) -> tuple[str, str]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE.npy, got '{text}'")
    name, path = text.split("=", 1)
    return name, path


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)  # accepted before and after the command
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks for errors")
    common.add_argument("--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show TVM's own warnings and log lines")
    p = _Parser(prog="bscompile", description="Compile pruned ONNX models into block-sparse kernels.",
                parents=[common])
    sub = p.add_subparsers(dest="command", required=True, parser_class=lambda **kw: _Parser(parents=[common], **kw))

    def model_opts(sp):
        sp.add_argument("--input-shape", type=_shape_arg, action="append", default=[], metavar="NAME=D0,D1,...",
                        help="static shape of an input with dynamic dims (repeatable)")
        sp.add_argument("--target", default="llvm", help="llvm (this CPU), x86_64, aarch64, a board preset "
                        "(see `bscompile targets`) or a TVM target JSON dict")
        sp.add_argument("--cpu", help="LLVM CPU model for CPU targets, e.g. cortex-a76")
        sp.add_argument("--arch", help="GPU architecture for the cuda target, e.g. sm_80, sm_90")
        sp.add_argument("--persistent-rnn", action="store_true",
                        help="cuda: run recurrent layers on the opt-in persistent kernel (Zhu et al.: weights on "
                             "chip for all steps; the grid must be co-resident)")
        sp.add_argument("--dense", action="store_true", help="compile bscompile's dense path (no sparsity)")
        sp.add_argument("--block", type=_block_arg, metavar="RxC",
                        help="force this block shape on every weight with zeros")

    c = sub.add_parser("compile", help="compile an ONNX model to a .bsc artifact")
    c.add_argument("model")
    c.add_argument("-o", "--output", help="artifact path (default: MODEL.bsc)")
    c.add_argument("--dump-ir", metavar="DIR", help="write the IR after every pass (bscompile's and TVM's) to DIR")
    c.add_argument("--records", help="tuning records from `bscompile tune` to apply")
    c.add_argument("--time-passes", action="store_true",
                   help="print where compile time went (wall and CPU per phase and pass) and the peak memory")
    c.add_argument("-q", "--quiet", action="store_true")
    model_opts(c)

    r = sub.add_parser("run", help="run a .bsc artifact on .npy inputs")
    r.add_argument("artifact")
    r.add_argument("--input", type=_input_arg, action="append", default=[], metavar="NAME=FILE.npy")
    r.add_argument("--random", action="store_true", help="feed random inputs of the right shapes")
    r.add_argument("--output", help="write outputs: FILE.npz, or a directory for NAME.npy files")
    r.add_argument("--check", metavar="MODEL.onnx", help="compare the outputs with onnxruntime on this model")
    r.add_argument("--bench", type=_positive_int, default=0, metavar="N",
                   help="time N calls (and onnxruntime with --check)")
    r.add_argument("--emulate", nargs="?", const="forward", choices=("forward", "reverse", "random"), metavar="ORDER",
                   help="run a CUDA artifact on this CPU with the CUDA emulator, which reports what a GPU would "
                        "reject or mis-execute; ORDER of threads and blocks: forward (default), reverse, random")

    i = sub.add_parser("inspect", help="per-weight sparsity report and layout choice, without compiling "
                                       "(of an ONNX model), or what a .bsc artifact holds")
    i.add_argument("model")
    i.add_argument("--json", action="store_true", help="print JSON")
    model_opts(i)

    k = sub.add_parser("package", help="bundle a .bsc with a native runner for deployment")
    k.add_argument("artifact", nargs="?", help="the .bsc to bundle (omit with --tuning-server for a server-only "
                   "bundle)")
    k.add_argument("--tuning-server", action="store_true", help="also ship the device-side tuning server "
                   "(./tuning-server, for `bscompile tune --remote`)")
    k.add_argument("-o", "--output", required=True, help="bundle path (.tar.gz)")
    k.add_argument("--name", help="folder the bundle unpacks into (default: the artifact's stem)")
    k.add_argument("--json", action="store_true", help="print the size report as JSON")

    d = sub.add_parser("demo", help="compile the bundled pruned GRU model, check it against onnxruntime, time both")
    d.add_argument("--model", help="ONNX model (default: the bundled char-level GRU)")
    d.add_argument("--runs", type=_positive_int, default=50)

    sub.add_parser("targets", help="list named targets")

    t = sub.add_parser("tune", help="measure candidate layouts/schedules per weight and compile the fastest")
    t.add_argument("model")
    t.add_argument("-o", "--output", help="artifact path (default: MODEL.bsc)")
    t.add_argument("--records", help="tuning records JSON to write (default: MODEL.tune.json)")
    t.add_argument("--remote", metavar="URL", help="measure on the device: ssh://[user@]board[:port][/path/to/"
                   "tuning-server], tcp://host:port, tracker://host:port/KEY, or emulator (the aarch64 server "
                   "under qemu here; timings mean nothing)")
    model_opts(t)
    return p


def _progress(quiet: bool):
    if quiet:
        return None
    from bscompile.driver import stderr_progress

    return stderr_progress


def _compile_kwargs(args) -> dict:
    target = args.target
    if args.arch:
        from bscompile.target import with_arch  # cuda targets

        target = with_arch(target, args.arch)
    if args.persistent_rnn:
        from bscompile.target import with_persistent_rnn

        target = with_persistent_rnn(target)
    return dict(target=target, cpu=args.cpu, input_shapes=dict(args.input_shape) or None,
                sparse=not args.dense, block=args.block)


def cmd_compile(args) -> int:
    import bscompile
    from bscompile.report import weight_table
    from bscompile.runtime.artifact import check_output_path

    out = args.output or str(Path(args.model).with_suffix(".bsc"))
    check_output_path(out, (args.model,))  # (before the compile, not after it)
    art = bscompile.compile(args.model, dump_ir=args.dump_ir, records=args.records, progress=_progress(args.quiet),
                            **_compile_kwargs(args))
    art.export(out)
    if args.time_passes:
        print(time_table(art))
    if not args.quiet:
        print(weight_table(art.manifest.weights))
        s = art.manifest.summary()
        print(f"\nwrote {out}: {len(art.manifest.weights)} weights, {s['dense_bytes'] / 2**20:.2f} MiB dense -> "
              f"{s['stored_bytes'] / 2**20:.2f} MiB stored, compiled in {art.manifest.compile_seconds:.1f} s")
    return 0


def time_table(art) -> str:
    """``--time-passes``: the artifact's compile timings and this process's peak memory."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    dense = art.manifest.summary()["dense_bytes"]
    lines = [f"{'wall s':>8} {'CPU s':>8} {'RSS MiB':>8}  phase / pass (RSS: resident memory at its end)"]
    lines += [f"{w:8.2f} {c:8.2f} {rss:8.0f}  {name}" for name, w, c, rss in art.timings]
    lines.append(f"peak memory {peak / 2**20:.0f} MiB = {peak / max(dense, 1):.1f}x the weights "
                 f"({dense / 2**20:.0f} MiB fp32)\n")
    return "\n".join(lines)


def cmd_inspect(args) -> int:
    import tarfile

    from bscompile.driver import analyze_model
    from bscompile.passes.report_generic_products import describe, generic_products
    from bscompile.report import dynamic_table, input_table, reasons, weight_table
    from bscompile.sites import weight_entries

    artifact = tarfile.is_tarfile(args.model) or Path(args.model).suffix == ".bsc"  # (a broken one: say so)
    if artifact:  # what its manifest says (it is verified too)
        from bscompile.errors import BscompileError
        from bscompile.runtime.artifact import read_artifact

        given = [flag for flag, on in (("--input-shape", args.input_shape), ("--cpu", args.cpu), ("--arch", args.arch),
                                       ("--persistent-rnn", args.persistent_rnn), ("--dense", args.dense),
                                       ("--block", args.block)) if on]
        if given:
            raise BscompileError(f"{', '.join(given)}: options of compiling; {args.model} is compiled already")
        manifest, _ = read_artifact(args.model)
        if args.json:
            print(json.dumps(manifest.to_json(), indent=2))
            return 0
        print(f"{args.model}: bscompile {manifest.bscompile_version} artifact (TVM {manifest.tvm_version}) for "
              f"{manifest.target_name} ({manifest.arch}), compiled from {manifest.source} "
              f"in {manifest.compile_seconds:.1f} s\n")
        print(input_table(manifest.inputs))
        print("\n".join(f"output {o.name}[{', '.join(map(str, o.shape))}] {o.dtype}" for o in manifest.outputs) + "\n")
        weights, generic = manifest.weights, manifest.extra.get("generic_products", [])
    else:
        kw = _compile_kwargs(args)
        from bscompile.target import resolve_target

        spec = resolve_target(kw["target"], kw["cpu"])
        im, mod, _ = analyze_model(args.model, kw["input_shapes"], spec, sparse=kw["sparse"], block=kw["block"])
        weights, generic = weight_entries(mod), generic_products(mod)
        if args.json:
            print(json.dumps(weights, indent=2))
            return 0
        print(input_table(im.inputs) + "\n")
    for g in generic:  # (compile warns of them)
        print(f"not a weight site: {describe(g)} (TVM's generic kernel)")
    print(weight_table(weights))
    dynamic = dynamic_table(weights)
    if dynamic:
        print("\n" + dynamic)
    if not artifact:
        print("\nlayout choices:")
        print(reasons(weights))
    return 0


def _load_inputs(mod, args) -> dict[str, np.ndarray]:
    from bscompile.errors import InputError

    feeds = {}
    for name, path in args.input:
        if not os.path.exists(path):
            raise InputError(f"input '{name}': no such file {path}")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
            if not isinstance(feeds[name], np.ndarray):  # (an .npz archive)
                raise InputError(f"input '{name}': {path} is an .npz archive; give one array as a .npy file")
        except InputError:
            raise
        except Exception as err:  # noqa: BLE001
            raise InputError(f"input '{name}': {path} is not a .npy file ({type(err).__name__})") from None
    if args.random:
        feeds.update({s.name: s.random() for s in mod.inputs if s.name not in feeds})
    return feeds


def _write_outputs(outs: dict[str, np.ndarray], path: str) -> None:
    from bscompile.errors import BscompileError
    from bscompile.runtime.artifact import atomic_write

    if path.endswith(".npz"):
        atomic_write(path, lambda tmp: np.savez(open(tmp, "wb"), **outs))
        return
    files = [safe_file_name(name) for name in outs]
    if len(set(files)) < len(files):
        raise BscompileError(f"outputs {', '.join(repr(n) for n in outs)} share file names in a folder; "
                             "write them to an .npz file (--output FILE.npz)")
    os.makedirs(path, exist_ok=True)
    for name, a in outs.items():
        atomic_write(os.path.join(path, f"{safe_file_name(name)}.npy"), lambda tmp, a=a: np.save(open(tmp, "wb"), a))


def safe_file_name(name: str) -> str:
    """An ONNX output name as a file name inside the output folder, as the deploy runner writes it
    (``SafeFileName`` in runtime/deploy/runner.cc): only ``[A-Za-z0-9._-]``, the rest ``_``, never
    starting with a dot (a name like ``../x`` or ``/tmp/x`` escaped the folder)."""
    out = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    return "_" + out if not out or out.startswith(".") else out


def cmd_run(args) -> int:
    import bscompile

    if args.emulate:
        return _run_emulated(args)
    mod = bscompile.load(args.artifact)
    feeds = _load_inputs(mod, args)
    outs = mod.run(feeds)
    return _report_run(mod, feeds, outs, args)


def _run_emulated(args) -> int:
    """``run --emulate``: the CUDA artifact on the CPU through the CUDA emulator (a kernel fault exits 1)."""
    import bscompile
    from bscompile.errors import InputError
    from bscompile.runtime import cuda_emulator as emu

    if args.bench:
        raise InputError("--bench measures nothing under --emulate (the emulator runs CUDA threads as CPU fibers)")
    emu.install(order=args.emulate, seed=1)
    mod = bscompile.load(args.artifact)
    if mod.manifest.device != "cuda":
        raise InputError(f"--emulate runs CUDA artifacts; {args.artifact} is for {mod.manifest.target_name}")
    feeds = _load_inputs(mod, args)
    try:
        with emu.raised_as_emulator_error():
            outs = mod.run(feeds)
    except emu.EmulatorError as err:
        print(f"bscompile: error: {err}", file=sys.stderr)
        return 1
    launches = emu.launches()
    print(f"cuda emulator: {len(launches)} launches of {len({ln.kernel for ln in launches})} kernels "
          f"({args.emulate} thread/block order) ran without a fault")
    return _report_run(mod, feeds, outs, args)


def _report_run(mod, feeds, outs, args) -> int:
    for name, a in outs.items():
        print(f"{name}: shape {list(a.shape)} {a.dtype}  mean {a.mean():.6g}  std {a.std():.6g}")
    if args.output:
        _write_outputs(outs, args.output)
    if args.check:
        ok = check_against_ort(args.check, feeds, outs)
        if not ok:
            return 1
    if args.bench:
        t = np.median(mod.benchmark(feeds, number=args.bench, repeat=3))
        print(f"bscompile: {t * 1e3:.3f} ms per run")
        if args.check:
            print(f"onnxruntime: {time_ort(args.check, feeds, args.bench) * 1e3:.3f} ms per run")
    return 0


def _ort_session(model_path: str, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 4  # its log lines are not ours to show; its errors (exceptions) become ours
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(model_path, opts, providers=["CPUExecutionProvider"])


def check_against_ort(model_path: str, feeds, outs, rtol=1e-4, atol=1e-5) -> bool:
    """Print and return whether ``outs`` match onnxruntime's (NaN where it has NaN counts as equal)."""
    import onnxruntime as ort

    from bscompile.errors import BscompileError

    try:
        sess = _ort_session(model_path)
        quiet = ort.RunOptions()
        quiet.log_severity_level = 4
        ref = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds, quiet)))
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        msg = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        raise BscompileError(f"--check: onnxruntime cannot run {model_path} ({msg[-1] if msg else err})") from None
    ok = True
    for name, a in outs.items():
        if name not in ref or np.shape(ref[name]) != a.shape:
            raise BscompileError(f"--check: {model_path} is not the model this artifact was compiled from "
                                 f"(output '{name}')")
        with np.errstate(invalid="ignore"):
            err = np.nanmax(np.abs(a - ref[name])) if a.size and not np.isnan(a - ref[name]).all() else 0.0
        good = np.allclose(a, ref[name], rtol=rtol, atol=atol, equal_nan=True)
        ok &= good
        print(f"check {name} vs onnxruntime: max abs err {err:.3g} ({'ok' if good else 'MISMATCH'}, rtol {rtol} atol {atol})")
    return ok


def time_ort(model_path: str, feeds, runs: int, threads: int | None = None) -> float:
    sess = _ort_session(model_path, threads)
    sess.run(None, feeds)
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def cmd_demo(args) -> int:
    import bscompile
    from bscompile.report import weight_table

    model = args.model or str(Path(bscompile.__file__).parent / "data" / "char_gru_bp4x4.onnx")
    print(f"model: {model}")
    with __import__("tempfile").TemporaryDirectory() as tmp:
        art = bscompile.compile(model, progress=_progress(False))
        print(weight_table(art.manifest.weights))
        mod = bscompile.load(art.export(Path(tmp) / "model.bsc"))
    feeds = {s.name: s.random() for s in mod.inputs}
    outs = mod.run(feeds)
    ok = check_against_ort(model, feeds, outs)
    t_bsc = float(np.median(mod.benchmark(feeds, number=args.runs, repeat=3)))
    t_ort = time_ort(model, feeds, args.runs)
    print(f"time per run: bscompile {t_bsc * 1e3:.3f} ms, onnxruntime {t_ort * 1e3:.3f} ms "
          f"({t_ort / t_bsc:.1f}x), threads: TVM_NUM_THREADS={os.environ.get('TVM_NUM_THREADS', 'default')}, "
          "onnxruntime default")
    return 0 if ok else 1


def cmd_package(args) -> int:
    from bscompile.errors import BscompileError
    from bscompile.runtime.artifact import check_output_path
    from bscompile.runtime.package import TUNING_SERVER_NAME, format_report, package_artifact, package_tuning_server

    check_output_path(args.output, (args.artifact,) if args.artifact else ())
    if args.artifact:
        report = package_artifact(args.artifact, args.output, name=args.name, with_tuning_server=args.tuning_server,
                                  progress=_progress(False))
    elif args.tuning_server:
        report = package_tuning_server(args.output, name=args.name or TUNING_SERVER_NAME, progress=_progress(False))
    else:
        raise BscompileError("package needs an artifact (ART.bsc), or --tuning-server for a server-only bundle")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_targets(args) -> int:
    from bscompile.target import TARGETS

    for name, make in TARGETS.items():
        spec = make()
        print(f"{name:14s} {spec.description:40s} {json.dumps(spec.target)}")
    return 0


def cmd_tune(args) -> int:
    from bscompile.tune import tune_command

    return tune_command(args, _compile_kwargs(args), _progress(False))


def _import_tvm_without_torch() -> None:
    """Import TVM with ``import torch`` refused, then allow it again.

    tvm_ffi imports torch eagerly (for DLPack interop only), ~1 s of every command's
    start-up; no command of this CLI uses torch. Only for the console script: a process
    that already has, or may later want, torch keeps tvm_ffi's torch fast path.
    """
    if "tvm" in sys.modules or "torch" in sys.modules:
        return
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        import tvm  # noqa: F401
    finally:
        del sys.modules["torch"]


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        _import_tvm_without_torch()
    argv = list(sys.argv[1:] if argv is None else argv)
    # `bscompile model.onnx ...` is `bscompile compile model.onnx ...`
    first = next((a for a in argv if a not in ("--debug", "--verbose")), None)
    if first is not None and first not in COMMANDS and not first.startswith("-"):
        argv.insert(argv.index(first), "compile")
    args = build_parser().parse_args(argv)
    args.debug, args.verbose = getattr(args, "debug", False), getattr(args, "verbose", False)
    import gc
    from contextlib import nullcontext

    from bscompile.logs import tvm_logs_hidden

    with nullcontext() if args.verbose else tvm_logs_hidden():
        rc = _dispatch(args)
        gc.collect()  # TVM objects a failed command left behind warn when destroyed: while hidden
    return rc


def _dispatch(args) -> int:
    from bscompile.errors import BscompileError

    try:
        model = getattr(args, "model", None)
        if model is not None and not os.path.isfile(model):  # before a file name is derived from it
            raise BscompileError(f"{'no such file' if not os.path.exists(model) else 'not a file'}: {model}")
        return {"compile": cmd_compile, "run": cmd_run, "inspect": cmd_inspect, "package": cmd_package,
                "demo": cmd_demo, "targets": cmd_targets, "tune": cmd_tune}[args.command](args)
    except BrokenPipeError:  # the reader left (`bscompile inspect m.onnx | head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except BscompileError as err:
        if args.debug:
            raise
        print(f"bscompile: error: {one_line(str(err))}", file=sys.stderr)
        return 2
    except OSError as err:  # a path the user gave cannot be read or written
        if args.debug:
            raise
        where = f": {err.filename}" if err.filename else ""
        print(f"bscompile: error: {one_line(f'{err.strerror or err}{where}')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bscompile: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - last line of defence: no raw tracebacks
        if args.debug:
            raise
        msg = [ln for ln in str(err).strip().splitlines() if ln.strip()]
        print(f"bscompile: internal error: {type(err).__name__}: {one_line(msg[-1]) if msg else ''} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return 3


def one_line(text: str) -> str:
    """``text`` with line breaks and other control characters escaped (names in a model can hold any)."""
    return re.sub(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]", lambda m: repr(m.group())[1:-1], text)


def entry() -> int:
    """The ``bscompile`` command: :func:`main` in a process that never imports torch. tvm_ffi
    imports torch eagerly when it is installed (the ``train``/``test`` extras): about 1 s of
    start-up, and every TVMScript kernel template parsed afterwards walks a deeper
    ``inspect.stack()``. No command needs torch (``--check`` runs onnxruntime)."""
    sys.modules.setdefault("torch", None)  # import torch -> ImportError, which tvm_ffi expects
    return main()


if __name__ == "__main__":
    sys.exit(entry())
