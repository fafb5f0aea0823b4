"""Generation speed: this engine against transformers' generate() on the same checkpoint, dtype and prompts.

    python bench/generate.py                      # the default model (random Qwen2.5-0.5B-shaped weights if absent)
    python bench/generate.py --model DIR --dtype bf16 --new 64
    python bench/generate.py --device cuda        # adds batch 64 and our decode without CUDA graphs

Prints prefill tokens/s (one ~600-token prompt), decode tokens/s at batch 1 and batch 16 (greedy, EOS
ignored so both sides decode exactly --new tokens), the ratios ours / transformers, and at batch 1 the
achieved weight-read bandwidth (every decode step reads all weights once; on CUDA also as a share of the
measured device-to-device copy bandwidth, the bound). Each figure is the best of --repeat runs, which resists
noise from other processes on a shared machine.
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
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a 1 GB device-to-device copy: the memory-bandwidth bound."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return 2 * a.numel() / best(lambda: b.copy_(a), 5)


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
    ap.add_argument("--batch", default=None, help="decode batch sizes (default: 1,16 on CPU, 1,16,64 on CUDA)")
    ap.add_argument("--device", default="cpu")
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
    dev = torch.device(args.device)
    batches = [int(b) for b in (args.batch or ("1,16,64" if dev.type == "cuda" else "1,16")).split(",")]
    ours = load_model(path, dtype=dtype, device=dev)
    n_params = sum(p.numel() for p in ours.parameters())
    weight_bytes = n_params * ours.model.embed_tokens.weight.element_size()
    packed = pack_linears(ours)  # what infer.py does on CPU
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(dev).eval()
    tok = NoEos(Tokenizer.from_dir(path)) if (path / "tokenizer.json").exists() else None
    vocab = ours.config.vocab_size
    print(f"{path.name}: {n_params / 1e6:.0f}M parameters, {args.dtype}, {torch.get_num_threads()} threads, "
          f"transformers {transformers.__version__}, torch {torch.__version__}, {packed} linear layers packed")

    g = torch.Generator().manual_seed(0)
    short = torch.randint(1000, min(vocab, 30000), (max(batches), 32), generator=g)   # decode prompts
    long = torch.randint(1000, min(vocab, 30000), (1, 600), generator=g)            # prefill prompt

    # token ids straight in; without a tokenizer, a stand-in that decodes nothing
    stub = tok or type("T", (), {"eos_ids": [], "pad_id": 0, "encode": None, "decode": lambda s, x: ""})()

    def ours_run(ids, new, graphs=True):
        return generate(ours, stub, [x.tolist() for x in ids], max_new_tokens=new, max_batch=256,
                        cuda_graphs=graphs, progress=False)

    def ref_run(ids, new):
        ids = ids.to(dev)
        with torch.inference_mode():
            return ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                do_sample=False, pad_token_id=0)

    rows = []
    t_ours, t_ref = best(lambda: ours_run(long, 1), args.repeat), best(lambda: ref_run(long, 1), args.repeat)
    rows.append(("prefill 600 tokens, batch 1", 600 / t_ours, 600 / t_ref))
    for b in batches:
        ids = short[:b]
        p_ours, p_ref = best(lambda: ours_run(ids, 1), args.repeat), best(lambda: ref_run(ids, 1), args.repeat)
        f_ours = best(lambda: ours_run(ids, args.new), args.repeat)
        f_ref = best(lambda: ref_run(ids, args.new), args.repeat)
        # decode rate: the tokens after the first, over the time after prefill
        rate_ref = b * (args.new - 1) / (f_ref - p_ref)
        rows.append((f"decode, batch {b}", b * (args.new - 1) / (f_ours - p_ours), rate_ref))
        if dev.type == "cuda":
            f_eager = best(lambda: ours_run(ids, args.new, graphs=False), args.repeat)
            rows.append((f"decode, batch {b}, no CUDA graph", b * (args.new - 1) / (f_eager - p_ours), rate_ref))
    print(f"\n{'':32}{'ours tok/s':>12}{'transformers':>14}{'ratio':>8}")
    for name, a, r in rows:
        print(f"{name:32}{a:>12.1f}{r:>14.1f}{a / r:>7.2f}x")
    b1 = rows[1][1]
    print(f"\nbatch-1 decode reads the weights once per token: {weight_bytes / 1e9:.2f} GB x {b1:.1f} tok/s "
          f"= {weight_bytes * b1 / 1e9:.1f} GB/s")
    if dev.type == "cuda":
        bw = copy_bandwidth(dev)
        print(f"{torch.cuda.get_device_name(dev)}: a device-to-device copy moves {bw / 1e9:.0f} GB/s, so batch-1 "
              f"decode runs at {weight_bytes * b1 / bw:.0%} of the bandwidth bound ({bw / weight_bytes:.0f} tok/s)")


if __name__ == "__main__":
    main()
