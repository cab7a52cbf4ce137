"""Does eosflow's scoped jax.default_matmul_precision("highest") change anything on this machine? Runs the demo
spec (GD and the central flow) for 150 steps under the caller's default and under "highest" around the
whole run, and prints whether losses and sharpness agree bit for bit (docs/spec.md, `dtype`). On the CPU
they do; on a GPU with TF32 the run under eosflow.precision is the float32 one either way.

    PYTHONPATH=src .venv/bin/python benchmarks/matmul_precision.py
"""

import contextlib
import tempfile

import jax
import numpy as np

import eosflow
from eosflow.cli import demo_table
from eosflow.experiment import run


def trajectory(context) -> np.ndarray:
    table = demo_table()
    table.update(steps=150)
    table["processes"] = ["gd", "central_flow"]
    with tempfile.TemporaryDirectory() as out, context:
        run(table, out)
        ds = eosflow.load(out)
        return np.stack([ds["loss"].values, ds["sharpness"].values])


def main() -> None:
    default = trajectory(contextlib.nullcontext())
    highest = trajectory(jax.default_matmul_precision("highest"))
    print(
        f"backend {jax.default_backend()}: bitwise equal {np.array_equal(default, highest, equal_nan=True)}, "
        f"max |difference| {np.nanmax(np.abs(default - highest)):.3g}"
    )


if __name__ == "__main__":
    main()
