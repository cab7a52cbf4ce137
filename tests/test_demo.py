"""The default experiment reproduces the edge of stability, through the CLI, with its report."""

import re

import numpy as np

import eosflow
from eosflow.cli import main
from eosflow.report import edge_of_stability_window


def test_demo_reaches_and_stays_at_the_edge_of_stability(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quiet"]) == 0
    ds = eosflow.load(out)
    lr = ds.attrs["lr"]
    sharpness = ds.sharpness.sel(process="gd").values
    assert np.all(np.isfinite(sharpness))  # measured at every step
    threshold = 2.0 / lr
    # progressive sharpening: it starts well below 2/lr ...
    assert sharpness[0] < 0.6 * threshold
    # ... reaches 2/lr within 5% ...
    reached = np.flatnonzero(sharpness >= 0.95 * threshold)
    assert reached.size > 0
    # ... and stays within [0.9, 1.1] x 2/lr for a window of at least 200 steps afterwards
    inside = (sharpness >= 0.9 * threshold) & (sharpness <= 1.1 * threshold)
    longest = max(len(run) for run in "".join("1" if x else "0" for x in inside[reached[0] :]).split("0"))
    assert longest >= 200
    # the loss keeps decreasing on average while it does, non-monotonically
    loss = ds.loss.sel(process="gd").values
    eos = slice(reached[0], None)
    assert loss[-100:].mean() < 0.7 * loss[reached[0] : reached[0] + 100].mean()
    assert np.sum(np.diff(loss[eos]) > 0) > 20
    # the report's files exist and its numbers are the run's
    report = (out / "report" / "report.md").read_text()
    for name in ("loss.png", "sharpness.png", "lr_sharpness.png"):
        assert (out / "report" / name).stat().st_size > 10_000
    window = edge_of_stability_window(ds.lr_sharpness.sel(process="gd").values)
    assert f"longest window with lr*S in [1.8, 2.2]: {window['longest_window_steps']} steps" in report
    final = re.search(r"\| gd \| ([0-9.e+-]+) \|", report).group(1)
    np.testing.assert_allclose(float(final), loss[-1], rtol=1e-5)
