"""The peak memory of a compress run, estimated from the model's shapes and the run's settings before
anything heavy starts, so that a run that would not fit ends in one line instead of an OOM kill.

What is estimated is the run's anonymous memory (RssAnon), what a memory limit's OOM killer weighs:
the pages of the weight files read through memory maps count in the RSS too, but the kernel drops
them under a limit instead of killing (the 1.5B model finished under a 7 GB cgroup limit with a peak
RSS of 7.09 GB). That memory is the runtime (Python, torch, the tokenizer), the weights the run
holds, and the working set of its heaviest moment. The moments (`phases`), each a sum of named terms:

    hessian     the sequential GPTQ Hessian of a block's widest input (the MLP down projection's,
                K = the FFN width): its fp64 accumulator and the fp64 temporaries of making it
                symmetric (`HessianAccumulator.hessian`), beside one copy of the calibration activations
    factor      GPTQ on the widest layer: the fp32 Hessian, its permuted copy and the Cholesky
                temporaries of the inverse factor (`gptq._inverse_hessian_factor`), the weight twice
    forward     a block run over the calibration set: its inputs and outputs (fp32 [S, T, C] each),
                the MLP's and the attention's temporaries of one batch
    planner     (--bpw, --max-size, ...) the original Hessians of one block collected at once, and of
                every block when the model is in memory
    evaluate    the reference and the packed model side by side, the replayed hidden states of a
                streamed reference, and one batch's log-probs of both (capped by BATCH_LOGITS_BYTES)

The term coefficients count the tensors the code allocates (see each constant); RUNTIME_BYTES is
measured (bench/memory_profile.py, issue 11). The planner's sensitivity and profile stages are not
counted (a --bpw run has not been measured yet).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from tightfit.algorithms.gptq import GRAM_BLOCK
from tightfit.artifacts import CalibrationConfig
from tightfit.errors import InsufficientMemory
from tightfit.evaluate import BATCH_LOGITS_BYTES, EvalConfig
from tightfit.model.load import missing_tensors, streamed_nbytes
from tightfit.model.memory import MemoryBudget
from tightfit.model.weights import CheckpointWeights

_FP32, _FP64 = 4, 8
_GB = 1e9
# Python, torch, transformers and the tokenizer (0.56 GB RSS before the weights), what the calibration
# text leaves in the Python heap, mapped file pages and the allocator's slack: fitted, the largest gap
# between a measured peak RSS and the other terms (1.27 GB: the whole qwen2.5-coder-1.5b, w4g128,
# bench/compress_run.py; 1.0 GB with --first-blocks 2 and evaluation; 0.58 GB smollm2-135m), rounded up.
# bench/memory_profile.py and bench/compress_run.py, 2026-11-26
RUNTIME_BYTES = int(1.3e9)
# gptq_quantize: the caller's fp32 H, H[perm][:, perm], then J H J and L in _inverse_hessian_factor
# (L^-1 is formed in place; 4 x K^2 fp32 at the worst moment, 5 while H[perm] is being indexed)
FACTOR_FP32_COPIES = 5
# one batch through a block: gate, up, act(gate) and their product [B, T, F] fp32, and the attention's
# scores and softmax [B, heads, T, T]
MLP_COPIES = 4
ATTENTION_COPIES = 2
# a quantized layer held until packing: uint8 codes and fp32 scale and zero per group of 32 at worst
QUANTIZED_BYTES_PER_WEIGHT = 1.25
# evaluation: the reference's logits and log-probs, and the candidate's, of one batch
LOGITS_COPIES = 4


@dataclass(frozen=True)
class CompressShapes:
    """What the memory of a compress run depends on in the model, read from its files' headers.

    Fields:
        name: the model, for messages.
        hidden: C, the width of the hidden states.
        vocab: V, rows of the embeddings (and the head).
        heads: attention heads (the scores are [B, heads, T, T]).
        group_inputs: K of each linear group of a block, one Hessian [K, K] each (largest: the FFN width).
        n_blocks: decoder blocks compressed.
        linear_weights: weights of the blocks' linear layers, the ones quantized.
        whole_fp32: bytes of every parameter in fp32.
        held_fp32: fp32 bytes the loaded model holds: the whole model, or for a streamed one the
            embeddings, head and norm with the largest block (`streamed_nbytes`).
        outside_fp32: fp32 bytes of what lies outside the blocks (embeddings, untied head, final norm).
        streamed: whether the blocks are read from the files one at a time.
    """

    name: str
    hidden: int
    vocab: int
    heads: int
    group_inputs: tuple[int, ...]
    n_blocks: int
    linear_weights: int
    whole_fp32: int
    held_fp32: int
    outside_fp32: int
    streamed: bool

    @property
    def widest_input(self) -> int:
        return max(self.group_inputs)

    @classmethod
    def of(cls, weights: CheckpointWeights, *, streamed: bool) -> "CompressShapes":
        arch, prefix = weights.arch, f"{weights.arch.blocks}."
        first = f"{prefix}0."
        linear = [f"{prefix}{i}.{name}.weight" for i in range(weights.n_blocks) for name in arch.linear_names]
        missing = [n for n in [*linear, f"{arch.embeddings}.weight"] if n not in weights.shapes]
        if missing:  # the loader's own words, before it would get to say them
            raise missing_tensors(weights, missing)
        group_inputs = tuple(weights.shapes[f"{first}{names[0]}.weight"][1] for names in arch.linear_groups)
        outside = [n for n in weights.shapes if not n.startswith(prefix)]
        whole = weights.nbytes()
        return cls(name=weights.source.name, hidden=int(weights.config.hidden_size),
                   vocab=weights.shapes[f"{arch.embeddings}.weight"][0], heads=int(weights.config.num_attention_heads),
                   group_inputs=group_inputs, n_blocks=weights.n_blocks, linear_weights=weights.nbytes(linear) // _FP32,
                   whole_fp32=whole, held_fp32=streamed_nbytes(weights) if streamed else whole,
                   outside_fp32=weights.nbytes(outside), streamed=streamed)


@dataclass(frozen=True)
class CompressSettings:
    """The settings of a compress run that its memory depends on.

    Fields:
        calibration: windows S x T and batch B of the calibration forwards.
        evaluation: windows of the evaluation after packing; None: --no-eval.
        method: "gptq" (calibration activations and Hessians) or "rtn" (neither).
        planned: a budget (--bpw, --max-size, --max-latency): the planner collects the original
            model's Hessians first.
        original_hessians: GPTQ takes the planner's Hessians instead of running the calibration set
            through the layers already quantized (a budget without --sequential).
        eval_engine: "torch" (a dequantized fp32 copy of the model) or "fast" (the packed layout).
        packed_bytes_per_weight: bytes per weight of the largest format the run may use, as packed
            (`packed_bytes_per_weight`); a streamed model's finished layers are held packed
            (StoredTensor), and the fast engine holds its layout at about that size. None: the
            builders' QUANTIZED_BYTES_PER_WEIGHT for both.
        smooth_attention: SmoothAttention takes key scales from the calibration windows run through
            the blocks, so their activations and block forwards count even without GPTQ's own.
    """

    calibration: CalibrationConfig = CalibrationConfig()
    evaluation: EvalConfig | None = EvalConfig()
    method: str = "gptq"
    planned: bool = False
    original_hessians: bool = False
    eval_engine: str = "torch"
    packed_bytes_per_weight: float | None = None
    smooth_attention: bool = False


def packed_bytes_per_weight(formats, shapes: CompressShapes) -> float:
    """The most bytes per weight that any of `formats` packs the widest layer [hidden, widest input] in."""
    n, k = shapes.hidden, shapes.widest_input
    return max(f.nbytes(n, k).total / (n * k) for f in formats)


@dataclass(frozen=True)
class PeakEstimate:
    """Bytes of a compress run at each of its heavy moments: runtime + held + the phase's own terms.

    Fields:
        held: terms alive through the whole run (runtime, the loaded weights).
        phases: phase name -> its own terms (name -> bytes); see the module docstring.
    """

    held: dict[str, int]
    phases: dict[str, dict[str, int]]

    def phase_total(self, phase: str) -> int:
        return sum(self.held.values()) + sum(self.phases[phase].values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phase_total)

    @property
    def total(self) -> int:
        return self.phase_total(self.peak_phase) if self.phases else sum(self.held.values())

    def largest_term(self) -> tuple[str, int]:
        """(name, bytes) of the largest term at the peak."""
        terms = {**self.held, **(self.phases[self.peak_phase] if self.phases else {})}
        name = max(terms, key=terms.__getitem__)
        return name, terms[name]


def hessian_bytes(k: int) -> int:
    """HessianAccumulator of K inputs at its largest, in `hessian()`: the fp64 sums, the fp32 result
    and one fp64 row block of GRAM_BLOCK x K."""
    return k * k * (_FP64 + _FP32) + min(GRAM_BLOCK, k) * k * _FP64


def _eval_batch(shapes: CompressShapes, evaluation: EvalConfig) -> int:
    """Windows per evaluation batch, as `evaluate.batch_size_for` lowers it."""
    per_window = (evaluation.ctx - 1) * shapes.vocab * _FP32
    return max(1, min(evaluation.batch_size, BATCH_LOGITS_BYTES // per_window))


def compress_peak(shapes: CompressShapes, settings: CompressSettings) -> PeakEstimate:
    """The estimated resident bytes of `tightfit compress` on a model of `shapes` with `settings`."""
    c, k = shapes.hidden, shapes.widest_input
    cal = settings.calibration
    # what the quantize stage adds to the loaded model: a working fp32 copy (a model in memory),
    # the kept tensors in fp16 (embeddings, head, norms), the quantized layers as they accumulate
    kept_fp16 = shapes.outside_fp32 // 2
    packed = settings.packed_bytes_per_weight or QUANTIZED_BYTES_PER_WEIGHT
    quantized = int(shapes.linear_weights * (packed if shapes.streamed else QUANTIZED_BYTES_PER_WEIGHT))
    held = {"runtime": RUNTIME_BYTES, "loaded weights (fp32)": shapes.held_fp32}
    quantize_held = {"working copy (fp32)": 0 if shapes.streamed else shapes.whole_fp32,
                     "kept tensors (fp16)": kept_fp16, "quantized layers": quantized}
    phases: dict[str, dict[str, int]] = {}
    largest_layer = 2 * c * k * _FP32  # gptq_quantize's w and w[:, perm] of the down projection [C, F]
    factor = {**quantize_held, "GPTQ inverse-Hessian factor": FACTOR_FP32_COPIES * k * k * _FP32,
              "weight copies": largest_layer}
    gptq = settings.method == "gptq"
    one_block = sum(n * n for n in shapes.group_inputs) * _FP32  # a block's Hessians, one per group, fp32
    original = one_block if shapes.streamed else one_block * shapes.n_blocks  # streamed: the rest on disk
    if gptq and settings.planned:
        # collect_hessians: every group's fp64 accumulator of one block at once, the widest made symmetric
        phases["planner"] = {"original Hessians (fp32)": original,
                             "Hessian accumulators (fp64)": 2 * one_block + hessian_bytes(k) - k * k * _FP64,
                             "calibration activations": 2 * cal.n_samples * cal.seq_len * c * _FP32}
    activations = cal.n_samples * cal.seq_len * c * _FP32
    batch_tokens = min(cal.batch_size, cal.n_samples) * cal.seq_len
    forward = {**quantize_held, "calibration activations": 2 * activations,
               # the attention's scores are freed before the MLP runs: the larger of the two
               "block forward of one batch": _FP32 * batch_tokens * max(
                   MLP_COPIES * k, ATTENTION_COPIES * shapes.heads * cal.seq_len)}
    if gptq and settings.original_hessians:
        phases["factor"] = {**factor, "original Hessians (fp32)": original}
    elif gptq:
        phases["hessian"] = {**quantize_held, "calibration activations": activations,
                             "Hessian accumulator (fp64)": hessian_bytes(k)}
        phases["factor"] = {**factor, "calibration activations": activations}
        phases["forward"] = forward
    else:
        phases["factor"] = {**quantize_held, "weight copies": largest_layer}
    if settings.smooth_attention and "forward" not in phases:
        phases["forward"] = forward
    if settings.evaluation is not None:
        ev = settings.evaluation
        # torch: QuantLinear keeps the fp32 weight and the quantized layer it came from; fast: the packed
        # codes and the embeddings and head in fp16 at most
        candidate = (quantized + shapes.whole_fp32 if settings.eval_engine == "torch"
                     else int(shapes.linear_weights * packed) + shapes.outside_fp32 // 2)
        phases["evaluate"] = {
            "packed model in the engine": candidate,
            "reference hidden states": 2 * ev.n_windows * ev.ctx * c * _FP32 if shapes.streamed else 0,
            "log-probs of one batch": LOGITS_COPIES * _eval_batch(shapes, ev) * ev.ctx * shapes.vocab * _FP32}
    return PeakEstimate(held=held, phases=phases)


def _options_that_fit(shapes: CompressShapes, settings: CompressSettings, available: int) -> list[tuple[str, int]]:
    """Smaller settings the CLI can ask for, each with its peak, that fit in `available`: fewest changes first."""
    cal = settings.calibration
    tries: list[tuple[str, CompressSettings]] = []
    if settings.evaluation is not None:
        tries.append(("--no-eval", dataclasses.replace(settings, evaluation=None)))
    for samples in (32, 16, 8):
        if samples < cal.n_samples:
            smaller = dataclasses.replace(cal, n_samples=samples, batch_size=min(cal.batch_size, samples))
            tries.append((f"--calib-samples {samples}", dataclasses.replace(settings, calibration=smaller)))
    for seq_len in (256, 128):
        if seq_len < cal.seq_len:
            shorter = dataclasses.replace(cal, seq_len=seq_len)
            tries.append((f"--calib-len {seq_len}", dataclasses.replace(settings, calibration=shorter)))
    if settings.evaluation is not None and tries:
        last = tries[-1]
        tries.append((f"{last[0]} --no-eval", dataclasses.replace(last[1], evaluation=None)))
    fitting = [(flags, compress_peak(shapes, s).total) for flags, s in tries]
    return [(flags, peak) for flags, peak in fitting if peak <= available]


def check_compress_memory(shapes: CompressShapes, settings: CompressSettings, budget: MemoryBudget) -> PeakEstimate:
    """Refuse a compress run whose estimated peak exceeds the memory left, saying what would fit.

    Raises:
        InsufficientMemory: `compress_peak` exceeds `budget.available` (no check when unknown).
    """
    estimate = compress_peak(shapes, settings)
    if budget.available is None or estimate.total <= budget.available:
        return estimate
    term, nbytes = estimate.largest_term()
    fitting = _options_that_fit(shapes, settings, budget.available)
    advice = (f"{fitting[0][0]} would fit (about {fitting[0][1] / _GB:.1f} GB)" if fitting
              else "no calibration or evaluation setting brings it under that: use a smaller model or free memory")
    raise InsufficientMemory(
        f"compressing {shapes.name} needs about {estimate.total / _GB:.1f} GB at its peak ({estimate.peak_phase}; "
        f"largest part: {term} {nbytes / _GB:.1f} GB), {budget.available / _GB:.1f} GB is available ({budget.detail}); "
        f"{advice}")
