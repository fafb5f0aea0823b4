"""Hugging Face-format checkpoints: `config.json` + `model.safetensors` (or shards with an index).

Loading builds the model on the meta device (no memory), then reads one tensor at a time straight into its
final dtype and device, so the weights never exist twice: peak memory is the model plus one tensor.
Saving writes the same format back (used to export merged fine-tuned weights), atomically.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .model import ModelConfig, Transformer, rope_frequencies

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def read_config(path: str | Path) -> tuple[ModelConfig, dict]:
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise FileNotFoundError(f"{cfg_file} not found: not a Hugging Face-format model directory")
    raw = json.loads(cfg_file.read_text())
    return ModelConfig.from_hf(raw, source=str(cfg_file)), raw


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file that holds it."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        return {name: path / f for name, f in json.loads(index.read_text())["weight_map"].items()}
    single = path / "model.safetensors"
    if not single.exists():
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json found")
    with safe_open(single, framework="pt") as f:
        return {name: single for name in f.keys()}


def load_model(path: str | Path, dtype: torch.dtype | str = torch.float32, device="cpu") -> Transformer:
    path = Path(path)
    dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype
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
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in names:
                t = f.get_tensor(name)
                if tuple(t.shape) != tuple(expected[name].shape):
                    raise ValueError(f"{file}: tensor {name!r} has shape {tuple(t.shape)}, "
                                     f"expected {tuple(expected[name].shape)}")
                # copy=True: the parameter must own its memory, not alias the file's buffer
                t = t.to(device=device, dtype=dtype, copy=True)
                module, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module), attr, torch.nn.Parameter(t, requires_grad=False))
                del t
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # buffers were built on the meta device with the module: compute them for real
    model.register_buffer("inv_freq", rope_frequencies(cfg).to(device), persistent=False)
    return model.eval()


def save_model(model: Transformer, path: str | Path, hf_config: dict, dtype=None, shard_bytes: int = 4 << 30):
    """Write config.json + safetensors (sharded above `shard_bytes`) into `path`, replacing it atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        state = {n: (p.detach().to(dtype) if dtype else p.detach()).contiguous().cpu()
                 for n, p in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        shards, size, current = [], 0, {}
        for name, t in state.items():
            nbytes = t.numel() * t.element_size()
            if current and size + nbytes > shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name], size = t, size + nbytes
        shards.append(current)
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({n: fname for n in shard})
            total = sum(t.numel() * t.element_size() for t in state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        cfg = dict(hf_config)
        if dtype is not None:
            cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
