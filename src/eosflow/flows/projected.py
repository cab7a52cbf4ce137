"""The projected flow: the central flow restricted to one critical direction (k = 1).

    dw/dt = -eta [ g + (sigma^2 / 2) grad S ],   sigma^2 = max(0, 2 <-g, grad S> / ||grad S||^2)

the value that makes dS/dt = 0 (gradient flow projected onto {S <= 2/eta}, the continuous form of
the self-stabilization picture of Damian, Nichani & Lee). It is the central flow with
``max_critical = 1``, whose complementarity problem has the closed form
X = max(0, -alpha / beta) (see :mod:`eosflow.flows.sdcp`); the discretized alpha also corrects
any overshoot of S above 2/eta within a substep.
"""

from __future__ import annotations

import dataclasses

from eosflow.flows.central import CentralFlow, CentralFlowOptions, ProjectedFlowOptions
from eosflow.flows.flow import register_flow

register_flow(
    "projected_flow",
    CentralFlow,
    ProjectedFlowOptions,
    "projected flow: gradient flow held at S <= 2/lr along the top eigenvector",
    every_step=True,
    fields=lambda problem, spec, options: {
        "options": CentralFlowOptions(**dataclasses.asdict(options), max_critical=1)
    },
)
