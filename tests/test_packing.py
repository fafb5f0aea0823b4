"""Shared-prefix packing: records packed behind one copy of their prefix give the loss and the gradients of
the same records unpacked (fp32), and a packed batch costs fewer tokens."""
import random

import pytest
import torch

from route.packing import IGNORE, block_mask, pack_shared_prefix
from route.batching import collate
from route.trainer import answer_loss
from route.weights import load_model
from tiny import write_tiny


def record(prefix, rng, vocab):
    rest = [rng.randrange(3, vocab) for _ in range(rng.randint(4, 9))]  # the question: prompt, no loss
    answer = [rng.randrange(3, vocab) for _ in range(rng.randint(2, 6))]
    ids = prefix + rest + answer
    return {"input_ids": ids, "labels": [IGNORE] * (len(prefix) + len(rest)) + answer, "prefix_len": len(prefix)}


@pytest.fixture(scope="module")
def examples():
    rng = random.Random(0)
    a, b = [rng.randrange(3, 200) for _ in range(20)], [rng.randrange(3, 200) for _ in range(13)]
    exs = [record(a, rng, 200) for _ in range(4)] + [record(b, rng, 200) for _ in range(3)]
    exs.append({"input_ids": [5, 6, 7, 8, 9], "labels": [IGNORE, IGNORE, IGNORE, 8, 9], "prefix_len": 0})
    return exs


def test_packing_layout(examples):
    rows = pack_shared_prefix(examples, max_len=60, seed=0)
    packed = [r for r in rows if "segments" in r]
    assert sum(len(r["input_ids"]) for r in rows) < 0.7 * sum(len(e["input_ids"]) for e in examples)
    assert all(len(r["input_ids"]) <= 60 for r in rows) and len(packed) >= 2  # one or more per shared prefix
    n_answers = sum(sum(t != IGNORE for t in r["labels"]) for r in rows)
    assert n_answers == sum(sum(t != IGNORE for t in e["labels"]) for e in examples)
    for r in packed:  # every record continues the prefix's positions; the prefix is segment 0
        P = r["segments"].index(1)
        assert r["positions"][:P] == list(range(P))
        for s in set(r["segments"]) - {0}:
            pos = [p for p, g in zip(r["positions"], r["segments"]) if g == s]
            assert pos == list(range(P, P + len(pos)))
    seg = torch.tensor([[0, 0, 1, 1, 2, -1]])
    m = block_mask(seg)[0, 0]
    assert m[3].tolist() == [True, True, True, True, False, False]  # record 1 sees the prefix and itself
    assert m[4].tolist() == [True, True, False, False, True, False]  # record 2 never sees record 1


def test_packed_loss_and_gradients_equal_unpacked(examples, tmp_path):
    write_tiny(tmp_path, "qwen2")
    model = load_model(tmp_path, dtype="fp32").train()
    for p in model.parameters():
        p.requires_grad_(True)

    def loss_and_grads(exs):
        model.zero_grad()
        s, n = answer_loss(model, *collate(exs, list(range(len(exs))), "cpu"))
        s.backward()
        return s.item(), n, {k: p.grad.clone() for k, p in model.named_parameters()}

    s1, n1, g1 = loss_and_grads(examples)
    rows = pack_shared_prefix(examples, max_len=60, seed=0)
    s2, n2, g2 = loss_and_grads(rows)
    assert n1 == n2 and s1 == pytest.approx(s2, rel=1e-5)
    for k in g1:  # the prefix's gradient is one sum instead of several: fp32 summation order differs
        torch.testing.assert_close(g2[k], g1[k], rtol=1e-3, atol=1e-3 * g1[k].abs().max().item())
    # and it is the mask that makes it so: attention across records changes the loss
    leaky = [dict(r, segments=[0] * len(r["input_ids"])) if "segments" in r else r for r in rows]
    assert abs(loss_and_grads(leaky)[0] - s1) > 1e-3
