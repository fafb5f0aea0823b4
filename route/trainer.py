"""Multitask supervised fine-tuning (ROUTE section 3.1, MSFT): the training loop behind `train.py`.

ROUTE tunes one model on a mix of tasks (text-to-SQL, schema linking, noise correction, continuation
writing). To this loop they are all the same thing: a prompt followed by an answer, as token ids, with the loss
on the answer only. The caller builds the mixed list of examples ({"input_ids": [...], "labels": [...]},
`tokenize_example` makes one) and the loop does the rest:

1. Plan. Each epoch, examples are shuffled, sorted by length within windows and packed into right-padded
   micro-batches under a token budget (so no batch is mostly padding), and the micro-batches are shuffled.
   A step takes world_size * grad_accum consecutive micro-batches; rank r computes its own grad_accum of them.
   The plan is a pure function of the seed, so every rank knows every step's global answer-token count and a
   resumed run starts at exactly the right micro-batch.
2. Loss. Cross-entropy over answer tokens, summed and divided by the step's global answer-token count. Any
   split of a step into micro-batches, accumulation rounds or processes then yields the same gradient as one
   big batch (what the two-process test checks). The output head runs on answer positions only: prompts are
   long (schema + rows) and answers short, and a 150k-vocabulary head over every position would cost over a
   quarter of Qwen2.5-0.5B's FLOPs and its largest activation (fp32 logits: 600 KB per token).
3. Step. Mixed precision (bf16 where the hardware does it fast, fp32 master weights), gradient clipping, AdamW,
   warmup then cosine decay. Dropout randomness is seeded per (step, micro-batch), so results depend neither
   on the process count nor on interruptions.
4. Bookkeeping. A tqdm bar (loss, tokens/s, MFU), metrics as JSON lines, periodic held-out loss, atomic
   checkpoints (trainable weights + optimizer + step), `resume` to continue exactly, and Ctrl-C (or SIGTERM)
   finishing the current step, saving a checkpoint and raising KeyboardInterrupt.

Several processes run under torchrun: DDP (gloo on CPU, NCCL on GPU), or FSDP2 for full fine-tuning of
models whose weights and optimizer state do not fit one device.
"""
import json
import math
import os
import random
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .lora import ALL_TARGETS, TOKENIZER_FILES, add_lora, lora_modules, save_adapter
from .model import Transformer
from .packing import block_mask
from .weights import load_model, read_config, save_model

IGNORE = -100      # label of tokens without loss (prompt and padding), as in PyTorch and transformers
SORT_WINDOW = 1024  # examples sorted by length together: larger packs tighter, smaller mixes batches more


@dataclass
class TrainConfig:
    out_dir: str = "runs/route"
    base_model: str | None = None  # HF-format model directory: loaded by prepare_model, named in the adapter
    # what trains
    full: bool = False             # full fine-tuning (the paper's setting) instead of LoRA
    lora_r: int = 16
    lora_alpha: float = 32
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_TARGETS
    # optimisation
    lr: float | None = None        # None: 3e-4 for LoRA, 1e-5 for full fine-tuning
    epochs: int = 3
    max_steps: int | None = None   # overrides epochs
    batch_tokens: int = 16384      # padded tokens (rows x longest row) per micro-batch and process
    grad_accum: int = 1            # micro-batches per process per optimizer step
    warmup: float = 0.03           # < 1: a fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0      # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0              # max gradient norm; 0 disables clipping
    max_len: int = 8192            # longer examples are dropped (with a warning), never truncated
    seed: int = 0
    # machinery
    dtype: str = "auto"            # auto | bf16 | fp32 (see compute_dtype)
    device: str = "auto"
    checkpointing: bool = False    # activation checkpointing: recompute each block in backward
    fsdp: bool | None = None       # FSDP2 instead of DDP; None: FSDP for full fine-tuning under torchrun
    eval_every: int = 0            # steps between held-out losses (0: only at the end)
    save_every: int = 500          # steps between checkpoints (0: only at the end or on interrupt)
    resume: bool = False
    peak_tflops: float | None = None  # the device's peak for MFU; None: a table (GPU) or a measurement (CPU)
    adapter_dtype: str = "bf16"    # dtype of the shipped adapter file (checkpoints keep fp32)
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full else 3e-4)


# ----------------------------------------------------------------------------------------------- examples

def end_of_turn(tok) -> str:
    """The token that closes an assistant turn in the chat format: what generation stops at."""
    return {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}[tok.format]


def tokenize_example(tok, prompt, answer: str, close_turn: bool = True) -> dict:
    """A training example from a formatted prompt (a string, e.g. tok.chat(messages), or its cache parts from
    prompts.cut) and its answer text.

    The prompt goes through Tokenizer.encode_parts, exactly as generate() encodes it at inference, and the
    answer is encoded on its own (the model sees the prompt's tokens, then generates); the end-of-turn token
    is appended to the answer so the model learns to stop.
    """
    return tokenize_examples(tok, [prompt], [answer], close_turn)[0]


def tokenize_examples(tok, prompts: list, answers: list[str], close_turn: bool = True) -> list[dict]:
    """tokenize_example for many pairs at once: the tokenizers library encodes a batch on all cores."""
    eot = end_of_turn(tok) if close_turn else ""
    parts = tok.encode_parts(prompts)
    ans = tok.encode_batch([a + eot for a in answers])
    out = []
    for ps, a in zip(parts, ans):
        p = [t for part in ps for t in part]
        # prefix_len: the first part (system + schema), which packing.py shares between records
        out.append({"input_ids": p + a, "labels": [IGNORE] * len(p) + a,
                    "prefix_len": len(ps[0]) if len(ps) > 1 else 0})
    return out


def n_targets(example: dict) -> int:
    """Answer tokens that get a loss: labels[0] is never predicted (nothing comes before it)."""
    return sum(1 for t in example["labels"][1:] if t != IGNORE)


def pack(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    """Cut `order` (sorted by length) into consecutive batches with rows * longest row <= batch_tokens."""
    batches, batch, longest = [], [], 0
    for i in order:
        if batch and max(longest, lengths[i]) * (len(batch) + 1) > batch_tokens:
            batches.append(batch)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, lengths[i])
    if batch:
        batches.append(batch)
    return batches


def plan_epoch(lengths: list[int], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's micro-batches (lists of example indices): shuffle, sort by length within windows, pack,
    shuffle the batches. Tasks mix because the shuffle ignores them."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for i in range(0, len(order), SORT_WINDOW):
        window = sorted(order[i:i + SORT_WINDOW], key=lambda j: lengths[j])
        batches += pack(window, lengths, batch_tokens)
    rng.shuffle(batches)
    return batches


def plan_steps(lengths: list[int], cfg: TrainConfig, group: int) -> tuple[list[list[list[int]]], list[float]]:
    """Every optimizer step of the run, each a list of `group` = world_size * grad_accum micro-batches, and
    the (fractional) epoch each step ends. An epoch's last micro-batches that do not fill a step are skipped
    (a different few each epoch, since every epoch is shuffled anew)."""
    steps, ends, epoch = [], [], 0
    while (len(steps) < cfg.max_steps) if cfg.max_steps is not None else (epoch < cfg.epochs):
        batches = plan_epoch(lengths, cfg.batch_tokens, cfg.seed, epoch)
        if len(batches) < group:
            raise ValueError(f"an epoch has {len(batches)} micro-batches, fewer than world_size * grad_accum = "
                             f"{group}: lower batch_tokens or grad_accum")
        n = len(batches) // group
        steps += [batches[i * group:(i + 1) * group] for i in range(n)]
        ends += [epoch + (i + 1) / n for i in range(n)]
        epoch += 1
    if cfg.max_steps is not None:
        steps, ends = steps[:cfg.max_steps], ends[:cfg.max_steps]
    return steps, ends


def collate(examples: list[dict], idx: list[int], device):
    """Right-pad a micro-batch: (tokens, labels, positions, mask), tokens and labels (B, T). Padding gets label
    IGNORE; with right padding plain causal attention is exact for every real token (padding comes after it),
    so positions and mask are None, unless a row is packed (packing.py): then the rows' own positions and
    the block mask that keeps its records apart."""
    T = max(len(examples[i]["input_ids"]) for i in idx)
    tokens = torch.zeros(len(idx), T, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE, dtype=torch.long)
    packed = any("segments" in examples[i] for i in idx)
    positions = torch.arange(T).repeat(len(idx), 1) if packed else None
    segments = torch.full((len(idx), T), -1, dtype=torch.long) if packed else None
    for b, i in enumerate(idx):
        ids = examples[i]["input_ids"]
        tokens[b, :len(ids)] = torch.tensor(ids)
        labels[b, :len(ids)] = torch.tensor(examples[i]["labels"])
        if packed:
            positions[b, :len(ids)] = torch.tensor(examples[i].get("positions", range(len(ids))))
            segments[b, :len(ids)] = torch.tensor(examples[i].get("segments", [0] * len(ids)))
    to = lambda t: t.to(device, non_blocking=True) if t is not None else None  # noqa: E731
    return to(tokens), to(labels), to(positions), to(block_mask(segments) if packed else None)


def answer_loss(model, tokens: torch.Tensor, labels: torch.Tensor, positions=None, mask=None):
    """(summed cross-entropy over answer tokens, their count). Position t predicts token t+1.

    The head runs on answer positions only (logits_for=keep), a chunk at a time: never (B, T, vocab) logits.
    The loss is computed inside the model's forward, so `model` may be a DDP or FSDP wrapper.
    """
    inputs, targets = tokens[:, :-1], labels[:, 1:]  # the last token is only ever a target
    keep = targets != IGNORE
    if positions is not None:
        positions, mask = positions[:, :-1], mask[:, :, :-1, :-1]
    return model(inputs, positions, mask, targets=targets), int(keep.sum())


# ------------------------------------------------------------------------------------------ the machine

def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; starts the process group when world > 1."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    local = int(os.environ.get("LOCAL_RANK", 0))
    if world > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), dist.get_world_size(), local) if dist.is_initialized() else (0, 1, 0)


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.split(":", 1)[-1].split())


def compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """bf16 where the hardware has fast bf16 matmuls, fp32 otherwise.

    CUDA: bf16 from Ampere on (older GPUs would emulate it; fp16 is not offered: it needs loss scaling).
    CPU: bf16 with AMX or AVX512-BF16 (on this project's AVX512-BF16 EPYC a bf16 GEMM runs ~4x faster than
    fp32: 0.9 against 0.2 TFLOP/s on 2 cores), fp32 elsewhere (bf16 would be emulated, and slower).
    """
    if name != "auto":
        return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
                "float32": torch.float32}[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.get_device_capability(device)[0] >= 8 else torch.float32
    return torch.bfloat16 if _cpu_flags() & {"amx_bf16", "avx512_bf16"} else torch.float32


def sharded(cfg: TrainConfig, world: int) -> bool:
    """FSDP (explicitly, or by default for full fine-tuning) with more than one process."""
    return world > 1 and (cfg.fsdp if cfg.fsdp is not None else cfg.full)


def prepare_model(cfg: TrainConfig) -> Transformer:
    """Load cfg.base_model for training: LoRA adapters (fp32) on a frozen model in the compute dtype, or every
    weight trainable in fp32 (master weights; bf16 compute comes from autocast or FSDP's policy)."""
    if not cfg.base_model:
        raise ValueError("TrainConfig.base_model is not set")
    _, world, _ = init_distributed()
    device = pick_device(cfg.device)
    dtype = compute_dtype(cfg.dtype, device)
    if cfg.full:
        # FSDP shards from CPU memory (fully_shard moves each shard to the device); DDP loads straight there
        model = load_model(cfg.base_model, torch.float32, "cpu" if sharded(cfg, world) else device)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora(load_model(cfg.base_model, dtype, device), cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout,
                         cfg.lora_targets)
    model.checkpointing = cfg.checkpointing
    return model.train()


# Dense bf16 / fp32 peak FLOP/s (no sparsity) of common accelerators, by a substring of the device name.
PEAK_FLOPS = {"H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
              "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12), "A10": (125e12, 31.2e12),
              "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12)}
_measured: dict = {}


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float, str]:
    """(FLOP/s, where the number comes from). GPUs: the datasheet table. CPUs: a measured large GEMM in the
    training dtype (datasheets rarely state CPU peaks; this is the achievable matmul rate on this machine)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (bf16, fp32) in PEAK_FLOPS.items():
            if key in name:
                return (bf16 if dtype == torch.bfloat16 else fp32), f"{name} datasheet"
        return float("nan"), f"{name}: unknown peak (set peak_tflops)"
    if dtype not in _measured:
        n = 1024
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b
        best = float("inf")
        for _ in range(3):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
        _measured[dtype] = 2 * n ** 3 / best
    return _measured[dtype], f"measured {str(dtype).removeprefix('torch.')} GEMM on this CPU"


def flops_per_token(core: Transformer, full: bool) -> float:
    """Model FLOPs per trained token: 6N for full fine-tuning (forward 2N, backward 2N for input gradients and
    2N for weight gradients), 4N for LoRA (no weight gradients for the frozen base; the adapters are ~1%).
    N counts the transformer blocks' weights only: embeddings, the output head (run on answer tokens only),
    attention scores and activation recomputation are left out, so MFU errs low."""
    n = sum(p.numel() for name, p in core.model.layers.named_parameters() if "lora_" not in name)
    return (6 if full else 4) * n


# ----------------------------------------------------------------------------------------------- the loop

def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup (the first step already moves), then cosine decay to lr * min_lr_ratio."""
    warm = int(cfg.warmup * total) if cfg.warmup < 1 else int(cfg.warmup)
    lr = cfg.learning_rate
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _micro_seed(seed: int, step: int, micro: int) -> int:
    return (seed * 1_000_003 + step) * 10_007 + micro  # one dropout stream per micro-batch of the global step


class _StopSignal:
    """Ctrl-C / SIGTERM set a flag that the loop checks between steps (checkpoint, then stop); a second
    Ctrl-C interrupts at once."""

    def __init__(self):
        self.hit, self.saved = False, {}
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self.saved[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if self.hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.hit = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def restore(self):
        for s, h in self.saved.items():
            signal.signal(s, h)


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: Path, model, core, optimizer, step: int, meta: dict, rank: int):
    """Trainable weights (fp32) + optimizer state + step, written to a temp file and renamed into place, so
    a crash mid-write leaves the previous checkpoint intact. Collective under FSDP: every rank calls it."""
    model_sd, optim_sd = _state_dicts(model, optimizer)
    if rank == 0:
        trainable = {n for n, p in core.named_parameters() if p.requires_grad}
        state = {"step": step, "meta": meta, "optimizer": optim_sd,
                 "model": {k: v for k, v in model_sd.items() if k in trainable}}
        tmp = path.with_name(path.name + ".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path: Path, model, optimizer, meta: dict) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    state = torch.load(path, map_location="cpu", weights_only=True)
    diff = {k: (state["meta"].get(k), v) for k, v in meta.items() if state["meta"].get(k) != v}
    if diff:
        raise ValueError(f"{path}: cannot resume, the run differs from the checkpoint's "
                         + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items()))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True, strict=False))
    return state["step"]


def _append(path: Path, row: dict):
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _truncate_metrics(path: Path, step: int):
    """On resume, forget metrics logged after the checkpoint: those steps run again."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


@torch.no_grad()
def evaluate(model, examples: list[dict], batch_tokens: int, dtype: torch.dtype,
             device: torch.device) -> float:
    """Mean cross-entropy per answer token over `examples`, shared out over the processes."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = pack(sorted(range(len(examples)), key=lambda i: lengths[i]), lengths, batch_tokens)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    # every rank runs the same number of forwards (FSDP's all-gathers are collective): spares repeat batch 0
    for j in range(rank, math.ceil(len(batches) / world) * world, world):
        batch = collate(examples, batches[j if j < len(batches) else 0], device)
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            s, n = answer_loss(model, *batch)
        if j < len(batches):
            total += torch.tensor([s.item(), n], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train(was_training)
    return (total[0] / total[1].clamp(min=1)).item()


def distribute(core: Transformer, cfg: TrainConfig, world: int, device, dtype):
    """Wrap for several processes: DDP (each process holds the model; gradients are averaged), or FSDP2 for
    full fine-tuning (each block's weights, gradients and optimizer state sharded over the processes, gathered
    block by block for compute; bf16 compute and fp32 gradient reduction via its mixed-precision policy)."""
    if world == 1:
        return core
    if sharded(cfg, world):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in core.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(core, mp_policy=mp)  # must happen before the optimizer: it swaps in sharded parameters
        return core
    from torch.nn.parallel import DistributedDataParallel as DDP
    return DDP(core, device_ids=[device.index] if device.type == "cuda" else None)


def make_optimizer(trainable: list, cfg: TrainConfig, device) -> torch.optim.AdamW:
    decay = [p for _, p in trainable if p.ndim >= 2]  # no weight decay on biases and norms
    rest = [p for _, p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.learning_rate, betas=cfg.betas, fused=device.type == "cuda")


def accumulate(model, core, examples, mine: list[list[int]], count: int, cfg: TrainConfig, step: int, rank: int,
               world: int, device, dtype) -> torch.Tensor:
    """Forward and backward this process's micro-batches of a step; returns their summed loss.

    Each micro-batch's loss is divided by `count`, the answer tokens of the whole global step, so the
    accumulated gradient is the mean over all of them whatever the split.
    """
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for k, idx in enumerate(mine):
        torch.manual_seed(_micro_seed(cfg.seed, step, rank * cfg.grad_accum + k))  # dropout: same for any split
        batch = collate(examples, idx, device)
        last = k == len(mine) - 1
        # accumulate locally; gradients are exchanged once, after the step's last micro-batch
        if sharded(cfg, world):
            model.set_requires_gradient_sync(last)
        with model.no_sync() if world > 1 and not sharded(cfg, world) and not last else nullcontext():
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                s, _ = answer_loss(model, *batch)
            (s * (world / count)).backward()  # DDP and FSDP average over processes: * world makes it a sum
        loss_sum += s.detach()
    return loss_sum


def _keep(examples: list[dict], max_len: int, what: str, log) -> list[dict]:
    for e in examples:
        if len(e["input_ids"]) != len(e["labels"]):
            raise ValueError(f"{what}: an example has {len(e['input_ids'])} input_ids but {len(e['labels'])} labels")
    kept = [e for e in examples if len(e["input_ids"]) <= max_len and n_targets(e) > 0]
    if len(kept) < len(examples):
        log(f"{what}: dropped {len(examples) - len(kept)} of {len(examples)} examples "
            f"(longer than max_len={max_len} tokens, or without answer tokens)")
    if not kept:
        raise ValueError(f"{what}: no usable examples")
    return kept


def train(model: Transformer, examples: list[dict], cfg: TrainConfig, eval_examples: list[dict] | None = None
          ) -> list[dict]:
    """Fine-tune `model` (from prepare_model) on `examples`; returns the per-step metrics.

    Writes into cfg.out_dir: metrics.jsonl, checkpoint.pt, and at the end adapter/ (PEFT format) or, for full
    fine-tuning, model/ (HF format). Raises KeyboardInterrupt after saving if stopped by Ctrl-C or SIGTERM.
    """
    rank, world, _ = init_distributed()
    log = (lambda msg: tqdm.write(msg)) if rank == 0 else (lambda msg: None)
    device = pick_device(cfg.device) if sharded(cfg, world) else next(model.parameters()).device
    dtype = compute_dtype(cfg.dtype, device)
    core = model
    if any(m.merged for m in lora_modules(core).values()):
        raise ValueError("the model's LoRA adapters are merged: unmerge_lora(model) before training")
    trainable = [(n, p) for n, p in core.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters: use prepare_model, add_lora, or unfreeze it")
    full = not lora_modules(core)
    if cfg.fsdp and not full:
        raise ValueError("fsdp is for full fine-tuning; LoRA runs under DDP")
    if cfg.full != full:
        raise ValueError(f"TrainConfig.full={cfg.full} but the model {'has' if not full else 'has no'} LoRA adapters")
    out = Path(cfg.out_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)

    examples = _keep(examples, cfg.max_len, "train", log)
    if eval_examples:
        eval_examples = _keep(eval_examples, cfg.max_len, "eval", log)
    lengths = [len(e["input_ids"]) for e in examples]
    targets = [n_targets(e) for e in examples]
    if max(lengths) > cfg.batch_tokens:
        log(f"note: examples up to {max(lengths)} tokens exceed batch_tokens={cfg.batch_tokens}; they go alone")
    group = world * cfg.grad_accum
    steps, epoch_ends = plan_steps(lengths, cfg, group)
    total = len(steps)

    model = distribute(core, cfg, world, device, dtype)
    trainable = [(n, p) for n, p in core.named_parameters() if p.requires_grad]  # FSDP replaced them
    optimizer = make_optimizer(trainable, cfg, device)

    meta = {"examples": len(examples), "tokens": sum(lengths), "answer_tokens": sum(targets), "seed": cfg.seed,
            "batch_tokens": cfg.batch_tokens, "world_x_accum": group, "steps": total, "full": full}
    ckpt, metrics = out / "checkpoint.pt", out / "metrics.jsonl"
    start = 0
    if cfg.resume and ckpt.exists():
        start = load_checkpoint(ckpt, model, optimizer, meta)
        if rank == 0:
            _truncate_metrics(metrics, start)
        log(f"resumed from {ckpt} at step {start}/{total}")
    elif rank == 0 and metrics.exists():
        metrics.unlink()

    fpt = flops_per_token(core, full)
    peak, peak_src = (cfg.peak_tflops * 1e12, "given") if cfg.peak_tflops else peak_flops(device, dtype)
    n_train = sum(p.numel() for _, p in trainable)
    log(f"{len(examples)} examples, {total} steps ({epoch_ends[-1]:.2f} epochs) of {group} micro-batches, "
        f"{n_train / 1e6:.2f}M trainable parameters, {str(dtype).removeprefix('torch.')} on {device}, world size {world}; MFU counts "
        f"{'6N' if full else '4N'} = {fpt / 1e9:.2f} GFLOP per token against {peak / 1e12:.2f} TFLOP/s ({peak_src})")

    if eval_examples and cfg.eval_every and start == 0:  # where the curve starts: the untrained model
        loss0 = evaluate(model, eval_examples, cfg.batch_tokens, dtype, device)
        log(f"step 0: held-out loss {loss0:.4f}")
        if rank == 0:
            _append(metrics, {"step": 0, "eval_loss": loss0})

    stop = _StopSignal()
    bar = tqdm(total=total, initial=start, desc="train", disable=not (cfg.progress and rank == 0), unit="step")
    history, t_start = [], time.perf_counter()
    model.train()
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            micro = steps[step]
            count = sum(targets[i] for b in micro for i in b)  # the global answer-token count of this step
            mine = micro[rank * cfg.grad_accum:(rank + 1) * cfg.grad_accum]
            loss_sum = accumulate(model, core, examples, mine, count, cfg, step, rank, world, device, dtype)
            grad_norm = torch.nn.utils.clip_grad_norm_([p for _, p in trainable],
                                                       cfg.clip if cfg.clip > 0 else float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if not torch.isfinite(grad_norm):  # the same on every rank: all stop, the last checkpoint is intact
                raise FloatingPointError(f"step {step + 1}: gradient norm is {grad_norm.item()} (lower the lr?)")
            lr = lr_at(step, total, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            flags = torch.tensor([loss_sum.item(), float(stop.hit)], dtype=torch.float64, device=device)
            if world > 1:
                dist.all_reduce(flags)
            dt = time.perf_counter() - t0
            n_tok = sum(lengths[i] for b in micro for i in b)
            padded = sum(len(b) * max(lengths[i] for i in b) for b in micro)
            mfu = fpt * n_tok / dt / peak if math.isfinite(peak) else None
            row = {"step": step + 1, "epoch": round(epoch_ends[step], 4), "loss": flags[0].item() / count,
                   "lr": lr, "grad_norm": grad_norm.item(), "tokens": n_tok, "answer_tokens": count,
                   "padding": round(1 - n_tok / padded, 4), "tokens_per_s": n_tok / dt, "mfu": mfu,
                   "elapsed_s": time.perf_counter() - t_start}
            history.append(row)
            bar.update(1)
            bar.set_postfix_str(f"loss {row['loss']:.4f}, {row['tokens_per_s']:.0f} tok/s"
                                + (f", MFU {mfu:.1%}" if mfu is not None else ""))
            done = step + 1
            if eval_examples and cfg.eval_every and done % cfg.eval_every == 0 and done < total:
                row["eval_loss"] = evaluate(model, eval_examples, cfg.batch_tokens, dtype, device)
                log(f"step {done}: held-out loss {row['eval_loss']:.4f}")
            if rank == 0:
                _append(metrics, row)
            if flags[1].item() > 0:
                save_checkpoint(ckpt, model, core, optimizer, done, meta, rank)
                log(f"saved {ckpt} at step {done}; continue with resume")
                raise KeyboardInterrupt
            if cfg.save_every and done % cfg.save_every == 0 and done < total:
                save_checkpoint(ckpt, model, core, optimizer, done, meta, rank)
    finally:
        bar.close()
        stop.restore()

    if eval_examples:
        loss = evaluate(model, eval_examples, cfg.batch_tokens, dtype, device)
        log(f"held-out loss {loss:.4f}")
        if history:
            history[-1]["eval_loss"] = loss
        if rank == 0:
            _append(metrics, {"step": total, "eval_loss": loss})
    save_checkpoint(ckpt, model, core, optimizer, total, meta, rank)
    save_result(model, core, optimizer, cfg, rank, dtype)
    return history


def save_result(model, core: Transformer, optimizer, cfg: TrainConfig, rank: int, dtype: torch.dtype):
    """The deliverable: out_dir/adapter (PEFT format, bf16) for LoRA, out_dir/model (HF format) for full."""
    out = Path(cfg.out_dir)
    if lora_modules(core):
        if rank == 0:
            save_adapter(core, out / "adapter", cfg.base_model, dtype=cfg.adapter_dtype)
        return
    if not cfg.base_model:
        raise ValueError("full fine-tuning needs TrainConfig.base_model to write the model's config.json")
    _, hf_config = read_config(cfg.base_model)
    model_sd, _ = _state_dicts(model, optimizer)  # gathers FSDP shards (a collective)
    if rank == 0:
        with torch.device("meta"):
            plain = Transformer(core.config)
        plain.load_state_dict(model_sd, strict=False, assign=True)
        if core.config.tie_word_embeddings:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        save_model(plain, out / "model", hf_config, dtype=dtype if dtype != torch.float32 else None)
        for f in TOKENIZER_FILES:
            if (Path(cfg.base_model) / f).exists():
                (out / "model" / f).write_bytes((Path(cfg.base_model) / f).read_bytes())
    if dist.is_initialized():
        dist.barrier()
