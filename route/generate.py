"""Batched, KV-cached generation: what turns every MCP step's prompts into answers. ROUTE's workload is
prefill-bound (thousands of prompts of 0.5-4k tokens: schema + sample rows + question; answers of 30-60 tokens).
Three ideas keep it fast:

1. Shared-prefix reuse. A prompt may come in parts, e.g. (system + schema, task instructions, question); each
   cut is a cache level (same database: same first part; same task: same second), computed once by extending
   the level before, kept in a PrefixCache across calls, copied into each row's cache: only the rest is prefilled.
2. Length-bucketed batches: prompts sorted by (prefix, length), packed while
   batch * (longest prefix + longest rest + max_new_tokens) stays within `batch_tokens`.
3. A static cache per batch with a validity mask. Row b's cache is [its prefix][holes][its rest, right-aligned],
   so every row's next token lands in the same slot and one decode step serves the whole batch. Finished rows
   are dropped so they stop costing compute.

Reading order: generate() -> _plan_batches -> _run_batch: _prefill (lay the batch out, run the prompts), then
per step: sample, _finish_rows, drop finished rows, one decode step.
"""
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .model import KVCache, Transformer, pack_linears


def load_for_inference(model: str | Path | None = None, dtype="auto", device: str | None = None,
                       adapter: str | Path | None = None, quant: str | None = None):
    """(model, tokenizer) ready to generate: the model resolved (None: the default one, fetched on first use),
    loaded, a LoRA adapter merged in (no separate LoRA matmuls), and its CPU bf16 weights packed (pack_linears),
    or its linear layers quantized: quant "int8" / "int4" (route/quant.py; None or "none": not).
    dtype "auto": bf16 where the hardware multiplies it fast, else fp32 (a CPU without AVX512-BF16 or AMX
    emulates bf16, about 5x slower than fp32 on an AVX2 core)."""
    from . import hub
    from .hardware import compute_dtype
    from .tokenizer import Tokenizer
    from .weights import load_model

    path = hub.resolve_model(model)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    lm = load_model(path, dtype=compute_dtype("auto", device) if dtype == "auto" else dtype, device=device)
    if adapter is not None:
        from .lora import load_adapter, merge_lora
        merge_lora(load_adapter(lm, adapter))
    if quant not in (None, "none"):
        from .quant import quantize
        quantize(lm, quant)
    pack_linears(lm)
    return lm, Tokenizer.from_dir(path)


@dataclass
class Stats:
    """What a generate() call did; filled in place so callers can report time per step."""
    prompts: int = 0
    prompt_tokens: int = 0   # tokens in all prompts
    prefilled: int = 0       # tokens actually run through the model (prompt tokens minus reused prefixes)
    generated: int = 0
    seconds: float = 0.0
    batches: int = 0

    def add(self, other: "Stats"):
        for k, v in vars(other).items():
            setattr(self, k, getattr(self, k) + v)


@dataclass
class Sampling:
    """How the next token is chosen and when a row ends."""
    max_new: int = 256                 # tokens per row at most
    temperature: float = 0.0           # 0: greedy
    top_p: float = 1.0                 # nucleus sampling: the smallest set of top tokens with this much mass
    generator: torch.Generator | None = None  # seeded, when sampling
    stop: tuple[str, ...] = ()         # a row ends at the first of these in its text...
    keep_stop: bool = False            # ...which its text then keeps (NC's verdicts) or loses


def _last_logits(model: Transformer, tokens, *args, **kw) -> torch.Tensor:
    """Logits (B, V) of each row's last new token: the head runs on no other position."""
    return model.head(model.hidden(tokens, *args, **kw)[:, -1:])[:, -1]


class PrefixCache:
    """Keys/values of shared prompt prefixes, least-recently-used first out past `max_bytes`. A prefix is a tuple
    of token-id tuples (its levels); each level is run as a one-row batch whose prefix is its parent level, so a
    database's schema is run once for all the tasks whose instructions follow it."""

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes, self.entries = max_bytes, OrderedDict()

    def get(self, model: Transformer, levels: tuple[tuple[int, ...], ...], stats: Stats) -> KVCache:
        if levels not in self.entries:
            self.entries[levels] = _prefill(model, [_Row(0, levels[:-1], list(levels[-1]))], self, 0, stats)[0]
            while len(self.entries) > 1 and sum(_nbytes(e) for e in self.entries.values()) > self.max_bytes:
                self.entries.popitem(last=False)
        self.entries.move_to_end(levels)
        return self.entries[levels]


def _nbytes(kv: KVCache) -> int:
    return sum(t.nbytes for t in kv.k + kv.v)


def attention_mask(valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """(B, S) slot validity -> (B, 1, T, start+T) mask for T new tokens written at slots [start, start+T)."""
    S = start + T
    slots = torch.arange(S, device=valid.device)
    query_slots = slots[start:, None]  # (T, 1)
    mask = valid[:, None, :S] & (slots <= query_slots)  # causal in slot order, holes masked
    # A padding query would see no valid key at all, and a fully masked softmax row is NaN; letting every
    # query see its own slot keeps padding rows finite (their outputs are never read).
    mask |= slots == query_slots
    return mask[:, None]


def sample(logits: torch.Tensor, temperature: float, top_p: float, gen: torch.Generator | None):
    """logits (B, vocab) -> token ids (B,). temperature 0 is greedy."""
    if temperature <= 0:
        # max().indices, not argmax(): the same first maximum, but CPU argmax over 150k bf16 logits is slower (README)
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of top tokens whose mass reaches top_p
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


@dataclass
class _Row:
    index: int                             # position in the caller's list
    prefix: tuple[tuple[int, ...], ...]    # cacheable levels
    rest: list[int]
    out: list[int] = field(default_factory=list)
    text: str | None = None                # set when finished

    @property
    def n_prefix(self) -> int:
        return sum(map(len, self.prefix))


def _split(ids: list[list[int]], reuse: bool) -> tuple[tuple[tuple[int, ...], ...], list[int]]:
    """A prompt's per-part ids (Tokenizer.encode_parts) -> (cacheable levels, the rest to prefill)."""
    levels = tuple(tuple(x) for x in ids[:-1] if x)
    rest = ids[-1]
    if not reuse or not rest:  # (with no rest the prompt runs in full: its last token must yield logits)
        return (), [t for level in levels for t in level] + rest
    return levels, rest


@torch.inference_mode()
def generate(model: Transformer, tok, prompts: list, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (), keep_stop: bool = False,
             batch_tokens: int = 32768, max_batch: int = 64, prefix_cache: PrefixCache | None = None,
             reuse_prefix: bool = True,
             stats: Stats | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
    """Complete each prompt; returns the completions (special tokens cut, and stop strings unless keep_stop)
    in prompt order. A prompt is a string, or a tuple of strings (or token-id lists) whose token ids are
    concatenated; each part but the last is a cache level, and prompts with the same leading parts share their KV
    cache (reuse_prefix=False runs every prompt in full: slower, and the same outputs in fp32; in bf16 the two
    orders of computation round differently, which can flip a greedy choice now and then)."""
    t0 = time.perf_counter()
    device = next(model.parameters()).device
    gen = torch.Generator(device).manual_seed(seed) if temperature > 0 else None
    sampling = Sampling(max_new_tokens, temperature, top_p, gen, tuple(stop), keep_stop)
    st = Stats(prompts=len(prompts))
    rows = [_Row(i, *_split(ids, reuse_prefix)) for i, ids in enumerate(tok.encode_parts(prompts))]
    st.prompt_tokens = sum(r.n_prefix + len(r.rest) for r in rows)
    cache = prefix_cache if prefix_cache is not None else PrefixCache()
    batches = _plan_batches(rows, max_new_tokens, batch_tokens, max_batch)
    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="prompt", leave=False)
    for batch in batches:
        _run_batch(model, tok, batch, cache, sampling, st)
        bar.update(len(batch))
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{st.prefilled / dt:.0f} prompt + {st.generated / dt:.1f} new tok/s")  # wall time
    bar.close()
    st.batches, st.seconds = len(batches), time.perf_counter() - t0
    if stats is not None:
        stats.add(st)
    return [r.text for r in sorted(rows, key=lambda r: r.index)]


def _plan_batches(rows: list[_Row], max_new: int, batch_tokens: int, max_batch: int) -> list[list[_Row]]:
    """Sort by (prefix, length), so that same-database prompts sit together and padding stays small, and cut
    into batches whose rows * (longest prefix + longest rest + max_new) stays within batch_tokens."""
    rows.sort(key=lambda r: (r.prefix, len(r.rest)))
    batches, batch, P, T = [], [], 0, 0  # P, T: the batch's longest prefix and rest
    for r in rows:
        p, t = max(P, r.n_prefix), max(T, len(r.rest))
        if batch and ((len(batch) + 1) * (p + t + max_new) > batch_tokens or len(batch) == max_batch):
            batches.append(batch)
            batch, p, t = [], r.n_prefix, len(r.rest)
        batch.append(r)
        P, T = p, t
    return batches + [batch] if batch else batches


def _run_batch(model, tok, rows: list[_Row], prefix_cache: PrefixCache, s: Sampling, st: Stats):
    """Prefill the batch, then decode a token per step for every live row until all rows are finished."""
    cache, logits, positions, slot = _prefill(model, rows, prefix_cache, s.max_new, st, tok.pad_id)
    live = list(range(len(rows)))  # live[i] = which row of `rows` cache row i holds
    finished = []  # cache rows whose row is done but still in the cache (dropped in bulk: a drop copies it)
    for step in range(s.max_new):
        tokens = sample(logits, s.temperature, s.top_p, s.generator)
        finished += _finish_rows(tok, [rows[i] for i in live], tokens.tolist(), s, step == s.max_new - 1, st)
        if len(finished) == len(live) or step == s.max_new - 1:
            return
        if 4 * len(finished) >= len(live):  # drop finished rows once they are a quarter of the batch
            live, tokens, positions = _compact(cache, live, finished, tokens, positions)
            finished = []
        cache.valid[:, slot] = True
        logits = _last_logits(model, tokens[:, None], positions[:, None], cache.valid[:, None, None, :slot + 1],
                              cache, start=slot)
        positions, slot = positions + 1, slot + 1


def _prefill(model, rows: list[_Row], prefix_cache: PrefixCache, max_new: int, st: Stats, pad_id: int = 0):
    """Lay the batch out in a new cache and run the rows' own tokens: each row's prefix (copied from the
    prefix cache) at [0, n_prefix), its rest right-aligned to end at slot P+T, so every row's next token
    lands in slot P+T. Returns (cache, last logits (B, V), next positions (B,), next slot)."""
    p = next(model.parameters())
    B, P, T = len(rows), max(r.n_prefix for r in rows), max(len(r.rest) for r in rows)
    cache = KVCache(model.config, B, P + T + max_new, p.dtype, p.device)
    tokens = torch.full((B, T), pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n, L = r.n_prefix, len(r.rest)
        if n:
            prefix = prefix_cache.get(model, r.prefix, st)  # one row, n slots
            for layer in range(len(cache.k)):
                cache.k[layer][b, :, :n] = prefix.k[layer][0]
                cache.v[layer][b, :, :n] = prefix.v[layer][0]
            cache.valid[b, :n] = True
        tokens[b, T - L:] = torch.tensor(r.rest)
        positions[b, T - L:] = torch.arange(n, n + L)  # rotary positions continue right after the prefix
        cache.valid[b, P + T - L:P + T] = True
        st.prefilled += L
    tokens, positions = tokens.to(p.device), positions.to(p.device)
    # Rows of one length with no prefix are plain causal attention: the faster kernel, and no mask to build.
    mask = None if P == 0 and all(len(r.rest) == T for r in rows) else attention_mask(cache.valid, P, T)
    logits = _last_logits(model, tokens, positions, mask, cache, start=P)
    return cache, logits, positions[:, -1] + 1, P + T


def _compact(cache: KVCache, live: list[int], finished: list[int], tokens, positions):
    """Drop the finished rows from the cache and the step's inputs, so they stop costing compute."""
    done = set(finished)
    kept = [i for i in range(len(live)) if i not in done]
    idx = torch.tensor(kept, device=tokens.device)
    cache.keep_rows(idx)
    return [live[i] for i in kept], tokens[idx], positions[idx]


def _finish_rows(tok, rows: list[_Row], tokens: list[int], s: Sampling, last_step: bool, st: Stats) -> list[int]:
    """Give each unfinished row its new token; returns the indices of the rows that finish with it: at an
    end-of-sequence token (not kept), a stop string, or the last step."""
    finished = []
    tail = max(map(len, s.stop), default=0) + 4  # how many last tokens to decode when looking for a stop string
    for i, (r, token) in enumerate(zip(rows, tokens)):
        if r.text is not None:
            continue
        if token in tok.eos_ids:
            r.text = tok.decode(r.out)
        else:
            r.out.append(token)
            st.generated += 1
            if s.stop and any(x in tok.decode(r.out[-tail:]) for x in s.stop):
                text = tok.decode(r.out)
                at, x = min((text.find(x), x) for x in s.stop if x in text)  # the earliest stop string
                r.text = text[:at + len(x)] if s.keep_stop else text[:at]
            elif last_step:
                r.text = tok.decode(r.out)
        if r.text is not None:
            finished.append(i)
    return finished
