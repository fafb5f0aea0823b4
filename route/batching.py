"""Examples to micro-batches for multitask fine-tuning (ROUTE section 3.1, MSFT): tokenize, plan, collate.

An example is a prompt then an answer, as token ids, with labels IGNORE on the prompt: only the answer gets a
loss. Each epoch, examples are shuffled, sorted by length within windows and cut into right-padded
micro-batches under a token budget, and the micro-batches are shuffled; a step takes world_size * grad_accum
of them. The plan is a pure function of the seed, so every rank knows every step's global answer-token count
and a resumed run starts at exactly the right micro-batch.
"""
import random
from dataclasses import dataclass

import torch

from .packing import IGNORE, block_mask

SORT_WINDOW = 1024  # examples sorted by length together: larger packs tighter, smaller mixes batches more


def tokenize_example(tok, prompt, answer: str, close_turn: bool = True) -> dict:
    """A training example from a formatted prompt (a string, e.g. tok.chat(messages), or its parts from
    prompts.cut) and its answer text."""
    return tokenize_examples(tok, [prompt], [answer], close_turn)[0]


def tokenize_examples(tok, prompts: list, answers: list[str], close_turn: bool = True) -> list[dict]:
    """tokenize_example for many pairs at once (encode_batch uses all cores). Prompts go through encode_parts,
    as generate() encodes them; answers are encoded on their own, closed by the chat format's end-of-turn token
    so the model learns to stop."""
    eot = tok.end_of_turn if close_turn else ""
    parts = tok.encode_parts(prompts)
    ans = tok.encode_batch([a + eot for a in answers])
    out = []
    for ps, a in zip(parts, ans):
        p = [t for part in ps for t in part]
        # prefix_len: the first part (system + schema), which packing.py shares between records
        out.append({"input_ids": p + a, "labels": [IGNORE] * len(p) + a,
                    "prefix_len": len(ps[0]) if len(ps) > 1 else 0})
    return out


def n_targets(example: dict) -> int:
    """Answer tokens that get a loss: labels[0] is never predicted (nothing comes before it)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def usable(examples: list[dict], max_len: int, what: str, log) -> list[dict]:
    """The examples that fit max_len and have answer tokens (the others are dropped, with a note, never cut)."""
    for e in examples:
        if len(e["input_ids"]) != len(e["labels"]):
            raise ValueError(f"{what}: an example has {len(e['input_ids'])} input_ids but {len(e['labels'])} labels")
    kept = [e for e in examples if len(e["input_ids"]) <= max_len and n_targets(e) > 0]
    if len(kept) < len(examples):
        log(f"{what}: dropped {len(examples) - len(kept)} of {len(examples)} examples "
            f"(longer than max_len={max_len} tokens, or without answer tokens)")
    if not kept:
        raise ValueError(f"{what}: no usable examples")
    return kept


def cut_batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Cut `order` (sorted by length) into consecutive batches with rows * longest row <= batch_tokens."""
    batches, batch, longest = [], [], 0
    for i in order:
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > batch_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        batches.append(batch)
    return batches


def plan_epoch(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices); tasks mix because the shuffle ignores them."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), SORT_WINDOW):
        window = sorted(order[i:i + SORT_WINDOW], key=lambda j: lengths[j])
        batches += cut_batches(window, lengths, batch_tokens)
    rng.shuffle(batches)
    return batches


def plan_steps(lengths: list[int], tc, group: int) -> tuple[list[list[list[int]]], list[float]]:
    """Every optimizer step of the run, each `group` = world_size * grad_accum micro-batches, and the fractional
    epoch each step ends. An epoch's leftover micro-batches are skipped (different ones each epoch)."""
    steps, ends, epoch = [], [], 0
    while (len(steps) < tc.max_steps) if tc.max_steps is not None else (epoch < tc.epochs):
        batches = plan_epoch(lengths, tc.batch_tokens, tc.seed, epoch)
        if len(batches) < group:
            raise ValueError(f"an epoch has {len(batches)} micro-batches, fewer than world_size * grad_accum = "
                             f"{group}: lower batch_tokens or grad_accum")
        n = len(batches) // group
        steps += [batches[i * group:(i + 1) * group] for i in range(n)]
        ends += [epoch + (i + 1) / n for i in range(n)]
        epoch += 1
    if tc.max_steps is not None:
        steps, ends = steps[:tc.max_steps], ends[:tc.max_steps]
    return steps, ends


@dataclass
class Plan:
    """A run's data: the usable examples, their lengths and answer-token counts, every step's micro-batches
    (and the fractional epoch each ends), and the usable held-out examples (None without any)."""
    examples: list[dict]
    lengths: list[int]
    targets: list[int]
    steps: list[list[list[int]]]
    epoch_ends: list[float]
    group: int  # micro-batches per step: world_size * grad_accum
    eval_examples: list[dict] | None

    @classmethod
    def make(cls, examples: list[dict], eval_examples: list[dict] | None, tc, world: int, log) -> "Plan":
        examples = usable(examples, tc.max_len, "train", log)
        eval_examples = usable(eval_examples, tc.max_len, "eval", log) if eval_examples else None
        lengths, targets = [len(e["input_ids"]) for e in examples], [n_targets(e) for e in examples]
        if max(lengths) > tc.batch_tokens:
            log(f"note: examples up to {max(lengths)} tokens exceed batch_tokens={tc.batch_tokens}; they go alone")
        group = world * tc.grad_accum
        return cls(examples, lengths, targets, *plan_steps(lengths, tc, group), group, eval_examples)

    def answer_tokens(self, micro: list[list[int]]) -> int:
        return sum(self.targets[i] for b in micro for i in b)

    def meta(self, tc, full: bool) -> dict:
        """What a checkpoint must agree with to be resumed."""
        return {"examples": len(self.examples), "tokens": sum(self.lengths), "answer_tokens": sum(self.targets),
                "seed": tc.seed, "batch_tokens": tc.batch_tokens, "world_x_accum": self.group,
                "steps": len(self.steps), "full": full}


def collate(examples: list[dict], idx: list[int], device):
    """Right-pad a micro-batch: (tokens, labels, positions, mask), tokens and labels (B, T), padding labelled
    IGNORE. Padding comes after every real token, so plain causal attention is exact: positions and mask are
    None, unless a row is packed (packing.py): then its own positions and the block mask between records."""
    T = max(len(examples[i]["input_ids"]) for i in idx)
    tokens = torch.zeros(len(idx), T, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    positions = torch.arange(T).repeat(len(idx), 1)
    segments = torch.full((len(idx), T), -1, dtype=torch.long)
    for b, i in enumerate(idx):
        n = len(examples[i]["input_ids"])
        tokens[b, :n] = torch.tensor(examples[i]["input_ids"])
        labels[b, :n] = torch.tensor(examples[i]["labels"])
        positions[b, :n] = torch.tensor(examples[i].get("positions", range(n)))
        segments[b, :n] = torch.tensor(examples[i].get("segments", [0] * n))
    if not any("segments" in examples[i] for i in idx):
        return tokens.to(device), labels.to(device), None, None
    return tokens.to(device), labels.to(device), positions.to(device), block_mask(segments).to(device)
