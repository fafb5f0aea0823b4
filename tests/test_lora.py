"""LoRA adapters: a fresh adapter is a no-op, merging is exact, only adapters train, PEFT reads and writes
the same files (transformers + peft are the reference)."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from route.generate import generate
from route.lora import (ALL_TARGETS, LoRALinear, add_lora, export_merged, load_adapter, lora_modules, merge_lora,
                        save_adapter, unmerge_lora)
from route.tokenizer import Tokenizer
from route.weights import load_model
from tiny import VOCAB, write_tiny, write_tiny_tokenizer


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    write_tiny(path, request.param)
    write_tiny_tokenizer(path, request.param)
    return path


def randomize(model, scale=0.05, seed=1):
    """A trained-looking adapter: B is zero at init, which would make every test below trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * scale)
    return model


def test_fresh_adapter_changes_nothing(tiny):
    x = torch.randint(0, VOCAB, (2, 40))
    with torch.no_grad():
        want = load_model(tiny)(x)
        model = add_lora(load_model(tiny), r=8, alpha=16)
        assert torch.equal(model(x), want)
    assert len(lora_modules(model)) == 7 * 2
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, LoRALinear) and q.lora_A.dtype == torch.float32 and q.scaling == 2.0
    assert (q.bias is not None) == (model.config.model_type == "qwen2")  # Qwen2's q/k/v bias carried over
    # the frozen weights keep their checkpoint names: the adapter only adds lora_A / lora_B
    names = set(model.state_dict())
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.0.self_attn.q_proj.lora_A" in names


def test_only_adapters_get_gradients(tiny):
    model = add_lora(load_model(tiny), r=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")).train()
    randomize(model)
    x = torch.randint(0, VOCAB, (2, 16))
    model(x).float().logsumexp(-1).mean().backward()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trainable == with_grad == {f"model.layers.{i}.{m}.lora_{w}" for i in range(2) for w in "AB"
                                      for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj")}
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.grad is not None)


def test_bf16_model_fp32_adapters(tiny):
    torch.manual_seed(0)  # the same A in both models
    model = randomize(add_lora(load_model(tiny, dtype="bf16"), r=4, alpha=8)).train()
    x = torch.randint(0, VOCAB, (2, 16))
    out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().logsumexp(-1).mean().backward()
    q = model.model.layers[0].self_attn.q_proj
    assert q.lora_A.grad.dtype == q.lora_B.grad.dtype == torch.float32
    torch.manual_seed(0)
    with torch.no_grad():
        ref = randomize(add_lora(load_model(tiny), r=4, alpha=8))(x)
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_merge_equals_unmerged_and_unmerge_restores(tiny):
    model = randomize(add_lora(load_model(tiny), r=8, alpha=16), scale=0.2)
    tok = Tokenizer.from_dir(tiny)
    x = torch.randint(0, VOCAB, (2, 40))
    w0 = model.model.layers[1].mlp.up_proj.weight.clone()
    prompts = ["SELECT count(*) FROM", "How many singers do we have?"]
    with torch.no_grad():
        before = model(x)
        greedy = generate(model, tok, prompts, max_new_tokens=12, progress=False)
        assert before.sub(load_model(tiny)(x)).abs().max() > 1e-2  # the adapter does something
        merge_lora(model)
        assert (model(x) - before).abs().max() < 1e-4
        assert generate(model, tok, prompts, max_new_tokens=12, progress=False) == greedy
        unmerge_lora(model)
        assert (model.model.layers[1].mlp.up_proj.weight - w0).abs().max() < 1e-6
        assert (model(x) - before).abs().max() < 1e-4


def test_peft_round_trip(tiny, tmp_path):
    """Our adapter loaded by PEFT on the transformers model gives our logits, and PEFT's gives PEFT's."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    ours = randomize(add_lora(load_model(tiny), r=4, alpha=12, dropout=0.1))
    save_adapter(ours, tmp_path / "ours", base_model_path=tiny, dtype=torch.float32)
    cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 12 and cfg["lora_dropout"] == 0.1
    assert sorted(cfg["target_modules"]) == sorted(ALL_TARGETS) and cfg["base_model_name_or_path"] == str(tiny)
    with safe_open(tmp_path / "ours/adapter_model.safetensors", "pt") as f:
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in f.keys()

    x = torch.randint(0, VOCAB, (2, 30))
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny), tmp_path / "ours").eval()
    with torch.no_grad():
        assert (peft_model(x).logits - ours.eval()(x)).abs().max() < 1e-4

    # the other way: an adapter trained with PEFT (here: randomised) loads into our model
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny),
                         LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "up_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    ref.save_pretrained(tmp_path / "theirs")
    mine = load_adapter(load_model(tiny), tmp_path / "theirs")
    assert len(lora_modules(mine)) == 2 * 2
    with torch.no_grad():
        assert (ref.eval()(x).logits - mine(x)).abs().max() < 1e-4


def test_bf16_adapter_file_is_small_and_close(tiny, tmp_path):
    model = randomize(add_lora(load_model(tiny), r=8, alpha=16))
    save_adapter(model, tmp_path / "a")  # bf16 by default
    save_adapter(model, tmp_path / "b", dtype="fp32")
    small, big = ((tmp_path / d / "adapter_model.safetensors").stat().st_size for d in "ab")
    assert small < 0.55 * big
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        want = model(x)
        again = load_adapter(load_model(tiny), tmp_path / "a")(x)
    assert (again - want).abs().max() < 0.02 * want.abs().max()


def test_export_merged_is_a_plain_checkpoint(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    model = randomize(add_lora(load_model(tiny), r=8, alpha=16))
    x = torch.randint(0, VOCAB, (2, 20))
    with torch.no_grad():
        want = model(x)
    w0 = model.model.layers[0].self_attn.o_proj.weight.clone()
    export_merged(model, tmp_path / "merged", tiny)
    assert (tmp_path / "merged/tokenizer.json").exists()
    assert torch.equal(model.model.layers[0].self_attn.o_proj.weight, w0)  # our model is left unmerged
    assert isinstance(model.model.layers[0].self_attn.o_proj, LoRALinear)
    with torch.no_grad():
        assert (load_model(tmp_path / "merged")(x) - want).abs().max() < 1e-4
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
        assert (hf(x).logits - want).abs().max() < 1e-4


def test_load_errors_name_the_file_and_tensor(tiny, tmp_path):
    model = add_lora(load_model(tiny), r=4, alpha=8, targets=("q_proj",))
    save_adapter(model, tmp_path / "a")
    file = tmp_path / "a/adapter_model.safetensors"
    with safe_open(file, "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}

    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapter(load_model(tiny), tmp_path / "nope")
    with pytest.raises(ValueError, match="r=4, lora_alpha=8 but the model's adapters have r=2"):
        load_adapter(add_lora(load_model(tiny), r=2, alpha=8), tmp_path / "a")

    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"
    save_file({k: v for k, v in state.items() if k != key}, file)
    with pytest.raises(KeyError, match=f"adapter_model.safetensors: tensor '{key}' missing"):
        load_adapter(load_model(tiny), tmp_path / "a")
    save_file({**state, key: torch.zeros(3, 4)}, file)
    with pytest.raises(ValueError, match=rf"tensor '{key}' has shape \(3, 4\), expected"):
        load_adapter(load_model(tiny), tmp_path / "a")
    save_file({**state, "base_model.model.lm_head.lora_A.weight": torch.zeros(1)}, file)
    with pytest.raises(KeyError, match="unexpected tensor 'base_model.model.lm_head.lora_A.weight'"):
        load_adapter(load_model(tiny), tmp_path / "a")

    cfg = json.loads((tmp_path / "a/adapter_config.json").read_text())
    (tmp_path / "a/adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(load_model(tiny), tmp_path / "a")
    with pytest.raises(ValueError, match="no linear layer matches"):
        add_lora(load_model(tiny), targets=("qkv",))
