"""Calibrate stage: fixed calibration windows from the calibration part of a text source (or a
mix of sources, data/mix.py), and statistics of the original model on them:

  Hessians  H = 2/T X^T X of every linear layer's inputs (one forward pass, block by block)
  Fisher    the diagonal Fisher information of every linear layer's outputs, of the embeddings and
            of the logits (one forward and backward per window; `FisherSet`)

A mix may hold `self`: text the original model writes itself (temperature 1 from BOS and a few
short seeds, a fixed seed per sample), which transfers across domains better than one corpus
(exllamav3 calibrates on such traces); it is cached in the work folder. Its token ids are fixed by
that cache: a fresh sampling on another machine may differ (floating point), so its sha256 is recorded.

Sequential quantization (the default) recomputes Hessians inside the quantize stage from inputs
that pass through already-quantized layers. Hessians of the original model are what measuring
many formats needs (sensitivity, benchmarks): collected once, they let every format be quantized
without another forward pass. Both are cached in a work folder, keyed by the source model and
the calibration.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator
from tightfit.artifacts import CalibrationConfig, CalibrationSet, CalibrationSource, FisherSet, HessianSet, config_to_json
from tightfit.data import SELF_TEXT, apportion, interleave, load_text, parse_mix, stream_windows, token_windows, window_body
from tightfit.data.text import DOC_SEPARATOR
from tightfit.errors import TextSourceError
from tightfit.formats.files import atomic_save_tensors, atomic_write_json
from tightfit.metrics import log_probs
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import block_list, capture_block_inputs, linear_layer_names, run_block

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


@torch.no_grad()
def collect_hessians(loaded: LoadedModel, calibration: CalibrationSet, *, progress: bool = True) -> HessianSet:
    """One pass of the original model over the calibration set, block by block.

    Returns, for every linear layer of every block, the Hessian [K, K] of its inputs; layers of
    one group (same input) share one tensor.
    """
    arch = loaded.arch
    blocks = block_list(loaded.model, arch)
    inputs = capture_block_inputs(loaded.model, arch, calibration.tokens, calibration.config.batch_size)
    hessians: dict[str, torch.Tensor] = {}
    for i in tqdm(range(len(blocks)), desc="hessians", unit="block", disable=not progress):
        block = blocks[i]
        accs = {names: HessianAccumulator(get_module(block, names[0]).in_features) for names in arch.linear_groups}
        handles = [
            get_module(block, names[0]).register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0]))
            for names, acc in accs.items()
        ]
        try:
            inputs.hidden = [run_block(block, h, inputs.extra[i][b]) for b, h in enumerate(inputs.hidden)]
        finally:
            for h in handles:
                h.remove()
        for names, acc in accs.items():
            h = acc.hessian()
            for name in names:
                hessians[f"{arch.blocks}.{i}.{name}"] = h
    return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=hessians)


def save_hessians(hessians: HessianSet, path: Path) -> None:
    unique: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, h in hessians.hessians.items():
        if h.data_ptr() in seen:
            aliases[name] = seen[h.data_ptr()]
        else:
            seen[h.data_ptr()] = name
            unique[name] = h
    meta = {"calibration": json.dumps(config_to_json(hessians.config)), "source_sha256": hessians.source_sha256,
            "aliases": json.dumps(aliases)}
    atomic_save_tensors(path, unique, metadata=meta)


def _cache_metadata(path: Path, loaded: LoadedModel, config: CalibrationConfig, **key: str) -> dict[str, str] | None:
    """The metadata of the tensor file at path if it was made from this model and calibration
    (and carries every `key` value), else None."""
    if not Path(path).is_file():
        return None
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    wanted = {"source_sha256": loaded.source.sha256(), "calibration": json.dumps(config_to_json(config)), **key}
    return meta if all(meta.get(k) == v for k, v in wanted.items()) else None


def load_hessians(path: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The cached Hessians at path if they were made from this model and calibration, else None."""
    meta = _cache_metadata(path, loaded, config)
    if meta is None:
        return None
    tensors = load_file(str(path))
    for alias, name in json.loads(meta["aliases"]).items():
        tensors[alias] = tensors[name]
    return HessianSet(config=config, source_sha256=meta["source_sha256"], hessians=tensors)


# ---- Fisher ------------------------------------------------------------------------------------


def _embedding_scale(embedding: torch.nn.Module, token: int) -> float:
    """s with embedding(x) = s * E[x]: 1 for a plain embedding, sqrt(hidden) for Gemma's scaled one."""
    out = embedding(torch.tensor([[token]])).reshape(-1).float()  # [H]
    row = embedding.weight[token].float()  # [H]
    s = float(out @ row / (row @ row).clamp_min(1e-30))
    if not torch.allclose(out, s * row, rtol=1e-4, atol=1e-6):
        raise ValueError(f"the token embedding {type(embedding).__name__} is not a (scaled) row lookup")
    return s


def collect_fisher(loaded: LoadedModel, calibration: CalibrationSet, *, windows: int = 8, seed: int = 0,
                   progress: bool = True) -> FisherSet:
    """One forward and backward of the original model per window (the first `windows` of the
    calibration set): the statistics of `FisherSet`, with next tokens sampled from the model's
    own prediction by a generator seeded with `seed` (the same statistics on every run)."""
    model, arch = loaded.model, loaded.arch
    if not 1 <= windows <= calibration.tokens.shape[0]:
        raise ValueError(f"Fisher windows must lie in 1 .. {calibration.tokens.shape[0]} (the calibration set), got {windows}")
    names = linear_layer_names(model, arch)
    outputs = {n: torch.zeros(get_module(model, n).out_features, dtype=torch.float64) for n in names}
    embedding, head = get_module(model, arch.embeddings), get_module(model, arch.head)
    vocab, hidden = embedding.weight.shape
    scale = _embedding_scale(embedding, int(calibration.tokens[0, 0]))
    head_fisher = torch.zeros(vocab, dtype=torch.float64)
    head_inputs = torch.zeros(hidden, hidden, dtype=torch.float64)
    ids, grad2 = [], []  # per window: input tokens [T], squared row gradients [T, H]
    head_input: list[torch.Tensor] = []

    def accumulate(name: str):
        def on_grad(g: torch.Tensor) -> None:  # a tensor hook must return None, or it replaces the gradient
            outputs[name] += g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1]).sum(0)

        def on_output(module, args, out) -> None:
            out.register_hook(on_grad)
        return on_output

    handles = [get_module(model, n).register_forward_hook(accumulate(n)) for n in names]
    handles.append(head.register_forward_hook(lambda m, args, out: head_input.append(args[0].detach())))
    generator = torch.Generator().manual_seed(seed)
    tokens = 0
    try:
        for w in tqdm(range(windows), desc="fisher", unit="window", disable=not progress):
            window = calibration.tokens[w : w + 1]  # [1, T]
            x = embedding(window).detach().requires_grad_(True)  # [1, T, H]
            with torch.enable_grad():
                logp = log_probs(model(inputs_embeds=x, use_cache=False).logits[:, :-1])  # [1, T-1, V]
                p = logp.detach().exp()
                y = torch.multinomial(p.reshape(-1, vocab), 1, generator=generator).reshape(p.shape[:2])  # [1, T-1]
                (g,) = torch.autograd.grad(logp.gather(-1, y[..., None]).sum(), x)  # [1, T, H]
            ids.append(window.reshape(-1))
            grad2.append((scale * g.reshape(-1, hidden)).pow(2))
            head_fisher += (p * (1 - p)).reshape(-1, vocab).sum(0).to(torch.float64)
            h = head_input.pop()[:, :-1].reshape(-1, hidden).to(torch.float64)  # [T-1, H] inputs of the scored logits
            head_inputs += h.T @ h
            tokens += window.shape[1] - 1
    finally:
        for handle in handles:
            handle.remove()
    all_ids = torch.cat(ids)
    embed_ids, where = torch.unique(all_ids, return_inverse=True)  # [U], [sum T]
    embed_fisher = torch.zeros(len(embed_ids), hidden, dtype=torch.float64).index_add_(0, where, torch.cat(grad2).to(torch.float64))
    return FisherSet(
        config=calibration.config, source_sha256=loaded.source.sha256(), windows=windows, seed=seed, tokens=tokens,
        outputs={n: (f / tokens).float() for n, f in outputs.items()}, embed_ids=embed_ids,
        embed_fisher=(embed_fisher / tokens).float(), head_fisher=(head_fisher / tokens).float(),
        head_inputs=(head_inputs / tokens).float(),
    )


def _fisher_key(windows: int, seed: int) -> dict[str, str]:
    return {"fisher": json.dumps({"windows": windows, "seed": seed, "version": FisherSet.version})}


def save_fisher(fisher: FisherSet, path: Path) -> None:
    tensors = {f"outputs.{n}": f for n, f in fisher.outputs.items()}
    tensors.update(embed_ids=fisher.embed_ids, embed_fisher=fisher.embed_fisher, head_fisher=fisher.head_fisher,
                   head_inputs=fisher.head_inputs)
    meta = {"calibration": json.dumps(config_to_json(fisher.config)), "source_sha256": fisher.source_sha256,
            "tokens": str(fisher.tokens), **_fisher_key(fisher.windows, fisher.seed)}
    atomic_save_tensors(path, tensors, metadata=meta)


def load_fisher(path: Path, loaded: LoadedModel, config: CalibrationConfig, *, windows: int, seed: int) -> FisherSet | None:
    """The cached Fisher statistics at path if they were made from this model, calibration,
    windows and seed, else None."""
    meta = _cache_metadata(path, loaded, config, **_fisher_key(windows, seed))
    if meta is None:
        return None
    t = load_file(str(path))
    return FisherSet(
        config=config, source_sha256=meta["source_sha256"], windows=windows, seed=seed, tokens=int(meta["tokens"]),
        outputs={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("outputs.")}, embed_ids=t["embed_ids"],
        embed_fisher=t["embed_fisher"], head_fisher=t["head_fisher"], head_inputs=t["head_inputs"],
    )
