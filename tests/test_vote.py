"""The vote by execution result, and the sampled candidates it votes on (reproducible with a seed)."""
import pytest
import torch

from route.generate import generate
from route.tokenizer import Tokenizer
from route.vote import Candidate, vote
from route.weights import load_model
from tiny import write_tiny, write_tiny_tokenizer


def C(sql, rows=None, error=None):
    return Candidate(sql, "x", error, rows)


def test_largest_group_of_equal_results_wins():
    cands = [C("a", [(1,)]), C("b", [(2,)]), C("c", [(2,)]), C("d", error="no such column: x")]
    assert vote(cands) == 1
    assert [c.group for c in cands] == [0, 1, 1, -1]


def test_ties_go_to_the_earliest_candidate():
    assert vote([C("a", [(1,)]), C("b", [(2,)])]) == 0
    assert vote([C("a", error="e"), C("b", [(2,)]), C("c", [(3,)])]) == 1


def test_all_failing_answers_the_first():
    assert vote([C("a", error="e1"), C("b", error="e2")]) == 0


def test_equal_results_as_the_evaluator_sees_them():
    # the same rows in another order and with columns swapped are equal unless both queries order them
    cands = [C("SELECT a, b FROM t", [(1, "x"), (2, "y")]), C("SELECT b, a FROM t", [("y", 2), ("x", 1)]),
             C("SELECT a FROM t", [(1,), (2,)])]
    assert vote(cands) == 0 and cands[1].group == 0 and cands[2].group == 1
    ordered = [C("SELECT a FROM t ORDER BY a", [(1,), (2,)]), C("SELECT a FROM t ORDER BY a DESC", [(2,), (1,)]),
               C("SELECT a FROM t ORDER BY a DESC LIMIT 5", [(2,), (1,)])]
    assert vote(ordered) == 1  # in order, [2, 1] twice beats [1, 2] once


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    write_tiny(path, "qwen2")
    write_tiny_tokenizer(path, "qwen2")
    return load_model(path, dtype="fp32"), Tokenizer.from_dir(path)


def test_samples_are_reproducible_with_a_seed_and_share_the_prefix(engine):
    """N samples of one prompt whose tokens are a cache level: the same seed gives the same samples, another
    seed others, and computing the prefix once (reuse) or per row gives the same samples in fp32."""
    model, tok = engine
    ids = tok.encode("How many singers do we have? SELECT count(*) FROM")
    prompts = [(ids[:-1], ids[-1:])] * 6
    kw = dict(max_new_tokens=12, temperature=1.0, progress=False)
    a = generate(model, tok, prompts, seed=1, **kw)
    assert a == generate(model, tok, prompts, seed=1, **kw)
    assert a == generate(model, tok, prompts, seed=1, reuse_prefix=False, **kw)
    assert len(set(a)) > 1  # the rows sample different answers
    assert a != generate(model, tok, prompts, seed=2, **kw)
    greedy = generate(model, tok, prompts[:1], max_new_tokens=12, progress=False)[0]
    assert generate(model, tok, [tok.decode(ids)], max_new_tokens=12, progress=False)[0] == greedy
    torch.manual_seed(0)  # the global generator plays no part
    assert a == generate(model, tok, prompts, seed=1, **kw)
