"""The adapter a training run had at its last checkpoint, for a learning curve without one run per point.

    python bench/adapter_at.py runs/curve/checkpoint.pt runs/curve/adapter_step20 [--model DIR] [--r R --alpha A]

Loads the checkpoint's trainable (LoRA) weights onto the base model and writes them as a PEFT adapter, as
train.py's end does (route/checkpoint.py: save_result).
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from route import hub  # noqa: E402
from route.lora import add_lora, save_adapter  # noqa: E402
from route.trainer import TrainConfig  # noqa: E402
from route.weights import load_model  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("out")
    ap.add_argument("--model", default=None)
    ap.add_argument("--r", type=int, default=TrainConfig.lora_r)  # the recipe's, as train.py trained it
    ap.add_argument("--alpha", type=float, default=TrainConfig.lora_alpha)
    args = ap.parse_args()
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
    path = hub.resolve_model(args.model)
    model = add_lora(load_model(path, dtype=torch.float32), args.r, args.alpha)
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    lora = [k for k in model.state_dict() if "lora_" in k]
    if unexpected or any(k in missing for k in lora):
        sys.exit(f"{args.checkpoint}: LoRA weights do not match (unexpected {unexpected[:3]}, "
                 f"missing {[k for k in lora if k in missing][:3]})")
    save_adapter(model, args.out, hub.portable_name(path))
    print(f"step {state['step']}: {len(lora)} LoRA tensors -> {args.out}")


if __name__ == "__main__":
    main()
