"""A process's own tracker: ``[name.spectrum]`` replaces keys of the run's ``[spectrum]`` for that process.

Oracles: runs whose whole ``[spectrum]`` is the one process's (each process must run bit for bit as it
would there), the stored spec re-read, and errors that name the table.
"""

import tomllib

import numpy as np
import pytest

from eosflow.anchored import check_anchorable
from eosflow.config import SpecError, SpecWarning
from eosflow.experiment import prepare, run
from eosflow.load import load
from eosflow.spec import resolve

TABLE = {
    "steps": 40,
    "lr": 0.3,
    "dtype": "float64",
    "processes": ["gd", "central_flow", "rod_flow"],
    "problem": {"name": "matrix_factorization", "dim": 3, "depth": 3, "rank": 2},
    "spectrum": {"k": 1, "k_max": 1},
    "record": {"chunk": 20},
}


def rows(table: dict, steps: int = 40) -> dict[str, dict]:
    _, problem, _, processes = prepare(table)
    return {name: p.advance(p.init(problem.w0), steps)[1] for name, p in processes.items()}


@pytest.mark.parametrize("override", [{"k": 2, "k_max": 3}, {"k_max": 2, "tol": 1e-5, "guard": 2}])
def test_each_process_runs_as_in_a_run_whose_spectrum_is_its_own(override):
    """The central flow tracks ``override``'s pairs while GD and rod flow keep the run's one: each process's
    rows are bitwise those of a run whose [spectrum] is that process's."""
    mixed = rows({**TABLE, "central_flow": {"spectrum": override}})
    alone = rows({**TABLE, "spectrum": TABLE["spectrum"] | override})
    plain = rows(TABLE)
    for name, reference in (("central_flow", alone), ("gd", plain), ("rod_flow", plain)):
        assert mixed[name].keys() == reference[name].keys()
        for key in mixed[name]:
            np.testing.assert_array_equal(np.asarray(mixed[name][key]), np.asarray(reference[name][key]), err_msg=key)
    assert np.asarray(mixed["central_flow"]["eigenvalues"]).shape[1] == override["k_max"]
    assert np.asarray(mixed["gd"]["eigenvalues"]).shape[1] == 1
    flow, default = mixed["central_flow"], plain["central_flow"]
    assert not all(np.array_equal(flow[key], default[key]) for key in flow)  # the override reached it


def test_the_override_is_stored_resumed_and_loaded(tmp_path):
    table = {**TABLE, "central_flow": {"substeps": 4, "spectrum": {"k_max": 3, "grow_every": 5}}}
    resolved = resolve(table)
    assert resolved.table["central_flow"]["spectrum"] == {"k_max": 3, "grow_every": 5}
    assert resolve(tomllib.loads(resolved.text)).table == resolved.table  # a fixed point
    assert resolved.spec.spectrum_of("central_flow").k_max == 3 and resolved.spec.spectrum_of("gd").k_max == 1
    run({**table, "steps": 20}, tmp_path / "run")
    run(table, tmp_path / "run", resume=True)  # the same spec but its length: extended
    data = load(tmp_path / "run")
    assert data.sizes["eig"] == 3 and data.sizes["step"] == 40
    gd = data.eigenvalues.sel(process="gd").values
    assert np.isfinite(gd[:, 0]).all() and np.isnan(gd[:, 1:]).all()  # gd tracks one: padded


@pytest.mark.parametrize(
    "section, message",
    [
        ({"central_flow": {"spectrum": {"kmax": 3}}}, r"central_flow\.spectrum.*kmax"),
        ({"central_flow": {"spectrum": {"k": 4, "k_max": 3}}}, r"`central_flow\.spectrum\.k` = 4 exceeds"),
        ({"central_flow": {"spectrum": 3}}, r"`central_flow\.spectrum` must be a table"),
        ({"gd": {"spectrum": {"tol": 2.0}}}, r"gd\.spectrum\.tol"),
    ],
)
def test_a_bad_override_names_its_table(section, message):
    with pytest.raises(SpecError, match=message):
        resolve({**TABLE, **section})


def test_an_override_of_a_process_not_run_is_refused():
    """``[rmsprop]`` may hold the hyperparameters its models read without ``rmsprop`` being run; a tracker
    for it then has no process."""
    with pytest.raises(SpecError, match=r"table `\[edge_flow\]` configures a process that `processes` does not list"):
        resolve({**TABLE, "edge_flow": {"spectrum": {"k_max": 2}}})
    table = {**TABLE, "processes": ["gd", "rmsprop_stable_flow"], "rmsprop": {"beta2": 0.9, "spectrum": {"k_max": 2}}}
    with pytest.raises(SpecError, match=r"`\[rmsprop\.spectrum\]` sets the tracker of a process that `processes`"):
        resolve(table)


def test_an_override_is_capped_at_the_parameter_count():
    """A 2-parameter quadratic has 2 eigenpairs: the override's k_max = 5 tracks 2, with a warning naming it."""
    table = {
        **TABLE,
        "problem": {"name": "quadratic", "eigenvalues": [3.0, 1.0]},
        "central_flow": {"spectrum": {"k_max": 5}},
        "steps": 4,
    }
    with pytest.warns(SpecWarning, match=r"`central_flow\.spectrum\.k_max` = 5 exceeds the number of parameters"):
        flows = rows(table, 4)
    assert np.asarray(flows["central_flow"]["eigenvalues"]).shape[1] == 2


@pytest.mark.parametrize(
    "section, key",
    [({"spectrum": {"every": 0}}, "spectrum.every"), ({"gd": {"spectrum": {"every": 0}}}, "gd.spectrum.every")],
)
def test_onset_needs_the_optimizers_own_measurement_and_names_the_key_that_stops_it(section, key):
    """The models start at GD's edge onset only if GD measures its edge ratio: its own tracker decides."""
    with pytest.raises(SpecError, match=rf"`{key}` = 0 never measures"):
        check_anchorable({**TABLE, **section}, "onset")
    check_anchorable({**TABLE, "central_flow": {"spectrum": {"every": 0}}}, "onset")  # a model's tracker: no matter
