"""The training loop: answer-only loss, length-grouped batches, learning, exact resume, two processes = one."""
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from route import trainer
from route.lora import load_adapter, lora_modules
from route.tokenizer import Tokenizer
from route.batching import IGNORE, collate, plan_epoch, plan_steps, tokenize_example, tokenize_examples
from route.trainer import TrainConfig, answer_loss, lr_at, prepare_model, train
from route.weights import load_model
from tiny import write_tiny_dir
from train_worker import make_examples, run

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2")
    return write_tiny_dir(path)


def test_tokenize_example_masks_the_prompt(tiny):
    tok = Tokenizer.from_dir(tiny)
    prompt = tok.chat([{"role": "user", "content": "How many singers?"}])
    ex = tokenize_example(tok, prompt, "SELECT count(*) FROM singer;")
    p = tok.encode(prompt)
    assert ex["input_ids"][:len(p)] == p and ex["labels"][:len(p)] == [IGNORE] * len(p)
    assert ex["labels"][len(p):] == ex["input_ids"][len(p):]
    assert ex["input_ids"][-1] == tok.tok.token_to_id("<|im_end|>")  # the model learns to stop
    assert tok.decode(ex["input_ids"][len(p):]) == "SELECT count(*) FROM singer;"


def test_tokenize_examples_equals_encoding_each_pair(tiny):
    """The batched tokenization train.py uses (encode_batch, parallel) gives each pair's own encoding."""
    tok = Tokenizer.from_dir(tiny)
    pairs = [(tok.chat([{"role": "user", "content": q}]), a) for q, a in
             [("How many singers?", "SELECT count(*) FROM singer"), ("x", "correct"), ("Names?", " SELECT name")]]
    got = tokenize_examples(tok, [p for p, _ in pairs], [a for _, a in pairs])
    for ex, (p, a) in zip(got, pairs):
        assert ex["input_ids"] == tok.encode(p) + tok.encode(a + "<|im_end|>")
        assert ex["labels"] == [IGNORE] * len(tok.encode(p)) + tok.encode(a + "<|im_end|>")


def test_batches_are_length_grouped_under_the_budget():
    lengths = [(i * 37) % 200 + 10 for i in range(500)]
    batches = plan_epoch(lengths, 1024, seed=0, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(500))  # each example once
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in batches)
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert sum(lengths) / padded > 0.9  # little padding
    assert plan_epoch(lengths, 1024, 0, 0) == batches and plan_epoch(lengths, 1024, 0, 1) != batches
    tc = TrainConfig(epochs=2, max_steps=None, batch_tokens=1024)
    steps, ends = plan_steps(lengths, tc, group=3)
    assert all(len(s) == 3 for s in steps) and ends[-1] == 2.0 and 0 < ends[0] < 1


def test_lr_schedule():
    tc = TrainConfig(lr=1.0, warmup=10, min_lr_ratio=0.1)
    lrs = [lr_at(s, 110, tc) for s in range(110)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[10] == 1.0  # the first step already moves
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and abs(lrs[-1] - 0.1) < 1e-3


def test_answer_only_loss_equals_the_full_reference(tiny):
    """The head on answer positions only gives the loss of the usual full-logits computation."""
    model = load_model(tiny)
    examples = make_examples(Tokenizer.from_dir(tiny), 5)
    tokens, labels, *_ = collate(examples, list(range(5)), "cpu")
    s, n = answer_loss(model, tokens, labels)
    with torch.no_grad():
        logits = model(tokens)[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE,
                           reduction="sum")
    assert n == int((labels[:, 1:] != IGNORE).sum()) and abs(s.item() - want.item()) < 1e-3
    # padding never changes a row's loss: alone, each example gives the same total
    alone = sum(answer_loss(model, *collate(examples, [i], "cpu"))[0].item() for i in range(5))
    assert abs(alone - s.item()) < 1e-3


@pytest.mark.parametrize("full", [False, True])
def test_a_few_steps_lower_the_loss(tiny, tmp_path, full):
    examples = make_examples(Tokenizer.from_dir(tiny), 8)
    eval_examples = make_examples(Tokenizer.from_dir(tiny), 4, seed=1)
    tc = TrainConfig(out_dir=str(tmp_path), base_model=str(tiny), full=full, lr=1e-2 if not full else 1e-3,
                     max_steps=12, batch_tokens=2000, grad_accum=1, warmup=2, dtype="fp32", progress=False, eval_every=6)
    torch.manual_seed(0)
    history = train(prepare_model(tc), examples, tc, eval_examples)
    assert len(history) == 12 and history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[5]["eval_loss"] > history[-1]["eval_loss"]
    lines = [json.loads(ln) for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines if "loss" in r] == list(range(1, 13))
    assert lines[0] == {"step": 0, "eval_loss": lines[0]["eval_loss"]}  # the untrained model's held-out loss
    assert lines[0]["eval_loss"] > history[5]["eval_loss"]
    assert {"lr", "grad_norm", "tokens_per_s", "mfu", "padding"} <= set(lines[1])
    if full:  # a plain HF-format model directory, with the tokenizer
        again = load_model(tmp_path / "model")
        assert (tmp_path / "model/tokenizer.json").exists()
    else:  # a PEFT adapter
        again = load_adapter(load_model(tiny), tmp_path / "adapter")
        cfg_json = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
        assert cfg_json["base_model_name_or_path"] == str(tiny)
    tokens, labels, *_ = collate(examples, list(range(8)), "cpu")
    with torch.no_grad():
        s, n = answer_loss(again, tokens, labels)
    assert s.item() / n < 0.6 * history[0]["loss"]


def test_bf16_training_keeps_fp32_adapters(tiny, tmp_path):
    tc = TrainConfig(out_dir=str(tmp_path), base_model=str(tiny), lr=1e-2, max_steps=3, batch_tokens=2000, grad_accum=1,
                     dtype="bf16", progress=False, checkpointing=True)
    model = prepare_model(tc)
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    history = train(model, make_examples(Tokenizer.from_dir(tiny), 8), tc)
    assert all(m.lora_A.dtype == torch.float32 for m in lora_modules(model).values())
    assert history[-1]["loss"] < history[0]["loss"] and all(math.isfinite(h["grad_norm"]) for h in history)


def test_resume_continues_exactly(tiny, tmp_path, monkeypatch):
    """Stop a run with Ctrl-C after step 3 of 6, resume it: the last three losses are the uninterrupted ones."""
    whole = run(tiny, tmp_path / "whole", max_steps=6, grad_accum=2)

    real_lr_at = trainer.lr_at
    handler_before = signal.getsignal(signal.SIGINT)  # SIG_IGN when pytest runs in a background job

    def ctrl_c_during_step_3(step, total, tc):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_lr_at(step, total, tc)

    monkeypatch.setattr(trainer, "lr_at", ctrl_c_during_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tiny, tmp_path / "cut", max_steps=6, grad_accum=2)
    assert torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)["step"] == 3
    monkeypatch.setattr(trainer, "lr_at", real_lr_at)
    assert signal.getsignal(signal.SIGINT) is handler_before  # the trainer's handler is removed again

    rest = run(tiny, tmp_path / "cut", max_steps=6, grad_accum=2, resume=True)
    assert [h["step"] for h in rest] == [4, 5, 6]
    assert [h["loss"] for h in rest] == [h["loss"] for h in whole[3:]]
    logged = [json.loads(ln)["step"] for ln in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]
    a = torch.load(tmp_path / "whole/checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "cut/checkpoint.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(ValueError, match="cannot resume.*batch_tokens: 400 then, 500 now"):
        run(tiny, tmp_path / "cut", max_steps=6, grad_accum=2, resume=True, batch_tokens=500)


def _torchrun(tiny, out, *args):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "train_worker.py"), str(tiny), str(out), *args]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE)]), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "history.json").read_text())


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_two_processes_equal_one(tiny, tmp_path, mode):
    """torchrun with 2 gloo processes x 1 micro-batch = 1 process x 2 accumulated micro-batches: the same
    global batches, losses and weights (DDP for LoRA, FSDP by default for full fine-tuning)."""
    two = _torchrun(tiny, tmp_path / "two", mode, "grad_accum=1")
    one = run(tiny, tmp_path / "one", mode, grad_accum=2)
    assert len(two) == len(one) == 4
    for a, b in zip(one, two):
        assert a["tokens"] == b["tokens"] and abs(a["loss"] - b["loss"]) < 1e-5, (a, b)
    wa = torch.load(tmp_path / "one/checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "two/checkpoint.pt", weights_only=True)["model"]
    assert wa.keys() == wb.keys() and max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-5


def test_periodic_checkpoints_resume_where_they_were_saved(tiny, tmp_path, monkeypatch):
    """save_every=2 over 5 steps: checkpoints after steps 2 and 4 (and the final one); the one from step 2,
    resumed, continues exactly like the uninterrupted run."""
    whole = run(tiny, tmp_path / "whole", max_steps=5)
    saved = []
    real_save = trainer.save_checkpoint

    def keep_a_copy(path, *args):
        real_save(path, *args)
        step = torch.load(path, weights_only=True)["step"]
        saved.append(step)
        path.with_name(f"step{step}.pt").write_bytes(path.read_bytes())

    monkeypatch.setattr(trainer, "save_checkpoint", keep_a_copy)
    history = run(tiny, tmp_path / "run", max_steps=5, save_every=2)
    assert saved == [2, 4, 5]
    assert [h["loss"] for h in history] == [h["loss"] for h in whole]
    monkeypatch.setattr(trainer, "save_checkpoint", real_save)
    (tmp_path / "run/step2.pt").replace(tmp_path / "run/checkpoint.pt")  # as if stopped after step 2
    rest = run(tiny, tmp_path / "run", max_steps=5, save_every=2, resume=True)
    assert [h["step"] for h in rest] == [3, 4, 5]
    assert [h["loss"] for h in rest] == [h["loss"] for h in whole[2:]]


def test_non_finite_gradient_stops_and_keeps_the_last_checkpoint(tiny, tmp_path, monkeypatch):
    real_accumulate = trainer.accumulate

    def nan_at_step_3(model, examples, micro, count, tc, step, *rest):
        loss = real_accumulate(model, examples, micro, count, tc, step, *rest)
        if step == 2:
            next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(trainer, "accumulate", nan_at_step_3)
    with pytest.raises(FloatingPointError, match="step 3: gradient norm is nan"):
        run(tiny, tmp_path, max_steps=5, save_every=1)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "adapter").exists()
    steps = [json.loads(ln)["step"] for ln in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # the bad step is not logged as if it had happened


def test_guards_against_a_mismatched_setup(tiny, tmp_path):
    from route.lora import merge_lora

    examples = make_examples(Tokenizer.from_dir(tiny), 8)
    lora = TrainConfig(out_dir=str(tmp_path), base_model=str(tiny), max_steps=1, batch_tokens=400, grad_accum=1, dtype="fp32",
                       progress=False)
    full = TrainConfig(**{**vars(lora), "full": True})
    with pytest.raises(ValueError, match="full=True"):  # the config says full, the model has adapters
        train(prepare_model(lora), examples, full)
    with pytest.raises(ValueError, match="full=False"):  # and the other way round
        train(prepare_model(full), examples, lora)
    with pytest.raises(ValueError, match="fsdp"):
        train(prepare_model(lora), examples, TrainConfig(**{**vars(lora), "fsdp": True}))
    merged = prepare_model(lora)
    merge_lora(merged)
    with pytest.raises(ValueError, match="merged"):
        train(merged, examples, lora)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(load_model(tiny), examples, full)
    with pytest.raises(ValueError, match="input_ids but"):
        train(prepare_model(lora), [dict(examples[0], labels=examples[0]["labels"][:-1])], lora)
    assert not (tmp_path / "adapter").exists() and not (tmp_path / "checkpoint.pt").exists()


def test_too_few_micro_batches_for_a_step(tiny, tmp_path):
    """A step takes world_size * grad_accum micro-batches: an epoch with fewer cannot make a single step."""
    lengths = [100] * 6  # 4 per micro-batch under 400 tokens: 2 micro-batches an epoch
    assert len(plan_epoch(lengths, 400, 0, 0)) == 2
    steps, _ = plan_steps(lengths, TrainConfig(max_steps=3, batch_tokens=400, grad_accum=2), group=2)
    assert len(steps) == 3 and all(len(s) == 2 for s in steps)
    with pytest.raises(ValueError, match="2 micro-batches, fewer than world_size \\* grad_accum = 3"):
        plan_steps(lengths, TrainConfig(max_steps=3, batch_tokens=400, grad_accum=1), group=3)
    with pytest.raises(ValueError, match="fewer than world_size"):
        run(tiny, tmp_path, grad_accum=1000)


def test_mfu_counts_the_whole_jobs_tokens_against_every_processs_peak(tiny):
    """Under torchrun a step's micro-batches are every process's: the same step on 2 processes is half the MFU of
    1 process doing it all (the tokens are the job's, the peak is per device)."""
    from types import SimpleNamespace

    from route.hardware import Progress

    model = load_model(tiny)
    tc = TrainConfig(peak_tflops=1.0, progress=False)
    plan = SimpleNamespace(lengths=[100, 100, 100, 100], steps=[[[0, 1], [2, 3]]])
    one, two = (Progress(model, tc, plan, 0, 0, world, "cpu", torch.float32) for world in (1, 2))
    with one, two:
        t0 = __import__("time").perf_counter() - 1.0  # a step that took (at least) a second
        a, b = one.measure(plan.steps[0], 400, t0), two.measure(plan.steps[0], 400, t0)
    assert a["tokens"] == b["tokens"] == 400
    # MFU / (tokens/s) = FLOPs per token / (peak x processes): each measure() times its own call
    assert b["mfu"] / b["tokens_per_s"] == pytest.approx(a["mfu"] / a["tokens_per_s"] / 2, rel=1e-9)
