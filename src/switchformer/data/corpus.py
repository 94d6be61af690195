"""The embedded default corpus: English text that ships inside every CPython installation.

``docs``: the language reference topics of ``pydoc_data.topics`` plus the docstrings of the standard
library's modules, classes and functions, read with ``ast`` from the ``.py`` sources (nothing is
imported or executed). ``docs+source`` adds the standard library's source files themselves, tens of
MB on every machine, for runs that should not repeat their data. ``docs+packages`` adds the Python
source of the installed packages (``site-packages``: hundreds of MB where PyTorch, JAX or
transformers are installed), for GPU-scale runs; ``max_mb`` caps it, taking package files in a
stable hash order so that a cap samples every package rather than the first alphabetically. What it
holds depends on what is installed: the run's tokenizer and config record the corpus, not its files.
The train/validation split is by source (a pydoc topic or a module file), chosen by a stable hash,
so the same text never lands on both sides and the split is the same on every run.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

CORPORA = ("docs", "docs+source", "docs+packages")
_MAX_PACKAGE_FILE = 512 * 1024  # larger .py files are generated tables or vendored bundles, not prose or code
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__", "turtledemo"}


@dataclass
class Document:
    source: str  # where it came from: a pydoc topic or a file path
    text: str


def clean(text: str) -> str:
    """Dedent, strip trailing spaces, collapse runs of blank lines."""
    text = inspect.cleandoc(text)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        if _SKIP_DIRS.intersection(path.relative_to(root).parts[:-1]) or path.name.startswith("test_"):
            continue
        files.append(path)
    return files


def _package_files() -> list[Path]:
    """Every ``.py`` file of the installed packages outside tests, in a stable hash order."""
    paths = sysconfig.get_paths()
    roots = sorted({Path(paths["purelib"]), Path(paths["platlib"])})
    files = []
    for root in roots:
        if not root.is_dir():
            continue
        for path in root.rglob("*.py"):
            parts = path.relative_to(root).parts[:-1]
            if _SKIP_DIRS.intersection(parts) - {"site-packages"} or path.name.startswith("test_"):
                continue
            try:
                if path.stat().st_size > _MAX_PACKAGE_FILE:
                    continue
            except OSError:
                continue
            files.append(path)
    return sorted(files, key=lambda p: hashlib.sha256(str(p).encode()).digest())


def _docstrings(path: Path) -> list[str]:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    out = []
    for node in nodes:
        doc = ast.get_docstring(node, clean=True)
        if doc and len(doc) >= 40:
            out.append(clean(doc))
    return out


def embedded_documents(corpus: str = "docs", max_mb: float | None = None) -> list[Document]:
    """The documents of an embedded corpus; ``max_mb`` caps the installed packages' share of
    ``docs+packages`` (characters / 1e6; the standard library part is always whole)."""
    if corpus not in CORPORA:
        raise ValueError(f"corpus: unknown {corpus!r}; choose one of {CORPORA}")
    import pydoc_data.topics

    docs = [Document(f"pydoc:{name}", clean(text)) for name, text in sorted(pydoc_data.topics.topics.items())]
    for path in _stdlib_files():
        text = "\n\n".join(_docstrings(path))
        if text:
            docs.append(Document(str(path), text))
        if corpus in ("docs+source", "docs+packages"):
            try:
                docs.append(Document(f"{path}#source", path.read_text(encoding="utf-8")))
            except UnicodeDecodeError:
                continue
    if corpus == "docs+packages":
        budget = float("inf") if max_mb is None else max_mb * 1e6
        for path in _package_files():
            if budget <= 0:
                break
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if text.strip():
                docs.append(Document(f"{path}#package", text))
                budget -= len(text)
    return docs


def is_validation(source: str, fraction: float) -> bool:
    """Stable across runs and machines: the first 8 bytes of sha256(source) against the fraction."""
    digest = hashlib.sha256(source.split("#")[0].encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def split_documents(docs: list[Document], validation_fraction: float = 0.05) -> tuple[list[str], list[str]]:
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction: must be in (0, 1), got {validation_fraction}")
    train, valid = [], []
    for doc in docs:
        (valid if is_validation(doc.source, validation_fraction) else train).append(doc.text)
    if not valid:  # tiny corpora: keep at least one validation document
        valid.append(train.pop())
    return train, valid
