"""Text-to-SQL from the command line: plain text-to-SQL or ROUTE's MCP chain.

    python infer.py --mcp                                     # the default model on the demo data in data/demo
    python infer.py --mcp --data data/spider --split dev.json --out preds.jsonl     # Spider dev (README, "Data")
    python infer.py --mcp --db my.sqlite --question "How many singers do we have?"
    python infer.py --mcp --db my.sqlite                      # an interactive session (route/session.py)

Flow: resolve the model (fetching the default one on first use) -> load weights, tokenizer and the
adapter -> route.mcp.run_chain -> print answers -> score them with route.evaluate when gold SQL is known.
"""
import argparse
import json
import sys
import time
from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
DEMO = ROOT / "data" / "demo"
SAMPLES = 2  # sampled TS candidates with the chain: chosen on the validation split for accuracy against time (README)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mcp", action="store_true", help="run the full MCP chain (same as --steps sl,nc,cw)")
    ap.add_argument("--steps", default=None, help="comma-separated MCP steps among sl,nc,cw; 'none' = plain TS")
    ap.add_argument("--fast", action="store_true", help="plain text-to-SQL, repaired where it fails: one model "
                    "call per question, for slow machines (what it costs in accuracy: README)")
    ap.add_argument("--model", default=None, help="HF-format directory or .gguf file (default: Qwen2.5-Coder-0.5B)")
    ap.add_argument("--adapter", default=None, help="LoRA adapter directory (PEFT format); e.g. "
                    "adapters/qwen2.5-coder-0.5b-route, MSFT for the default model (opt-in: see its card)")
    ap.add_argument("--fewshot", choices=["auto", "yes", "no"], default="auto",
                    help="few-shot SL/NC/CW prompts (auto: yes unless a fine-tuned adapter is used)")
    ap.add_argument("--samples", type=int, default=None,
                    help="sampled TS candidates per question that vote with the greedy ones by execution result "
                    f"(default: {SAMPLES} with MCP steps, 0 for plain text-to-SQL)")
    ap.add_argument("--temperature", type=float, default=0.8, help="for --samples")
    ap.add_argument("--seed", type=int, default=0, help="for --samples")
    ap.add_argument("--no-repair", action="store_true",
                    help="no schema-based repair of failing SQL (plain text-to-SQL never repairs)")
    ap.add_argument("--data", default=None, help="dataset root in Spider or BIRD layout (default: data/demo)")
    ap.add_argument("--split", default="dev", help="split name or JSON file within --data")
    ap.add_argument("--limit", type=int, default=None, help="answer only the first N questions")
    ap.add_argument("--db", default=None, help="your own SQLite file: with --question, or alone for a session")
    ap.add_argument("--question", default=None, help="a question about --db")
    ap.add_argument("--explain", action="store_true", help="session: show what each step of the chain did")
    ap.add_argument("--batch-tokens", type=int, default=65536, help="token budget of one generation batch")
    ap.add_argument("--no-prefix-reuse", action="store_true", help="recompute shared prompt prefixes (slower)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp16", "fp32"],
                    help="auto: bf16 where the hardware is fast at it (GPU, AVX512-BF16, AMX), else fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                    help="weight-only quantized linear layers, CPU only (route/quant.py; README: speed, accuracy)")
    ap.add_argument("--out", default=None, help="write per-question traces (JSONL) and, beside them, the "
                    "official prediction file (Spider: .sql; BIRD: .predict_<split>.json)")
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
        # the prediction files then cover the input file up to the last question answered
        last = ds.examples[-1].position if ds.examples else -1
        ds.skipped_examples = [e for e in ds.skipped_examples if e.position < last]
    if not ds.examples:
        sys.exit(f"error: no questions to answer in {args.data or DEMO} ({args.split})")
    return ds


def load_engine(args):
    """Model + tokenizer (+ adapter): returns (model, tokenizer, whether a fine-tuned adapter is active)."""
    from route.generate import load_for_inference

    adapter = Path(args.adapter) if args.adapter else None
    model, tok = load_for_inference(args.model, args.dtype, args.device, adapter, args.quant)
    if adapter is not None:
        print(f"adapter: {adapter}")
    return model, tok, adapter is not None


def check_args(args):
    """Every option checked before anything is loaded or fetched."""
    from route.mcp import STEPS, check_steps

    if args.fast and (args.mcp or args.steps):
        sys.exit("error: --fast is plain text-to-SQL: it goes with neither --mcp nor --steps")
    steps = tuple(s for s in args.steps.split(",") if s and s != "none") if args.steps else STEPS if args.mcp else ()
    check_steps(steps)
    for name, least in (("samples", 0), ("limit", 1), ("batch_tokens", 1)):
        if (v := getattr(args, name)) is not None and v < least:
            sys.exit(f"error: --{name.replace('_', '-')} must be at least {least}")
    if args.temperature <= 0:
        sys.exit("error: --temperature must be positive (the samples are drawn at it)")
    return steps


def main(argv=None):
    args = parse_args(argv)
    steps = check_args(args)
    from route.evaluate import evaluate
    from route.generate import PrefixCache
    from route.mcp import run_chain

    session = args.db is not None and args.question is None  # --db alone: questions from the terminal
    if session:
        from route.datasets import load_sqlite
        load_sqlite(args.db, [])  # a missing or non-SQLite file fails now, not after loading the model
    else:
        ds = load_examples(args)
    model, tok, tuned = load_engine(args)
    fewshot = {"auto": not tuned, "yes": True, "no": False}[args.fewshot]
    # the chain with this run's options: a dataset run and a session call the same thing
    # plain text-to-SQL (--steps none) is the model's greedy answer as written: no samples, no repair
    samples = args.samples if args.samples is not None else SAMPLES if steps else 0
    chain = partial(run_chain, model, tok, steps=steps, fewshot=fewshot, samples=samples,
                    temperature=args.temperature, seed=args.seed,
                    repair=not args.no_repair and (bool(steps) or args.fast),
                    batch_tokens=args.batch_tokens, reuse_prefix=not args.no_prefix_reuse)
    print(("" if session else f"{len(ds.examples)} questions, ") + f"steps: {','.join(steps) or 'plain text-to-SQL'}, "
          f"{'few-shot' if fewshot else 'zero-shot'} prompts")
    if session:  # the schema's KV cache outlives each question
        from route.session import run_session
        return run_session(partial(chain, prefix_cache=PrefixCache()), args.db, show_steps=args.explain)

    t0 = time.perf_counter()
    traces, times = chain(ds.examples)
    total = time.perf_counter() - t0

    has_gold = all(e.gold_sql for e in ds.examples)
    mode = "bird" if ds.kind == "bird" else "spider"  # each benchmark's own EX rules (route/evaluate.py)
    report = evaluate([t.sql for t in traces], ds.examples, mode, skipped=ds.skipped) if has_gold else None
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
        summary = {"times": times, "total_seconds": total, "steps": list(steps),
                   "ex": report.accuracy if report else None}
        for what, path in write_outputs(args.out, ds, traces, report, summary):
            print(f"{what} written to {path}")


def prediction_path(out: Path, kind: str, split: str) -> Path | None:
    """Where the official prediction file goes, beside the trace: runs/x.jsonl -> runs/x.sql (Spider), or
    runs/x.predict_dev.json (BIRD, whose evaluator reads <--predicted_sql_path>predict_<--data_mode>.json, so
    --predicted_sql_path runs/x. --data_mode dev finds it). None for a user's own database."""
    if kind == "spider":
        path = out.with_suffix(".sql")
        return path if path != out else out.with_suffix(".pred.sql")
    if kind == "bird":
        return out.with_name(f"{out.stem}.predict_{Path(split).stem}.json")
    return None


def write_outputs(out, ds, traces, report, summary: dict) -> list[tuple[str, Path]]:
    """The trace (JSONL: one row per question with the dataset's own id, then a summary row) and the
    official prediction file of the dataset's kind; returns (what, path) for each file written."""
    from route.evaluate import write_bird_preds, write_spider_preds

    out = Path(out)
    with open(out, "w", encoding="utf-8") as f:
        for i, (e, t) in enumerate(zip(ds.examples, traces)):
            ids = {ds.id_key: e.index, "position": e.position}  # e.g. {"dev_index": 12, "position": 3}
            row = ids | asdict(t) | {"linked": {k: sorted(v) for k, v in t.linked.items()}}
            if report:
                row["correct"] = report.results[i].correct
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    written = [("traces", out)]
    pred = prediction_path(out, ds.kind, ds.name.partition("/")[2])
    if pred is not None:
        write = write_bird_preds if ds.kind == "bird" else write_spider_preds
        write(pred, ds.examples, [t.sql for t in traces], ds.skipped_examples)
        written.append((f"{'BIRD' if ds.kind == 'bird' else 'Spider'} predictions", pred))
    return written


if __name__ == "__main__":
    from route import cli
    cli.run(main)  # one line naming the culprit for a bad file, option or fetch; exit 130 on Ctrl-C
