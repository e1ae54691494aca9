"""Weight quantization algorithms. Each takes a weight (and, if it needs one, the Hessian of the
layer's inputs) and returns a QuantizedTensor; none touches modules or files."""

from tightfit.algorithms.gptq import GPTQResult, HessianAccumulator, gptq_quantize, gptq_quantize_many, group_aware_order

__all__ = ["GPTQResult", "HessianAccumulator", "gptq_quantize", "gptq_quantize_many", "group_aware_order"]
