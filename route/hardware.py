"""The hardware under the training loop (ROUTE section 3.1, MSFT): which device and compute dtype; the processes
(under torchrun: DDP, gloo on CPU and NCCL on GPU, or FSDP2 for full fine-tuning of models whose weights and
optimizer state do not fit one device); and the model FLOPs utilization, MFU = model FLOPs per token
(flops_per_token) x tokens/s / (peak FLOP/s (peak_flops) x processes).
"""
import math
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .model import Transformer
from .weights import DTYPES

# Dense bf16 / fp32 peak FLOP/s (no sparsity) of common accelerators, by a substring of the device name.
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12),
              "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12)}
_measured: dict = {}


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has fast bf16 matmuls (CUDA from Ampere on; CPUs with AMX or AVX512-BF16), else
    fp32: emulated bf16 is slower. No fp16: it needs loss scaling, which this loop omits."""
    if name != "auto":
        if DTYPES.get(name) == torch.float16:
            raise ValueError("fp16 training needs loss scaling, which this trainer does not do: use bf16 or fp32")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    try:
        flags = next((ln for ln in Path("/proc/cpuinfo").read_text().splitlines() if ln.startswith("flags")), "")
    except OSError:  # not Linux
        flags = ""
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags.split()) else torch.float32


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size(), local) if dist.is_initialized() else (0, 1, 0)


def sharded(tc, world: int) -> bool:
    """FSDP (explicitly, or by default for full fine-tuning) with more than one process."""
    return world > 1 and (tc.fsdp if tc.fsdp is not None else tc.full)


def distribute(raw_model: Transformer, tc, world: int, device, dtype):
    """Wrap for several processes: DDP, or FSDP2 (each block sharded, gathered block by block for compute)."""
    if world == 1:
        return raw_model
    if sharded(tc, world):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in raw_model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(raw_model, mp_policy=mp)  # must happen before the optimizer: it swaps in sharded parameters
        return raw_model
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(raw_model, device_ids=[device.index] if device.type == "cuda" else None)


def sum_over_ranks(*values: float, device) -> list[float]:
    """Each value summed over the processes, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the number comes from): GPUs from the datasheet table, CPUs (which rarely have a stated
    peak) from a measured large GEMM in the training dtype."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in PEAK_FLOPS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"{name} datasheet"
        return float("nan"), f"{name}: unknown peak (set peak_tflops)"
    if dtype not in _measured:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _measured[dtype] = 2 * n ** 3 / best
    return _measured[dtype], f"measured {str(dtype).removeprefix('torch.')} GEMM on this CPU"


def flops_per_token(raw_model, full: bool) -> float:
    """Model FLOPs per trained token: 6N for full fine-tuning (forward 2N, backward 2N + 2N for input and weight
    gradients), 4N for LoRA (no weight gradients for the frozen base). N: the blocks' weights only (no
    embeddings, output head, attention scores or recomputation), so MFU errs low."""
    n = sum(p.numel() for name, p in raw_model.model.layers.named_parameters() if "lora_" not in name)
    return (6 if full else 4) * n


class Progress:
    """`with progress:` a progress bar over the steps, timed from there; measure() gives a step's throughput."""

    def __init__(self, raw_model, tc, plan, start: int, rank: int, world: int, device, dtype):
        self.fpt, self.lengths, self.world = flops_per_token(raw_model, tc.full), plan.lengths, world
        self.peak, self.source = (tc.peak_tflops * 1e12, "given") if tc.peak_tflops else peak_flops(device, dtype)
        self.bar_args = dict(total=len(plan.steps), initial=start, desc="train", unit="step",
                             disable=not (tc.progress and rank == 0))

    def __enter__(self):
        self.bar, self.t_start = tqdm(**self.bar_args), time.perf_counter()
        return self

    def __exit__(self, *_):
        self.bar.close()

    def measure(self, micro: list[list[int]], count: int, t0: float) -> dict:
        """Tokens/s, padding and MFU of a step that started at time.perf_counter() = t0. `micro` holds every
        process's micro-batches: the tokens of the whole job, against the peak of all its devices."""
        seconds = time.perf_counter() - t0
        n_tok = sum(self.lengths[i] for b in micro for i in b)
        padded = sum(len(b) * max(self.lengths[i] for i in b) for b in micro)
        return {"tokens": n_tok, "answer_tokens": count, "padding": round(1 - n_tok / padded, 4),
                "tokens_per_s": n_tok / seconds,
                "mfu": self.fpt * n_tok / seconds / (self.peak * self.world) if math.isfinite(self.peak) else None,
                "elapsed_s": time.perf_counter() - self.t_start}

    def show(self, row: dict):
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {row['loss']:.4f}, {row['tokens_per_s']:.0f} tok/s"
                                 + (f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else ""))
