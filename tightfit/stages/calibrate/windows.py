"""Calibration windows: fixed token windows from the calibration part of a text source (or a mix
of sources, data/mix.py), and held-back windows of the same text.

A mix may hold `self`: text the original model writes itself (temperature 1 from BOS and a few
short seeds, a fixed seed per sample), which transfers across domains better than one corpus
(exllamav3 calibrates on such traces); it is cached in the work folder. Its token ids are fixed by
that cache: a fresh sampling on another machine may differ (floating point), so its sha256 is recorded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tightfit.artifacts import CalibrationConfig, CalibrationSet, CalibrationSource
from tightfit.data import SELF_TEXT, apportion, interleave, load_text, parse_mix, stream_windows, token_windows, window_body
from tightfit.data.text import DOC_SEPARATOR
from tightfit.errors import TextSourceError
from tightfit.formats.files import atomic_write_json
from tightfit.model import LoadedModel

SELF_PROMPTS = ("", "The", "In", "def", "#")  # after BOS: nothing, then short seeds of prose and code
SELF_NEW_TOKENS = 512  # tokens sampled per seed at most (EOS may end a sample sooner)
SELF_SEED = 0  # sample i uses seed SELF_SEED + i
SELF_VERSION = 1
SELF_FILE = "self-text.json"


def calibrate(tokenizer, config: CalibrationConfig, *, loaded: LoadedModel | None = None, work: Path | None = None,
              progress: bool = True) -> CalibrationSet:
    """config.n_samples windows of config.seq_len tokens -> CalibrationSet (tokens [S, T]).

    loaded: the original model, needed when the text holds `self` (sampled from it, cached in `work`)."""
    calibration, _ = calibrate_with_held_back(tokenizer, config, 0, loaded=loaded, work=work, progress=progress)
    return calibration


def calibrate_with_held_back(tokenizer, config: CalibrationConfig, held_back: int, *, loaded: LoadedModel | None = None,
                             work: Path | None = None, progress: bool = True) -> tuple[CalibrationSet, torch.Tensor]:
    """The calibration set, and the next `held_back` windows of the same text, never calibrated on
    -> (CalibrationSet, tokens [held_back, seq_len]); windows come in a fixed order, so the
    calibration set is the same whatever held_back is. In a mix, each source gives held-back
    windows in proportion to its calibration windows, and both sets are interleaved (`interleave`)."""
    mix = parse_mix(config.text)
    counts = mix.windows(config.n_samples, config.seq_len)
    extra = dict(zip(counts, apportion([float(w) for w in counts.values()], held_back)))
    windows: dict[str, torch.Tensor] = {}  # source -> [counts + extra, seq_len]
    sources = []
    for name, n in counts.items():
        if name == SELF_TEXT:
            if loaded is None:
                raise ValueError("calibration text 'self' is sampled from the model: calibrate(..., loaded=) needs it")
            stream = sample_self_text(loaded, (n + extra[name]) * window_body(tokenizer, config.seq_len), work, progress)
            windows[name] = stream_windows(tokenizer, stream, n + extra[name], config.seq_len)
            origin = (f"sampled from {loaded.source.name}: temperature 1 after BOS and the seeds "
                      f"{list(SELF_PROMPTS)}, seed {SELF_SEED} + sample")
            sha = hashlib.sha256(stream.numpy().tobytes()).hexdigest()
        else:
            corpus = load_text(name)
            what = "calibration" if len(counts) == 1 else f"{name} calibration"
            windows[name] = token_windows(tokenizer, corpus, "calibration", n + extra[name], config.seq_len, what=what)
            origin, sha = corpus.origin, corpus.sha256()
        sources.append(CalibrationSource(name=name, windows=n, held_back=extra[name], origin=origin, sha256=sha))

    def gather(order: list[tuple[str, int]], offset: dict[str, int]) -> torch.Tensor:
        rows = [windows[name][offset[name] + j] for name, j in order]
        return torch.stack(rows) if rows else torch.empty(0, config.seq_len, dtype=torch.int64)  # [n, seq_len]

    tokens = gather(interleave(counts), dict.fromkeys(counts, 0))
    held = gather(interleave({k: v for k, v in extra.items() if v}), counts)
    return CalibrationSet(config=config, tokens=tokens, sources=tuple(sources)), held


def _stop_ids(loaded: LoadedModel) -> set[int]:
    ids = {loaded.tokenizer.eos_token_id} if loaded.tokenizer.eos_token_id is not None else set()
    eos = getattr(loaded.model.config, "eos_token_id", None)
    ids |= set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    return {int(i) for i in ids}


@torch.no_grad()
def sample_self_text(loaded: LoadedModel, n_tokens: int, work: Path | None = None, progress: bool = True) -> torch.Tensor:
    """The first n_tokens of text the model writes itself -> int64 [n_tokens].

    Sample i starts from BOS (EOS when the tokenizer has none) and seed SELF_PROMPTS[i % 5], draws
    up to SELF_NEW_TOKENS tokens at temperature 1 (no top-k, no top-p) with seed SELF_SEED + i and
    ends at EOS; the stream is seed + sample + a blank line, sample after sample. The last sample is
    drawn only as far as n_tokens needs (`partial`; being seeded, it is a prefix of the whole one,
    which a longer request draws again), so the stream of a longer request extends this one.
    Samples are cached in work/self-text.json (keyed by the source model and these settings) as
    they are drawn.
    """
    from tightfit.runtime.generate import SamplingConfig, generate
    from tightfit.runtime.torch_backend import TorchBackend

    if loaded.streamed:
        raise TextSourceError(f"'{SELF_TEXT}' calibration text is sampled from the whole model in memory; "
                              f"{loaded.source.name} is read one block at a time: use wiki, code or a file")
    tokenizer = loaded.tokenizer
    key = {"source_sha256": loaded.source.sha256(), "prompts": list(SELF_PROMPTS), "new_tokens": SELF_NEW_TOKENS,
           "temperature": 1.0, "seed": SELF_SEED, "version": SELF_VERSION}
    path = None if work is None else Path(work) / SELF_FILE
    samples: list[list[int]] = []
    partial = False  # whether the last sample stops short of where it would end
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
        if isinstance(cached, dict) and cached.get("key") == key:
            samples, partial = cached["samples"], bool(cached.get("partial", False))
    start = [tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id]
    start = [t for t in start if t is not None]
    separator = tokenizer(DOC_SEPARATOR, add_special_tokens=False)["input_ids"]
    stops = _stop_ids(loaded)
    backend = TorchBackend(loaded.model, max_positions=len(start) + 8 + SELF_NEW_TOKENS)
    total = sum(len(s) for s in samples)
    if partial and total < n_tokens:  # a longer request: the cut sample is drawn again in full
        total -= len(samples.pop())
        partial = False
    bar = tqdm(total=n_tokens, initial=min(total, n_tokens), desc="self text", unit="tok", disable=not progress)
    while total < n_tokens:
        i = len(samples)
        if i >= n_tokens:  # every sample ended at once
            raise TextSourceError(f"the model ends its samples at once: {total} tokens from {i} samples, "
                                  f"{n_tokens} needed for 'self'")
        seed = tokenizer(SELF_PROMPTS[i % len(SELF_PROMPTS)], add_special_tokens=False)["input_ids"]
        prompt = start + seed or seed or separator  # a tokenizer without BOS and EOS starts from a blank line
        cap = min(SELF_NEW_TOKENS, max(1, n_tokens - total - len(seed)))
        run = generate(backend, tokenizer, prompt, SamplingConfig(max_new_tokens=cap, temperature=1.0, seed=SELF_SEED + i),
                       eos_token_ids=tuple(stops))
        run.text()
        out = list(run.result.token_ids)
        if out and out[-1] in stops:
            out = out[:-1]
        partial = run.result.finish_reason == "length" and len(out) == cap < SELF_NEW_TOKENS
        samples.append([int(t) for t in seed + out + ([] if partial else separator)])
        total += len(samples[-1])
        bar.update(min(total, n_tokens) - bar.n)
        if path is not None:
            atomic_write_json(path, {"key": key, "samples": samples, "partial": partial})
    bar.close()
    stream = [t for s in samples for t in s]
    return torch.tensor(stream[:n_tokens], dtype=torch.int64)
