"""The problem zoo: objectives studied at the edge of stability, declared by name in a spec."""

from eosflow.problems.registry import (
    IN_MEMORY,
    PROBLEMS,
    Problem,
    build_problem,
    describe_problems,
    problem_params,
    register_problem,
)

# Each module registers its problems on import; the import order is the registration (listing) order, so isort
# must not sort across these lines.
# isort: split
from eosflow.problems import factorization, networks, toys  # noqa: F401

# isort: split
from eosflow.problems import regression  # noqa: F401  (linear_regression)

# isort: split
from eosflow.problems import lstm, resnet, transformer  # noqa: F401  (the architectures suite)

__all__ = [
    "IN_MEMORY",
    "PROBLEMS",
    "Problem",
    "build_problem",
    "describe_problems",
    "problem_params",
    "register_problem",
]
