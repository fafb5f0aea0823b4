"""Training throughput: route's loop against transformers + peft on the same model, data, batches and precision.

    python bench/train.py                       # Qwen2.5-0.5B-shaped random checkpoint at /tmp/q05 (made if absent)
    python bench/train.py --layers 2 --steps 3  # a quick smoke run on a 2-layer model of the same width
    python bench/train.py --full                # full fine-tuning (fp32 master weights, bf16 autocast) on both

Both sides train LoRA (same rank, alpha, dropout, targets), or with --full every weight, with AdamW and
gradient clipping on the same right-padded micro-batches (route's length-grouped plan): bf16 weights with fp32
adapters (full: fp32 weights) under bf16 autocast, as the HF Trainer's bf16=True does. The reference gets
its fastest settings: SDPA attention and no attention mask (plain causal attention, exact with right padding
and -100 labels). The data mimic ROUTE's: long prompts (schema + rows; random tokens here), short answers.

MFU convention (both sides): 4N FLOPs per token for LoRA (6N for full), N = weights of the transformer blocks
(no embeddings, output head, attention scores or recomputation), against the peak of route.hardware.peak_flops:
a datasheet number on GPUs, a measured bf16 GEMM on CPUs. The first step of each side is warmup, not timed.
"""
import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from route.lora import ALL_TARGETS  # noqa: E402
from route.batching import collate, plan_steps  # noqa: E402
from route.hardware import compute_dtype, flops_per_token, peak_flops, pick_device  # noqa: E402
from route.trainer import TrainConfig, prepare_model, train  # noqa: E402

QWEN25_05B = dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                  rope_theta=1e6, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645)


def ensure_model(path: Path, layers: int | None):
    if (path / "config.json").exists():
        return
    import transformers
    print(f"writing a random Qwen2.5-0.5B-shaped checkpoint to {path} ...", flush=True)
    hf_config = transformers.Qwen2Config(**{**QWEN25_05B, **({"num_hidden_layers": layers} if layers else {})})
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(hf_config).to(torch.bfloat16).save_pretrained(path)


def make_examples(n: int, vocab: int, prompt_len: tuple[int, int], answer_len: tuple[int, int], seed: int = 0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p, a = rng.randint(*prompt_len), rng.randint(*answer_len)
        ids = [rng.randrange(1000, vocab) for _ in range(p + a)]
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def run_reference(path, examples, steps, args, dtype, device):
    """transformers + peft, the loop the HF Trainer runs (without its bookkeeping)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    weights = torch.float32 if args.full else dtype  # full: fp32 master weights, like ours
    model = AutoModelForCausalLM.from_pretrained(path, dtype=weights, attn_implementation="sdpa").to(device)
    if not args.full:
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=args.dropout,
                                                 target_modules=list(ALL_TARGETS), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for micro in steps:
        t0 = time.perf_counter()
        total = 0.0
        for idx in micro:
            tokens, labels, *_ = collate(examples, idx, device)
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                loss = model(input_ids=tokens, labels=labels).loss  # mean over this batch's answer tokens
            (loss / len(micro)).backward()
            total += loss.item() / len(micro)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(total)
        print(f"  reference step {len(times)}: {times[-1]:.2f} s, loss {total:.4f}", flush=True)
    return times, losses


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/q05")
    ap.add_argument("--layers", type=int, help="make (or use) a model of this depth at MODEL-L{layers}")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per side (the first is warmup)")
    ap.add_argument("--batch-tokens", type=int, default=4096)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(300, 900))
    ap.add_argument("--answer-len", type=int, nargs=2, default=(20, 80))
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=32)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", help="also write the results here")
    return ap.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model + (f"-L{args.layers}" if args.layers else ""))
    ensure_model(path, args.layers)
    cfg_json = json.loads((path / "config.json").read_text())
    examples = make_examples(args.examples, cfg_json["vocab_size"], tuple(args.prompt_len), tuple(args.answer_len))
    lengths = [len(e["input_ids"]) for e in examples]

    with tempfile.TemporaryDirectory() as out:
        tc = TrainConfig(out_dir=out, base_model=str(path), full=args.full, lora_r=args.r, lora_alpha=args.alpha,
                         lora_dropout=args.dropout, max_steps=args.steps, batch_tokens=args.batch_tokens,
                         grad_accum=args.grad_accum, lr=1e-4, warmup=0, dtype=args.dtype, save_every=0,
                         progress=False, device=args.device)
        steps, _ = plan_steps(lengths, tc, args.grad_accum)  # the batches train() will run, in its order
        device = pick_device(args.device)
        dtype = compute_dtype(args.dtype, device)
        print(f"{path}: {args.steps} steps of {args.grad_accum} x <= {args.batch_tokens} padded tokens, "
              f"{str(dtype).removeprefix('torch.')} on {device}, {torch.get_num_threads()} CPU threads", flush=True)
        model = prepare_model(tc)
        fpt = flops_per_token(model, full=args.full)
        history = train(model, examples, tc)
        for h in history:
            print(f"  route step {h['step']}: {h['tokens'] / h['tokens_per_s']:.2f} s, loss {h['loss']:.4f}",
                  flush=True)
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()

    ref_times, ref_losses = run_reference(path, examples, steps, args, dtype, device)
    tokens = [sum(lengths[i] for b in micro for i in b) for micro in steps]
    timed = slice(1, None) if len(steps) > 1 else slice(None)
    ours = sum(tokens[timed]) / sum(h["tokens"] / h["tokens_per_s"] for h in history[timed])
    theirs = sum(tokens[timed]) / sum(ref_times[timed])
    peak, src = peak_flops(device, dtype)
    res = {"model": str(path), "mode": "full" if args.full else "lora", "steps_timed": len(tokens[timed]),
           "tokens_timed": sum(tokens[timed]),
           "route_tokens_per_s": ours, "reference_tokens_per_s": theirs, "speedup": ours / theirs,
           "route_mfu": ours * fpt / peak, "reference_mfu": theirs * fpt / peak,
           "flops_per_token": fpt, "peak_flops": peak, "peak_source": src,
           "first_loss": {"route": history[0]["loss"], "reference": ref_losses[0]}}
    print(f"\n{'full fine-tuning' if args.full else 'LoRA'}, {res['steps_timed']} timed steps")
    print(f"{'route':18} {ours:8.1f} tokens/s   MFU {res['route_mfu']:.1%}")
    print(f"{'transformers' if args.full else 'transformers+peft':18} {theirs:8.1f} tokens/s   "
          f"MFU {res['reference_mfu']:.1%}")
    print(f"speedup {res['speedup']:.2f}x (target >= 1.2x); MFU = {'6N' if args.full else '4N'} = "
          f"{fpt / 1e9:.2f} GFLOP per token (N = block weights) over {peak / 1e12:.2f} TFLOP/s ({src})")
    print(f"first-step loss: route {history[0]['loss']:.4f}, reference {ref_losses[0]:.4f} (same data, same start)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
