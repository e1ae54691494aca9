"""Calibrate stage: fixed calibration windows from the calibration part of a text source, and
statistics of the original model on them:

  Hessians  H = 2/T X^T X of every linear layer's inputs (one forward pass, block by block)
  Fisher    the diagonal Fisher information of every linear layer's outputs, of the embeddings and
            of the logits (one forward and backward per window; `FisherSet`)

Sequential quantization (the default) recomputes Hessians inside the quantize stage from inputs
that pass through already-quantized layers. Hessians of the original model are what measuring
many formats needs (sensitivity, benchmarks): collected once, they let every format be quantized
without another forward pass. Both are cached in a work folder, keyed by the source model and
the calibration, with the sha256 of their contents; a corrupt cache is collected again.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tightfit.algorithms import HessianAccumulator
from tightfit.artifacts import CalibrationConfig, CalibrationSet, FisherSet, HessianSet, config_to_json
from tightfit.data import load_text, token_windows
from tightfit.errors import CorruptCacheError
from tightfit.formats.files import atomic_save_tensors, load_checked_tensors, read_tensor_metadata, warn_recomputed
from tightfit.metrics import log_probs
from tightfit.model import LoadedModel, get_module
from tightfit.model.blocks import block_list, capture_block_inputs, linear_layer_names, run_block


def calibrate(tokenizer, config: CalibrationConfig) -> CalibrationSet:
    """config.n_samples windows of config.seq_len tokens -> CalibrationSet (tokens [S, T])."""
    corpus = load_text(config.text)
    tokens = token_windows(tokenizer, corpus, "calibration", config.n_samples, config.seq_len)
    return CalibrationSet(config=config, tokens=tokens)


def calibrate_with_held_back(tokenizer, config: CalibrationConfig, held_back: int) -> tuple[CalibrationSet, torch.Tensor]:
    """The calibration set, and the next `held_back` windows of the same text, never calibrated on
    -> (CalibrationSet, tokens [held_back, seq_len]); windows come in a fixed order, so the
    calibration set is the same whatever held_back is."""
    extended = calibrate(tokenizer, dataclasses.replace(config, n_samples=config.n_samples + held_back))
    return CalibrationSet(config=config, tokens=extended.tokens[: config.n_samples]), extended.tokens[config.n_samples :]


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
