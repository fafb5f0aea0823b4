"""LoRA: low-rank adapters on the linear layers, saved in PEFT's format (ROUTE section 3.1, multitask SFT).

A frozen weight W (out x in) gets a trainable update B @ A with A (r x in) and B (out x r), scaled by alpha/r:

    y = x W^T + bias + (dropout(x) A^T B^T) * alpha / r

B starts at zero, so a fresh adapter changes nothing. Only A and B train, in fp32 (the optimizer's master weights;
the frozen model may be bf16): backward computes input gradients through W but never W's own gradient (~4N FLOPs
per token rather than full fine-tuning's 6N). Files use PEFT's layout (`adapter_config.json` +
`adapter_model.safetensors`, keys like `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`), so PEFT
and vLLM load our adapters and we load theirs.
"""
import json
import math
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .files import atomic_file, read_json_file
from .weights import as_dtype, save_model

# every projection, attention and MLP: targeting all matters more for quality than rank (QLoRA, section 4)
ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> the transformers model
CONFIG, WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update. It adopts the base layer's `weight` and `bias` Parameters (no copy), so
    the frozen weights keep their checkpoint names and the adapter adds only `q_proj.lora_A` / `q_proj.lora_B`."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank must be positive, got r={r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.r, self.alpha, self.scaling = r, alpha, alpha / r
        dev = base.weight.device
        # PEFT's initialisation: A like an nn.Linear (kaiming-uniform, a=sqrt(5)), B zero => update starts at 0
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=dev, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=dev, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        # The low-rank path runs in the compute dtype (bf16 under autocast or with a bf16 model), not fp32: upcasting
        # x would copy the whole activation at twice its size and run the skinny matmuls at fp32 speed (README,
        # "Measures"). The casts are differentiable, so the fp32 A and B get fp32 gradients. The scaling is folded
        # into B (out x r, tiny) rather than applied to the (tokens x out) result.
        dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        a, b = self.lora_A.to(dt), (self.lora_B * self.scaling).to(dt)
        return y + F.linear(F.linear(self.dropout(x), a), b)

    @torch.no_grad()
    def delta(self) -> torch.Tensor:
        """The update alpha/r * B @ A, in fp32."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, alpha={self.alpha}, merged={self.merged}"


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _targeted(name: str, module: nn.Module, targets) -> bool:
    """PEFT's matching rules: a list matches a module name or its last components; a string is a regex that
    must match the whole name; "all-linear" means every linear layer but the output head."""
    if not isinstance(module, nn.Linear):
        return False
    if targets == "all-linear":
        return not name.endswith("lm_head")
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def add_lora(model: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
             targets=ALL_TARGETS) -> nn.Module:
    """Wrap the targeted nn.Linear layers in place and freeze every other parameter; returns the model. Dropout 0 by
    default (as in LLaMA-Factory): it costs a masked copy of every adapter input, and multitask SFT data is not tiny."""
    if lora_modules(model):
        raise ValueError("the model already has LoRA adapters")
    chosen = [(n, m) for n, m in model.named_modules() if _targeted(n, m, targets)]
    if not chosen:
        raise ValueError(f"no linear layer matches target_modules={targets!r}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, m in chosen:
        _swap(model, name, LoRALinear(m, r, alpha, dropout))
    return model


def _swap(model: nn.Module, name: str, module: nn.Module):
    """Put `module` where the submodule `name` is."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


@torch.no_grad()
def merge_lora(model: nn.Module, merge: bool = True):
    """W <- W + alpha/r * B A, computed in fp32 and rounded once to W's dtype; the adapters stay, unused.
    merge=False undoes it, exactly up to rounding (fp32: ~1e-7; a bf16 W comes back within one bf16 ulp)."""
    for m in lora_modules(model).values():
        if m.merged != merge:
            delta = m.delta() if merge else -m.delta()
            m.weight.copy_((m.weight.float() + delta).to(m.weight.dtype))
            m.merged = merge


def unmerge_lora(model: nn.Module):
    merge_lora(model, merge=False)


def save_adapter(model: nn.Module, path: str | Path, base_model_path: str | Path | None = None,
                 dtype: torch.dtype | str = torch.bfloat16):
    """Write adapter_config.json + adapter_model.safetensors in PEFT's layout. bf16 by default: the adapter is
    applied to bf16 weights anyway (vLLM casts it to the model's dtype), and it halves the file (rank 16 on all
    seven projections of Qwen2.5-0.5B: 17.6 MB). Training checkpoints keep fp32 (see checkpoint.py)."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to save")
    dtype = as_dtype(dtype)
    first = next(iter(mods.values()))
    if any(m.r != first.r or m.alpha != first.alpha for m in mods.values()):
        raise ValueError("adapters with different ranks per layer are not supported")
    dropout = first.dropout.p if isinstance(first.dropout, nn.Dropout) else 0.0
    adapter_cfg = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.r, "lora_alpha": first.alpha,
                   "lora_dropout": dropout, "target_modules": sorted({n.rsplit(".", 1)[-1] for n in mods}),
                   "base_model_name_or_path": str(base_model_path) if base_model_path else None,
                   "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                   "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
                   "rank_pattern": {}, "alpha_pattern": {}, "use_rslora": False, "use_dora": False, "revision": None}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with atomic_file(path / CONFIG) as config_tmp, atomic_file(path / WEIGHTS) as weights_tmp:
        state = {f"{PREFIX}{n}.lora_{w}.weight": getattr(m, f"lora_{w}").detach().to(dtype).contiguous().cpu()
                 for n, m in mods.items() for w in "AB"}  # PEFT's key names
        save_file(state, weights_tmp, metadata={"format": "pt"})
        config_tmp.write_text(json.dumps(adapter_cfg, indent=2))


def read_adapter_config(path: str | Path) -> dict:
    file = Path(path) / CONFIG
    if not file.exists():
        raise FileNotFoundError(f"{file} not found: not a PEFT adapter directory")
    adapter_cfg = read_json_file(file)
    if not isinstance(adapter_cfg, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(adapter_cfg).__name__}")
    unsupported = {"peft_type": lambda v: v != "LORA", "use_dora": bool, "use_rslora": bool,
                   "rank_pattern": bool, "alpha_pattern": bool, "modules_to_save": bool,
                   "layers_to_transform": lambda v: v is not None, "fan_in_fan_out": bool,
                   "bias": lambda v: v not in (None, "none"), "lora_bias": bool}
    for key, bad in unsupported.items():
        if key in adapter_cfg and bad(adapter_cfg[key]):
            raise ValueError(f"{file}: {key}={adapter_cfg[key]!r} is not supported (plain LoRA only)")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in adapter_cfg:
            raise ValueError(f"{file}: missing field {key!r}")
    return adapter_cfg


@torch.no_grad()
def load_adapter(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a PEFT LoRA adapter into `model` (adding LoRA layers from the config if it has none)."""
    path = Path(path)
    adapter_cfg = read_adapter_config(path)
    r, alpha, targets = adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["target_modules"]
    if not lora_modules(model):
        add_lora(model, r, alpha, adapter_cfg.get("lora_dropout", 0.0), targets)
    mods = lora_modules(model)
    for name, m in mods.items():
        if m.merged:
            raise ValueError(f"{name}: adapter is merged; unmerge before loading another")
        if m.r != r or m.alpha != alpha:
            raise ValueError(f"{path / CONFIG}: r={r}, lora_alpha={alpha} but the model's "
                             f"adapters have r={m.r}, alpha={m.alpha}")
    file = path / WEIGHTS
    if not file.exists():
        raise FileNotFoundError(f"{file} not found")
    expected = {f"{PREFIX}{n}.lora_{w}.weight": (m, f"lora_{w}") for n, m in mods.items() for w in "AB"}
    try:  # a truncated or corrupted file fails here, with a message that does not name it
        opened = safe_open(file, framework="pt", device="cpu")
    except SafetensorError as e:
        raise ValueError(f"{file}: not a readable safetensors file ({e})") from None
    with opened as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            raise KeyError(f"{file}: tensor {missing[0]!r} missing ({len(missing)} missing)")
        unexpected = sorted(keys - set(expected))
        if unexpected:
            raise KeyError(f"{file}: unexpected tensor {unexpected[0]!r} ({len(unexpected)} unexpected)")
        for key, (m, attr) in expected.items():
            t, p = f.get_tensor(key), getattr(m, attr)
            if t.shape != p.shape:
                raise ValueError(f"{file}: tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t.to(p.dtype))
    return model


def export_merged(model: nn.Module, path: str | Path, base_model_path: str | Path, dtype=None):
    """Write base + adapters as one plain HF-format model directory (config, weights, tokenizer files). `model` is
    left untouched: for the save only, each LoRALinear is swapped for an nn.Linear holding the original bias and a
    new merged weight (fp32 math, rounded once to `dtype` or the weight's dtype, built on the CPU)."""
    base_model_path = Path(base_model_path)
    hf_config = read_json_file(base_model_path / "config.json")
    dtype = as_dtype(dtype)
    mods = lora_modules(model)
    try:
        for name, m in mods.items():
            plain = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            w = m.weight.detach().float().cpu()
            merged = w if m.merged else w + m.delta().cpu()
            plain.weight = nn.Parameter(merged.to(dtype or m.weight.dtype), requires_grad=False)
            plain.bias = m.bias
            _swap(model, name, plain)
        save_model(model, path, hf_config, dtype=dtype, tokenizer_from=base_model_path)
    finally:
        for name, m in mods.items():
            _swap(model, name, m)
