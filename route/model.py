"""The decoder-only transformer behind every ROUTE task: Qwen2/Qwen2.5 and Llama (2, 3, SmolLM2).

In the spirit of gpt-fast: RMSNorm, rotary embeddings, grouped-query attention through
F.scaled_dot_product_attention over an optional KV cache, and a SwiGLU MLP. Parameter names are Hugging Face's
(`model.layers.0.self_attn.q_proj.weight`) so weights load by name, LoRA adapters get PEFT's key names, and a
fine-tuned model saves back in the same format. The model is pure math: the caller (generate.py, trainer.py) says
where new tokens go in the cache and which cache slots they may see.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2 has biases on q/k/v (not o); Llama has `attention_bias` on all four
    o_bias: bool
    mlp_bias: bool
    rope_scaling: dict | None = None

    @classmethod
    def from_hf(cls, hf: dict, source: str = "config.json") -> "ModelConfig":
        """Build from a Hugging Face `config.json` dict; unknown families and missing fields are errors."""
        mt = hf.get("model_type")
        if mt not in ("qwen2", "llama"):
            raise ValueError(f"{source}: unsupported model_type {mt!r} (supported: 'qwen2', 'llama')")

        def need(key):
            if key not in hf:
                raise ValueError(f"{source}: missing field {key!r} for model_type {mt!r}")
            return hf[key]

        n_heads, hidden = need("num_attention_heads"), need("hidden_size")
        bias = bool(hf.get("attention_bias", False))
        # transformers<5 writes rope_theta + rope_scaling; transformers>=5 folds both into rope_parameters
        scaling = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        theta = scaling.get("rope_theta", hf.get("rope_theta", 10000.0))
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in ("default", "llama3"):
            raise ValueError(f"{source}: rope type {kind!r} is not supported (only 'default' and 'llama3')")
        return cls(model_type=mt, vocab_size=need("vocab_size"), hidden_size=hidden,
                   intermediate_size=need("intermediate_size"), num_hidden_layers=need("num_hidden_layers"),
                   num_attention_heads=n_heads, num_key_value_heads=hf.get("num_key_value_heads") or n_heads,
                   head_dim=hf.get("head_dim") or hidden // n_heads, rms_norm_eps=need("rms_norm_eps"),
                   rope_theta=float(theta), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
                   qkv_bias=True if mt == "qwen2" else bias, o_bias=False if mt == "qwen2" else bias,
                   mlp_bias=bool(hf.get("mlp_bias", False)), rope_scaling=scaling if kind == "llama3" else None)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()  # normalise in fp32 (as the reference implementations do), scale in the weight's dtype
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """Inverse frequencies theta^(-2i/d), with Llama-3's long-context rescaling when configured."""
    d = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s:  # llama3: slow down low frequencies by `factor`, keep high ones, blend smoothly in between
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = ((old_len / wavelen) - lo) / (hi - lo)
        blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        inv_freq = torch.where(wavelen > old_len / lo, inv_freq / factor,
                               torch.where(wavelen < old_len / hi, inv_freq, blended))
    return inv_freq.float()


def rotate(x, cos, sin):
    # HF's "rotate half" convention: dimension i pairs with i + d/2 (not with i+1 as in the original paper).
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """A static, preallocated cache: per layer, keys and values (B, kv_heads, S, D); `valid[b, s]`: slot s of row b
    holds a real token. Rows may have holes (left padding, the gap between a shared prefix and a row's own suffix):
    attention masks them out, so any layout works as long as each row's tokens sit in slot order."""

    def __init__(self, cfg: ModelConfig, batch: int, slots: int, dtype, device):
        shape = (batch, cfg.num_key_value_heads, slots, cfg.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]
        self.valid = torch.zeros(batch, slots, dtype=torch.bool, device=device)

    def update(self, layer: int, k, v, start: int):
        """Store T new keys/values at slots [start, start+T); return those of [0, start+T), attended over."""
        T = k.shape[2]
        self.k[layer][:, :, start:start + T] = k
        self.v[layer][:, :, start:start + T] = v
        return self.k[layer][:, :, :start + T], self.v[layer][:, :, :start + T]

    def keep_rows(self, rows: torch.Tensor):
        """Drop finished rows so they stop costing compute (called rarely: it copies the cache)."""
        self.k = [t.index_select(0, rows) for t in self.k]
        self.v = [t.index_select(0, rows) for t in self.v]
        self.valid = self.valid.index_select(0, rows)


class Attention(nn.Module):
    """Grouped-query attention. Shapes, as in the comments below:

        B  batch rows              T  new tokens per row       S  key/value slots attended over
        H  query heads             K  key/value heads (H = K * rep: `rep` query heads share one kv head)
        D  head dim                C  hidden size (H * D for the models here)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, layer: int, start: int):
        B, T, _ = x.shape  # x: (B, T, C)
        q = self.q_proj(x).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, K, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v, start)  # (B, K, S, D)
        if mask is None:  # plain causal attention over these T tokens; each kv head serves `rep` query heads
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        else:
            # GQA by folding: the `rep` query heads that share a kv head become rep*T query rows of that one
            # head, (B, H, T, D) -> (B, K, rep*T, D), so each key/value is read once per kv head; for decoding
            # (T=1) this is much faster on CPU than enable_gqa (README). The mask is repeated to match.
            rep, S = self.n_heads // self.n_kv, k.shape[2]
            q = q.reshape(B, self.n_kv, rep * T, self.hd)
            mask = mask[:, :, None].expand(B, 1, rep, T, S).reshape(B, 1, rep * T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).view(B, self.n_heads, T, self.hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, *attention_args):
        x = x + self.self_attn(self.input_layernorm(x), *attention_args)
        return x + self.mlp(self.post_attention_layernorm(x))


IGNORE = -100  # a target that is not scored (F.cross_entropy's ignore_index)


class Transformer(nn.Module):
    """One contract per mode, each with a fixed return type:

        hidden(tokens, ...) -> (B, T, C)   the residual stream after the last block (before the final norm)
        head(h)             -> (..., V)    final norm + output projection of chosen positions' hidden states
        logits(tokens, ...) -> (B, T, V)   head(hidden(...)) at every position
        loss(tokens, targets, ...) -> ()   summed cross-entropy over the scored targets, in fp32
        forward             logits(...), or loss(...) given targets: the one call a DDP/FSDP wrapper passes on
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.ModuleDict(dict(  # the body, `model.*` in HF checkpoints
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),
            layers=nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)))
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_frequencies(cfg), persistent=False)
        self.checkpointing = False  # activation checkpointing, switched on by the trainer

    def hidden(self, tokens, positions=None, mask=None, cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """tokens (B, T) -> hidden states (B, T, C). positions (B, T): rotary positions; default start..start+T-1.
        mask (B, 1, T, S) bool: which key/value slots each new token may attend to. None: plain causal
            attention over these T tokens, for a sequence that starts at slot 0 (training, a first prefill).
        cache, start: keep the new keys/values at cache slots [start, start+T) and attend over [0, start+T).
        """
        B, T = tokens.shape
        if mask is None and start:
            raise ValueError("mask=None is causal attention from slot 0; tokens written later need a mask")
        if positions is None:
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        angles = positions[..., None].float() * self.inv_freq  # (B, T, D/2), in fp32 for long contexts
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D): broadcast over heads
        x = self.model.embed_tokens(tokens)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for i, block in enumerate(self.model.layers):
            if self.checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, mask, cache, i, start, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache, i, start)
        return x

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states (..., C) -> logits (..., V). Over a 150k vocabulary this is the biggest matmul: callers
        pass only the positions they read (generation: each row's last)."""
        return self.lm_head(self.model.norm(h))

    def logits(self, tokens, positions=None, mask=None, cache: KVCache | None = None, start: int = 0):
        return self.head(self.hidden(tokens, positions, mask, cache, start))

    def loss(self, tokens, targets, positions=None, mask=None) -> torch.Tensor:
        """Summed cross-entropy of the positions whose target (B, T) is not IGNORE; the head runs on those
        positions only. In chunks, each recomputed in backward: the fp32 logits of N scored tokens over a 150k
        vocabulary take N x 0.6 MB (times ~3 with their gradients), but only one chunk's are ever alive."""
        keep = targets != IGNORE
        x, targets = self.model.norm(self.hidden(tokens, positions, mask)[keep]), targets[keep]
        loss = x.new_zeros((), dtype=torch.float32)
        for i in range(0, len(x), 1024):
            loss = loss + checkpoint(self._head_loss, x[i:i + 1024], targets[i:i + 1024], use_reentrant=False)
        return loss

    def _head_loss(self, x, targets):
        return F.cross_entropy(self.lm_head(x).float(), targets, reduction="sum")

    def forward(self, tokens, positions=None, mask=None, targets=None) -> torch.Tensor:
        return self.logits(tokens, positions, mask) if targets is None else self.loss(tokens, targets, positions, mask)


class PackedLinear(nn.Module):
    """Inference-only stand-in for nn.Linear on CPU, its bf16 weight laid out once for oneDNN's GEMM. A plain bf16
    F.linear re-blocks the weight on every call, at decode sizes about as costly as the matmul (README: a third of
    Qwen2.5-0.5B's decode time); torch.compile with freezing packs too, after a minute of compilation. Uses torch's
    internal mkldnn ops, hence `pack_linears` checks them."""

    def __init__(self, linear):
        super().__init__()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 16)  # 16: batch-size hint
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")


def pack_linears(model: nn.Module) -> int:
    """Swap the bf16 CPU linear layers of an inference model (plain nn.Linear, and merged LoRA layers) for
    PackedLinear; returns how many. A no-op where torch or the CPU lacks them (other builds, GPUs, AVX2-only CPUs):
    correct, just slower."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return 0
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            plain = type(child) is nn.Linear or getattr(child, "merged", False)  # (a merged LoRALinear)
            if plain and child.weight.device.type == "cpu" and child.weight.dtype == torch.bfloat16:
                try:
                    setattr(module, name, PackedLinear(child))
                except RuntimeError:  # oneDNN's bf16 layout needs AVX512 or AVX-NE-CONVERT: keep plain F.linear
                    return n
                n += 1
    return n
