"""What lets a fine-tuning run (ROUTE section 3.1, MSFT) survive interruptions.

- Checkpoints: trainable weights (fp32) + optimizer state + step, written atomically; resuming checks the
  run's metadata against the checkpoint's, or it would silently train something else.
- Metrics (out_dir/metrics.jsonl), Ctrl-C / SIGTERM handling, and the result: out_dir/adapter (PEFT format)
  for LoRA, out_dir/model (HF format) for full fine-tuning.
"""
import json
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from .files import atomic_file
from .hub import portable_name
from .lora import lora_modules, save_adapter
from .model import Transformer
from .weights import read_config, save_model

CHECKPOINT, METRICS = "checkpoint.pt", "metrics.jsonl"


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict  # slow: 0.8 s
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_checkpoint(path: Path, model, raw_model, optimizer, step: int, meta: dict, rank: int):
    """Trainable weights (fp32) + optimizer state + step, written atomically, so a crash mid-write leaves the
    previous checkpoint intact. Collective under FSDP: every rank calls it."""
    model_sd, optim_sd = _state_dicts(model, optimizer)
    if rank == 0:
        trainable = {n for n, p in raw_model.named_parameters() if p.requires_grad}
        state = {"step": step, "meta": meta, "optimizer": optim_sd,
                 "model": {k: v for k, v in model_sd.items() if k in trainable}}
        with atomic_file(path) as tmp:
            torch.save(state, tmp)
    if dist.is_initialized():
        dist.barrier()


def start_step(out: Path, model, optimizer, meta: dict, resume: bool, rank: int, log=print) -> int:
    """The step to start at: the checkpoint's when resuming (metrics logged after it are forgotten: those steps
    run again), else 0 with a fresh metrics file."""
    metrics = out / METRICS
    if resume and not (out / CHECKPOINT).exists():  # starting over would delete the metrics it meant to extend
        raise FileNotFoundError(f"{out}: nothing to resume, no {CHECKPOINT} there (leave --resume out to start)")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if resume:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
        state = torch.load(out / CHECKPOINT, map_location="cpu", weights_only=True)
        diff = {k: (state["meta"].get(k), v) for k, v in meta.items() if state["meta"].get(k) != v}
        if diff:
            raise ValueError(f"{out / CHECKPOINT}: cannot resume, the run differs from the checkpoint's "
                             + ", ".join(f"{k}: {a!r} then, {b!r} now" for k, (a, b) in diff.items()))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=False))
        step = state["step"]
        if rank == 0 and metrics.exists():
            rows = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
            with atomic_file(metrics) as tmp:
                tmp.write_text("".join(ln + "\n" for ln in rows))
        log(f"resumed from {out / CHECKPOINT} at step {step}/{meta['steps']}")
        return step
    if rank == 0 and metrics.exists():
        metrics.unlink()
    return 0


def append_metrics(out: Path, row: dict, rank: int):
    if rank == 0:
        with open(out / METRICS, "a") as f:
            f.write(json.dumps(row) + "\n")


class StopSignal:
    """`with StopSignal() as stop:` Ctrl-C / SIGTERM set stop.hit, which the loop checks between steps
    (checkpoint, then stop); a second Ctrl-C interrupts at once. The previous handlers come back on exit."""

    def __enter__(self):
        self.hit, self.saved = False, {}
        if threading.current_thread() is threading.main_thread():  # the only one allowed to set handlers
            self.saved = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.hit = True
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *_):
        for s, h in self.saved.items():
            signal.signal(s, h)


def save_result(model, raw_model: Transformer, optimizer, tc, rank: int, dtype: torch.dtype):
    """The deliverable: out_dir/adapter (PEFT format, bf16) for LoRA, out_dir/model (HF format) for full."""
    out = Path(tc.out_dir)
    if lora_modules(raw_model):
        if rank == 0:
            save_adapter(raw_model, out / "adapter", portable_name(tc.base_model), dtype=tc.adapter_dtype)
        return
    if not tc.base_model:
        raise ValueError("full fine-tuning needs TrainConfig.base_model to write the model's config.json")
    _, hf_config = read_config(tc.base_model)
    model_sd, _ = _state_dicts(model, optimizer)  # gathers FSDP shards (a collective)
    if rank == 0:
        with torch.device("meta"):
            plain = Transformer(raw_model.config)
        plain.load_state_dict(model_sd, strict=False, assign=True)
        if raw_model.config.tie_word_embeddings:
            plain.lm_head.weight = plain.model.embed_tokens.weight
        save_model(plain, out / "model", hf_config, dtype=dtype if dtype != torch.float32 else None,
                   tokenizer_from=tc.base_model)
    if dist.is_initialized():
        dist.barrier()
