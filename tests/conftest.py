import os
import signal

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=1")


# The test process's choice, not the library's: XLA's older CPU emitters. The suite's time is mostly
# XLA compiling programs that then run for a few steps, and its CPU fusion emitters (the default)
# compile ~1.5x slower (the first runs of six processes on tests/user_models.py: 30.5 -> 19.3 s;
# tests/test_central_flow.py 120 -> 82 s of CPU, its 600-step MLP run included). The arithmetic is
# IEEE either way (no fast math); last bits may differ from the default's (where a product is fused
# into an add), as they may between XLA versions. A caller's XLA_FLAGS that names the flag keeps its
# setting: `XLA_FLAGS=--xla_cpu_use_fusion_emitters=true` runs the tests under XLA's defaults.
# Subprocesses (CLI runs, Dask workers) inherit it. Adding --xla_backend_optimization_level=0 compiled ~2.3x
# faster still, but two programs meant to agree bit for bit (tests/test_adaptive_flows.py, the
# central flow's free steps and the stable flow's) then differed by an ulp.
# Only on the jaxlib it was measured on: XLA aborts the process on a flag it does not know, and a flag
# of its CPU backend may be renamed or dropped in another release.
def _jaxlib_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("jaxlib")
    except PackageNotFoundError:
        return ""


if "xla_cpu_use_fusion_emitters" not in os.environ["XLA_FLAGS"] and _jaxlib_version().startswith("0.10."):
    os.environ["XLA_FLAGS"] += " --xla_cpu_use_fusion_emitters=false"

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
