"""Shared by the benchmarks: what machine ran them, and writing JSON + Markdown results."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import torch

import tightfit

RESULTS = Path(__file__).resolve().parent / "results"


def machine_info() -> dict:
    cpu = "unknown"
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {
        "cpu": cpu,
        "isa": isa,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "tightfit": tightfit.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def write_results(name: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS / f"{name}.json", RESULTS / f"{name}.md"
    json_path.write_text(json.dumps(payload, indent=2) + "\n")
    md_path.write_text(markdown)
    return json_path, md_path


def hessians_cached(loaded, calibration):
    """Original-model Hessians for this model and calibration, from .cache/ or collected now."""
    from tightfit.stages import calibrate as calibrate_stage

    cache = Path(__file__).resolve().parents[1] / ".cache" / f"hessians-{loaded.source.sha256()[:16]}.safetensors"
    hessians = calibrate_stage.load_hessians(cache, loaded, calibration.config)
    if hessians is None:
        hessians = calibrate_stage.collect_hessians(loaded, calibration)
        calibrate_stage.save_hessians(hessians, cache)
    return hessians


def quantize_and_evaluate(loaded, configs: dict, calibration, eval_config, *, hessians=None) -> tuple[dict, dict]:
    """Quantize every config (key -> QuantizeConfig), pack it to a temporary folder, reload the
    packed model from disk, then score all of them against the original in one pass.

    Returns ({key: row with sizes and seconds}, {key: EvalResult}).
    """
    import tempfile
    import time

    from tightfit.evaluate import eval_windows, evaluate_many
    from tightfit.formats.packed import load_packed
    from tightfit.runtime import build_model
    from tightfit.stages import pack as pack_stage
    from tightfit.stages import quantize as quantize_stage

    rows, models = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for key, config in configs.items():
            t = time.perf_counter()
            use_calibration = config.method == "gptq" and hessians is None
            qmodel = quantize_stage.quantize_model(loaded, calibration if use_calibration else None, config,
                                                   hessians=hessians if config.method == "gptq" else None)
            seconds = time.perf_counter() - t
            out = pack_stage.write(pack_stage.pack(qmodel, loaded, calibration.config), loaded.tokenizer,
                                   Path(tmp) / key.replace(" ", "_"))
            del qmodel
            packed = load_packed(out)
            models[key] = build_model(packed)
            file_bytes = (out / "model.safetensors").stat().st_size
            rows[key] = {
                "quantize_seconds": round(seconds, 1),
                "bits_per_weight": 8 * packed.quantized_bytes() / packed.quantized_weights(),
                "file_bytes": file_bytes,
                "model_bits_per_weight": 8 * file_bytes / packed.total_weights(),
                "layers": {name: q for name, q in packed.layers.items()},
            }
            print(f"{key}: quantized in {seconds:.0f}s, {rows[key]['bits_per_weight']:.3f} bits/weight", flush=True)
        windows = eval_windows(loaded.tokenizer, eval_config)
        results = evaluate_many(models, windows, reference=loaded.model, batch_size=eval_config.batch_size)
    return rows, results


# The default model ships as Q4_1: its weights lie on a 4-bit asymmetric grid in groups of 32.
SOURCE_GRID = (4, 32)  # (bits, group size)


def on_source_grid(name: str) -> bool:
    """Whether format `name` can represent the source's own 4-bit g32 asymmetric grid (or a
    finer one of it: g16), so re-quantizing to it is (near) lossless and proves nothing."""
    from tightfit.formats.registry import parse_format

    fmt = parse_format(name)
    bits, group = SOURCE_GRID
    return (fmt.bits == bits and fmt.group_size is not None and group % fmt.group_size == 0
            and not getattr(fmt, "symmetric", False))


def source_grid_caveat(names) -> list[str]:
    """Markdown lines warning about rows on the source's grid (none when no row is)."""
    on_grid = [n for n in names if on_source_grid(n)]
    if not on_grid:
        return []
    return ["", f"Caveat: {', '.join(on_grid)} can hold the source's own grid (the default model is a dequantized Q4_1 "
            "file: 4-bit asymmetric, groups of 32), so their quality here is (near) lossless re-quantization, not "
            "evidence."]
