import os
import sys

# Idle thread pools spin and steal the other core (2-core CI machines).
os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", "0")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, os.path.dirname(__file__))  # tests/onnx_models.py

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from bscompile.passes.pipeline import bscompile_passes  # noqa: E402
from bscompile.target import resolve_target  # noqa: E402


@pytest.fixture
def rng(request):
    """Fresh random inputs per test; the seed is printed when the test fails."""
    seed = int(np.random.SeedSequence().entropy % (2**32))
    request.node.user_properties.append(("seed", seed))
    return np.random.default_rng(seed)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seeds = [v for k, v in item.user_properties if k == "seed"]
    if rep.failed and seeds:
        rep.sections.append(("random seed", f"rng seed {seeds[0]} (np.random.default_rng({seeds[0]}))"))


@tvm.ir.instrument.pass_instrument
class _WellFormedAfterBscompilePasses:
    """relax.analysis.well_formed after every bscompile pass (TVM's own passes check themselves).
    (In this TVM ``well_formed`` raises on the first violation and returns None.)"""

    NAMES = {p.info.name for p in bscompile_passes(resolve_target("llvm").kernel_family())
             if p.info.name not in ("FoldConstant", "DeadCodeElimination")} | {"ShareIdenticalKernels"}

    def run_after_pass(self, mod, info):
        if info.name in self.NAMES:
            try:
                relax.analysis.well_formed(mod)
            except Exception as err:
                raise AssertionError(f"the IR after {info.name} is not well formed: {err}") from err


@pytest.fixture(autouse=True)
def _check_ir_after_each_pass():
    with tvm.transform.PassContext(instruments=[_WellFormedAfterBscompilePasses()]):
        yield
