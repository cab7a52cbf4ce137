"""The adaptive suite's metrics split at the optimizer's edge onset, and the loss metric's own floor.

    PYTHONPATH=src python benchmarks/adaptive_edge_metrics.py RUN_DIR [RUN_DIR ...]

RUN_DIR: a run whose first process is the optimizer and which holds its stable flow (e.g. the
leaderboard's ``runs/mlp_digits-adam``). The onset is the optimizer's first step with edge ratio >= 0.95.
Printed per model:

- ``rel. distance``: <||w_opt - w||> / the stable flow's, as ``eosflow compare`` (whole run);
- ``gained after onset``: the same ratio for the distance gained after the onset, <d(t) - d(onset)>
  over t >= onset (what a model of the edge can change: before the onset every model here is its
  stable flow);
- ``loss error``: relative L1 error of the predicted loss against the optimizer's Gaussian-smoothed loss
  (std 20 steps), as ``eosflow compare``, and the same over t >= onset;
- ``floor``: that error for the optimizer's *own* loss (a perfect pointwise prediction). When the loss
  falls steeply the window biases the smoothed loss, and no model can score below the floor;
- the model's edge ratio (median over t >= onset) beside the optimizer's.
"""

from __future__ import annotations

import sys

import numpy as np

import eosflow
from eosflow.compare import gaussian_smooth, relative_l1_error


def report(run_dir: str) -> None:
    ds = eosflow.load(run_dir)
    processes = [str(p) for p in ds.process.values]
    optimizer = processes[0]
    stable = f"{optimizer}_stable_flow"
    edge = ds["edge_ratio"].sel(process=optimizer).values
    above = np.flatnonzero(edge >= 0.95)
    onset = int(above[0]) if above.size else len(edge)
    loss = ds["loss"].sel(process=optimizer).values
    smooth = gaussian_smooth(loss)
    print(f"{run_dir}: {optimizer}, {len(loss)} steps, edge onset at step {onset}")
    print(
        f"  floor (the optimizer's own loss): {relative_l1_error(loss, smooth):.3f}, "
        f"from the onset {relative_l1_error(loss[onset:], smooth[onset:]):.3f}; "
        f"its edge ratio after the onset: median {np.nanmedian(edge[onset:]):.3f}"
    )
    base = ds["distance"].sel(process=stable).values
    gained_base = np.nanmean(base[onset:] - base[onset]) if onset < len(base) else np.nan
    at_onset = base[min(onset, len(base) - 1)]
    print(f"  {stable}: distance {at_onset:.3f} at the onset, mean {np.nanmean(base):.3f}, final {base[-1]:.3f}")
    print("  model                      rel. distance  gained after onset  loss error  from onset  edge ratio")
    for name in processes[1:]:
        distance = ds["distance"].sel(process=name).values
        predicted = ds["predicted_loss"].sel(process=name).values
        gained = np.nanmean(distance[onset:] - distance[onset]) / gained_base if onset < len(base) else np.nan
        late = relative_l1_error(predicted[onset:], smooth[onset:])
        print(
            f"  {name:26s} {np.nanmean(distance) / np.nanmean(base):13.3f}  {gained:18.3f}"
            f"  {relative_l1_error(predicted, smooth):10.3f}  {late:10.3f}"
            f"  {np.nanmedian(ds['edge_ratio'].sel(process=name).values[onset:]):10.3f}"
        )


if __name__ == "__main__":
    for run in sys.argv[1:]:
        report(run)
