"""Sentence pairs whose targets differ in length (2 to 17 label tokens with EOS): the data of the
tests that a step's gradient does not depend on how its batch is split."""

from __future__ import annotations

import json
from pathlib import Path

PAIRS = [
    {"source": "held out", "target": "validation pair"},  # the validation split takes the first
    {"source": "a short one", "target": "x"},
    {"source": "a long one", "target": " ".join(f"word{i}" for i in range(16))},
    {"source": "medium length source", "target": "three words here"},
    {"source": "y", "target": "z z"},
]


def write_uneven_pairs(folder: Path) -> Path:
    path = Path(folder) / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in PAIRS))
    return path
