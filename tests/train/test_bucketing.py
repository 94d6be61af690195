"""bucket_by_length: batches of rows of similar length, still a shuffle of every row, deterministic,
and the same rows per step whatever the number of ranks (with grad_accum keeping the global batch)."""

from __future__ import annotations

import pytest
import torch

from switchformer.data.objectives import epoch_order, length_bucketed
from switchformer.train.data import Data, Split


def lengths_for(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(2, 60, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("n, batch_size, pool_batches, phase", [(1000, 8, 5, 0), (997, 8, 5, 3), (50, 16, 50, 0)])
def test_bucketed_order_is_a_permutation_of_the_same_rows_and_deterministic(n, batch_size, pool_batches, phase):
    order = epoch_order(n, 0, 1)
    lengths = lengths_for(n)
    out = length_bucketed(order, lengths, batch_size, pool_batches * batch_size, phase, 0, 1)
    assert torch.equal(torch.sort(out).values, torch.arange(n))
    assert torch.equal(out, length_bucketed(order, lengths, batch_size, pool_batches * batch_size, phase, 0, 1))
    assert torch.equal(out[:phase], order[:phase])  # before the epoch's first whole batch: untouched


def test_each_batch_is_a_sorted_block_of_its_window_and_padding_falls():
    n, batch_size, pool = 4000, 16, 16 * 10
    order, lengths = epoch_order(n, 0, 0), lengths_for(n)
    out = length_bucketed(order, lengths, batch_size, pool, 0, 0, 0)
    for start in range(0, n - pool + 1, pool):
        window_lengths = torch.sort(lengths[order[start : start + pool]]).values
        blocks = window_lengths.view(-1, batch_size)
        got = lengths[out[start : start + pool]].view(-1, batch_size)
        # every batch is one of the window's sorted blocks (in some order)
        got_sorted = torch.sort(got, dim=1).values
        assert sorted(map(tuple, got_sorted.tolist())) == sorted(map(tuple, blocks.tolist()))
    # padding: the sum over batches of the longest row, against the plain shuffle
    plain = lengths[order].view(-1, batch_size).max(1).values.sum()
    bucketed = lengths[out].view(-1, batch_size).max(1).values.sum()
    assert bucketed < 0.8 * plain
    # the batches' lengths still come in random order, not sorted across the window
    first_window = lengths[out[:pool]].view(-1, batch_size).float().mean(1)
    assert not torch.equal(first_window, torch.sort(first_window).values)


class _Config:
    def __init__(self, batch_size: int, grad_accum: int, bucket: bool = True):
        self.batch_size, self.grad_accum, self.seed, self.bucket_by_length = batch_size, grad_accum, 0, bucket


def _data(n: int) -> Data:
    lengths = lengths_for(n, 1)
    ids = torch.arange(n)[:, None].expand(n, 60).clone()
    mask = torch.arange(60)[None, :] < lengths[:, None]
    split = Split({"input_ids": ids, "attention_mask": mask.long(), "labels": ids.clone()})
    return Data(train=split, valid=split, tokenizer=None, vocab_size=1000)


def test_ranks_see_the_rows_of_one_process_with_grad_accum():
    """W ranks with batch_size b see, step by step, the rows one process sees with batch_size b
    and grad_accum W: the bucket is the micro-batch, whatever the layout (across epochs too)."""
    data = _data(203)
    for step in range(40):
        ranks = [data.batch(_Config(4, 1), step, 0, rank, 2)["input_ids"][:, 0] for rank in range(2)]
        one = [data.batch(_Config(4, 2), step, micro, 0, 1)["input_ids"][:, 0] for micro in range(2)]
        assert torch.equal(torch.cat(ranks), torch.cat(one)), step


def test_an_epoch_of_bucketed_batches_covers_every_row_once():
    data = _data(240)
    rows = torch.cat([data.batch(_Config(8, 1), step, 0)["input_ids"][:, 0] for step in range(30)])
    assert torch.equal(torch.sort(rows).values, torch.arange(240))
    plain = torch.cat([data.batch(_Config(8, 1, bucket=False), step, 0)["input_ids"][:, 0] for step in range(30)])
    assert not torch.equal(rows, plain)
