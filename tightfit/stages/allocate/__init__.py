"""Allocate stage: choose one candidate (a quantization format, or fp16) per layer of the plan
under size and latency budgets.

    plan     the artifacts: LayerChoice (one measured candidate), Budget, Plan, and their JSON
    problem  the candidates of every layer flattened into one vector; a Plan from a pick
    milp     `allocate`: the multiple-choice knapsack solved exactly (HiGHS), and why a budget
             cannot be met
"""

from tightfit.stages.allocate.milp import allocate, pareto_sweep
from tightfit.stages.allocate.plan import Budget, LayerChoice, Plan

__all__ = ["Budget", "LayerChoice", "Plan", "allocate", "pareto_sweep"]
