"""Weight files too big to memory-map (Linux refuses a private writable mapping larger than memory
and swap, safetensors/safetensors#528): safetensors files are read with ``pread`` instead, giving
the same tensors and experts; ``.bin`` files are refused naming the file and its size, never read
whole; a damaged or cut file is named either way."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from switchformer.runs import lazy_tensors
from switchformer.runs.lazy_tensors import LazyTensors

REFUSAL = "unable to mmap 26918050544 bytes from file <x>: Cannot allocate memory (12)"


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "experts.w_in": torch.randn(4, 8, 16, generator=g).to(torch.bfloat16),
        "experts.q": torch.randint(-127, 128, (4, 16, 8), generator=g, dtype=torch.int8),
        "router.weight": torch.randn(4, 8, generator=g),
    }


def refuse_mapping(monkeypatch):
    """``safe_open`` as on a machine whose memory is smaller than the file: the mapping fails as
    PyTorch reports it."""
    import safetensors

    def fake(*args, **kwargs):
        raise RuntimeError(REFUSAL)

    monkeypatch.setattr(safetensors, "safe_open", fake)


def test_a_safetensors_file_too_big_to_map_is_read_with_pread(tmp_path, tensors, monkeypatch):
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file), metadata={"format": "pt"})
    mapped = LazyTensors([file])
    expected = {k: mapped[k].clone() for k in tensors}
    expected_parts = {(k, i): mapped.part(k, i).clone() for k in tensors for i in range(4)}
    refuse_mapping(monkeypatch)
    lazy = LazyTensors([file])
    assert isinstance(lazy._where["router.weight"], lazy_tensors._UnmappedSafetensors)
    assert list(lazy) == list(mapped)
    for key, tensor in tensors.items():
        assert lazy.meta(key).shape == tensor.shape and lazy.meta(key).dtype == tensor.dtype
        assert torch.equal(lazy[key], expected[key]) and torch.equal(lazy[key], tensor)
        for i in range(4):
            part = lazy.part(key, i)
            assert torch.equal(part, expected_parts[key, i]) and part.dtype == tensor.dtype
    with pytest.raises(IndexError, match="has 4 entries, not an index 4"):
        lazy.part("router.weight", 4)


def test_an_unmapped_file_cut_short_is_named(tmp_path, tensors, monkeypatch):
    file = tmp_path / "model.safetensors"
    save_file(tensors, str(file))
    data = file.read_bytes()
    refuse_mapping(monkeypatch)
    for cut, message in ((len(data) - 5, "truncated"), (4, "damaged or not a safetensors file")):
        file.write_bytes(data[:cut])
        with pytest.raises(ValueError, match=rf"model\.safetensors: .*{message}"):
            LazyTensors([file])
    file.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}" + data[100:])
    with pytest.raises(ValueError, match=r"model\.safetensors: damaged or not a safetensors file"):
        LazyTensors([file])


def test_a_bin_file_too_big_to_map_is_refused_not_read_whole(tmp_path, tensors, monkeypatch):
    file = tmp_path / "pytorch_model.bin"
    torch.save(tensors, file)
    real = torch.load
    whole_reads = []

    def fake_load(f, *args, mmap=None, **kwargs):
        if mmap:
            raise RuntimeError(REFUSAL)
        whole_reads.append(f)
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", fake_load)
    with pytest.raises(MemoryError, match=r"pytorch_model\.bin: .* GiB is more than .* shards"):
        LazyTensors([file])
    assert whole_reads == []


def test_a_legacy_bin_file_is_still_read_whole(tmp_path, tensors):
    file = tmp_path / "pytorch_model.bin"
    torch.save(tensors, file, _use_new_zipfile_serialization=False)
    lazy = LazyTensors([file])
    assert all(torch.equal(lazy[k], v) for k, v in tensors.items())
