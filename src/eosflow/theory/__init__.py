"""Closed forms and exact solutions that the processes are checked against.

- :mod:`eosflow.theory.linear_regression`: SGD and its underdamped Langevin model on a quadratic
  (phase-space moments, Lyapunov covariances, modified loss, probability currents).
- :mod:`eosflow.theory.diffusion`: anomalous diffusion after convergence (displacements, exponent
  fit, the theory curve of a spectrum, phase portraits).
"""

from eosflow.theory import diffusion, linear_regression  # noqa: F401
