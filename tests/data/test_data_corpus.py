"""The embedded corpora, the tokenizer's training sample and causal packing."""

from __future__ import annotations

import pytest
import torch

from switchformer.data.corpus import embedded_documents
from switchformer.data.objectives import pack_causal
from switchformer.train.data import tokenizer_sample
from switchformer.train.sources import build_config


@pytest.mark.slow
def test_docs_plus_packages_adds_capped_package_source_in_a_stable_order():
    base = embedded_documents("docs+source")
    docs = embedded_documents("docs+packages", max_mb=2.0)
    packages = [d for d in docs if d.source.endswith("#package")]
    if not packages:
        pytest.skip("no installed packages with Python source on this machine")
    # the standard-library part is whole, and the packages come after it
    assert [d.source for d in docs[: len(base)]] == [d.source for d in base]
    assert len(docs) == len(base) + len(packages)
    # the cap is checked before each file: at most one file (<= 512 KB) past it
    chars = sum(len(d.text) for d in packages)
    assert chars <= 2.0e6 + 512 * 1024
    assert chars >= 2.0e6 or len(packages) > 1
    # a hash order samples many packages, not the first ones alphabetically
    assert len({d.source.split("site-packages/")[-1].split("/")[0] for d in packages}) > 1
    again = embedded_documents("docs+packages", max_mb=2.0)
    assert [d.source for d in again] == [d.source for d in docs]
    bigger = embedded_documents("docs+packages", max_mb=3.0)
    assert [d.source for d in bigger][: len(docs)] == [d.source for d in docs]  # a larger cap extends it


def test_unknown_corpus_is_a_config_error_naming_the_field():
    with pytest.raises(ValueError, match="corpus: unknown 'nope'"):
        build_config("test", sets=["corpus=nope"])


def test_tokenizer_sample_takes_leading_texts_up_to_the_limit():
    texts = ["a" * 10, "b" * 10, "c" * 10]
    assert tokenizer_sample(texts, limit=25) == texts[:2]
    assert tokenizer_sample(texts, limit=30) == texts
    assert tokenizer_sample(texts, limit=5) == texts[:1]  # never empty
    assert tokenizer_sample([], limit=5) == []


def test_pack_causal_matches_a_naive_flat_stream():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 50, (int(n),), generator=g).tolist() for n in torch.randint(0, 30, (40,), generator=g)]
    for seq_len in (1, 7, 64):
        stream = [t for doc in docs for t in (*doc, 1)]
        rows = len(stream) // seq_len
        expected = torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)
        got = pack_causal(docs, seq_len, eos_id=1)
        assert got.dtype == torch.long and torch.equal(got, expected)
    with pytest.raises(ValueError, match="seq_len"):
        pack_causal([[5]], 8, eos_id=1)
