"""Training logs: JSON lines (``train_log.jsonl``), optional TensorBoard, memory probes."""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..errors import DataFormatError
from ..io_utils import atomic_write_text

_warned_tensorboard = False


def _warn_no_tensorboard(exc: BaseException) -> None:
    """Say once per process that TensorBoard events are not written (the JSON-lines log still is)."""
    global _warned_tensorboard
    if _warned_tensorboard:
        return
    _warned_tensorboard = True
    print(
        f"deltatune: TensorBoard events are not written ({type(exc).__name__}: {exc}); the JSON-lines log is. "
        "Install the 'eval' extra for them: pip install 'deltatune[eval]', or set train.tensorboard: false",
        file=sys.stderr,
    )


__all__ = ["LOG_FILE", "MetricsLogger", "peak_memory_mb", "read_log", "reset_peak_memory"]

LOG_FILE = "train_log.jsonl"


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory in MiB: ``torch.cuda.max_memory_allocated`` on a CUDA device, else the peak
    resident set size of this process (``resource.getrusage``; 0.0 where unavailable)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Start a new CUDA peak-memory window (the CPU peak RSS cannot be reset)."""
    if device is not None and device.type == "cuda" and torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats(device)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan" / "inf": JSON has no literal for them
    return value


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a ``train_log.jsonl`` (or the directory holding it) into a list of dicts.

    A half-written last line (a crash mid-write) is skipped; a malformed line elsewhere raises
    :class:`~deltatune.errors.DataFormatError` naming file and line.
    """
    p = Path(path)
    if p.is_dir():
        p = p / LOG_FILE
    lines = p.read_bytes().splitlines()
    records = []
    for i, raw in enumerate(lines, start=1):
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if i == len(lines):
                break
            reason = exc.msg if isinstance(exc, json.JSONDecodeError) else f"not valid UTF-8: {exc.reason}"
            raise DataFormatError(f"{p}:{i}: not a JSON object ({reason})") from exc
        if not isinstance(rec, dict):
            raise DataFormatError(f"{p}:{i}: expected a JSON object, got {type(rec).__name__}")
        records.append(rec)
    return records


class MetricsLogger:
    """Append records to ``<output_dir>/train_log.jsonl`` and TensorBoard, and keep them in memory.

    With ``output_dir=None`` (or on non-zero ranks: ``enabled=False``) nothing is written to disk.
    TensorBoard is skipped silently when ``torch.utils.tensorboard`` cannot be imported.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike[str] | None,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        resume_step: int | None = None,
    ) -> None:
        self.history: list[dict[str, Any]] = []
        self.enabled = enabled
        self._fh = None
        self._tb = None
        self.path: Path | None = None
        if not enabled or output_dir is None:
            return
        root = Path(output_dir)
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOG_FILE
        if resume_step is not None and self.path.is_file():
            # a resumed run continues from its checkpoint: drop what the interrupted run logged after
            # it (and a half-written last line), so the log has each step once and in order
            kept = [r for r in read_log(self.path) if int(r.get("step", 0)) <= resume_step]
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except Exception as exc:  # noqa: BLE001 - tensorboard missing or broken: say so once, go on
                SummaryWriter = None  # noqa: N806
                _warn_no_tensorboard(exc)
            if SummaryWriter is not None:
                self._tb = SummaryWriter(log_dir=os.fspath(root / "tensorboard"))

    @property
    def has_tensorboard(self) -> bool:
        """Whether TensorBoard events are being written."""
        return self._tb is not None

    def log(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Store one record (JSON line; numeric fields also as TensorBoard scalars ``<split>/<key>``)."""
        rec = {k: _jsonable(v) for k, v in record.items()}
        self.history.append(rec)
        if self._fh is not None:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        if self._tb is not None:
            split = rec.get("split", "train")
            step = int(rec.get("step", 0))
            for k, v in rec.items():
                if k in ("step", "split") or isinstance(v, bool) or not isinstance(v, (int, float)):
                    continue
                self._tb.add_scalar(f"{split}/{k}", v, step)
        return rec

    def close(self) -> None:
        """Flush and close the files."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()
            self._tb = None
