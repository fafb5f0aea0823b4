"""Text-to-SQL from the command line: plain text-to-SQL or ROUTE's MCP chain.

    python infer.py --mcp                                     # the default model on the demo data in data/demo
    python infer.py --mcp --data ../shared/data/spider --split dev_sample.json --out preds.jsonl
    python infer.py --mcp --db my.sqlite --question "How many singers do we have?"

Flow: resolve the model (fetching the default one on first use) -> load weights, tokenizer and the
adapter -> route.mcp.run_chain -> print answers -> score them with route.evaluate when gold SQL is known.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "data" / "demo"
ADAPTER = ROOT / "adapters" / "qwen2.5-coder-0.5b-route"  # trained by train.py for the default model


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mcp", action="store_true", help="run the full MCP chain (same as --steps sl,nc,cw)")
    ap.add_argument("--steps", default=None, help="comma-separated MCP steps among sl,nc,cw; 'none' = plain TS")
    ap.add_argument("--model", default=None, help="HF-format directory or .gguf file (default: Qwen2.5-Coder-0.5B)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format)")
    ap.add_argument("--no-adapter", action="store_true", help="do not use the adapter shipped for the default model")
    ap.add_argument("--fewshot", choices=["auto", "yes", "no"], default="auto",
                    help="few-shot SL/NC/CW prompts (auto: yes unless a fine-tuned adapter is used)")
    ap.add_argument("--data", default=None, help="dataset root in Spider or BIRD layout (default: data/demo)")
    ap.add_argument("--split", default="dev", help="split name or JSON file within --data")
    ap.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    ap.add_argument("--db", default=None, help="your own SQLite file (with --question)")
    ap.add_argument("--question", default=None, help="a question about --db")
    ap.add_argument("--batch-tokens", type=int, default=65536, help="token budget of one generation batch")
    ap.add_argument("--no-prefix-reuse", action="store_true", help="recompute shared prompt prefixes (slower)")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="write per-question traces (JSONL)")
    ap.add_argument("--quiet", action="store_true", help="no per-question printout")
    return ap.parse_args(argv)


def load_examples(args):
    from route.datasets import load_dataset, load_sqlite

    if args.db or args.question is not None:
        if not args.db or not (args.question or "").strip():
            sys.exit("error: --db and a non-empty --question go together")
        return load_sqlite(args.db, args.question)
    ds = load_dataset(args.data or DEMO, args.split)
    if ds.skipped:
        print(f"skipped {ds.skipped} questions whose database is missing: {sorted(ds.missing_dbs)}")
    if args.limit:
        ds.examples = ds.examples[:args.limit]
    if not ds.examples:
        sys.exit(f"error: no questions to answer in {args.data or DEMO} ({args.split})")
    return ds


def load_engine(args):
    """Model + tokenizer (+ adapter); returns whether a fine-tuned adapter is active."""
    from route import hub
    from route.model import pack_linears
    from route.tokenizer import Tokenizer
    from route.weights import load_model

    path = hub.resolve_model(args.model)
    model = load_model(path, dtype=args.dtype, device=args.device)
    adapter = Path(args.adapter) if args.adapter else None
    if adapter is None and args.model is None and not args.no_adapter and (ADAPTER / "adapter_config.json").exists():
        adapter = ADAPTER
    if adapter is not None:
        from route.lora import load_adapter, merge_lora
        load_adapter(model, adapter)
        merge_lora(model)  # inference needs no separate LoRA matmuls
        print(f"adapter: {adapter}")
    pack_linears(model)  # CPU bf16: weights laid out once for oneDNN (a no-op elsewhere)
    return model, Tokenizer.from_dir(path), adapter is not None


def main(argv=None):
    args = parse_args(argv)
    from route.evaluate import evaluate
    from route.mcp import STEPS, run_chain

    if args.steps is not None:
        steps = tuple(s for s in args.steps.split(",") if s and s != "none")
    else:
        steps = STEPS if args.mcp else ()
    ds = load_examples(args)
    model, tok, tuned = load_engine(args)
    fewshot = {"auto": not tuned, "yes": True, "no": False}[args.fewshot]
    print(f"{len(ds.examples)} questions, steps: {','.join(steps) or 'plain text-to-SQL'}, "
          f"{'few-shot' if fewshot else 'zero-shot'} prompts")

    t0 = time.perf_counter()
    traces, times = run_chain(model, tok, ds.examples, steps=steps, fewshot=fewshot,
                              batch_tokens=args.batch_tokens, reuse_prefix=not args.no_prefix_reuse)
    total = time.perf_counter() - t0

    has_gold = all(e.gold_sql for e in ds.examples)
    report = evaluate([t.sql for t in traces], ds.examples, skipped=ds.skipped) if has_gold else None
    if not args.quiet:
        for i, (e, t) in enumerate(zip(ds.examples, traces)):
            print(f"\n[{e.db_id}] {e.question}\n  SQL: {t.sql}")
            print(f"  error: {t.error}" if t.error else f"  rows: {t.rows[:5]}{' ...' if len(t.rows) > 5 else ''}")
            if report:
                print(f"  matches gold: {'yes' if report.results[i].correct else 'no'}")
    print("\ntime per step: " + ", ".join(f"{k} {v:.1f}s" for k, v in times.items()) +
          f"; total {total:.1f}s ({total / 60:.2f} min, {total / len(traces):.2f} s/question)")
    if report:
        print(report)
    if args.out:
        with open(args.out, "w") as f:
            for i, t in enumerate(traces):
                row = asdict(t) | {"linked": {k: sorted(v) for k, v in t.linked.items()}}
                if report:
                    row["correct"] = report.results[i].correct
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
            f.write(json.dumps({"summary": {"times": times, "total_seconds": total, "steps": list(steps),
                                            "ex": report.accuracy if report else None}}) + "\n")
        print(f"traces written to {args.out}")


if __name__ == "__main__":
    from route import cli
    cli.run(main)  # one line naming the culprit for a bad file, option or fetch; exit 130 on Ctrl-C
