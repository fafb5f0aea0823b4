"""Generation speed: this engine against transformers' generate() on the same checkpoint and prompts.

    python bench/generate.py                      # the default model (random Qwen2.5-0.5B-shaped weights if absent)
    python bench/generate.py --model DIR --dtype bf16 --new 64 --repeat 3
    python bench/generate.py --variants base      # only the unquantized engine in --dtype, against transformers
    python bench/generate.py --device cuda        # adds batch 64

Our engine runs in --dtype ("base", auto: route.hardware.compute_dtype, fp32 on a CPU without fast bf16), in bf16, and
with weight-only int8 and int4 linear layers (route/quant.py; CPU only); transformers in --dtype. Prints prefill
tokens/s (one 600-token prompt), decode tokens/s at batch 1 and batch 16 (greedy, EOS ignored so both sides decode
exactly --new tokens), the ratios to transformers, the bytes a batch-1 decode step reads (every weight once) and the
bandwidth that implies, against the read bandwidth measured in the same run (a sum over 512 MB; on CUDA a
device-to-device copy), the CPU and its bf16 flags, and which ops each engine spends its time in for a 1-token and
a 32-token forward (torch.profiler). Each figure is the best of --repeat runs after one warm-up per engine; the
default (1) keeps a CPU run of all five engines to minutes, at the cost of noise from other processes.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from route.generate import generate  # noqa: E402
from route.model import pack_linears  # noqa: E402
from route.tokenizer import Tokenizer  # noqa: E402
from route.weights import load_model  # noqa: E402


def best(fn, repeat, warm=True, timed=True):
    """The shortest of `repeat` runs of fn after a warm-up run; timed=False: fn returns its own seconds."""
    if warm:
        fn()  # warm-up
    if not timed:
        return min(fn() for _ in range(repeat))
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


MARKS = []  # when each generation's first new token was there (time.perf_counter)


class FirstToken:
    """A transformers streamer noting when the first new token is there (its first put() is the prompt)."""

    def __init__(self):
        self.puts = 0

    def put(self, _):
        self.puts += 1
        if self.puts == 2:
            sync()
            MARKS.append(time.perf_counter())

    def end(self):
        pass


def mark_prefill():
    """Have our engine note when each batch's prefill (which yields its first token's logits) is done."""
    import route.generate as engine

    prefill = engine._prefill

    def noted(*args, **kwargs):
        out = prefill(*args, **kwargs)
        sync()
        MARKS.append(time.perf_counter())
        return out

    engine._prefill = noted


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


def read_bandwidth() -> float:
    """Bytes per second read by a sum over a 512 MB fp32 tensor: the bound for weight-read-bound CPU decoding."""
    x = torch.ones(1 << 27)
    return x.nbytes / best(x.sum, 3)


def cpu_name() -> str:
    """The CPU model and whether it multiplies bf16 natively (AVX512-BF16, AMX): without, torch emulates bf16."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln for ln in info.splitlines() if ln.startswith("flags")), "").split())
    have = ", ".join(f"{f} {'yes' if f in flags else 'no'}" for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{name} ({have})"


def bytes_per_token(model) -> int:
    """Bytes a batch-1 decode step reads: each linear layer's weight (with its scales) and bias, the norms; of
    the embedding one row (a tied lm_head is the embedding, counted once, as the head)."""
    seen, total = set(), 0
    for m in model.modules():
        for t in (getattr(m, k, None) for k in ("weight", "scale", "bias")):
            if isinstance(t, torch.Tensor) and id(t) not in seen:
                seen.add(id(t))
                total += t.nbytes
    head = model.lm_head.weight
    return total if head is model.model.embed_tokens.weight else total - model.model.embed_tokens.weight.nbytes


def top_ops(forward, n=3) -> str:
    """The ops taking the most CPU time in one call of `forward` (torch.profiler): which kernels a path runs."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        forward()
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return ", ".join(f"{e.key.removeprefix('aten::')} {e.self_cpu_time_total / total:.0%}" for e in ops[:n])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                    help="the unquantized baseline and transformers' dtype (auto: route.hardware.compute_dtype); "
                    "bf16 is measured too, and the quantized models run their other layers in this dtype")
    ap.add_argument("--variants", default="base,bf16,int8,int4", help="our engine's variants: base (--dtype), "
                    "bf16, fp32, int8, int4 (weight-only, other layers in --dtype); transformers runs in --dtype")
    ap.add_argument("--new", type=int, default=32, help="tokens decoded per prompt")
    ap.add_argument("--batch", default=None, help="decode batch sizes (default: 1,16 on CPU, 1,16,64 on CUDA)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per figure after a warm-up; the best counts")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    import transformers

    from route import hub
    from route.hardware import compute_dtype
    from route.quant import quantize

    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else hub.default_model_dir(fetch=False)
    if not (path / "config.json").exists():
        path = Path("/tmp/route-bench-qwen05")
        if not (path / "config.json").exists():
            random_checkpoint(path)
        print(f"default model absent: random Qwen2.5-0.5B-shaped weights at {path} (no tokenizer: token ids)")
    torch.manual_seed(0)
    dev = torch.device(args.device)
    base = compute_dtype(args.dtype, dev)
    name = {torch.bfloat16: "bf16", torch.float32: "fp32"}[base]
    batches = [int(b) for b in (args.batch or ("1,16,64" if dev.type == "cuda" else "1,16")).split(",")]
    tok = NoEos(Tokenizer.from_dir(path)) if (path / "tokenizer.json").exists() else None
    print(f"{path.name}, {torch.get_num_threads()} threads, transformers {transformers.__version__}, "
          f"torch {torch.__version__}, best of {args.repeat} run(s) after a warm-up, {args.new} tokens decoded")
    if dev.type == "cpu":
        print(f"CPU: {cpu_name()}")
        bw = read_bandwidth()
        print(f"read bandwidth: a sum over a 512 MB fp32 tensor reads {bw / 1e9:.1f} GB/s")
    else:
        bw = copy_bandwidth(dev)
        print(f"{torch.cuda.get_device_name(dev)}: a device-to-device copy moves {bw / 1e9:.0f} GB/s")

    g = torch.Generator().manual_seed(0)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    lo, hi = min(1000, vocab // 2), min(vocab, 30000)  # ordinary tokens (a tiny test model has a few hundred)
    short = torch.randint(lo, hi, (max(batches), 32), generator=g)   # decode prompts
    long = torch.randint(lo, hi, (1, 600), generator=g)              # prefill prompt
    # token ids straight in; without a tokenizer, a stand-in that decodes nothing
    stub = tok or type("T", (), {"eos_ids": [], "pad_id": 0, "encode": None, "decode": lambda s, x: ""})()
    one, some = short[:1, :1].to(dev), short[:1].to(dev)  # profiled forwards (after the timed runs: warm)

    def measure(run):
        """tok/s: the 600-token prefill; per decode batch, the tokens after the first over the time after the first
        (one run: MARKS). One warm-up run per engine, then the best of --repeat runs."""
        run(short[:2], 2)
        out = {"prefill 600": 600 / best(lambda: run(long, 1), args.repeat, warm=False)}
        for b in batches:
            out[f"decode b{b}"] = b * (args.new - 1) / best(lambda: run(short[:b], args.new) - MARKS[-1],
                                                            args.repeat, warm=False, timed=False)
        return out

    dtypes = {"base": base, "bf16": torch.bfloat16, "fp32": torch.float32}
    variants = dict.fromkeys(v.replace("base", name) for v in args.variants.split(","))  # unique, in order
    rows, info = {}, {}
    mark_prefill()
    for label in variants:
        dtype, quant = dtypes.get(label, base), None if label in dtypes else label
        ours = load_model(path, dtype=dtype, device=dev)
        try:
            n = quantize(ours, quant) if quant else 0
        except ValueError as e:
            print(f"route {label}: skipped: {e}")
            continue
        nbytes, packed = bytes_per_token(ours), pack_linears(ours)  # what infer.py does

        def ours_run(ids, new):  # -> when it ended
            generate(ours, stub, [x.tolist() for x in ids], max_new_tokens=new, max_batch=256, progress=False)
            sync()
            return time.perf_counter()

        rows[f"route {label}"] = measure(ours_run)
        info[f"route {label}"] = (nbytes, f"{n} quantized, {packed} packed", top_ops(
            lambda: ours.head(ours.hidden(one))), top_ops(lambda: ours.head(ours.hidden(some)[:, -1:])))
        del ours
        print(f"route {label}: done", flush=True)

    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=base).to(dev).eval()

    def ref_run(ids, new):
        ids = ids.to(dev)
        with torch.inference_mode():
            ref.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                         do_sample=False, pad_token_id=0, streamer=FirstToken())
        sync()
        return time.perf_counter()

    ref_name = f"transformers {name}"
    rows[ref_name] = measure(ref_run)
    info[ref_name] = (sum(p.nbytes for p in ref.parameters()) - ref.model.embed_tokens.weight.nbytes *
                      (ref.lm_head.weight is not ref.model.embed_tokens.weight), "",
                      top_ops(lambda: ref(one)), top_ops(lambda: ref(some, logits_to_keep=1)))

    cols = list(rows[ref_name])
    print(f"\ntok/s (and ours / {ref_name})\n{'':28}" + "".join(f"{c:>22}" for c in cols))
    for label, r in rows.items():
        print(f"{label:28}" + "".join(f"{r[c]:>12.1f} ({r[c] / rows[ref_name][c]:5.2f}x)" for c in cols))
    print(f"\nbatch-1 decode reads the weights once per token; share of the measured read bandwidth "
          f"(measured above: {bw / 1e9:.1f} GB/s)\n{'':28}{'GB/token':>10}{'GB/s':>8}{'share':>7}")
    for label, (nbytes, *_) in info.items():
        rate = nbytes * rows[label]["decode b1"]
        print(f"{label:28}{nbytes / 1e9:>10.3f}{rate / 1e9:>8.1f}{rate / bw:>7.0%}")
    print("\nkernels: top ops by CPU time in one forward (torch.profiler)")
    for label, (_, what, one, many) in info.items():
        print(f"{label}{' (' + what + ')' if what else ''}\n    1 token:   {one}\n    32 tokens: {many}")


if __name__ == "__main__":
    main()
