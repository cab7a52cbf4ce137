import os
import signal

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


# The test process's choice, not the library's: how XLA compiles. The suite's time is mostly XLA compiling
# programs that then run for a few steps, so two flags that make it compile faster are set here:
# - XLA's older CPU emitters: its CPU fusion emitters (the default) compile ~1.5x slower (the first runs of six
#   processes on tests/user_models.py: 30.5 -> 19.3 s; tests/test_central_flow.py 120 -> 82 s of CPU);
# - LLVM at optimization level 0 (--xla_backend_optimization_level=0): tests/test_tracker.py 73.5 -> 52.8 s,
#   tests/test_simulate.py 43.9 -> 28.2 s, tests/test_central_flow.py 53.4 -> 39.0 s, one process each; the
#   whole suite 650 s where it took 941-994 s (tests/run_files.py, 2 at a time, 2-core AMD EPYC).
# The arithmetic is IEEE either way (no fast math). Last bits may differ from the defaults' (where a product is
# fused into an add), as they may between XLA versions, and two programs meant to take the same steps may then
# differ by an ulp where they agree bit for bit under the defaults (tests/test_adaptive_flows.py and
# tests/test_leaderboard.py say so where they compare them). `make demo` and the benchmarks compile with XLA's
# defaults. A caller's XLA_FLAGS that names a flag keeps its setting: `XLA_FLAGS="--xla_cpu_use_fusion_emitters=true
# --xla_backend_optimization_level=3"` runs the tests under XLA's defaults. Subprocesses (CLI runs, Dask workers)
# inherit them. Only on the jaxlib they were measured on: XLA aborts the process on a flag it does not know, and a
# flag of its CPU backend may be renamed or dropped in another release.
def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


if _jaxlib_version().startswith("0.10."):
    for _flag, _value in (("xla_cpu_use_fusion_emitters", "false"), ("xla_backend_optimization_level", "0")):
        if _flag not in os.environ["XLA_FLAGS"]:
            os.environ["XLA_FLAGS"] += f" --{_flag}={_value}"

# A shell without job control starts a background job with SIGINT ignored, and eosflow leaves an ignored
# signal alone (eosflow.signals): the tests that interrupt a run with SIGINT, in this process or in a
# CLI subprocess (which inherits the disposition), would then see it ignored and fail.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import jax  # noqa: E402

# The test process's choice, not the library's: oracles (dense eigh, closed forms) built directly
# in tests compute in float64. eosflow itself sets no JAX configuration (runs scope their dtype).
jax.config.update("jax_enable_x64", True)

import eosflow.process  # noqa: E402,F401  (registers every process)
