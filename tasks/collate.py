"""Batch collators for causal-LM training: padding, and packing without cross-attention.

Measured on transformers 5.23 with GPT-NeoX (sdpa and eager): position_ids-only
packing (DataCollatorWithFlattening) lets a packed example attend to the one
before it (max logit difference 0.38 on the tiny model). So packing here builds
an explicit block-diagonal causal 4D mask per packed row, which gives the same
logits as running each example alone (difference ~1e-7).
"""
from __future__ import annotations

import torch

IGNORE = -100


class PadCollator:
    """Pad to the longest example in the batch: input_ids with pad, labels with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        n = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), n), self.pad_id, dtype=torch.long)
        labels = torch.full((len(features), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(features), n), dtype=torch.long)
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            ids[i, :k] = torch.as_tensor(f["input_ids"])
            labels[i, :k] = torch.as_tensor(f["labels"])
            mask[i, :k] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """Greedy first-fit-decreasing: example indices per row, each row at most max_len tokens."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, left in enumerate(room):
            if lengths[i] <= left:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


class PackingCollator:
    """Pack a batch's examples into rows of at most ``max_len`` tokens with a block-diagonal causal mask.

    ``mask_dtype`` torch.bool suits sdpa; a float dtype (0 / -inf style) suits eager attention;
    None gives position_ids only, for flash_attention_2, whose varlen path splits sequences where
    position_ids restart (sdpa and eager ignore that and would attend across examples).
    """

    def __init__(self, pad_id: int, max_len: int, mask_dtype: torch.dtype | None = torch.bool):
        self.pad_id, self.max_len, self.mask_dtype = pad_id, max_len, mask_dtype

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = pack_rows([len(f["input_ids"]) for f in features], self.max_len)
        width = max(sum(len(features[i]["input_ids"]) for i in row) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        pos = torch.zeros((len(rows), width), dtype=torch.long)
        seg = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, row in enumerate(rows):
            start = 0
            for s, i in enumerate(row):
                f = features[i]
                k = len(f["input_ids"])
                ids[r, start:start + k] = torch.as_tensor(f["input_ids"])
                lab = torch.as_tensor(f["labels"]).clone()
                lab[0] = IGNORE  # the previous example's last token must not learn to predict this one's first
                labels[r, start:start + k] = lab
                pos[r, start:start + k] = torch.arange(k)
                seg[r, start:start + k] = s
                start += k
        if self.mask_dtype is None:
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        causal = torch.tril(torch.ones(width, width, dtype=torch.bool))
        allowed = (seg[:, :, None] == seg[:, None, :]) & causal & (seg[:, :, None] >= 0)
        # A padding query row may not be all-masked (NaN in softmax): let it see itself.
        allowed |= torch.eye(width, dtype=torch.bool)[None]
        if self.mask_dtype == torch.bool:
            mask = allowed[:, None]
        else:
            mask = torch.zeros(allowed.shape, dtype=self.mask_dtype).masked_fill(~allowed, torch.finfo(self.mask_dtype).min)[:, None]
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "attention_mask": mask}
