"""Per-block checkpoints of the quantize stage: a killed job resumes after its last finished block.

    job.json               what the job is (source, quantize, calibration and Hessian settings);
                           blocks of another job, or of a job that cannot be read, are removed
    block_NNN.safetensors  the block's quantized layers as QuantizedTensor.pack gives them, with
                           the sha256 of their contents in the header (formats.files checksum)
    block_NNN.json         each layer's format, shape, loss and seconds; written last, so its
                           presence marks the block done

A finished block whose files are missing, unreadable or fail the checksum is redone, with a
one-line CorruptCacheWarning.
"""

from __future__ import annotations

import json
from pathlib import Path

from tightfit.artifacts import LayerReport, QuantizeConfig
from tightfit.errors import CorruptCacheError, TightfitError
from tightfit.formats.files import atomic_save_tensors, atomic_write_json, load_checked_tensors, warn_recomputed
from tightfit.formats.registry import AnyQuantizedTensor, parse_format, unpack_tensor

JOB_FILE = "job.json"

BlockResults = dict[str, tuple[AnyQuantizedTensor, LayerReport]]  # layer name in the block -> (weights, report)


class BlockCheckpoint:
    """Per-block results of one job in a folder (see the module docstring for the files)."""

    def __init__(self, folder: Path, job: dict) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        job_file = self.folder / JOB_FILE
        try:
            same = json.loads(job_file.read_text(encoding="utf-8")) == job
        except FileNotFoundError:
            same = False  # a new job, or one whose job.json went first when its folder was removed
        except (OSError, ValueError) as e:
            warn_recomputed(CorruptCacheError(f"{job_file} is unreadable ({e}), so are its finished blocks"))
            same = False
        if not same:
            for stale in self.folder.glob("block_*"):
                stale.unlink()
        atomic_write_json(job_file, job)

    def _paths(self, index: int) -> tuple[Path, Path]:
        return self.folder / f"block_{index:03d}.safetensors", self.folder / f"block_{index:03d}.json"

    def done(self, index: int) -> bool:
        """Whether block `index` was saved (its results may still prove corrupt when loaded)."""
        return self._paths(index)[1].exists()

    def load(self, index: int, config: QuantizeConfig) -> BlockResults | None:
        """The finished block `index`, or None when it is not done (or was corrupt: then warned)."""
        tensors_path, meta_path = self._paths(index)
        if not meta_path.exists():
            return None
        try:
            return self._read(tensors_path, meta_path)
        except CorruptCacheError as e:
            warn_recomputed(CorruptCacheError(f"finished block {index}: {e}"))
            return None

    @staticmethod
    def _read(tensors_path: Path, meta_path: Path) -> BlockResults:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CorruptCacheError(f"{meta_path} is unreadable ({e})") from e
        tensors, _ = load_checked_tensors(tensors_path)
        if not isinstance(meta, dict) or not meta:
            raise CorruptCacheError(f"{meta_path} lists no layers")
        out = {}
        try:
            for name, info in meta.items():
                parts = {k.rsplit(".", 1)[1]: v for k, v in tensors.items() if k.rsplit(".", 1)[0] == name}
                q = unpack_tensor(parse_format(info["format"]), tuple(info["shape"]), parts)
                out[name] = (q, LayerReport(loss=float(info["loss"]), seconds=float(info["seconds"])))
        except (TightfitError, KeyError, TypeError, ValueError) as e:
            raise CorruptCacheError(f"{meta_path} does not match {tensors_path.name} ({e})") from e
        return out

    def save(self, index: int, results: BlockResults) -> None:
        tensors_path, meta_path = self._paths(index)
        tensors = {f"{name}.{k}": v for name, (q, _) in results.items() for k, v in q.pack().items()}
        atomic_save_tensors(tensors_path, tensors, checksum=True)
        meta = {name: {"format": q.fmt.name, "shape": list(q.shape), "loss": r.loss, "seconds": r.seconds}
                for name, (q, r) in results.items()}
        atomic_write_json(meta_path, meta)  # written last: its presence marks the block done
