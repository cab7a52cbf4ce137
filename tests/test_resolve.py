"""spec.resolve, the one resolver: what a run stores, and comparisons that build nothing.

Oracles: the spec.resolved.toml that experiment.run writes; builders replaced by ones that raise
(so any comparison that built a problem or a process would fail).
"""

import dataclasses
import tomllib

import pytest

from eosflow.config import SpecError
from eosflow.experiment import prepare, run
from eosflow.problems import PROBLEMS
from eosflow.process import PROCESSES
from eosflow.spec import resolve, spec_differences

TABLE = {
    "name": "r",
    "steps": 4,
    "lr": 0.08,
    "dtype": "float64",
    "processes": ["gd", "gradient_flow"],
    "problem": {"name": "quartic", "dim": 1},
    "record": {"chunk": 2},
    "gradient_flow": {"substeps": 3},
}


def test_resolve_is_what_a_run_stores_and_what_prepare_returns(tmp_path):
    run(TABLE, tmp_path / "run")
    resolved = resolve(TABLE)
    assert resolved.text == (tmp_path / "run" / "spec.resolved.toml").read_text()
    assert resolved.table == prepare(TABLE)[2]
    assert resolved.spec.options["gradient_flow"].substeps == 3
    assert resolve(tomllib.loads(resolved.text)).table == resolved.table  # a fixed point


def test_spec_differences_builds_nothing(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("a comparison of specs built something")

    stored = resolve(TABLE).text
    older = "".join(line for line in stored.splitlines(keepends=True) if not line.startswith("grow_every"))
    for name in ("gd", "gradient_flow"):
        monkeypatch.setitem(PROCESSES, name, dataclasses.replace(PROCESSES[name], build=boom))
    monkeypatch.setitem(PROBLEMS, "quartic", dataclasses.replace(PROBLEMS["quartic"], build=boom))
    current = resolve(TABLE).table
    assert spec_differences(stored, current) == []
    assert spec_differences(older, current) == []  # re-resolved with today's defaults
    assert spec_differences(stored, resolve({**TABLE, "lr": 0.07}).table) == ["`lr` = 0.08 there, 0.07 here"]
    # a stored spec this eosflow cannot read (an option since removed) is compared as written
    unreadable = stored.replace("[gradient_flow]\n", "[gradient_flow]\nremoved_option = 1\n")
    with pytest.raises(SpecError):
        resolve(tomllib.loads(unreadable))
    assert spec_differences(unreadable, current) == ["`gradient_flow.removed_option` = 1 there, '(absent)' here"]
