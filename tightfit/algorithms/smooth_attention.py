"""SmoothAttention (QServe, Lin et al. 2024, sec. 4.3): per-channel key scales folded into the
query and key projections, so that a 4-bit KV cache sees keys without outlier channels.

For KV head h and head channel i, lambda_hi = max_t |K_thi|^alpha over calibration tokens t, K the
keys before RoPE (the key projection's output). Dividing key channel i by lambda_hi and multiplying
query channel i of every query head that reads KV head h (GQA) by lambda_hi leaves every score
q . k unchanged. RoPE rotates channel pairs (i, i + r/2) of the first r = rotary dims (the
"rotate_half" layout of llama/qwen2/mistral): a pair shares one lambda (the larger of its two), so
RoPE(k / lambda) . RoPE(q * lambda) = RoPE(k) . RoPE(q) exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

DEFAULT_ALPHA = 0.5  # QServe's migration strength
_MIN_KEY_MAX = 1e-5  # a channel that never fires keeps a finite scale


@dataclass(frozen=True)
class AttentionShape:
    """Head layout of one attention block: n_heads query heads and n_kv_heads KV heads of
    head_dim channels each, the first rotary_dim of them rotated by RoPE."""

    head_dim: int
    n_heads: int
    n_kv_heads: int
    rotary_dim: int

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads or self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ValueError(f"bad attention shape {self}")

    @classmethod
    def of(cls, config: Any) -> "AttentionShape":
        """From a transformers config (head_dim, num_attention_heads, num_key_value_heads,
        partial_rotary_factor where the family has one)."""
        n_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
        rotary = int(head_dim * (getattr(config, "partial_rotary_factor", None) or 1.0))
        return cls(head_dim=head_dim, n_heads=n_heads, n_kv_heads=getattr(config, "num_key_value_heads", None) or n_heads,
                   rotary_dim=rotary)


def key_scales(key_max: torch.Tensor, shape: AttentionShape, alpha: float = DEFAULT_ALPHA) -> torch.Tensor:
    """lambda [n_kv_heads, head_dim] from the keys' per-channel max |K| [n_kv_heads * head_dim]:
    max^alpha, RoPE pairs (i, i + rotary_dim/2) sharing the larger of their two maxima; channels
    past rotary_dim are not rotated and keep their own."""
    assert key_max.shape == (shape.n_kv_heads * shape.head_dim,), (key_max.shape, shape)
    if not 0 <= alpha <= 1:
        raise ValueError(f"SmoothAttention alpha must lie in [0, 1], got {alpha}")
    m = key_max.float().clamp_min(_MIN_KEY_MAX).reshape(shape.n_kv_heads, shape.head_dim).clone()  # [Hkv, d]
    half = shape.rotary_dim // 2
    pair = torch.maximum(m[:, :half], m[:, half:shape.rotary_dim])  # [Hkv, r/2]
    m[:, :half] = pair
    m[:, half:shape.rotary_dim] = pair
    return m.pow(alpha)


@torch.no_grad()
def fold_key_scales(query: nn.Linear, key: nn.Linear, scales: torch.Tensor, shape: AttentionShape) -> None:
    """In place: key rows (and bias) of KV head h, channel i divided by scales[h, i]; query rows
    (and bias) of every query head j in that head's group (j // (n_heads / n_kv_heads) == h, as
    transformers' repeat_kv pairs them) multiplied by it."""
    assert scales.shape == (shape.n_kv_heads, shape.head_dim), (scales.shape, shape)
    assert key.out_features == scales.numel() and query.out_features == shape.n_heads * shape.head_dim, (
        key.out_features, query.out_features, shape)
    k_scale = scales.reshape(-1)  # [Hkv * d]
    q_scale = scales.repeat_interleave(shape.n_heads // shape.n_kv_heads, dim=0).reshape(-1)  # [H * d]
    key.weight.div_(k_scale.to(key.weight.dtype)[:, None])
    query.weight.mul_(q_scale.to(query.weight.dtype)[:, None])
    if key.bias is not None:
        key.bias.div_(k_scale.to(key.bias.dtype))
    if query.bias is not None:
        query.bias.mul_(q_scale.to(query.bias.dtype))
