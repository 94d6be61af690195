"""What several test modules share: small corpora, the word-mapping translation task, and a snapshot
of a folder's files (what a command that reads a run must not change). Fixtures are conftest.py's."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

# the public data for development beside the repository (../shared/data; tests that read it skip,
# saying why, where it is absent)
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse experts route each token to one feed-forward network.\n"
    "A router sends tokens to experts; capacity limits how many each expert takes. Dropped tokens skip the layer.\n"
)

# a synthetic translation task that a small model learns in seconds: a word-by-word mapping between
# two invented vocabularies
SOURCE_WORDS = "ka lu mi po re su ti vo ze bo da fe gi ho ju ne".split()
TARGET_WORDS = "zap wol kin dret flum grop hask jilt mork norp plax quib rast snib tolk vurn".split()
MAPPING = dict(zip(SOURCE_WORDS, TARGET_WORDS))
TRAIN_FLAGS = ["--preset", "test", "--model", "t5", "--no-progress", "--set", "objective=seq2seq"]
TRAIN_FLAGS += ["--set", "eval_every=1000", "--set", "checkpoint_every=1000", "--set", "log_every=100"]


def mapping_pairs(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [rng.choice(SOURCE_WORDS) for _ in range(rng.randint(3, 6))]
        rows.append({"source": " ".join(words), "target": " ".join(MAPPING[w] for w in words)})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with its content hash and mode: what a read must not change."""
    return {
        str(p.relative_to(folder)): f"{hashlib.sha256(p.read_bytes()).hexdigest()} {oct(p.stat().st_mode)}"
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
