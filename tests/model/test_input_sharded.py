"""Input side: `tightfit compress` on a transformers folder whose weights are sharded
(model.safetensors.index.json + several *.safetensors) packs the same model as the single file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from tightfit.cli import main
from tightfit.formats.packed import MANIFEST_FILE, load_packed
from tightfit.model import load_model, resolve_source


def test_compress_sharded_folder_packs_the_same_model(make_tiny_model: Callable[[str, Path], Path], tmp_path: Path) -> None:
    single_dir = make_tiny_model("qwen2", tmp_path)
    single = load_model(str(single_dir))
    sharded_dir = tmp_path / "sharded"
    single.model.save_pretrained(sharded_dir, max_shard_size="100KB")
    single.tokenizer.save_pretrained(sharded_dir)
    shards = sorted(sharded_dir.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (sharded_dir / "model.safetensors.index.json").is_file()

    outs = {}
    for name, folder in (("single", single_dir), ("sharded", sharded_dir)):
        outs[name] = tmp_path / f"packed-{name}"
        assert main(["compress", str(folder), "--format", "w4g32", "--method", "rtn", "--no-eval", "--out", str(outs[name])]) == 0

    a, b = (load_packed(outs[n]).tensors() for n in ("single", "sharded"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the manifest identifies the source by every shard's bytes
    source = json.loads((outs["sharded"] / MANIFEST_FILE).read_text())["source"]
    assert source["kind"] == "hf" and source["sha256"] == resolve_source(str(sharded_dir)).sha256()
    shards[0].write_bytes(shards[0].read_bytes()[:-1] + b"\x00")
    assert resolve_source(str(sharded_dir)).sha256() != source["sha256"]
