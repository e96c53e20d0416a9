"""Run metrics: one JSON object per line in `metrics.jsonl`, and the loss curve drawn from them."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from qkv.atomic import atomic_write_text


class MetricsLog:
    """Append-only JSON-lines log. Each record has a `step`; train and eval records share the file.

    {"step": 10, "loss": 5.91, "lr": 0.0003, "grad_norm": 1.2, "tokens_per_s": 8123.4, ...}
    {"step": 10, "eval_loss": 5.87, "eval_ppl": 354.2}
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records past `step`: on resume, the steps after the checkpoint are about to be redone."""
        records = self.read()
        kept = [r for r in records if r.get("step", 0) <= step]
        if len(kept) != len(records):
            atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
