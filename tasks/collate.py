"""Batch collators for causal-LM training: padding, and packing whole rows without cross-attention.

Packing follows transformers' position_ids convention (DataCollatorWithFlattening):
examples are concatenated into one row and position_ids restart at 0 for each.
With no attention_mask and no KV cache, transformers 5.x (masking_utils) derives
a block-diagonal causal mask from the restarts for sdpa and eager, and
flash_attention_2 takes its varlen path, so a packed example never sees another.
Measured on the tiny GPT-NeoX: packed logits equal running each example alone
(~1e-7). With use_cache=True the restarts are ignored and examples leak (0.45),
so the training model runs with use_cache=False (tests/test_collate.py).
"""
from __future__ import annotations

import bisect

import torch

from .contracts import PackingStats

IGNORE = -100


def pad_rows(features: list[dict], pad_id: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids right-padded with pad_id and labels with -100, to ``width`` columns."""
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    labels = torch.full((len(features), width), IGNORE, dtype=torch.long)
    for i, f in enumerate(features):
        k = len(f["input_ids"])
        ids[i, :k] = torch.as_tensor(f["input_ids"])
        labels[i, :k] = torch.as_tensor(f["labels"])
    return ids, labels


class PadCollator:
    """Pad to the longest example in the batch, with an attention mask over the real tokens."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        lengths = torch.tensor([len(f["input_ids"]) for f in features])
        ids, labels = pad_rows(features, self.pad_id, int(lengths.max()))
        mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).long()
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_examples(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit decreasing: example indices per row, each row at most ``max_len`` tokens.

    Longest first, each into the open row with the least room that still holds it.
    Deterministic for the same lengths, so a resumed run rebuilds the same rows.
    O(n log n): 160k examples pack in about a second.
    """
    rows: list[list[int]] = []
    open_rows: list[tuple[int, int]] = []  # (room left, row index), sorted
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than the row length {max_len}")
        k = bisect.bisect_left(open_rows, (n, -1))
        if k < len(open_rows):
            room, r = open_rows.pop(k)
            rows[r].append(i)
        else:
            room, r = max_len, len(rows)
            rows.append([i])
        if room - n > 0:
            bisect.insort(open_rows, (room - n, r))
    return rows


def concat_row(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, list[int]]:
    """One packed row: ids and labels concatenated, position_ids restarting at each example."""
    ids, labs, pos = [], [], []
    for x, y in zip(input_ids, labels):
        ids += x
        labs += [IGNORE] + list(y[1:])  # the previous example's last token must not learn to predict this one's first
        pos += range(len(x))
    return {"input_ids": ids, "labels": labs, "position_ids": pos}


class PackedRows(torch.utils.data.Dataset):
    """A tokenized split seen as packed rows of at most ``max_len`` tokens (built once, at start)."""

    def __init__(self, examples, max_len: int):
        self.examples = examples  # a datasets.Dataset with input_ids and labels
        lengths = list(examples["length"]) if "length" in examples.column_names else [len(x) for x in examples["input_ids"]]
        self.rows = pack_examples(lengths, max_len)
        self.max_len = max_len
        self.tokens = int(sum(lengths))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, r: int) -> dict[str, list[int]]:
        batch = self.examples[self.rows[r]]
        return concat_row(batch["input_ids"], batch["labels"])

    def stats(self) -> PackingStats:
        n = len(self.rows)
        return PackingStats(examples=len(self.examples), rows=n, max_len=self.max_len, tokens=self.tokens,
                            real_token_share=round(self.tokens / (n * self.max_len), 4) if n else 0.0,
                            examples_per_row=round(len(self.examples) / n, 2) if n else 0.0)


class PositionCollator:
    """Pad rows (packed or single examples) and send position_ids, no attention_mask.

    Right padding gets position 0 per pad token, so each pad is its own one-token
    sequence and real tokens never attend to it. ``pad_to`` fixes the width (static
    shapes for torch.compile); None pads to the longest row in the batch.
    """

    def __init__(self, pad_id: int, pad_to: int | None = None):
        self.pad_id, self.pad_to = pad_id, pad_to

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        ids, labels = pad_rows(features, self.pad_id, self.pad_to or max(len(f["input_ids"]) for f in features))
        pos = torch.zeros_like(ids)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            pos[i, :k] = torch.as_tensor(f["position_ids"]) if "position_ids" in f else torch.arange(k)
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
