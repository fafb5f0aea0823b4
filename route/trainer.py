"""Multitask supervised fine-tuning (ROUTE section 3.1, MSFT): the training loop behind `train.py`.

Every MSFT task is, to this loop, a prompt then an answer as token ids, with the loss on the answer only
(batching.tokenize_examples). Each optimizer step:
1. Plan (batching.py): world_size * grad_accum length-grouped micro-batches; rank r runs its share.
2. Accumulate: the summed answer-token cross-entropy (answer_loss) divided by the step's global answer-token
   count, so any split into micro-batches, accumulation rounds or processes gives one big batch's gradient.
   The output head runs on answer positions only: over every position, a 150k-vocabulary head would cost a
   quarter of Qwen2.5-0.5B's FLOPs and its largest activation.
3. Clip and step: bf16 compute where fast, fp32 master weights, AdamW, warmup then cosine. Dropout is seeded
   per (step, micro-batch): results depend neither on the process count nor on interruptions.
4. Log and save (hardware.py, checkpoint.py): metrics, held-out loss, atomic checkpoints, exact resume; Ctrl-C or
   SIGTERM finishes the step, saves, then raises KeyboardInterrupt.
"""
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from .batching import IGNORE, Plan, collate, cut_batches
from .checkpoint import CHECKPOINT, StopSignal, append_metrics, save_checkpoint, save_result, start_step
from .hardware import (Progress, compute_dtype, distribute, init_distributed, pick_device, sharded,
                       sum_over_ranks)
from .lora import ALL_TARGETS, add_lora, lora_modules
from .model import Transformer
from .weights import load_model


@dataclass
class TrainConfig:
    """A run's settings. The defaults are this repository's recipe (train.py's defaults read them here): the
    shipped adapter's, 40 steps of LoRA on the default model, sized for a CPU."""
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
    epochs: int = 1
    max_steps: int | None = 40     # overrides epochs (the cosine ends there); None: run `epochs`
    batch_tokens: int = 4096       # padded tokens (rows x longest row) per micro-batch and process
    grad_accum: int = 2            # micro-batches per process per optimizer step
    warmup: float = 0.03           # < 1: a fraction of the steps; >= 1: a number of steps
    min_lr_ratio: float = 0.0      # the cosine ends at lr * min_lr_ratio
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip: float = 1.0              # max gradient norm; 0 disables clipping
    max_len: int = 1024            # longer examples are dropped (with a warning), never truncated
    seed: int = 0
    # machinery
    dtype: str = "auto"            # auto | bf16 | fp32 (see hardware.compute_dtype)
    device: str = "auto"
    checkpointing: bool = False    # activation checkpointing: recompute each block in backward
    fsdp: bool | None = None       # FSDP2 instead of DDP; None: FSDP for full fine-tuning under torchrun
    eval_every: int = 40           # steps between held-out losses (0: only at the end)
    save_every: int = 25           # steps between checkpoints (0: only at the end or on interrupt)
    resume: bool = False
    peak_tflops: float | None = None  # the device's peak for MFU; None: a table (GPU) or a measurement (CPU)
    adapter_dtype: str = "bf16"    # dtype of the shipped adapter file (checkpoints keep fp32)
    progress: bool = True

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (1e-5 if self.full else 3e-4)


def prepare_model(tc: TrainConfig) -> Transformer:
    """Load tc.base_model for training: LoRA adapters (fp32) on a frozen model in the compute dtype, or every
    weight trainable in fp32 (master weights; bf16 compute comes from autocast or FSDP's policy)."""
    if not tc.base_model:
        raise ValueError("TrainConfig.base_model is not set")
    _, world, _ = init_distributed()
    device = pick_device(tc.device)
    dtype = compute_dtype(tc.dtype, device)
    if tc.full:
        # FSDP shards from CPU memory (fully_shard moves each shard to the device); DDP loads straight there
        model = load_model(tc.base_model, torch.float32, "cpu" if sharded(tc, world) else device)
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        model = add_lora(load_model(tc.base_model, dtype, device), tc.lora_r, tc.lora_alpha, tc.lora_dropout,
                         tc.lora_targets)
    model.checkpointing = tc.checkpointing
    return model.train()


def _this_process(model: Transformer, tc: TrainConfig):
    """(rank, world size, device, compute dtype, log): where this process trains, and how it reports."""
    rank, world, _ = init_distributed()
    device = pick_device(tc.device) if sharded(tc, world) else next(model.parameters()).device
    return rank, world, device, compute_dtype(tc.dtype, device), tqdm.write if rank == 0 else (lambda msg: None)


def _check_trainable(raw_model: Transformer, tc: TrainConfig) -> bool:
    """Refuse a model that does not match the config; returns whether every weight trains (no LoRA)."""
    if any(m.merged for m in lora_modules(raw_model).values()):
        raise ValueError("the model's LoRA adapters are merged: unmerge_lora(model) before training")
    if not any(p.requires_grad for p in raw_model.parameters()):
        raise ValueError("the model has no trainable parameters: use prepare_model, add_lora, or unfreeze it")
    full = not lora_modules(raw_model)
    if tc.fsdp and not full:
        raise ValueError("fsdp is for full fine-tuning; LoRA runs under DDP")
    if tc.full != full:
        raise ValueError(f"TrainConfig.full={tc.full} but the model {'has' if not full else 'has no'} LoRA adapters")
    return full


def make_optimizer(trainable: list, tc: TrainConfig, device) -> torch.optim.AdamW:
    groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # none on biases and norms
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=tc.betas, fused=device.type == "cuda")


def lr_at(step: int, total: int, tc: TrainConfig) -> float:
    """Linear warmup (the first step already moves), then cosine decay to lr * min_lr_ratio."""
    warm = int(tc.warmup * total) if tc.warmup < 1 else int(tc.warmup)
    lr = tc.learning_rate
    if step < warm:
        return lr * (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return lr * (tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# ------------------------------------------------------------------ the loss: shift, sum, normalize

def answer_loss(model, tokens: torch.Tensor, labels: torch.Tensor, positions=None, mask=None):
    """(summed cross-entropy over answer tokens, their count). Position t predicts token t+1. The model's
    forward computes it (so `model` may be a DDP or FSDP wrapper), on answer positions only: no (B, T, vocab)."""
    inputs, targets = tokens[:, :-1], labels[:, 1:]  # the last token is only ever a target
    if positions is not None:
        positions, mask = positions[:, :-1], mask[:, :, :-1, :-1]
    return model(inputs, positions, mask, targets=targets), int((targets != IGNORE).sum())


def accumulate(model, examples, micro: list[list[int]], count: int, tc: TrainConfig, step: int, rank: int,
               world: int, device, dtype) -> torch.Tensor:
    """Forward and backward this process's share of a step's micro-batches; returns their summed loss.
    Dividing by `count`, the answer tokens of the whole global step, makes the gradient their mean."""
    mine = micro[rank * tc.grad_accum:(rank + 1) * tc.grad_accum]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for k, idx in enumerate(mine):
        # dropout: one stream per micro-batch of the global step, whatever the split
        torch.manual_seed((tc.seed * 1_000_003 + step) * 10_007 + rank * tc.grad_accum + k)
        batch = collate(examples, idx, device)
        last = k == len(mine) - 1  # gradients are exchanged once, after the step's last micro-batch
        if sharded(tc, world):
            model.set_requires_gradient_sync(last)
        with model.no_sync() if world > 1 and not sharded(tc, world) and not last else nullcontext():
            with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
                s, _ = answer_loss(model, *batch)
            (s * (world / count)).backward()  # DDP and FSDP average over processes: * world makes it a sum
        loss_sum += s.detach()
    return loss_sum


@torch.no_grad()
def held_out_loss(model, examples: list[dict], batch_tokens: int, dtype: torch.dtype, device: torch.device) -> float:
    """Mean cross-entropy per answer token over `examples`, shared out over the processes; leaves `model` in
    training mode."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    lengths = [len(e["input_ids"]) for e in examples]
    batches = cut_batches(sorted(range(len(examples)), key=lambda i: lengths[i]), lengths, batch_tokens)
    model.eval()
    loss, count = 0.0, 0
    # every rank runs the same number of forwards (FSDP's all-gathers are collective): spares repeat batch 0
    for j in range(rank, math.ceil(len(batches) / world) * world, world):
        batch = collate(examples, batches[j if j < len(batches) else 0], device)
        with torch.autocast(device.type, dtype, enabled=dtype != torch.float32):
            s, n = answer_loss(model, *batch)
        if j < len(batches):
            loss, count = loss + s.item(), count + n
    loss, count = sum_over_ranks(loss, count, device=device)
    model.train()
    return loss / max(count, 1)


# ------------------------------------------------------------------------------------------- the loop

def clip_gradients(params: list, max_norm: float, step: int) -> float:
    """Clip the global gradient norm to max_norm (0: no clipping); returns the norm before clipping."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    if not torch.isfinite(norm):  # the same on every rank: all stop, the last checkpoint is intact
        raise FloatingPointError(f"step {step + 1}: gradient norm is {norm.item()} (lower the lr?)")
    return norm.item()


def train(model: Transformer, examples: list[dict], tc: TrainConfig, eval_examples: list[dict] | None = None
          ) -> list[dict]:
    """Fine-tune `model` (from prepare_model); returns the per-step metrics. Writes metrics.jsonl, checkpoint.pt,
    then adapter/ (PEFT) or model/ (HF) into tc.out_dir. On Ctrl-C / SIGTERM: saves, raises KeyboardInterrupt."""
    rank, world, device, dtype, log = _this_process(model, tc)
    raw_model, full, out = model, _check_trainable(model, tc), Path(tc.out_dir)
    plan = Plan.make(examples, eval_examples, tc, world, log)
    model = distribute(raw_model, tc, world, device, dtype)
    trainable = [p for p in raw_model.parameters() if p.requires_grad]  # after distribute: FSDP swaps them
    optimizer = make_optimizer(trainable, tc, device)
    meta, total = plan.meta(tc, full), len(plan.steps)
    start = start_step(out, model, optimizer, meta, tc.resume, rank, log)
    progress = Progress(raw_model, tc, plan, start, rank, world, device, dtype)
    log(_describe(meta, plan, trainable, progress, device, dtype, world))

    def held_out(step: int) -> float:  # the one place the held-out loss is computed and reported
        loss = held_out_loss(model, plan.eval_examples, tc.batch_tokens, dtype, device)
        log(f"step {step}: held-out loss {loss:.4f}")
        return loss

    def save(step: int):  # the one place checkpoints are written (collective under FSDP: every rank saves)
        save_checkpoint(out / CHECKPOINT, model, raw_model, optimizer, step, meta, rank)

    if plan.eval_examples and tc.eval_every and start == 0:  # where the curve starts: the untrained model
        append_metrics(out, {"step": 0, "eval_loss": held_out(0)}, rank)
    history = []
    model.train()
    with StopSignal() as stop, progress:
        for step in range(start, total):
            t0, micro, done = time.perf_counter(), plan.steps[step], step + 1
            count = plan.answer_tokens(micro)  # of the whole step, all ranks: what the loss is divided by
            loss_sum = accumulate(model, plan.examples, micro, count, tc, step, rank, world, device, dtype)
            grad_norm = clip_gradients(trainable, tc.clip, step)
            lr = lr_at(step, total, tc)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # one collective: the step's loss over all ranks, and how many ranks were asked to stop (all stop)
            loss_sum, stops = sum_over_ranks(loss_sum.item(), float(stop.hit), device=device)
            history.append({"step": done, "epoch": round(plan.epoch_ends[step], 4), "loss": loss_sum / count,
                            "lr": lr, "grad_norm": grad_norm, **progress.measure(micro, count, t0)})
            progress.show(history[-1])
            if plan.eval_examples and tc.eval_every and done % tc.eval_every == 0 and done < total:
                history[-1]["eval_loss"] = held_out(done)
            append_metrics(out, history[-1], rank)
            if stops or (tc.save_every and done % tc.save_every == 0 and done < total):
                save(done)
            if stops:
                raise KeyboardInterrupt(f"saved {out / CHECKPOINT} at step {done}")
    if plan.eval_examples:  # the final held-out loss: a metrics row of its own, and in the last step's history
        loss = held_out(total)
        append_metrics(out, {"step": total, "eval_loss": loss}, rank)
        if history:
            history[-1]["eval_loss"] = loss
    save(total)
    save_result(model, raw_model, optimizer, tc, rank, dtype)
    return history


def _describe(meta: dict, plan: Plan, trainable: list, progress: Progress, device, dtype, world: int) -> str:
    return (f"{meta['examples']} examples, {meta['steps']} steps ({plan.epoch_ends[-1]:.2f} epochs) of "
            f"{plan.group} micro-batches, {sum(p.numel() for p in trainable) / 1e6:.2f}M trainable parameters, "
            f"{str(dtype).removeprefix('torch.')} on {device}, world size {world}; MFU counts "
            f"{'6N' if meta['full'] else '4N'} = {progress.fpt / 1e9:.2f} GFLOP per token against "
            f"{progress.peak / 1e12:.2f} TFLOP/s per process ({progress.source})")
