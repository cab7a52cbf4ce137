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

# each module registers its problems on import
from eosflow.problems import factorization, networks, toys  # noqa: E402,F401
from eosflow.problems import regression  # noqa: E402,F401  (linear_regression)

__all__ = ["IN_MEMORY", "PROBLEMS", "Problem", "build_problem", "describe_problems", "problem_params", "register_problem"]
