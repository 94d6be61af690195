"""Carve a tuning split out of line-aligned training files, by hash, so that recipes and decoding are
chosen on pairs the model never trains on and the validation split is only ever a report.

A line goes to the tuning split when the SHA-256 of its target-language text falls in the first
``1/every`` of the hash range: the same caption in every language lands on the same side, duplicate
captions never straddle the split, and the choice depends on the text alone (not on file order).

    python benchmarks/mt_tuning_split.py ../shared/data/multi30k /tmp/mt --target en
    # writes /tmp/mt/rest.{cs,de,en,fr}.gz (about 28,000 lines) and /tmp/mt/tune.*.gz (about 1,000)
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
from pathlib import Path


def tuning_rows(targets: list[str], every: int) -> list[bool]:
    """``True`` for the rows whose target text hashes into the first ``1/every`` of the range."""
    return [int.from_bytes(hashlib.sha256(t.encode("utf-8")).digest()[:8], "big") % every == 0 for t in targets]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data", type=Path, help="a folder of train.<lang>.gz files")
    parser.add_argument("out", type=Path)
    parser.add_argument("--target", default="en")
    parser.add_argument("--every", type=int, default=29, help="one line in this many goes to tuning")
    args = parser.parse_args(argv)

    from switchformer.data.files import read_file_lines

    files = {p.name.split(".")[1]: p for p in sorted(args.data.glob("train.*.gz"))}
    if args.target not in files:
        raise SystemExit(f"{args.data}: no train.{args.target}.gz")
    texts = {lang: read_file_lines(path, "data") for lang, path in files.items()}
    tune = tuning_rows(texts[args.target], args.every)
    args.out.mkdir(parents=True, exist_ok=True)
    for lang, rows in texts.items():
        if len(rows) != len(tune):
            raise SystemExit(f"{files[lang]}: {len(rows)} lines, {files[args.target]} {len(tune)}: not aligned")
        for name, keep in (("tune", True), ("rest", False)):
            chosen = [row for row, t in zip(rows, tune) if t == keep]
            with gzip.open(args.out / f"{name}.{lang}.gz", "wt", encoding="utf-8") as f:
                f.write("\n".join(chosen) + "\n")
    print(f"{sum(tune)} tuning and {len(tune) - sum(tune)} training lines per language in {args.out}")


if __name__ == "__main__":
    main()
