"""The engine's quantized KV cache (runtime/kernels/kv_cache.h): 16 (fp16), 8 and 4 bits, native
(AVX-512 where the CPU has it) and portable builds.

The reference quantizes every key and value the way the cache is documented to (x ~ scale * code +
min with scale and min rounded to fp16 first; values and 8-bit keys per token in groups of 32 along
head_dim or head_dim when smaller, 4-bit keys per channel over blocks of 16 positions) and attends in
float64: the kernel must match it to fp32 rounding, and be far from the
unquantized attention where the codes are coarse (so a kernel that skipped quantization fails too).
On a tiny model, exact-mode greedy generation with an 8-bit cache equals a torch reference whose
cache holds the same quantized-dequantized keys and values, token for token.
"""

from __future__ import annotations

import ctypes
import json
import shutil

import pytest
import torch
from transformers import DynamicCache

from tightfit.cli import main
from tightfit.errors import GenerationError, KernelUnavailable
from tightfit.formats.packed import load_packed
from tightfit.runtime.engine import FastBackend, open_backend
from tightfit.runtime.engine_config import check_kv_bits
from tightfit.runtime.kernels import AVX2, kv_attend, time_kv_attend
from tightfit.runtime.kernels.build import load
from tightfit.runtime.model import build_model

BUILDS = [pytest.param(False, id="native"), pytest.param(True, id="portable"), pytest.param(AVX2, id="avx2")]
TF_E_COUNT, TF_E_KV = -1, -7


def _asymmetric(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x quantized-dequantized along dim: min = fp16(min x), scale = fp16((max x - min x) / (2^bits - 1)),
    code = clamp(round((x - min) / scale), 0, 2^bits - 1), x' = scale * code + min."""
    top = 2**bits - 1
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    m, s = lo.half().float(), ((hi - lo) / top).half().float()
    inv = torch.where(s > 0, 1.0 / s, torch.zeros_like(s))
    return s * torch.round((x - m) * inv).clamp(0, top) + m


def quantize_dequantize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x [..., D] fp32 values (or 8-bit keys) as the KV cache gives them back: fp16 (bits 16), else
    per token and group of min(32, D) dims."""
    if bits == 16:
        return x.half().float()
    gw = min(32, x.shape[-1])
    return torch.cat([_asymmetric(x[..., g0 : g0 + gw], bits, -1) for g0 in range(0, x.shape[-1], gw)], -1)


def quantize_dequantize_keys(keys: torch.Tensor, bits: int) -> torch.Tensor:
    """keys [..., n, D] of positions 0 .. n-1, all stored, as the cache gives them back: 4 bits per
    channel, every head dim over each block of 16 positions (the last one over those it holds so
    far); other widths as values."""
    if bits != 4:
        return quantize_dequantize(keys, bits)
    return torch.cat([_asymmetric(keys[..., b0 : b0 + 16, :], 4, -2) for b0 in range(0, keys.shape[-2], 16)], -2)


def _attention(keys: torch.Tensor, values: torch.Tensor, q: torch.Tensor, scale: float) -> torch.Tensor:
    """q [D] or [rep, D] -> [D] or [rep, D], in float64."""
    p = torch.softmax((q.double() @ keys.double().T) * scale, dim=-1)  # [rep, n]
    return p @ values.double()  # [rep, D]


def _head(n: int, d: int, seed: int, rep: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """keys, values [n, d] and the rep query heads that share them q [rep, d]; per-channel offsets and
    a few outlier channels, as real keys have."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(n, d, generator=g) + 3 * torch.randn(d, generator=g)
    keys[:, :: max(1, d // 5)] *= 6
    values = torch.randn(n, d, generator=g) * 0.5 + torch.randn(d, generator=g)
    return keys.contiguous(), values.contiguous(), torch.randn(rep, d, generator=g)


def _relative_error(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| per query head, the worst head's"""
    return ((got.double() - ref).abs().amax(-1) / ref.abs().amax(-1)).max().item()


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("d", [16, 32, 64, 80, 128])
@pytest.mark.parametrize("rep", [1, 2, 6])
def test_attention_reads_the_cache_it_quantized(rep, d, bits, portable):
    """Every width, head size (80: a short last group of 16 dims; 37 positions: a partial block of 16
    slots) and GQA ratio (rep query heads read the KV head together): each head's output equals
    attention over the dequantized cache."""
    keys, values, q = _head(37, d, seed=d + bits + rep, rep=rep)
    scale = d**-0.5
    got = kv_attend(bits, keys, values, q, scale, portable=portable)
    ref = _attention(quantize_dequantize_keys(keys, bits), quantize_dequantize(values, bits), q, scale)
    err = _relative_error(got, ref)
    assert err < 2e-5, err
    if bits == 4:  # 4-bit codes move the result far more than fp32 rounding does
        assert _relative_error(_attention(keys, values, q, scale).float(), ref) > 100 * max(err, 1e-7)


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("bits", [16, 8, 4])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 131])
@pytest.mark.parametrize("rep", [3, 6, 11])
def test_grouped_attention_at_odd_lengths(rep, n, bits, portable):
    """Lengths around a block of 16 slots and GQA ratios beyond one group of 8 heads (11: groups of 8
    and 3) on the 1.5B's head size: every head equals its reference, and grouping does not mix heads
    up (each head alone gives the same output, up to fp32 rounding)."""
    keys, values, q = _head(n, 128, seed=n * rep + bits, rep=rep)
    got = kv_attend(bits, keys, values, q, 128**-0.5, portable=portable)
    ref = _attention(quantize_dequantize_keys(keys, bits), quantize_dequantize(values, bits), q, 128**-0.5)
    assert _relative_error(got, ref) < 2e-5
    alone = torch.cat([kv_attend(bits, keys, values, q[r : r + 1], 128**-0.5, portable=portable) for r in range(rep)])
    assert _relative_error(got, alone.double()) < 2e-5  # fp32 sums in another order, not another head's


@pytest.mark.parametrize("portable", BUILDS)
def test_per_channel_4bit_keys_are_blind_to_smoothattention_scales(portable):
    """SmoothAttention moves a per-channel scale l from the keys into the queries (k l, q / l; q.k is
    unchanged). 4-bit keys are quantized per channel: their grid moves with l (scale and min times l,
    the same codes), so attention is the same to fp32 rounding (l powers of two: exact in fp16) and
    SmoothAttention cannot lower KV4's error. 8-bit keys are per token: there the scales change it."""
    keys, values, q = _head(64, 128, seed=7, rep=2)
    lam = 2.0 ** torch.randint(-3, 4, (128,), generator=torch.Generator().manual_seed(1)).float()  # [D]
    scale = 128**-0.5
    for bits, same in ((4, True), (8, False)):
        plain = kv_attend(bits, keys, values, q, scale, portable=portable)
        smooth = kv_attend(bits, keys * lam, values, q / lam, scale, portable=portable)
        err = _relative_error(smooth, plain.double())
        assert err < 2e-5 if same else err > 1e-4, (bits, err)


def test_time_kv_attend_runs_and_refuses_wide_groups():
    """The timing entry runs (over one cache, or copies of it) and refuses a group wider than the
    kernel keeps in registers."""
    keys, values, q = _head(40, 64, seed=5, rep=6)
    assert time_kv_attend(4, keys, values, q, 0.125, group=6, reps=2) > 0
    assert time_kv_attend(8, keys, values, q, 0.125, group=2, reps=5, min_bytes=1 << 16) > 0  # cycles through copies
    with pytest.raises(ValueError, match="group 9"):
        time_kv_attend(4, keys, values, q, 0.125, group=9, reps=1)


@pytest.mark.parametrize("portable", BUILDS)
def test_attention_with_constant_groups(portable):
    """A group whose values are all equal has scale 0: its codes are 0 and it reads back as its min."""
    keys, values, q = _head(20, 64, seed=3, rep=2)
    keys[:, :32] = 1.5
    values[:, 32:] = -2.0
    for bits in (8, 4):
        got = kv_attend(bits, keys, values, q, 0.125, portable=portable).double()
        ref = _attention(quantize_dequantize_keys(keys, bits), quantize_dequantize(values, bits), q, 0.125)
        assert torch.allclose(got, ref, rtol=2e-5, atol=2e-5)
        assert torch.allclose(got[:, 32:], torch.full((2, 32), -2.0, dtype=torch.float64))


def test_kv_attend_refuses_bad_widths():
    lib = load(False)
    x, out = torch.zeros(4, 24), torch.zeros(24)
    args = (x.data_ptr(), x.data_ptr(), out.data_ptr(), ctypes.c_float(1.0), out.data_ptr())
    assert lib.tf_kv_attend(5, 16, 4, 1, *args) == TF_E_KV
    assert lib.tf_kv_attend(8, 24, 4, 1, *args) == TF_E_KV  # codes need head_dim a multiple of 16
    assert lib.tf_kv_attend(16, 24, 4, 0, *args) == TF_E_COUNT  # no query head
    assert lib.tf_kv_attend(16, 24, 4, 1, *args) == 0


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_kv_bytes_per_token_match_the_formula(bits, packed_llama):
    """Per KV head and layer: codes (D bits/8, or fp16's 2 D bytes) of K and V, + fp16 (scale, min)
    per group of 32 dims for V and 8-bit K, per dim and block of 16 positions for 4-bit K (D / 4 bytes
    a position: 16 at D = 64, against 8 per token)."""
    packed = load_packed(packed_llama)
    cfg = packed.hf_config
    layers, kv_heads, d = cfg["num_hidden_layers"], cfg["num_key_value_heads"], cfg["head_dim"]
    codes, groups = d * bits // 8, -(-d // 32) * 2 * 2
    key, value = (2 * d, 2 * d) if bits == 16 else (codes + (d * 2 * 2 // 16 if bits == 4 else groups), codes + groups)
    engine = FastBackend(packed, max_positions=48, threads=1, kv_bits=bits)
    assert engine.kv_bytes_per_token == layers * kv_heads * (key + value)
    assert engine.kv_bytes == 48 * engine.kv_bytes_per_token  # no ring: 48 slots in every layer


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_ring_of_per_channel_keys_has_a_block_more(bits, make_packed):
    """Gemma3's sliding layer (window 16, max_batch 4): a ring of 16 + 4 - 1 slots rounded up to 16,
    with 4-bit keys 15 more (a block being re-quantized holds no position a query still sees)."""
    packed = load_packed(make_packed("gemma3_text"))
    engine = FastBackend(packed, max_positions=128, threads=1, max_batch=4, kv_bits=bits)
    ring = 48 if bits == 4 else 32
    assert engine.kv_bytes == (ring + 128) * engine.kv_bytes_per_token // 2  # one sliding and one full layer


class _QuantizedKV(DynamicCache):
    """A transformers cache whose attention reads keys and values quantized-dequantized like the
    engine's: values per token as they come; keys from all raw keys so far at every call (a 4-bit
    block's grid is re-set by each call that stores into it, as the engine's stage does)."""

    def __init__(self, bits: int, config) -> None:
        super().__init__(config=config)
        self.bits = bits
        self.raw_keys: dict[int, torch.Tensor] = {}  # layer -> [batch, kv_heads, positions so far, head_dim]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        old = self.raw_keys.get(layer_idx)
        raw = key_states if old is None else torch.cat([old, key_states], -2)
        self.raw_keys[layer_idx] = raw
        keys, values = super().update(key_states, quantize_dequantize(value_states, self.bits), layer_idx, *args, **kwargs)
        return quantize_dequantize_keys(raw, self.bits)[..., -keys.shape[-2] :, :], values  # a sliding layer's last ones


def _reference_logits(model, ids: list[int], bits: int, calls: list[int]) -> torch.Tensor:
    """[len(ids), vocab] of the torch model over ids in calls of `calls` tokens each (as the engine
    got them), its K/V cache quantized like the engine's."""
    cache, out, at = _QuantizedKV(bits, model.config), [], 0
    with torch.no_grad():
        for m in calls:
            out.append(model(input_ids=torch.tensor([ids[at : at + m]]), past_key_values=cache, use_cache=True).logits[0])
            at += m
    assert at == len(ids)
    return torch.cat(out).float()


@pytest.mark.parametrize("portable", BUILDS)
@pytest.mark.parametrize("model_type", ["llama", "gemma3_text"])
def test_exact_greedy_with_quantized_kv_matches_reference(model_type, portable, make_packed):
    """Greedy generation in exact mode, prefill in calls of 4 then decode: kv 8 and kv 4 (4-bit keys
    per channel, a block's grid re-set by every call storing into it) equal the quantized-KV torch
    reference fed in the same calls, token for token (gemma3's sliding layer wraps its ring: 32
    slots at kv 8, 48 at kv 4)."""
    packed = load_packed(make_packed(model_type))
    model = build_model(packed)
    prompt = torch.randint(4, 300, (6,), generator=torch.Generator().manual_seed(7)).tolist()
    fp16 = FastBackend(packed, max_positions=96, threads=2, max_batch=4, exact=True, portable=portable)
    fp16_logits = fp16.forward_all(prompt)
    for bits in (8, 4):
        fast = FastBackend(packed, max_positions=96, threads=2, max_batch=4, exact=True, portable=portable, kv_bits=bits)
        ids, logits = list(prompt), fast.forward_all(prompt)  # prefill in calls of 4 and 2, then decode
        ref = _reference_logits(model, ids, bits, [4, 2])
        assert (logits - ref).abs().max() / ref.abs().max() < 2e-3
        assert not torch.allclose(logits, fp16_logits, atol=1e-4)  # the codes are really what it reads
        steps = 60
        for _ in range(steps):
            ids.append(int(logits[-1].argmax()))
            logits = fast.forward([ids[-1]]).unsqueeze(0)
        ref = _reference_logits(model, ids, bits, [4, 2] + [1] * steps)
        assert ids[len(prompt):] == [int(t) for t in ref[len(prompt) - 1 : -1].argmax(-1)]
        assert (logits[-1] - ref[-1]).abs().max() / ref[-1].abs().max() < 2e-3


@pytest.mark.parametrize("portable", BUILDS)
def test_ring_refilled_by_calls_of_several_tokens(portable, make_packed):
    """70 tokens through gemma3's sliding layer (window 16) in calls of 1, then 4: a call whose last
    token starts a block (positions 16 k - 3 .. 16 k) re-quantizes all 16 slots of that block, which
    in a ring of 32 would still hold 2 positions in its first query's window; in the ring of 48 none
    is, so every position's logits equal the reference fed in the same calls."""
    packed = load_packed(make_packed("gemma3_text"))
    ids = torch.randint(4, 300, (70,), generator=torch.Generator().manual_seed(5)).tolist()
    fast = FastBackend(packed, max_positions=96, threads=2, max_batch=4, exact=True, portable=portable, kv_bits=4)
    logits = torch.cat([fast.forward_all(ids[:1]), fast.forward_all(ids[1:])])
    ref = _reference_logits(build_model(packed), ids, 4, [1] + [4] * 17 + [1])
    assert ((logits - ref).abs().amax(-1) / ref.abs().amax(-1)).max() < 2e-3


@pytest.mark.parametrize("portable", BUILDS)
def test_per_channel_keys_after_a_truncation(portable, packed_llama):
    """A call starting inside a block of 16 re-quantizes it with the block's earlier keys: from the
    fp32 stage when the cache was truncated within the block it last stored into (the same logits
    as a fresh cache fed the same calls), as their codes give them back after a truncation into an
    earlier block (close, not equal: those keys are rounded once more)."""
    packed = load_packed(packed_llama)
    ids = torch.randint(4, 300, (44,), generator=torch.Generator().manual_seed(11)).tolist()

    def engine():
        return FastBackend(packed, max_positions=64, threads=2, max_batch=4, exact=True, portable=portable, kv_bits=4)

    for keep in (37, 21):  # block 2, stage's (positions 32 .. 39 stored); block 1, an earlier one
        cut = engine()
        cut.forward_all(ids[:40])
        cut.truncate(keep)
        got = cut.forward_all(ids[keep : keep + 4])
        fresh = engine()
        fresh.forward_all(ids[:keep])
        want = fresh.forward_all(ids[keep : keep + 4])
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < (1e-5 if keep == 37 else 2e-2), (keep, err)
        if keep == 21:
            assert err > 1e-6  # the dequantized keys: a real second path


def test_open_backend_kv_widths(packed_llama):
    """The torch engine has no quantized KV cache: it refuses --kv 8/4 (so does auto where the fast
    engine cannot run); a width the engine lacks is refused in one line."""
    assert open_backend(packed_llama, engine="auto", max_positions=32, kv_bits=4).kv_bits == 4
    with pytest.raises(KernelUnavailable, match="8-bit KV cache runs on the fast engine only"):
        open_backend(packed_llama, engine="torch", max_positions=32, kv_bits=8)
    with pytest.raises(GenerationError, match="16, 8, 4 bits wide, not 5"):
        FastBackend(load_packed(packed_llama), max_positions=32, kv_bits=5)
    with pytest.raises(KernelUnavailable, match="needs head_dim a multiple of 16, this model has 24"):
        check_kv_bits(8, 24)
    assert check_kv_bits(16, 24) == 16


def test_cli_kv_flag(packed_llama, capsys, tmp_path):
    """--kv reaches the engine (bench prints its KV bytes per token) and a bad width is a one-line error."""
    report = tmp_path / "bench.json"
    assert main(["bench", str(packed_llama), "--kv", "4", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1",
                 "--threads", "1", "--json", str(report)]) == 0
    per_token = json.loads(report.read_text())["kv_bytes_per_token"]
    assert f"kv cache          4 bits, {per_token} bytes/token" in capsys.readouterr().out
    assert main(["generate", str(packed_llama), "hello", "--engine", "torch", "--kv", "8", "--max-tokens", "2"]) == 2
    assert "runs on the fast engine only" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", str(packed_llama), "hello", "--kv", "5"])
    assert main(["eval", str(packed_llama), "--kv", "4", "--fast"]) == 2  # scored by the torch engine (its default)
    assert "4-bit KV cache runs on the fast engine only" in capsys.readouterr().err
    assert main(["eval", "smollm2-135m", "--kv", "8", "--fast"]) == 2  # not packed: torch only
    assert "8-bit KV cache runs on the fast engine only, which scores packed models only" in capsys.readouterr().err


def test_eval_scores_with_a_quantized_kv_cache(packed_llama, tmp_path):
    """`eval --engine fast --kv 8` scores through the 8-bit cache and records its width in eval.json."""
    folder = tmp_path / "packed"
    shutil.copytree(packed_llama, folder)
    ppl = {}
    for bits in (16, 8):
        assert main(["eval", str(folder), "--engine", "fast", "--kv", str(bits), "--windows", "2", "--ctx", "64"]) == 0
        record = json.loads((folder / "eval.json").read_text())
        assert record["kv_bits"] == bits
        ppl[bits] = record["result"]["ppl"]
    assert ppl[8] != ppl[16] and abs(ppl[8] / ppl[16] - 1) < 0.05


@pytest.mark.parametrize("bits", [16, 4])
def test_query_heads_split_among_threads_agree(bits, packed_llama):
    """A decode step on 1 thread attends with both query heads of a KV head together, on 4 threads
    with each alone (the engine splits groups to keep threads busy): same logits up to fp32 rounding."""
    packed = load_packed(packed_llama)
    prompt = torch.randint(4, 300, (9,), generator=torch.Generator().manual_seed(3)).tolist()
    logits = []
    for threads in (1, 4):
        engine = FastBackend(packed, max_positions=32, threads=threads, max_batch=4, exact=True, kv_bits=bits)
        engine.forward_all(prompt)
        logits.append(torch.stack([engine.forward([t]).clone() for t in (5, 17, 40)]))
    assert ((logits[0] - logits[1]).abs().max() / logits[0].abs().max()).item() < 1e-4
