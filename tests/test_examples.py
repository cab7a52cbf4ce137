"""Every spec shipped in ``examples/`` (and the demo spec) is valid: its problem and processes build."""

from pathlib import Path

import numpy as np
import pytest

from eosflow.cli import demo_table
from eosflow.experiment import prepare
from eosflow.spec import load_spec_table

EXAMPLES = sorted((Path(__file__).resolve().parents[1] / "examples").glob("*.toml"))


def test_there_are_examples():
    assert len(EXAMPLES) >= 10


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_spec_builds(path):
    spec, problem, resolved, processes = prepare(load_spec_table(path))
    assert list(processes) == list(spec.processes)
    assert np.isfinite(float(problem.objective.value(problem.w0)))


def test_demo_spec_builds():
    spec, problem, _, _ = prepare(demo_table())
    assert problem.w0.size == 3466 and spec.lr == 0.4
