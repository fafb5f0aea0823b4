"""Hugging Face-format checkpoints: `config.json` + `model.safetensors` (or shards with an index).

Loading builds the model on the meta device (no memory), then reads one tensor at a time straight into its final
dtype and device: peak memory is the model plus one tensor. Plain file reads, not safetensors' memory map: every
mapped page the loader touches counts as resident too, which doubled peak memory (README, "Loading").
Saving writes the same format back, atomically.
"""
import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors.torch import save_file

from .files import atomic_dir, read_json_file
from .model import ModelConfig, Transformer, rope_frequencies

# The one table of dtype names (command lines, configs, adapter files) for the whole package.
DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A torch dtype from itself or one of DTYPES' names."""
    return DTYPES[dtype] if isinstance(dtype, str) else dtype


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face-format model directory")
    raw = read_json_file(cfg_file)
    return ModelConfig.from_hf(raw, source=str(cfg_file)), raw


SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_header(file: Path) -> tuple[dict, int]:
    """A safetensors file is an 8-byte little-endian header size, a JSON header, then raw tensor bytes.
    Returns ({name: {"dtype", "shape", "data_offsets"}}, where the data starts)."""
    with open(file, "rb") as f:
        try:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > file.stat().st_size:
                raise ValueError(f"header size {n} exceeds the file")
            header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"{file}: not a safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def read_tensor(f, meta: dict, base: int, where: str) -> torch.Tensor:
    if meta["dtype"] not in SAFETENSORS_DTYPES:  # e.g. FP8 or integer-quantized (GPTQ, AWQ) checkpoints
        raise ValueError(f"{where}: dtype {meta['dtype']} is not supported (only {', '.join(SAFETENSORS_DTYPES)})")
    start, end = meta["data_offsets"]
    buf = bytearray(end - start)
    f.seek(base + start)
    if f.readinto(buf) != len(buf):
        raise ValueError(f"{where}: file is truncated")
    return torch.frombuffer(buf, dtype=SAFETENSORS_DTYPES[meta["dtype"]]).reshape(meta["shape"])


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / f for name, f in read_json_file(index)["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    return {name: single for name in read_header(single)[0]}


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    path, dtype = Path(path), as_dtype(dtype)
    cfg, _ = read_config(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = dict(model.named_parameters())  # tied lm_head appears once, under the embedding's name
    files = weight_files(path)
    if cfg.tie_word_embeddings:
        files.pop("lm_head.weight", None)  # some tied checkpoints store the copy anyway
    missing = sorted(set(expected) - set(files))
    if missing:
        raise KeyError(f"{path}: tensor {missing[0]!r} missing from the checkpoint ({len(missing)} missing)")
    unexpected = sorted(n for n in files if n not in expected and not n.endswith("rotary_emb.inv_freq"))
    if unexpected:
        raise KeyError(f"{files[unexpected[0]]}: unexpected tensor {unexpected[0]!r} for {cfg.model_type}")

    by_file: dict[Path, list[str]] = {}
    for name in expected:
        by_file.setdefault(files[name], []).append(name)
    for file, names in by_file.items():
        header, base = read_header(file)
        with open(file, "rb") as f:
            for name in names:
                meta = header.get(name)
                if meta is None:
                    raise KeyError(f"{file}: tensor {name!r} listed in the index but not in the file")
                if tuple(meta["shape"]) != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(meta['shape'])}, "
                                     f"expected {tuple(expected[name].shape)}")
                t = read_tensor(f, meta, base, f"{file}: tensor {name!r}").to(device=device, dtype=dtype)
                module, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module), attr, torch.nn.Parameter(t, requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers were built on the meta device with the module: compute them for real
    model.register_buffer("inv_freq", rope_frequencies(cfg).to(device), persistent=False)
    return model.eval()


# What a model directory holds besides config.json and the weights: copied along when a model is saved
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "vocab.json", "merges.txt")


def save_model(model: Transformer, path: str | Path, hf_config: dict, dtype=None, shard_bytes: int = 4 << 30,
               tokenizer_from: str | Path | None = None):
    """Write config.json + safetensors (sharded above `shard_bytes`) into `path`, replacing it atomically,
    with the TOKENIZER_FILES of the model directory `tokenizer_from`, if given."""
    with atomic_dir(path) as tmp:
        state = {n: (p.detach().to(dtype) if dtype else p.detach()).contiguous().cpu()
                 for n, p in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shards, size = [{}], 0  # size: bytes in the last shard
        for name, t in state.items():
            if shards[-1] and size + t.nbytes > shard_bytes:
                shards, size = shards + [{}], 0
            shards[-1][name], size = t, size + t.nbytes
        n = len(shards)
        fnames = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
        for fname, shard in zip(fnames, shards):
            save_file(shard, tmp / fname, metadata={"format": "pt"})
        if n > 1:
            weight_map = {name: fname for fname, shard in zip(fnames, shards) for name in shard}
            index = {"metadata": {"total_size": sum(t.nbytes for t in state.values())}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        config = dict(hf_config)
        # the dtype the files hold, not the source config's: transformers and vLLM load a model in the dtype its
        # config names, so an fp32 save that kept "bfloat16" would be loaded as bf16 without a word
        floats = [t.dtype for t in state.values() if t.is_floating_point()]
        config["torch_dtype"] = str(max(set(floats), key=floats.count)).removeprefix("torch.")
        if "dtype" in config:  # transformers >= 4.56 writes this name
            config["dtype"] = config["torch_dtype"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for f in TOKENIZER_FILES if tokenizer_from else ():
            if (Path(tokenizer_from) / f).exists():
                shutil.copyfile(Path(tokenizer_from) / f, tmp / f)
