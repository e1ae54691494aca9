"""Fisher statistics: the diagonal Fisher information of every linear layer's outputs, of the
embeddings and of the logits (one forward and backward of the original model per window;
`FisherSet`), cached in the work folder with the sha256 of their contents."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tightfit.artifacts import CalibrationConfig, CalibrationSet, FisherSet, config_to_json
from tightfit.formats.files import atomic_save_tensors
from tightfit.metrics import log_probs
from tightfit.model import LoadedModel, get_module, resident_block
from tightfit.model.blocks import block_list, capture_block_inputs, linear_layer_names, replay_blocks, run_block
from tightfit.stages.calibrate.cache import load_cached


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
    cached = load_cached(path, loaded, config, **_fisher_key(windows, seed))
    if cached is None:
        return None
    t, meta = cached
    return FisherSet(
        config=config, source_sha256=meta["source_sha256"], windows=windows, seed=seed, tokens=int(meta["tokens"]),
        outputs={k.split(".", 1)[1]: v for k, v in t.items() if k.startswith("outputs.")}, embed_ids=t["embed_ids"],
        embed_fisher=t["embed_fisher"], head_fisher=t["head_fisher"], head_inputs=t["head_inputs"],
    )
