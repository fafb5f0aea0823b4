"""GGUF file -> Hugging Face-format model directory.

    python -m route.convert model.gguf out_dir [--dtype bf16|fp32]

A GGUF (llama.cpp's format) holds quantized weights and, as metadata, the config and the tokenizer; we write
them as HF files, plus provenance.json and README.md saying where they came from. Dequantization is the `gguf`
package's (llama.cpp's reference reader): the result is exactly the quantized model widened to bf16 or fp32, not
the original full-precision weights. Only qwen2 and llama with byte-level BPE tokenizers are accepted (Llama's
q/k rows are unpermuted); anything else is refused with the file and the reason.
"""
import argparse
import json
import math
import re
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGUFReader, LlamaFileType
from gguf.quants import dequantize
from safetensors.torch import save_file
from tqdm import tqdm

from .cli import run
from .files import atomic_dir, sha256_file
from .weights import as_dtype

ARCHITECTURES = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}

# GGUF tensor names -> HF names ("blk.N." becomes "model.layers.N.")
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm", "attn_q": "self_attn.q_proj",
               "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

# Split regexes of the byte-level BPE pre-tokenizers we know, by `tokenizer.ggml.pre` (from the models'
# own tokenizer.json files; llama.cpp's llama-vocab.cpp has the same table).
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = {"qwen2": "qwen2", "llama-bpe": "llama3", "llama3": "llama3", "smollm": "smollm", "gpt2": "gpt2"}

# Control tokens that end a turn; llama.cpp stops on these too, whatever `eos_token_id` says.
END_OF_GENERATION = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|end|>",
                     "<end_of_turn>")
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # llama.cpp's token types (1 normal, 5 unused, 6 byte)

# Two stored copies of the embedding closer than this (relative Frobenius distance) are one tied matrix
# quantized twice; separately trained matrices are ~100% apart.
TIE_TOLERANCE = 0.2


class ConversionError(ValueError):
    pass


def _f32(x) -> float:
    # GGUF stores floats as float32: print the shortest decimal that round-trips (1e-06, not 9.99999997e-07)
    return float(str(np.float32(x)))


def hf_name(gguf_name: str, source) -> str:
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m[2] in LAYER_NAMES:
        return f"model.layers.{m[1]}.{LAYER_NAMES[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", gguf_name)
    if m and m[1] in GLOBAL_NAMES:
        return f"{GLOBAL_NAMES[m[1]]}.{m[2]}"
    raise ConversionError(f"{source}: tensor {gguf_name!r} has no Hugging Face counterpart known to this converter")


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: within each head it interleaves the two rotary halves (x0 y0 x1 y1 ...)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_scaling(factors: np.ndarray, theta: float, head_dim: int, original: int, source) -> dict:
    """Recover Llama-3.1's rope_scaling from the per-frequency divisors llama.cpp stores as `rope_freqs`. HF's
    formula keeps high frequencies, divides low ones by `factor` (the largest divisor) and blends in between,
    linearly in 1/wavelength: the blend's line gives low/high_freq_factor. Only original/low and original/high
    matter, so `original` is a free choice (8192, Llama-3.1's, by default)."""
    factors = factors.astype(np.float64)
    factor = float(factors.max())
    x = original * (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)) / (2 * math.pi)  # original/wavelen
    mid = (factors > 1 + 1e-4) & (factors < factor - 1e-4)
    if mid.sum() >= 2:  # smooth = (x - low) / (high - low): fit the line
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(x[mid], smooth, 1)
        low, high = -intercept / slope, (1 - intercept) / slope  # where smooth is 0 and 1
    else:  # too few points to fit: Llama-3.1's values, checked below like any fit
        low, high = 1.0, 4.0
    scaling = {"rope_type": "llama3", "factor": round(factor, 4), "low_freq_factor": round(float(low), 4),
               "high_freq_factor": round(float(high), 4), "original_max_position_embeddings": original}
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]  # checked as rounded
    smooth = np.clip((x - low) / (high - low), 0, 1)
    rebuilt = 1 / ((1 - smooth) / scaling["factor"] + smooth)
    if not np.allclose(rebuilt, factors, rtol=1e-3):
        raise ConversionError(f"{source}: rope_freqs is not a Llama-3 rope scaling this converter can express")
    return scaling


def model_config(meta: dict, tensors: dict, source) -> dict:
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ConversionError(f"{source}: metadata {arch}.{key} is missing")
        return value

    hidden, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ConversionError(f"{source}: per-layer head counts are not supported")
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // n_heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise ConversionError(f"{source}: partial rotary embeddings are not supported")
    theta = _f32(get("rope.freq_base", 10000.0))
    vocab = int(tensors["token_embd.weight"].shape[-1])  # the matrix is the truth, not the token list
    config = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "hidden_size": hidden,
              "intermediate_size": int(get("feed_forward_length")), "num_hidden_layers": int(get("block_count")),
              "num_attention_heads": n_heads, "num_key_value_heads": int(n_kv), "hidden_act": "silu",
              "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")), "rope_theta": theta,
              "rope_scaling": None, "max_position_embeddings": int(get("context_length")), "vocab_size": vocab,
              "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
              "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
              "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True}
    if arch == "qwen2":
        if head_dim != hidden // n_heads:
            config["head_dim"] = head_dim
        config.update(use_sliding_window=False, sliding_window=config["max_position_embeddings"],
                      max_window_layers=config["num_hidden_layers"])
    else:
        config.update(head_dim=head_dim, attention_bias="blk.0.attn_q.bias" in tensors, mlp_bias=False,
                      pretraining_tp=1)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind not in ("none", "llama3"):
        raise ConversionError(f"{source}: rope scaling {kind!r} is not supported (only Llama-3's)")
    if "rope_freqs.weight" in tensors:
        t = tensors["rope_freqs.weight"]
        original = int(meta.get(f"{arch}.rope.scaling.original_context_length", 8192))
        factors = dequantize(t.data, t.tensor_type)
        config["rope_scaling"] = llama3_rope_scaling(factors, theta, head_dim, original, source)
    return config


def token_ids(meta: dict, kind: int) -> list[int]:
    """The ids of one token type; control and user-defined tokens are matched whole in text, never split by BPE."""
    return [i for i, t in enumerate(meta.get("tokenizer.ggml.token_type") or []) if t == kind]


def build_tokenizer(meta: dict, source):
    """A `tokenizers.Tokenizer` equivalent to the model's original tokenizer.json, from GGUF metadata."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ConversionError(f"{source}: tokenizer {kind!r} is not supported (only byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise ConversionError(f"{source}: pre-tokenizer {pre!r} is not supported (known: {sorted(PRE_TOKENIZERS)})")
    style = PRE_TOKENIZERS[pre]
    tokens = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    # Llama-3 looks a whole pre-token up in the vocabulary before merging (llama.cpp does the same)
    bpe = models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=style == "llama3")
    tok = Tokenizer(bpe)
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    if style in ("qwen2", "llama3"):
        split = QWEN2_SPLIT if style == "qwen2" else LLAMA3_SPLIT
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated",
                                                                          invert=False), byte_level])
    elif style == "smollm":  # SmolLM2: every digit on its own, then GPT-2's regex
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()  # as Qwen2's own tokenizer.json (transformers' GGUF reader omits it)
    tok.decoder = decoders.ByteLevel()

    control, user = token_ids(meta, TOKEN_CONTROL), token_ids(meta, TOKEN_USER_DEFINED)
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    bos = meta.get("tokenizer.ggml.bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        b = tokens[bos]
        tok.post_processor = processors.TemplateProcessing(single=f"{b} $A", pair=f"{b} $A {b}:1 $B:1",
                                                           special_tokens=[(b, bos)])
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def tokenizer_files(meta: dict, max_length: int) -> tuple[dict, dict]:
    """(tokenizer_config.json, generation_config.json) contents."""
    tokens = meta["tokenizer.ggml.tokens"]

    def text(key):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if i is not None and i < len(tokens) else None

    control = token_ids(meta, TOKEN_CONTROL)
    eos = meta.get("tokenizer.ggml.eos_token_id")
    ids = [eos, meta.get("tokenizer.ggml.eot_token_id"), meta.get("tokenizer.ggml.eom_token_id")]
    stops = [i for i in ids if i is not None] + [i for i in control if tokens[i] in END_OF_GENERATION]
    stops = list(dict.fromkeys(stops))
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast",  # i.e. "use tokenizer.json as it is"
               "bos_token": text("bos"), "eos_token": text("eos"), "unk_token": text("unknown"),
               "pad_token": text("padding") or text("eos"),
               "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
               "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
               "clean_up_tokenization_spaces": False, "model_max_length": max_length}
    if "tokenizer.chat_template" in meta:
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    # No sampling settings: the GGUF does not carry them, and this project decodes greedily.
    gen_cfg = {"bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
               "eos_token_id": stops if len(stops) > 1 else eos,
               "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos)}
    return tok_cfg, gen_cfg


def convert_tensors(tensors: dict, config: dict, dtype: torch.dtype, source, progress: bool):
    """HF state dict plus notes on what was done: quantization types seen, the tied-embedding decision."""
    unpermute_heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    state, types = {}, {}
    # progress: True for a bar of its own, or a function given each tensor's bytes (route.hub's single bar)
    for t in tqdm(tensors.values(), desc="dequantizing", unit="tensor", disable=not progress or callable(progress),
                  file=sys.stderr):
        if callable(progress):
            progress(int(t.n_bytes))
        if t.name == "rope_freqs.weight":  # folded into config.json's rope_scaling
            continue
        name = hf_name(t.name, source)
        try:
            w = dequantize(t.data, t.tensor_type)
        except NotImplementedError as e:
            raise ConversionError(f"{source}: tensor {t.name!r}: {e}") from None
        kind = t.name.split(".")[-2]
        if config["model_type"] == "llama" and kind in unpermute_heads:
            w = unpermute(w, unpermute_heads[kind])
        # fp32 stays exact; the tied embedding is decided on fp32 values below, so keep both copies fp32 till then
        keep32 = t.name in ("token_embd.weight", "output.weight")
        state[name] = torch.from_numpy(np.array(w, dtype=np.float32)).to(torch.float32 if keep32 else dtype)
        types[t.name] = t.tensor_type.name
    notes = {"tensor_types": {k: sum(v == k for v in types.values()) for k in sorted(set(types.values()))}}

    if "output.weight" in tensors:
        embed, out = state["model.embed_tokens.weight"], state["lm_head.weight"]
        diff = float((embed - out).norm() / out.norm()) if embed.shape == out.shape else math.inf
        if diff < TIE_TOLERANCE:
            # One matrix stored twice at different precisions: keep the model tied, from the better copy.
            quant = {n: GGML_QUANT_SIZES[tensors[n].tensor_type] for n in ("output.weight", "token_embd.weight")}
            better, other = sorted(quant, key=lambda n: -quant[n][1] / quant[n][0])  # (block, bytes): most bits first
            if better == "output.weight":
                state["model.embed_tokens.weight"] = out
            del state["lm_head.weight"]
            notes["tied_embeddings"] = (
                f"the file stores the tied embedding twice, {better} as {types[better]} and {other} as "
                f"{types[other]} (relative difference {diff:.4f}); the model is kept tied, from {better}")
    config["tie_word_embeddings"] = "lm_head.weight" not in state
    return {k: v.to(dtype).contiguous() for k, v in state.items()}, notes


def card(prov: dict) -> str:
    """README.md for the converted directory: what it is, from where, under what license."""
    about = prov.get("about", {})
    lines = [f"# {about.get('name') or prov['gguf']['general.name']} (converted from GGUF)", ""]
    lines += [about["description"], ""] if "description" in about else []
    lines += [
        f"- Source file: `{prov['source_file']}`, sha256 `{prov['source_sha256']}`",
        f"- Upstream: {about.get('upstream', 'not stated in the file')}",
        f"- License: {about.get('license') or prov['gguf'].get('general.license') or 'not stated in the file'}",
        f"- Quantization: {prov['gguf'].get('quantization')}; tensor types {prov['tensor_types']}",
        f"- Stored here as {prov['dtype']}: the dequantized values of the quantized file, so this is the quantized "
        "model, not the original full-precision weights; quantization costs some accuracy against them.",
    ]
    tied = prov.get("tied_embeddings")
    lines += [f"- {tied[0].upper()}{tied[1:]}."] if tied else []
    lines += [f"- {note}" for note in about.get("notes", [])]
    lines += ["", f"Made by `python -m route.convert` (dequantization: {prov['dequantized_by']}); details in "
              "`provenance.json`.", ""]
    return "\n".join(lines)


def convert(gguf_path: str | Path, out_dir: str | Path, dtype="bf16", sha256: str | None = None,
            about: dict | None = None, progress: bool = True) -> Path:
    """Convert `gguf_path` into a new HF-format directory `out_dir`, atomically; returns `out_dir`. `about` (name,
    description, upstream, license, notes) goes into provenance.json and README.md."""
    src, out = Path(gguf_path), Path(out_dir)
    dtype = as_dtype(dtype)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} already exists and is not empty")
    start = time.time()
    try:
        reader = GGUFReader(src)
    except (ValueError, OSError) as e:
        raise ConversionError(f"{src}: not a readable GGUF file ({e})") from None
    meta = {name: f.contents() for name, f in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ConversionError(f"{src}: architecture {arch!r} is not supported (this converter knows "
                              f"{', '.join(ARCHITECTURES)})")
    tokenizer = build_tokenizer(meta, src)  # before the slow part: an unsupported tokenizer fails fast
    tensors = {t.name: t for t in reader.tensors}
    config = model_config(meta, tensors, src)
    state, notes = convert_tensors(tensors, config, dtype, src, progress)
    config["torch_dtype"] = str(dtype).removeprefix("torch.")
    tok_cfg, gen_cfg = tokenizer_files(meta, config["max_position_embeddings"])

    prov = {"source_file": src.name, "source_sha256": sha256 or sha256_file(src), "source_bytes": src.stat().st_size,
            "gguf": {k: v for k, v in meta.items() if k.startswith("general.") and isinstance(v, (str, int, float))},
            "dtype": config["torch_dtype"], **notes, "converter": "route.convert",
            "dequantized_by": "gguf " + _gguf_version()}
    prov["gguf"]["quantization"] = file_type(meta.get("general.file_type"))
    if about:
        prov["about"] = about

    with atomic_dir(out, replace=False) as tmp:
        save_file(state, tmp / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save(str(tmp / "tokenizer.json"))
        for name, content in [("config.json", config), ("generation_config.json", gen_cfg),
                              ("tokenizer_config.json", tok_cfg), ("provenance.json", prov)]:
            (tmp / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        (tmp / "README.md").write_text(card(prov))
    if progress is True:
        print(f"converted {src.name} -> {out} in {time.time() - start:.1f}s", file=sys.stderr)
    return out


def file_type(code) -> str | None:
    """general.file_type -> llama.cpp's name for the quantization mix, e.g. 15 -> "Q4_K_M"."""
    try:
        return LlamaFileType(code).name.removeprefix("MOSTLY_")
    except ValueError:
        return None if code is None else str(code)


def _gguf_version() -> str:
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "unknown"


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m route.convert", description=__doc__.splitlines()[0])
    p.add_argument("gguf", help="a .gguf file (qwen2 or llama architecture, byte-level BPE tokenizer)")
    p.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    args = p.parse_args(argv)
    run(convert, args.gguf, args.out_dir, args.dtype)  # a failure: one line naming the file, exit status 1


if __name__ == "__main__":
    main()
