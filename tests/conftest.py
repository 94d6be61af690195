"""Fixtures several test folders share, and the markers of the suite.

Markers: ``slow`` (seconds of training, subprocesses or big data: left out of the fast subset,
``pytest -m "not slow"``), ``distributed`` (several processes over gloo on 127.0.0.1; also slow),
``browser`` (headless chromium; also slow), ``hf`` (needs ``transformers``). The full suite is the
README's test command and CI's.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from shared import TEXT


def pytest_configure(config):
    for name, meaning in (
        ("slow", "seconds of training, subprocesses or big data; not in the fast subset (-m 'not slow')"),
        ("distributed", "several processes over gloo on 127.0.0.1 (slow too)"),
        ("browser", "headless chromium against a server (slow too)"),
        ("hf", "compares with or loads through Hugging Face transformers"),
    ):
        config.addinivalue_line("markers", f"{name}: {meaning}")


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("distributed") or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def corpus(request, tmp_path_factory) -> Path:
    """A small English corpus about experts and routing: a folder of ``CORPUS_DOCS`` documents (the
    test module's, default 6; 0: one file, ``corpus.txt``) of ``CORPUS_REPEATS`` copies of the text
    each (default 40)."""
    docs = getattr(request.module, "CORPUS_DOCS", 6)
    text = TEXT * getattr(request.module, "CORPUS_REPEATS", 40)
    folder = tmp_path_factory.mktemp("corpus")
    if docs == 0:
        (folder / "corpus.txt").write_text(text)
        return folder / "corpus.txt"
    for i in range(docs):
        (folder / f"doc{i}.txt").write_text(f"Document {i}.\n" + text)
    return folder
