"""The pipeline: load -> calibrate -> profile -> sensitivity -> allocate -> quantize -> pack -> evaluate.

One module per job, each ordering the stages it needs and resuming from artifacts already saved:

    evaluation    a packed model from disk against its source; eval.json beside it
    compression   one model in one format or plan: calibrate -> quantize -> pack -> evaluate
    profiling     the latency table of the model's linear layers on this machine
    planning      one format per layer (embeddings and head included) under a budget: sensitivity -> allocate
    pareto_sweep  the original, every candidate and a plan per budget: compressed, evaluated, timed

Each imports only the ones above it. The entry points the command line uses are re-exported here.
"""

from tightfit.pipeline.compression import CompressRequest, ModelSummary, compress, packed_file_bytes, work_dir_for
from tightfit.pipeline.evaluation import default_reference, evaluate_packed, is_packed
from tightfit.pipeline.pareto_sweep import ParetoRequest, pareto
from tightfit.pipeline.planning import DEFAULT_CANDIDATES, DEFAULT_EMBED_CANDIDATES, PlanRequest, file_budget, make_plan, pinned_embeddings
from tightfit.pipeline.profiling import LATENCY_CACHE_FILE, linear_layer_shapes, profile_model, uniform_rtn_packed

__all__ = [
    "CompressRequest", "DEFAULT_CANDIDATES", "DEFAULT_EMBED_CANDIDATES", "LATENCY_CACHE_FILE", "ModelSummary", "ParetoRequest", "PlanRequest",
    "compress", "default_reference", "evaluate_packed", "file_budget", "is_packed", "linear_layer_shapes", "make_plan",
    "packed_file_bytes", "pareto", "pinned_embeddings", "profile_model", "uniform_rtn_packed", "work_dir_for",
]
