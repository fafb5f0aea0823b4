"""Shared-prefix packing of training examples: several MSFT records behind one copy of their schema.

The MSFT records (paper Sec. 3.2) of one database all open with the same system prompt and schema with sample
rows (prompts.cut), most of their tokens. Packed, a row holds that prefix once, then each record's own rest:

    tokens     [ prefix (P) | rest of record 1 | rest of record 2 | ... ]
    positions    0 .. P-1     P .. P+n1-1        P .. P+n2-1            each record continues the prefix
    segments     0            1                  2                       0 = the shared prefix

and attention lets a token see the prefix and the earlier tokens of its own record, never another record:
mask[i, j] = j <= i and (segment[j] == 0 or segment[j] == segment[i]). Each record computes exactly what it
would alone (same keys, values and rotary positions): the unpacked records' loss and gradients (checked in
tests/test_packing.py) for about half the tokens. A rest starts with prompt tokens (the question), so no
loss crosses from one record into the next.
"""
import random
from collections import defaultdict

import torch

from .model import IGNORE  # label of tokens without loss (prompt and padding)


def pack_shared_prefix(examples: list[dict], max_len: int, seed: int = 0) -> list[dict]:
    """Examples with "prefix_len" (batching.tokenize_examples) -> packed rows of at most max_len tokens, a group's
    records in seeded random order. An example alone with its prefix is returned as it was."""
    groups = defaultdict(list)
    for i, ex in enumerate(examples):
        p = ex.get("prefix_len", 0)
        groups[tuple(ex["input_ids"][:p]) if p else ("single", i)].append(ex)
    rng = random.Random(seed)
    rows = []
    for key, members in groups.items():
        if key[:1] == ("single",) or len(members) == 1:
            rows += members
            continue
        rng.shuffle(members)
        P = members[0]["prefix_len"]
        row = None
        for ex in members:
            rest_ids, rest_labels = ex["input_ids"][P:], ex["labels"][P:]
            if row is None or len(row["input_ids"]) + len(rest_ids) > max_len:
                if row is not None:
                    rows.append(row)
                row = {"input_ids": list(ex["input_ids"][:P]), "labels": [IGNORE] * P, "positions": list(range(P)),
                       "segments": [0] * P}
            seg = row["segments"][-1] + 1
            row["input_ids"] += rest_ids
            row["labels"] += rest_labels
            row["positions"] += range(P, P + len(rest_ids))
            row["segments"] += [seg] * len(rest_ids)
        rows.append(row)
    return rows


def block_mask(segments: torch.Tensor) -> torch.Tensor:
    """segments (B, T) -> attention mask (B, 1, T, T): causal, and a record sees only the prefix and itself.
    Unpacked rows (all segments 0) get plain causal attention; right padding (segment -1) sees the prefix and
    itself, so no softmax row is empty (its outputs are never read)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    same = segments[:, :, None] == segments[:, None, :]
    shared = (segments == 0)[:, None, :]
    return (causal & (same | shared))[:, None]
