"""Multitask fine-tuning (MSFT) from the command line.

    python train.py --tasks all                   # LoRA on the default model, Spider train, this repo's recipe
    python train.py --tasks all --limit 0 --max-steps 0 --epochs 2   # all of Spider train (a GPU's work)
    python train.py --tasks ts,sl --limit 500 --epochs 1 --out runs/small
    torchrun --nproc_per_node 4 train.py --tasks all --full --data /data/spider

--data defaults to $ROUTE_DATA, else data/spider in this repository (README, "Data").
Flow: build the MSFT data if missing (route.msft: four tasks as chat messages) -> render and tokenize each
record with the model's chat format (prompt tokens get no loss) -> route.trainer.train (LoRA or full,
mixed precision, checkpoints, torchrun) -> out/adapter (PEFT format) or out/model (HF format).
"""
import argparse
import hashlib
import json
import sys
from pathlib import Path

from route.datasets import default_root, layout
from route.trainer import TrainConfig as RECIPE  # the defaults below are TrainConfig's: one definition

ROOT = Path(__file__).resolve().parent


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="all", help="all, or a comma list of ts,sl,nc,cw")
    ap.add_argument("--model", default=None, help="HF-format directory or .gguf (default: Qwen2.5-Coder-0.5B)")
    ap.add_argument("--data", default=str(default_root()),
                    help="Spider or BIRD root with its training split (default: $ROUTE_DATA, else data/spider)")
    ap.add_argument("--msft", default=None,
                    help="MSFT data directory (default: data/msft/val20x10-seed<seed>-limit<limit>-<source hash>)")
    ap.add_argument("--nc-from-model", action="store_true",
                    help="when building the data, add NC candidates that the base model writes (slow: one TS pass)")
    ap.add_argument("--limit", type=int, default=1800, help="training questions used (each gives up to 4 records); "
                    "0: all")
    ap.add_argument("--out", default=RECIPE.out_dir, help="checkpoints, metrics and the result go here")
    ap.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    ap.add_argument("--rank", type=int, default=RECIPE.lora_r)
    ap.add_argument("--alpha", type=float, default=RECIPE.lora_alpha)
    ap.add_argument("--lr", type=float, default=None, help="default: 3e-4 for LoRA, 1e-5 for --full (TrainConfig)")
    ap.add_argument("--epochs", type=int, default=RECIPE.epochs)
    ap.add_argument("--max-steps", type=int, default=RECIPE.max_steps,
                    help="stop after this many steps (the cosine schedule ends there); default: the shipped "
                    "adapter's recipe, 24%% of an epoch of the default data (its card: the time); 0: run --epochs")
    ap.add_argument("--batch-tokens", type=int, default=RECIPE.batch_tokens,
                    help="padded tokens per micro-batch (memory grows with it: README, Training loop)")
    ap.add_argument("--grad-accum", type=int, default=RECIPE.grad_accum)
    ap.add_argument("--max-len", type=int, default=RECIPE.max_len, help="longer examples are dropped, never cut")
    ap.add_argument("--no-pack", dest="pack", action="store_false",
                    help="one record per row, instead of the records of one database packed behind one copy of "
                    "their schema prefix (route/packing.py)")
    ap.add_argument("--checkpointing", action="store_true", help="recompute activations in backward")
    ap.add_argument("--eval-every", type=int, default=RECIPE.eval_every,
                    help="held-out loss at step 0 and every N steps; 0: only the final one (always run)")
    ap.add_argument("--save-every", type=int, default=RECIPE.save_every)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--seed", type=int, default=RECIPE.seed)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"])
    return ap.parse_args(argv)


def load_records(path: Path, tasks) -> list[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not the JSON lines train.py writes ({e}); delete it to rebuild") from None
    return [r for r in records if r.get("task") in tasks]


def main(argv=None):
    args = parse_args(argv)
    if args.resume and not (Path(args.out) / "checkpoint.pt").exists():  # before hours of data building
        raise SystemExit(f"error: --resume: no checkpoint.pt in {args.out} (leave --resume out to start)")
    from route import hub, msft, prompts
    from route.tokenizer import Tokenizer
    from route.batching import tokenize_examples
    from route.trainer import TrainConfig, prepare_model, train

    tasks = msft.TASKS if args.tasks == "all" else tuple(t.strip() for t in args.tasks.split(","))
    if set(tasks) - set(msft.TASKS):
        raise SystemExit(f"error: unknown tasks {sorted(set(tasks) - set(msft.TASKS))}; choose from ts,sl,nc,cw")
    # What the MSFT data is built from: the dataset and, with --nc-from-model, the model writing NC candidates.
    # Cached data from another source must never be trained on by mistake: the default folder's name carries a
    # hash of it, and source.json in a folder train.py built is checked on reuse (a --msft folder too).
    nc_model = (str(Path(args.model).resolve()) if args.model else hub.DEFAULT.name) if args.nc_from_model else None
    source = json.dumps({"data": str(Path(args.data).resolve()), "nc_from_model": nc_model})
    tag = hashlib.sha256(source.encode()).hexdigest()[:8]
    # "val20x10": data built with both validation checks' databases left out (older directories were not)
    data_dir = Path(args.msft or ROOT / "data" / "msft" / f"val20x10-seed{args.seed}-limit{args.limit}-{tag}")
    stamp = data_dir / "source.json"  # (a folder `python -m route.msft` built has none: used as given)
    if stamp.exists() and stamp.read_text() != source:
        raise ValueError(f"{data_dir} holds MSFT data built from {stamp.read_text()}, not from {source}; "
                         "pass another --msft, or delete it to rebuild")
    if not (data_dir / "train.jsonl").exists():
        layout(Path(args.data))  # a bad --data fails now, not after fetching the model
    model_dir = hub.resolve_model(args.model)
    if not (data_dir / "train.jsonl").exists():
        print(f"building MSFT data from {args.data} into {data_dir}")
        data_dir.mkdir(parents=True, exist_ok=True)
        stamp.write_text(source)
        gen = (lambda exs: msft.model_sql(args.model, exs)) if args.nc_from_model else None
        counts = msft.build(args.data, data_dir, seed=args.seed, limit=args.limit, nc_from_model=gen)
        print("\n".join(f"  {k:46}{v:>7}" for k, v in sorted(counts.items())))

    tok = Tokenizer.from_dir(model_dir)

    def tokenized(name):
        records = load_records(data_dir / f"{name}.jsonl", tasks)
        return tokenize_examples(tok, [prompts.cut(tok, r["task"], r["messages"], r["answer_start"]) for r in records],
                                 [r["target"] for r in records])

    train_set, val_set = tokenized("train"), tokenized("val")
    if args.pack:
        from route.packing import pack_shared_prefix
        n = sum(len(e["input_ids"]) for e in train_set)
        train_set = pack_shared_prefix(train_set, args.max_len, args.seed)
        print(f"packed behind shared schema prefixes: {n} -> {sum(len(e['input_ids']) for e in train_set)} tokens")
    print(f"{len(train_set)} training and {len(val_set)} held-out examples, tasks {','.join(tasks)}, "
          f"{sum(len(e['input_ids']) for e in train_set) / max(1, len(train_set)):.0f} tokens on average")
    tc = TrainConfig(out_dir=args.out, base_model=str(model_dir), full=args.full, lora_r=args.rank,
                     lora_alpha=args.alpha, lr=args.lr, epochs=args.epochs, max_steps=args.max_steps or None,
                     batch_tokens=args.batch_tokens, grad_accum=args.grad_accum, max_len=args.max_len,
                     checkpointing=args.checkpointing, eval_every=args.eval_every, save_every=args.save_every,
                     resume=args.resume, seed=args.seed, dtype=args.dtype)
    model = prepare_model(tc)
    try:
        train(model, train_set, tc, val_set)
    except KeyboardInterrupt as e:  # e.args: the trainer's "saved <checkpoint> at step N", if it saved
        ckpt = Path(args.out) / "checkpoint.pt"
        print(f"interrupted: {e.args[0]}; continue with the same command plus --resume" if e.args else
              f"interrupted: nothing saved now; --resume continues from {ckpt}" if ckpt.exists() else
              "interrupted before the first checkpoint: nothing to resume", file=sys.stderr)
        raise SystemExit(130) from None
    print(f"done: {Path(args.out) / ('model' if args.full else 'adapter')}")


if __name__ == "__main__":
    from route import cli
    cli.run(main)  # one line naming the culprit for a bad file, option or fetch; exit 130 on Ctrl-C
