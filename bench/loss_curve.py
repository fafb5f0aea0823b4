"""Draw a training run's loss curve as a small SVG (no plotting library): training loss per step in blue,
held-out losses as orange dots.

    python bench/loss_curve.py runs/route/metrics.jsonl adapters/qwen2.5-coder-0.5b-route/loss.svg [--eval 0:0.5459]

--eval STEP:LOSS adds a held-out point the log lacks (e.g. step 0 measured by an earlier run on the same data).
"""
import argparse
import json


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics")
    ap.add_argument("out")
    ap.add_argument("--eval", action="append", default=[], help="STEP:LOSS")
    args = ap.parse_args()
    rows = [json.loads(line) for line in open(args.metrics, encoding="utf-8") if line.strip()]
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    evals += [(int(s), float(v)) for s, v in (e.split(":") for e in args.eval)]
    top = max(v for _, v in train + evals) * 1.05
    last = max(s for s, _ in train)
    x = lambda s: 40 + 560 * s / last  # noqa: E731  step 0 at the axis, the last step at the right end
    y = lambda v: 200 - 160 * v / top  # noqa: E731
    svg = ['<svg xmlns="http://www.w3.org/2000/svg" width="640" height="240" font-family="sans-serif" font-size="11">',
           '<rect width="640" height="240" fill="white"/>',
           '<line x1="40" y1="200" x2="600" y2="200" stroke="black"/>',
           '<line x1="40" y1="40" x2="40" y2="200" stroke="black"/>',
           '<polyline points="' + " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in train)
           + '" fill="none" stroke="steelblue" stroke-width="1.5"/>']
    svg += [f'<circle cx="{x(s):.1f}" cy="{y(v):.1f}" r="4" fill="darkorange"/>' for s, v in sorted(evals)]
    svg += [f'<text x="36" y="{y(v) + 4:.1f}" text-anchor="end">{v:.2f}</text>' for v in (0, top / 2, top)]
    svg += [f'<text x="600" y="216" text-anchor="end">step {last}</text>', '<text x="40" y="216">0</text>',
            '<text x="320.0" y="26" text-anchor="middle">training loss per step (blue), held-out loss (orange)</text>',
            "</svg>"]
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(svg) + "\n")


if __name__ == "__main__":
    main()
