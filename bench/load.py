"""Peak memory while loading a checkpoint, against the size of its weights in the chosen dtype.

    python bench/load.py [--model DIR] [--dtype bf16|fp32]

The loader reads one tensor at a time into its final dtype, so the peak should be the weights plus one
tensor; the target is at most 1.3x the weights. Run in a fresh process: ru_maxrss is the process's peak.
"""
import argparse
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from route import hub  # noqa: E402
from route.weights import load_model  # noqa: E402


def rss_now() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    args = ap.parse_args()
    path = hub.resolve_model(args.model)
    before = rss_now()  # torch and friends imported
    t0 = time.perf_counter()
    model = load_model(path, dtype=args.dtype)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grown = peak - before
    print(f"{path.name} in {args.dtype}: weights {weights / 1e9:.3f} GB, loaded in {seconds:.1f} s; "
          f"peak RSS grew by {grown / 1e9:.3f} GB = {grown / weights:.2f}x the weights (target <= 1.3x); "
          f"torch {torch.__version__}")


if __name__ == "__main__":
    main()
