"""Batched, KV-cached generation: what turns every MCP step's prompts into answers.

ROUTE's workload is prefill-bound: thousands of prompts of 0.5-4k tokens (schema + sample rows + question)
with answers of 30-60 tokens. Three ideas keep it fast:

1. Shared-prefix reuse. A prompt may come in parts, e.g. (system + schema, task instructions, question).
   Every cut is a cache point: prompts about the same database share their first part, those of the same
   task share the second, so those keys/values are computed once (each level extending the one before),
   kept in a PrefixCache across calls, and copied into each row's cache; only the short rest is prefilled.
2. Length-bucketed batches under a token budget: prompts are sorted by (prefix, length) and packed while
   batch * (longest prefix + longest rest + max_new_tokens) stays within `batch_tokens`.
3. A static cache per batch with a validity mask. Row b's cache is [its prefix][holes][its rest, right-
   aligned], so every row's next token lands in the same slot and one decode step serves the whole batch;
   holes are masked out. Finished rows are dropped from the batch so they stop costing compute.

On CUDA the decode step is a CUDA graph (GraphedDecode): recorded once per batch, replayed per token.
"""
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .model import KVCache, Transformer


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


class PrefixCache:
    """Keys/values of shared prompt prefixes, least-recently-used first out past `max_bytes`.

    A prefix is a tuple of token-id tuples (its levels); computing one extends the cached entry of its
    parent level, so a database's schema is run once for all the tasks whose instructions follow it.
    """

    def __init__(self, max_bytes: int = 4 << 30):
        self.max_bytes, self.entries, self.hits = max_bytes, OrderedDict(), 0

    def get(self, model: Transformer, levels: tuple[tuple[int, ...], ...], stats: Stats) -> KVCache:
        if levels in self.entries:
            self.entries.move_to_end(levels)
            self.hits += 1
            return self.entries[levels]
        parent = self.get(model, levels[:-1], stats) if len(levels) > 1 else None
        n = parent.valid.shape[1] if parent is not None else 0
        new = levels[-1]
        p = next(model.parameters())
        kv = KVCache(model.config, 1, n + len(new), p.dtype, p.device)
        kv.valid[:] = True
        if parent is not None:
            for layer in range(len(kv.k)):
                kv.k[layer][:, :, :n] = parent.k[layer]
                kv.v[layer][:, :, :n] = parent.v[layer]
        tokens = torch.tensor([new], device=p.device)
        # the first level needs no mask (plain causal attention, the faster kernel); later ones see their parent
        mask = attention_mask(kv.valid, n, len(new)) if n else None
        model(tokens, mask=mask, cache=kv, start=n, logits_for=slice(0, 0))
        stats.prefilled += len(new)
        self.entries[levels] = kv
        while len(self.entries) > 1 and sum(_nbytes(e) for e in self.entries.values()) > self.max_bytes:
            self.entries.popitem(last=False)
        return kv


def _nbytes(kv: KVCache) -> int:
    return sum(t.numel() * t.element_size() for t in kv.k + kv.v)


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
        # max().indices, not argmax(): the same first-maximum index, but torch's CPU argmax over a 150k bf16
        # vocabulary is ~5x slower (4 ms of a 46 ms batch-16 decode step here)
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:  # nucleus: keep the smallest set of top tokens whose mass reaches top_p
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p
        probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class GraphedDecode:
    """CUDA: one decode step recorded as a CUDA graph for a batch's rows and cache, then replayed per token.

    A decode step of a small model is ~400 small kernels; launched one at a time from Python they take longer
    than the GPU needs to run them (Qwen2.5-0.5B: the weights are read in ~0.4 ms on an H100). Replaying a
    recorded graph is one launch. A graph replays fixed addresses, so every step copies its inputs into fixed
    buffers, the cache slot is a tensor, and attention runs over the whole cache (unwritten slots masked).
    Recording costs about two eager steps; a batch is re-recorded when finished rows are dropped from it.
    """

    def __init__(self, model: Transformer, cache: KVCache, tokens, positions, slot: int):
        self.tokens, self.positions = tokens[:, None].clone(), positions[:, None].clone()
        self.slot = torch.tensor([slot], device=tokens.device)
        mask = cache.valid[:, None, None, :]  # a view: marking a slot valid also updates the graph's mask

        def step():
            return model(self.tokens, self.positions, mask, cache, start=self.slot)[:, -1]

        side = torch.cuda.Stream()  # warm up (kernel choice, workspaces) off the capture, as torch advises
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # computes this same step: it rewrites only the slot that the graph will write again
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tokens, positions, slot: int) -> torch.Tensor:
        self.tokens.copy_(tokens[:, None])
        self.positions.copy_(positions[:, None])
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits


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


def _cut_at_stop(text: str, stop, keep: bool) -> str:
    """The text up to its first stop string (through it, if keep)."""
    at, s = min((text.find(s), s) for s in stop if s in text)
    return text[:at + len(s)] if keep else text[:at]


@torch.inference_mode()
def generate(model: Transformer, tok, prompts: list, max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop: tuple[str, ...] = (), keep_stop: bool = False,
             batch_tokens: int = 32768, max_batch: int = 64, prefix_cache: PrefixCache | None = None,
             reuse_prefix: bool = True, cuda_graphs: bool = True,
             stats: Stats | None = None, progress: bool = True, desc: str = "generate") -> list[str]:
    """Complete each prompt; returns the completions (special tokens cut, and stop strings unless keep_stop)
    in prompt order.

    A prompt is a string, or a tuple of strings (or token-id lists) whose token ids are concatenated; each
    part but the last is a cache level, and prompts with the same leading parts share their KV cache
    (reuse_prefix=False runs every prompt in full instead: slower, and the same outputs in fp32; in bf16 the
    two orders of computation round differently, which can flip a greedy choice now and then).
    On CUDA, cuda_graphs=True replays each batch's decode step as a CUDA graph (GraphedDecode).
    """
    t0 = time.perf_counter()
    st = Stats(prompts=len(prompts))
    rows = [_Row(i, *_split(ids, reuse_prefix)) for i, ids in enumerate(tok.encode_parts(prompts))]
    st.prompt_tokens = sum(r.n_prefix + len(r.rest) for r in rows)
    cache = prefix_cache if prefix_cache is not None else PrefixCache()
    gen = torch.Generator(next(model.parameters()).device).manual_seed(seed) if temperature > 0 else None

    # Sort by (prefix, length): same-database prompts sit together and padding stays small.
    rows.sort(key=lambda r: (r.prefix, len(r.rest)))
    batches, batch, P, T = [], [], 0, 0  # P, T: the batch's longest prefix and rest
    for r in rows:
        p, t = max(P, r.n_prefix), max(T, len(r.rest))
        if batch and ((len(batch) + 1) * (p + t + max_new_tokens) > batch_tokens or len(batch) == max_batch):
            batches.append(batch)
            batch, p, t = [], r.n_prefix, len(r.rest)
        batch.append(r)
        P, T = p, t
    if batch:
        batches.append(batch)

    bar = tqdm(total=len(rows), desc=desc, disable=not progress, unit="prompt")
    for batch in batches:
        _run_batch(model, tok, batch, cache, max_new_tokens, temperature, top_p, gen, stop, keep_stop, st,
                   cuda_graphs)
        bar.update(len(batch))
        dt = time.perf_counter() - t0
        bar.set_postfix_str(f"{st.prefilled / dt:.0f} prompt + {st.generated / dt:.1f} new tok/s")  # wall time
    bar.close()
    st.batches, st.seconds = len(batches), time.perf_counter() - t0
    if stats is not None:
        stats.add(st)
    return [r.text for r in sorted(rows, key=lambda r: r.index)]


def _run_batch(model, tok, rows: list[_Row], prefix_cache, max_new, temperature, top_p, gen, stop, keep_stop,
               st: Stats, cuda_graphs: bool):
    p = next(model.parameters())
    B = len(rows)
    P = max(r.n_prefix for r in rows)
    T = max(len(r.rest) for r in rows)
    cache = KVCache(model.config, B, P + T + max_new, p.dtype, p.device)

    # Lay out each row: prefix at [0, len(prefix)), rest right-aligned to end at slot P+T.
    tokens = torch.full((B, T), tok.pad_id, dtype=torch.long)
    positions = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(rows):
        n, L = r.n_prefix, len(r.rest)
        if n:
            kv = prefix_cache.get(model, r.prefix, st)
            for layer in range(len(cache.k)):
                cache.k[layer][b, :, :n] = kv.k[layer][0]
                cache.v[layer][b, :, :n] = kv.v[layer][0]
            cache.valid[b, :n] = True
        tokens[b, T - L:] = torch.tensor(r.rest)
        positions[b, T - L:] = torch.arange(n, n + L)  # rotary positions continue right after the prefix
        cache.valid[b, P + T - L:P + T] = True
        st.prefilled += L
    tokens, positions = tokens.to(p.device), positions.to(p.device)
    # Rows of one length with no prefix are plain causal attention: the faster kernel, and no mask to build.
    mask = None if P == 0 and all(len(r.rest) == T for r in rows) else attention_mask(cache.valid, P, T)
    logits = model(tokens, positions, mask, cache, start=P, logits_for=slice(-1, None))[:, -1]

    eos = torch.tensor(tok.eos_ids, device=p.device)
    next_pos = positions[:, -1] + 1
    slot = P + T
    live = list(range(B))  # live[i] = which row of `rows` cache row i holds
    done_in_cache = []      # rows finished but still in the cache (dropped in bulk: a drop copies the cache)
    graph = None            # CUDA: this batch's recorded decode step
    tail = max((len(s) for s in stop), default=0) + 4  # tokens to decode when looking for stop strings
    for step in range(max_new):
        nxt = sample(logits, temperature, top_p, gen)
        is_eos = torch.isin(nxt, eos).tolist()
        for i, token in enumerate(nxt.tolist()):
            r = rows[live[i]]
            if r.text is not None:
                continue
            if is_eos[i]:
                r.text = tok.decode(r.out)
            else:
                r.out.append(token)
                st.generated += 1
                if stop and any(s in tok.decode(r.out[-tail:]) for s in stop):
                    r.text = _cut_at_stop(tok.decode(r.out), stop, keep_stop)
                elif step == max_new - 1:
                    r.text = tok.decode(r.out)
            if r.text is not None:
                done_in_cache.append(i)
        if len(done_in_cache) == len(live) or step == max_new - 1:
            break
        if 4 * len(done_in_cache) >= len(live):  # drop finished rows once they are a quarter of the batch
            done = set(done_in_cache)
            keep = [i for i in range(len(live)) if i not in done]
            idx = torch.tensor(keep, device=p.device)
            cache.keep_rows(idx)
            live, nxt, next_pos = [live[i] for i in keep], nxt[idx], next_pos[idx]
            done_in_cache, graph = [], None  # the graph recorded the old cache: record anew
        cache.valid[:, slot] = True
        if p.device.type == "cuda" and cuda_graphs:
            graph = graph or GraphedDecode(model, cache, nxt, next_pos, slot)
            logits = graph(nxt, next_pos, slot)
        else:
            logits = model(nxt[:, None], next_pos[:, None], cache.valid[:, None, None, :slot + 1], cache,
                           start=slot)[:, -1]
        next_pos, slot = next_pos + 1, slot + 1
