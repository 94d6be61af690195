"""The running rows' key/value buffers of the continuous-batching engine, per model family.

Each family keeps static key/value buffers of ``max_batch_size`` slots and
``columns`` positions. The running requests occupy slots ``0 .. n-1`` (a finished request's slot
takes the last row's buffers, so a step computes only live rows); all rows write a step's keys
at the same column ``length``, and each row's own keys are the contiguous columns just before it,
the columns to the left being padding that its mask hides. A request joins with its prompt's keys
copied in right-aligned; a prompt longer than ``length`` shifts every row right, and when
``length`` reaches ``columns`` every row shifts left by the padding all rows share. Positions stay
each request's own: the decoder-only model takes them from each row's ``next_position``; the
encoder-decoder's relative positions are differences of columns, which the shift does not change.

**The static step** (``serve --cache static``): the model's ``decode_step`` over the first ``R``
slots, ``R`` the running rows rounded up to a power of two (so a handful of shapes, each compiled
or captured once), every column attended under the rows' masks, the idle slots routed nowhere.
The buffers, the write column and the step's inputs are tensors allocated once, so a compiled step
(CUDA graphs on a GPU) writes into the same memory every time. The same tokens as the growing step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from switchformer.models.caches import DecoderCache, LMCache, StaticDecoderCache, StaticLMCache
from switchformer.models.lm import SwitchLM
from switchformer.models.outputs import RouterStats
from switchformer.models.t5 import SwitchT5
from switchformer.serve.sampling import RowSampler, TextStream


@dataclass
class Row:
    """One running request in the batch: the request (the engine's), its sampler and text so far."""

    request: object  # the engine's Request
    sampler: RowSampler
    text: TextStream
    pending: int = -1  # the token the next step feeds
    completion_tokens: int = 0
    source_length: int = 0  # encoder-decoder: the source's tokens


class Batch:
    """Key/value buffers of ``slots`` rows and ``columns`` positions shared by the running rows
    (see the module docstring): the column bookkeeping both families share."""

    def __init__(self, slots: int, columns: int, self_kv: list[Tensor], device):
        self.slots, self.columns = slots, columns
        self.self_kv = self_kv  # every self-attention key and value buffer, [slots, heads, columns, head_dim]
        self.key_valid = torch.zeros(slots, columns, dtype=torch.bool, device=device)
        self.length = 0
        self.rows: list[Row] = []
        # the static step's inputs, allocated once (their addresses are what a captured step reads)
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.step_tokens = torch.zeros(slots, dtype=torch.long, device=device)
        self.live = torch.zeros(slots, dtype=torch.bool, device=device)
        self._static_caches: dict[int, object] = {}  # per row count R, the cache over the first R slots

    def static_rows(self, n: int) -> int:
        """``R``: ``n`` running rows rounded up to a power of two, at most ``slots``."""
        return min(1 << max(n - 1, 0).bit_length(), self.slots)

    def _static_inputs(self, n: int, tokens: list[int]) -> int:
        """The step's inputs written into their buffers; returns ``R``."""
        rows = self.static_rows(n)
        self.column.fill_(self.length)
        self.step_tokens[:n] = torch.tensor(tokens, dtype=torch.long)
        self.live[:rows] = False
        self.live[:n] = True
        return rows

    def static_step(self, n: int, tokens: list[int], step) -> tuple[Tensor, list[Tensor]]:
        """Logits ``[n, vocab]`` of the first ``n`` rows after feeding each its next token, and each
        Switch layer's tokens per expert, by ``step`` (``model.decode_step`` or its compiled form)."""
        rows = self._static_inputs(n, tokens)
        cache = self._static_caches.get(rows)
        if cache is None:
            cache = self._static_caches[rows] = self.static_cache(rows)
        logits, counts = step(self.step_tokens[:rows], cache, self.live[:rows])
        return logits[:n], counts

    def __len__(self) -> int:
        return len(self.rows)

    def make_room(self, needed: int = 0) -> None:
        """A free column at ``length`` (when every column is taken, every row shifts left by the
        padding all rows share), and ``length`` at least ``needed`` (a new row's prompt ends there;
        the rows shift right if it is longer)."""
        n = len(self.rows)
        if n == 0:
            self.length = needed
            return
        if self.length >= self.columns:
            spans = self.key_valid[:n, : self.length].sum(1)
            self._shift(-(self.length - int(spans.max())))
        if needed > self.length:
            self._shift(needed - self.length)

    def _shift(self, delta: int) -> None:
        """Move every row's columns by ``delta`` (right if positive)."""
        n, length = len(self.rows), self.length
        if delta > 0:
            if length + delta > self.columns:
                raise RuntimeError(f"cache: {length + delta} columns needed, {self.columns} held")
            for buf in self.self_kv:
                buf[:n, :, delta : length + delta] = buf[:n, :, :length].clone()
            self.key_valid[:n, delta : length + delta] = self.key_valid[:n, :length].clone()
            self.key_valid[:n, :delta] = False
        elif delta < 0:
            d = -delta
            for buf in self.self_kv:
                buf[:n, :, : length - d] = buf[:n, :, d:length].clone()
            self.key_valid[:n, : length - d] = self.key_valid[:n, d:length].clone()
            self.key_valid[:n, length - d :] = False
        self.length = length + delta

    def place(self, keys_values: list[Tensor]) -> int:
        """A new row whose ``keys_values`` (one ``[heads, p, head_dim]`` per buffer) end at the
        current column; returns its slot."""
        slot = len(self.rows)
        p = keys_values[0].shape[1] if keys_values else 0
        self.make_room(p)
        for buf, kv in zip(self.self_kv, keys_values):
            buf[slot, :, self.length - p : self.length] = kv
        self.key_valid[slot] = False
        self.key_valid[slot, self.length - p : self.length] = True
        return slot

    def remove(self, slot: int) -> None:
        last = len(self.rows) - 1
        if slot != last:
            self.move_row(last, slot)
        self.rows[slot] = self.rows[last]
        self.rows.pop()
        if not self.rows:
            self.length = 0

    def move_row(self, source: int, target: int) -> None:
        for buf in self.self_kv:
            buf[target, :, : self.length] = buf[source, :, : self.length]
        self.key_valid[target] = self.key_valid[source]


class LMBatch(Batch):
    """The decoder-only model's running rows."""

    def __init__(self, model: SwitchLM, slots: int, columns: int, device, dtype):
        config = model.config
        head_dim = config.d_model // config.num_heads
        shape = (slots, config.num_heads, columns, head_dim)
        buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * config.num_layers)]
        super().__init__(slots, columns, buffers, device)
        self.model = model
        self.next_position = torch.zeros(slots, dtype=torch.long, device=device)

    def prefill(self, prompt_ids: list[int], stats: RouterStats) -> tuple[Tensor, list[Tensor]]:
        """The last position's logits ``[vocab]`` of the prompt alone, and its keys and values."""
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.key_valid.device)
        cache = self.model.new_cache(1, len(prompt_ids))
        h, _ = self.model.hidden_states(ids, None, cache=cache, stats=stats)
        return self.model.project(h[:, -1])[0], [t[0] for kv in cache.kv for t in kv]

    def admit(self, row: Row, keys_values: list[Tensor]) -> None:
        slot = self.place(keys_values)
        self.next_position[slot] = len(row.request.prompt_ids)
        self.rows.append(row)

    def step(self, rows: slice, tokens: list[int], stats: RouterStats) -> Tensor:
        """Logits ``[rows, vocab]`` after feeding each row of ``rows`` its next token."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.key_valid.device)[:, None]
        kv = [(self.self_kv[2 * i][rows], self.self_kv[2 * i + 1][rows]) for i in range(len(self.self_kv) // 2)]
        cache = LMCache.from_buffers(kv, self.key_valid[rows], self.length, self.next_position[rows])
        h, _ = self.model.hidden_states(ids, None, cache=cache, stats=stats)
        self.next_position[rows] = cache.next_position
        return self.model.project(h[:, -1])

    def static_cache(self, rows: int) -> StaticLMCache:
        """A :class:`StaticLMCache` over the first ``rows`` slots (views of the batch's buffers)."""
        pairs = range(len(self.self_kv) // 2)
        kv = [(self.self_kv[2 * i][:rows], self.self_kv[2 * i + 1][:rows]) for i in pairs]
        return StaticLMCache.over(kv, self.key_valid[:rows], self.next_position[:rows], self.column)

    def move_row(self, source: int, target: int) -> None:
        super().move_row(source, target)
        self.next_position[target] = self.next_position[source]


class T5Batch(Batch):
    """The encoder-decoder's running rows: decoder self-attention in the shared columns, each
    row's cross-attention keys and values (its source, encoded once) in buffers of its own."""

    def __init__(self, model: SwitchT5, slots: int, columns: int, source_columns: int, device, dtype):
        config = model.config
        layers = len(model.decoder.blocks)
        shape = (slots, config.num_heads, columns, config.d_kv)
        buffers = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(2 * layers)]
        super().__init__(slots, columns, buffers, device)
        self.model = model
        cross_shape = (slots, config.num_heads, source_columns, config.d_kv)
        self.cross_kv = [torch.zeros(cross_shape, device=device, dtype=dtype) for _ in range(2 * layers)]
        self.cross_bias = torch.zeros(slots, 1, 1, source_columns, device=device, dtype=dtype)
        self.start_token = config.decoder_start_token_id

    def encode(self, source_ids: list[int], stats: RouterStats) -> list[Tensor]:
        """The source's cross-attention keys and values, one ``[heads, source, d_kv]`` per buffer."""
        ids = torch.tensor([source_ids], dtype=torch.long, device=self.key_valid.device)
        memory = self.model.encode(ids, None, stats=stats)
        return [t[0] for block in self.model.decoder.blocks for t in block.cross_attn.project_kv(memory)]

    def admit(self, row: Row, cross: list[Tensor]) -> None:
        slot = self.place([])
        length = row.source_length
        for buf, kv in zip(self.cross_kv, cross):
            buf[slot, :, :length] = kv
        self.cross_bias[slot] = torch.finfo(self.cross_bias.dtype).min
        self.cross_bias[slot, ..., :length] = 0
        row.pending = self.start_token
        self.rows.append(row)

    def step(self, rows: slice, tokens: list[int], stats: RouterStats) -> Tensor:
        ids = torch.tensor(tokens, dtype=torch.long, device=self.key_valid.device)[:, None]
        source = max(r.source_length for r in self.rows[rows])
        self.key_valid[rows, self.length] = True
        pairs = range(len(self.self_kv) // 2)
        cache = DecoderCache(
            [(self.self_kv[2 * i][rows], self.self_kv[2 * i + 1][rows]) for i in pairs],
            [(self.cross_kv[2 * i][rows, :, :source], self.cross_kv[2 * i + 1][rows, :, :source]) for i in pairs],
            self.cross_bias[rows, ..., :source],
            None,
        )
        cache.length = self.length
        mask = self.key_valid[rows, : self.length + 1]
        h = self.model.decode(ids, None, None, decoder_attention_mask=mask, cache=cache, stats=stats)
        return self.model.project(h[:, -1])

    def static_step(self, n: int, tokens: list[int], step) -> tuple[Tensor, list[Tensor]]:
        self.key_valid[: self.static_rows(n), self.length] = True  # idle slots too: no row attends to nothing
        return super().static_step(n, tokens, step)

    def static_cache(self, rows: int) -> StaticDecoderCache:
        """A :class:`StaticDecoderCache` over the first ``rows`` slots: every decoder column under
        the rows' key masks, every source column under their cross-attention masks."""
        pairs = range(len(self.self_kv) // 2)
        return StaticDecoderCache(
            [(self.self_kv[2 * i][:rows], self.self_kv[2 * i + 1][:rows]) for i in pairs],
            [(self.cross_kv[2 * i][:rows], self.cross_kv[2 * i + 1][:rows]) for i in pairs],
            self.cross_bias[:rows],
            self.key_valid[:rows],
            column=self.column,
        )

    def move_row(self, source: int, target: int) -> None:
        super().move_row(source, target)
        columns = self.rows[source].source_length
        for buf in self.cross_kv:
            buf[target, :, :columns] = buf[source, :, :columns]
        self.cross_bias[target] = self.cross_bias[source]
