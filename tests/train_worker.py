"""A small deterministic training run, in-process or as one torchrun process (the distributed tests' worker).

    torchrun --standalone --nproc_per_node 2 tests/train_worker.py MODEL_DIR OUT_DIR MODE [KEY=VALUE ...]

MODE is lora or full (with fsdp=1 for FSDP). Rank 0 writes the per-step metrics to OUT_DIR/history.json.
"""
import json
import random
import sys

import torch

from route.tokenizer import Tokenizer
from route.batching import tokenize_example
from route.hardware import init_distributed
from route.trainer import TrainConfig, prepare_model, train

WORDS = "singer concert stadium name age country year capacity song title average count".split()
SQL = ["SELECT count(*) FROM singer;", "SELECT name FROM singer WHERE age > 20 ORDER BY name DESC LIMIT 3;",
       "SELECT avg(age) FROM singer WHERE country = 'France';", "SELECT concert_Name FROM concert;"]


def make_examples(tok, n: int = 32, seed: int = 0) -> list[dict]:
    """Chat prompts of varied length (a fake schema) with short SQL answers, like ROUTE's data."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        schema = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 40)))
        prompt = tok.chat([{"role": "system", "content": f"CREATE TABLE t ({schema})"},
                           {"role": "user", "content": f"How many {rng.choice(WORDS)}?"}])
        out.append(tokenize_example(tok, prompt, SQL[i % len(SQL)]))
    return out


def run(model_dir, out_dir, mode: str = "lora", **overrides) -> list[dict]:
    torch.manual_seed(0)  # the same fresh adapters in every process (DDP also broadcasts rank 0's)
    tc = TrainConfig(out_dir=str(out_dir), base_model=str(model_dir), full=mode == "full", max_steps=4,
                     lr=1e-3 if mode == "full" else 3e-3, batch_tokens=400, warmup=1, dtype="fp32",
                     progress=False, save_every=0, lora_dropout=0.1, grad_accum=1, eval_every=0)  # dropout: seeding tested too
    for k, v in overrides.items():
        setattr(tc, k, type(getattr(tc, k))(v) if getattr(tc, k) is not None else v)
    model = prepare_model(tc)
    return train(model, make_examples(Tokenizer.from_dir(model_dir)), tc)


if __name__ == "__main__":
    model_dir, out_dir, mode = sys.argv[1:4]
    kv = dict(a.split("=", 1) for a in sys.argv[4:])
    kv = {k: (v == "1") if k in ("fsdp", "checkpointing") else v for k, v in kv.items()}
    history = run(model_dir, out_dir, mode, **kv)
    rank, _, _ = init_distributed()
    if rank == 0:
        with open(f"{out_dir}/history.json", "w") as f:
            json.dump(history, f)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
