"""Generation speed: this engine against transformers' generate() on the same checkpoint, dtype and prompts.

    python bench/generate.py                      # the default model (random Qwen2.5-0.5B-shaped weights if absent)
    python bench/generate.py --model DIR --dtype bf16 --new 64

Prints prefill tokens/s (one ~600-token prompt), decode tokens/s at batch 1 and batch 16 (greedy, EOS
ignored so both sides decode exactly --new tokens), the ratios ours / transformers, and at batch 1 the
achieved weight-read bandwidth (every decode step reads all weights once). Each figure is the best of
--repeat runs, which resists noise from other processes on a shared machine.
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from route.generate import generate  # noqa: E402
from route.model import pack_linears  # noqa: E402
from route.tokenizer import Tokenizer  # noqa: E402
from route.weights import load_model  # noqa: E402


def best(fn, repeat):
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


class NoEos:
    """The tokenizer, minus its EOS ids, so both engines decode exactly the requested number of tokens."""

    def __init__(self, tok):
        self.tok, self.eos_ids, self.pad_id = tok, [], tok.pad_id

    def __getattr__(self, name):
        return getattr(self.tok, name)


def random_checkpoint(path: Path):
    import transformers

    cfg = transformers.Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True)
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return path


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--new", type=int, default=64, help="tokens decoded per prompt")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import transformers

    from route import hub

    path = Path(args.model) if args.model else hub.default_model_dir(fetch=False)
    if not (path / "config.json").exists():
        path = Path("/tmp/route-bench-qwen05")
        if not (path / "config.json").exists():
            random_checkpoint(path)
        print(f"default model absent: random Qwen2.5-0.5B-shaped weights at {path} (no tokenizer: token ids)")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    ours = load_model(path, dtype=dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = n_params * ours.model.embed_tokens.weight.element_size()
    packed = pack_linears(ours)  # what infer.py does on CPU
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    tok = NoEos(Tokenizer.from_dir(path)) if (path / "tokenizer.json").exists() else None
    vocab = ours.config.vocab_size
    print(f"{path.name}: {n_params / 1e6:.0f}M parameters, {args.dtype}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, {packed} linear layers packed")

    g = torch.Generator().manual_seed(0)
    short = torch.randint(1000, min(vocab, 30000), (args.batch, 32), generator=g)   # decode prompts
    long = torch.randint(1000, min(vocab, 30000), (1, 600), generator=g)            # prefill prompt

    def ours_run(ids, new):
        if tok is None:  # token ids straight in; a stand-in tokenizer that decodes nothing
            stub = type("T", (), {"eos_ids": [], "pad_id": 0, "encode": None, "decode": lambda s, x: ""})()
            return generate(ours, stub, [x.tolist() for x in ids], max_new_tokens=new, progress=False)
        return generate(ours, tok, [x.tolist() for x in ids], max_new_tokens=new, progress=False)

    def ref_run(ids, new):
        with torch.inference_mode():
            return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)

    rows = []
    t_ours, t_ref = best(lambda: ours_run(long, 1), args.repeat), best(lambda: ref_run(long, 1), args.repeat)
    rows.append(("prefill 600 tokens, batch 1", 600 / t_ours, 600 / t_ref))
    for b in (1, args.batch):
        ids = short[:b]
        p_ours, p_ref = best(lambda: ours_run(ids, 1), args.repeat), best(lambda: ref_run(ids, 1), args.repeat)
        f_ours = best(lambda: ours_run(ids, args.new), args.repeat)
        f_ref = best(lambda: ref_run(ids, args.new), args.repeat)
        # decode rate: the tokens after the first, over the time after prefill
        rows.append((f"decode, batch {b}", b * (args.new - 1) / (f_ours - p_ours), b * (args.new - 1) / (f_ref - p_ref)))
    print(f"\n{'':32}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}")
    for name, a, r in rows:
        print(f"{name:32}{a:>12.1f}{r:>14.1f}{a / r:>7.2f}x")
    b1 = rows[1][1]
    print(f"\nbatch-1 decode reads the weights once per token: {weight_bytes / 1e9:.2f} GB x {b1:.1f} tok/s "
          f"= {weight_bytes * b1 / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
