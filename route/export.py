"""Export base model + LoRA adapter as one merged Hugging Face model directory.

    python -m route.export --adapter adapters/qwen2.5-coder-0.5b-route --out runs/merged [--dtype bf16|fp32]
    python -m route.export --adapter runs/route/adapter --model BASE_DIR --out runs/merged

The result is a plain checkpoint (config.json with the dtype the files really hold, model.safetensors, the base's
tokenizer files, a README naming base, adapter and license) that transformers, vLLM and `infer.py --model OUT`
load with no PEFT or LoRA code, at no extra cost per token. The base: --model, else the adapter's
`base_model_name_or_path` when that is a local model directory, else route's default model. It is loaded in fp32,
so W + alpha/r * B A is computed in fp32 and rounded once, to --dtype (default: the base's own dtype).
"""
import argparse
import json
from pathlib import Path

import torch

from . import hub
from .lora import export_merged, load_adapter, read_adapter_config
from .weights import DTYPES, load_model, read_config


def base_for(adapter_cfg: dict, model: str | None = None) -> Path:
    """The base model directory to merge into (see the module docstring for the order)."""
    if model:
        return hub.resolve_model(model)
    named = adapter_cfg.get("base_model_name_or_path")
    if named and (Path(named).expanduser() / "config.json").is_file():
        return Path(named).expanduser()
    return hub.resolve_model(None)  # the default model, by its release name (hub.portable_name) or none


def write_card(out: Path, base: Path, adapter: Path, adapter_cfg: dict, dtype: str, command: str):
    prov = base / "provenance.json"  # what the base is, where from, its license: as route.convert wrote them
    about = json.loads(prov.read_text()).get("about", {}) if prov.is_file() else {}
    name, upstream = about.get("name") or base.name, about.get("upstream") or ""
    license_ = about.get("license") or "the base model's license (see its model card)"
    card = adapter / "README.md"
    if card.is_file():  # the adapter's card travels with the weights it shaped: its data, results and terms
        (out / "ADAPTER_CARD.md").write_text(card.read_text(encoding="utf-8"), encoding="utf-8")
    targets = adapter_cfg["target_modules"]
    targets = ", ".join(targets) if isinstance(targets, list) else targets
    (out / "README.md").write_text(f"""# {out.name}

{name} with the LoRA adapter `{adapter.name}` merged into its weights: a plain Hugging Face checkpoint in
{dtype} (W + alpha/r * B A computed in fp32, rounded once). No PEFT or LoRA code is needed to use it.

- Base model: `{base.name}` ({name}){f"; upstream: {upstream}" if upstream else ""}
- Adapter: `{adapter.name}` (LoRA r={adapter_cfg['r']}, alpha={adapter_cfg['lora_alpha']}, on {targets}){
    "; its card is copied here as `ADAPTER_CARD.md`" if card.is_file() else ""}
- License: {license_}, as the base model's; the adapter's training data may add terms (see its card).
- Made by route: `{command}`

Load it (from the directory that holds `{out.name}`):

```
python -c "from transformers import AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained('{out.name}')"
vllm serve {out.name}
python infer.py --model {out.name} --fewshot no --mcp --db my.sqlite   # tuned: the zero-shot prompts
```
""", encoding="utf-8")


def export(adapter: str | Path, out: str | Path, model: str | None = None, dtype: str | None = None) -> Path:
    """Merge the adapter into its base and write the result to `out`; returns `out`."""
    adapter, out = Path(adapter), Path(out)
    adapter_cfg = read_adapter_config(adapter)
    base = base_for(adapter_cfg, model)
    _, hf = read_config(base)
    dt = DTYPES[dtype or hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"]
    net = load_model(base, torch.float32)
    load_adapter(net, adapter)
    export_merged(net, out, base, dtype=dt)
    command = " ".join(["python -m route.export", f"--adapter {adapter}", f"--out {out}"] +
                       ([f"--model {model}"] if model else []) + ([f"--dtype {dtype}"] if dtype else []))
    write_card(out, base, adapter, adapter_cfg, str(dt).removeprefix("torch."), command)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m route.export", description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapter", required=True, help="LoRA adapter directory (PEFT format)")
    ap.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    ap.add_argument("--model", default=None, help="base model directory or .gguf (default: see above)")
    ap.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                    help="dtype of the written weights (default: the base model's)")
    args = ap.parse_args(argv)
    print(f"merged model written to {export(args.adapter, args.out, args.model, args.dtype)}")


if __name__ == "__main__":
    from .cli import run
    run(main)  # one line naming the culprit for a bad file, option or fetch; exit 130 on Ctrl-C
