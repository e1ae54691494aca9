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
the calibration, with the sha256 of their contents; a corrupt cache is collected again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator
from tightfit.artifacts import CalibrationConfig, CalibrationSet, CalibrationSource, FisherSet, HessianSet, config_to_json
from tightfit.data import SELF_TEXT, apportion, interleave, load_text, parse_mix, stream_windows, token_windows, window_body
from tightfit.data.text import DOC_SEPARATOR
from tightfit.errors import CorruptCacheError, TextSourceError
from tightfit.formats.files import atomic_save_tensors, atomic_write_json, load_checked_tensors, read_tensor_metadata, warn_recomputed
from tightfit.metrics import log_probs
from tightfit.model import LoadedModel, get_module, resident_block
from tightfit.model.blocks import block_list, capture_block_inputs, linear_layer_names, replay_blocks, run_block

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


@torch.no_grad()
def collect_hessians(loaded: LoadedModel, calibration: CalibrationSet, *, store: Path | None = None,
                     progress: bool = True) -> HessianSet:
    """One pass of the original model over the calibration set, block by block.

    Returns, for every linear layer of every block, the Hessian [K, K] of its inputs; layers of
    one group (same input) share one tensor. With `store` (a folder), each block's Hessians are
    saved there as soon as they exist and the set reads them back on access (`HessianFiles`):
    a 1.5B model's take 9 GB, more than the model, so a streamed model keeps them on disk.
    """
    arch = loaded.arch
    n_blocks = len(block_list(loaded.model, arch))
    inputs = capture_block_inputs(loaded.model, arch, calibration.tokens, calibration.config.batch_size)
    hessians: dict[str, torch.Tensor] = {}
    stored: dict[str, tuple[Path, str]] = {}
    for i in tqdm(range(n_blocks), desc="hessians", unit="block", disable=not progress):
        with resident_block(loaded, i) as block:
            accs = {names: HessianAccumulator(get_module(block, names[0]).in_features) for names in arch.linear_groups}
            handles = [
                get_module(block, names[0]).register_forward_pre_hook(lambda m, args, acc=acc: acc.add_batch(args[0]))
                for names, acc in accs.items()
            ]
            try:
                with calibration.config.forward_precision():
                    inputs.hidden = [run_block(block, h, inputs.extra[i][b]).float() for b, h in enumerate(inputs.hidden)]
            finally:
                for h in handles:
                    h.remove()
        block_hessians = {}
        for names, acc in accs.items():
            h = acc.hessian()
            for name in names:
                block_hessians[f"{arch.blocks}.{i}.{name}"] = h
        if store is None:
            hessians.update(block_hessians)
            continue
        path = Path(store) / f"block_{i:03d}.safetensors"
        unique, aliases = _unique_tensors(block_hessians)
        atomic_save_tensors(path, unique, metadata={"aliases": json.dumps(aliases)})
        stored.update({name: (path, aliases.get(name, name)) for name in block_hessians})
    if store is not None:
        atomic_write_json(Path(store) / HESSIAN_FILES_META, _hessian_key(loaded, calibration.config))
        return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=HessianFiles(stored))
    return HessianSet(config=calibration.config, source_sha256=loaded.source.sha256(), hessians=hessians)


HESSIAN_FILES_META = "hessians.json"  # written last: its presence marks a finished folder


class HessianFiles(Mapping[str, torch.Tensor]):
    """Hessians kept in files, one per block: name -> (file, stored name); read on every access."""

    def __init__(self, where: dict[str, tuple[Path, str]]) -> None:
        self.where = where

    def __getitem__(self, name: str) -> torch.Tensor:
        path, stored = self.where[name]
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(stored)

    def __iter__(self) -> Iterator[str]:
        return iter(self.where)

    def __len__(self) -> int:
        return len(self.where)


def _hessian_key(loaded: LoadedModel, config: CalibrationConfig) -> dict[str, str]:
    return {"source_sha256": loaded.source.sha256(), "calibration": json.dumps(config_to_json(config))}


def load_hessian_files(folder: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The Hessians `collect_hessians(store=folder)` saved, if made from this model and calibration, else None."""
    meta = Path(folder) / HESSIAN_FILES_META
    if not meta.is_file() or json.loads(meta.read_text()) != _hessian_key(loaded, config):
        return None
    where: dict[str, tuple[Path, str]] = {}
    for path in sorted(Path(folder).glob("block_*.safetensors")):
        with safe_open(str(path), "pt") as f:
            aliases = json.loads((f.metadata() or {}).get("aliases", "{}"))
            where.update({name: (path, name) for name in f.keys()})
        where.update({alias: (path, name) for alias, name in aliases.items()})
    return HessianSet(config=config, source_sha256=loaded.source.sha256(), hessians=HessianFiles(where))


def _unique_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors shared under several names, stored once: (unique name -> tensor, alias -> stored name)."""
    unique: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, h in tensors.items():
        if h.data_ptr() in seen:
            aliases[name] = seen[h.data_ptr()]
        else:
            seen[h.data_ptr()] = name
            unique[name] = h
    return unique, aliases


def save_hessians(hessians: HessianSet, path: Path) -> None:
    unique, aliases = _unique_tensors(hessians.hessians)
    meta = {"calibration": json.dumps(config_to_json(hessians.config)), "source_sha256": hessians.source_sha256,
            "aliases": json.dumps(aliases)}
    atomic_save_tensors(path, unique, metadata=meta, checksum=True)


def _cached(path: Path, loaded: LoadedModel, config: CalibrationConfig, **key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    """(tensors, metadata) of the cache file at path if it was made from this model and calibration
    (and carries every `key` value), else None; a corrupt one is None too, with a CorruptCacheWarning."""
    if not Path(path).is_file():
        return None
    wanted = {"source_sha256": loaded.source.sha256(), "calibration": json.dumps(config_to_json(config)), **key}
    try:
        meta = read_tensor_metadata(path)
        if not all(meta.get(k) == v for k, v in wanted.items()):
            return None
        return load_checked_tensors(path)
    except CorruptCacheError as e:
        warn_recomputed(e)
        return None


def load_hessians(path: Path, loaded: LoadedModel, config: CalibrationConfig) -> HessianSet | None:
    """The cached Hessians at path if they were made from this model and calibration, else None."""
    cached = _cached(path, loaded, config)
    if cached is None:
        return None
    tensors, meta = cached
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
    own prediction by a generator seeded with `seed` (the same statistics on every run).

    Block by block, so that a streamed model reads each block twice and holds one: the forward keeps
    every block's input (windows x T x H floats per block); the head scores each window from the
    last block's output; the backward then runs the blocks in reverse, each recomputing its forward
    from its kept input and passing the gradient at its input to the block before it.
    """
    model, arch = loaded.model, loaded.arch
    if not 1 <= windows <= calibration.tokens.shape[0]:
        raise ValueError(f"Fisher windows must lie in 1 .. {calibration.tokens.shape[0]} (the calibration set), got {windows}")
    tokens_in = calibration.tokens[:windows]  # [W, T]
    n_blocks = len(block_list(model, arch))
    embedding, head = get_module(model, arch.embeddings), get_module(model, arch.head)
    vocab, hidden = embedding.weight.shape
    scale = _embedding_scale(embedding, int(tokens_in[0, 0]))
    bar = tqdm(total=2 * n_blocks + windows, desc="fisher", unit="step", disable=not progress)

    # forward, every window through one block at a time; block_inputs[i][w] enters block i
    inputs = capture_block_inputs(model, arch, tokens_in, 1)
    block_inputs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in range(n_blocks):
            block_inputs.append(inputs.hidden)
            with resident_block(loaded, i) as block, calibration.config.forward_precision():
                inputs.hidden = [run_block(block, h, inputs.extra[i][w]).float() for w, h in enumerate(inputs.hidden)]
            bar.update()

    # the head: log p(y_t) of sampled next tokens, its gradient at the last block's output
    head_fisher = torch.zeros(vocab, dtype=torch.float64)
    head_inputs = torch.zeros(hidden, hidden, dtype=torch.float64)
    head_input: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda m, args, out: head_input.append(args[0].detach()))
    generator = torch.Generator().manual_seed(seed)
    grads: list[torch.Tensor] = []  # per window: the gradient at the current block's output [1, T, H]
    try:
        for w in range(windows):
            last = inputs.hidden[w].detach().requires_grad_(True)  # [1, T, H]
            with torch.enable_grad(), replay_blocks(model, arch, n_blocks, last):
                logp = log_probs(model(input_ids=tokens_in[w : w + 1], use_cache=False).logits[:, :-1])  # [1, T-1, V]
                p = logp.detach().exp()
                y = torch.multinomial(p.reshape(-1, vocab), 1, generator=generator).reshape(p.shape[:2])  # [1, T-1]
                (g,) = torch.autograd.grad(logp.gather(-1, y[..., None]).sum(), last)
            grads.append(g)
            head_fisher += (p * (1 - p)).reshape(-1, vocab).sum(0).to(torch.float64)
            h = head_input.pop()[:, :-1].reshape(-1, hidden).to(torch.float64)  # [T-1, H] inputs of the scored logits
            head_inputs += h.T @ h
            bar.update()
    finally:
        handle.remove()
    extra = inputs.extra
    del inputs

    # backward, block by block in reverse; the linear layers' output gradients accumulate on the way
    outputs: dict[str, torch.Tensor] = {}
    for i in reversed(range(n_blocks)):
        with resident_block(loaded, i) as block:
            block_outputs = {n: torch.zeros(get_module(block, n).out_features, dtype=torch.float64) for n in arch.linear_names}

            def accumulate(name: str):
                def on_grad(g: torch.Tensor) -> None:  # a tensor hook must return None, or it replaces the gradient
                    block_outputs[name] += g.detach().to(torch.float64).pow(2).reshape(-1, g.shape[-1]).sum(0)

                def on_output(module, args, out) -> None:
                    out.register_hook(on_grad)
                return on_output

            handles = [get_module(block, n).register_forward_hook(accumulate(n)) for n in arch.linear_names]
            try:
                for w in range(windows):
                    x = block_inputs[i][w].detach().requires_grad_(True)
                    with torch.enable_grad(), calibration.config.forward_precision():
                        out = run_block(block, x, extra[i][w])
                        (g,) = torch.autograd.grad(out, x, grad_outputs=grads[w].to(out.dtype))
                    grads[w] = g.float()
            finally:
                for handle in handles:
                    handle.remove()
        outputs.update({f"{arch.blocks}.{i}.{n}": f for n, f in block_outputs.items()})
        block_inputs[i] = []
        bar.update()
    bar.close()

    tokens = windows * (tokens_in.shape[1] - 1)
    grad2 = torch.cat([(scale * g.reshape(-1, hidden)).pow(2) for g in grads])  # [W T, H]
    embed_ids, where = torch.unique(tokens_in.reshape(-1), return_inverse=True)  # [U], [W T]
    embed_fisher = torch.zeros(len(embed_ids), hidden, dtype=torch.float64).index_add_(0, where, grad2.to(torch.float64))
    names = linear_layer_names(model, arch)
    return FisherSet(
        config=calibration.config, source_sha256=loaded.source.sha256(), windows=windows, seed=seed, tokens=tokens,
        outputs={n: (outputs[n] / tokens).float() for n in names}, embed_ids=embed_ids,
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
    atomic_save_tensors(path, tensors, metadata=meta, checksum=True)


def load_fisher(path: Path, loaded: LoadedModel, config: CalibrationConfig, *, windows: int, seed: int) -> FisherSet | None:
    """The cached Fisher statistics at path if they were made from this model, calibration,
    windows and seed, else None."""
    cached = _cached(path, loaded, config, **_fisher_key(windows, seed))
    if cached is None:
        return None
    t, meta = cached
    return FisherSet(
        config=config, source_sha256=meta["source_sha256"], windows=windows, seed=seed, tokens=int(meta["tokens"]),
        outputs={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("outputs.")}, embed_ids=t["embed_ids"],
        embed_fisher=t["embed_fisher"], head_fisher=t["head_fisher"], head_inputs=t["head_inputs"],
    )
