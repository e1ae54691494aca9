"""Allocate stage: choose one quantization format per linear layer under size and latency budgets.

    plan        the artifacts: LayerChoice (one measured candidate), Budget, Plan, and their JSON
    problem     the candidates of every layer flattened into one vector; a Plan from a pick
    milp        `allocate`: the multiple-choice knapsack solved exactly (HiGHS), and why a budget
                cannot be met
    refinement  `refine`: EvoPress around the MILP plan on the real loss, within the same budget
"""

from tightfit.stages.allocate.milp import allocate, pareto_sweep
from tightfit.stages.allocate.plan import Budget, LayerChoice, Plan
from tightfit.stages.allocate.refinement import Refinement, refine

__all__ = ["Budget", "LayerChoice", "Plan", "Refinement", "allocate", "pareto_sweep", "refine"]
