"""Self-configuration: the experiment plan fitted to a dataset and to this machine.

``rules`` holds nnU-Net's planning rules as plain functions, ``memory`` the memory and
compute model of a planned U-Net, ``probe`` this machine's timings, ``planner`` the chain
from fingerprint to :class:`ExperimentPlan` (``record``), and ``resolve`` how a run's
config and its plan meet (planned values where the config leaves them, overrides recorded).
"""

from medseg.planning.planner import (
    PlanOptions,
    explain,
    format_plan,
    parse_duration,
    plan_experiment,
)
from medseg.planning.record import PLAN_VERSION, Decision, ExperimentPlan, PlanError
from medseg.planning.rules import Topology, target_spacing, topology

__all__ = [
    "format_plan",
    "PLAN_VERSION",
    "Decision",
    "ExperimentPlan",
    "PlanError",
    "PlanOptions",
    "Topology",
    "explain",
    "parse_duration",
    "plan_experiment",
    "target_spacing",
    "topology",
]
