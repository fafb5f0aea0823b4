"""The adapter shipped in adapters/ for the default model: what infer.py loads when no --model is given.

The fast test reads the directory as PEFT would and checks it against the default model's shapes (written out
here from Qwen2.5-Coder-0.5B's config): a missing, truncated or mis-shaped file, a Git LFS pointer in place of
the weights, or an untrained (all-zero) B fails it. The slow test loads it the way infer.py does (load ->
merge -> pack, bf16) onto the real default model and compares the logits with PEFT on transformers.
"""
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

ADAPTER = Path(__file__).resolve().parents[1] / "adapters" / "qwen2.5-coder-0.5b-route"
# Qwen2.5-Coder-0.5B: 24 blocks, hidden 896, MLP 4864, 14 query heads and 2 key/value heads of 64
LAYERS = 24
SHAPES = {"self_attn.q_proj": (896, 896), "self_attn.k_proj": (896, 128), "self_attn.v_proj": (896, 128),
          "self_attn.o_proj": (896, 896), "mlp.gate_proj": (896, 4864), "mlp.up_proj": (896, 4864),
          "mlp.down_proj": (4864, 896)}  # (in, out)
QUESTION = "How many singers do we have?"


def test_shipped_adapter_is_complete():
    cfg = json.loads((ADAPTER / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 16 and cfg["lora_alpha"] == 32
    assert sorted(cfg["target_modules"]) == sorted(name.split(".")[1] for name in SHAPES)
    assert not cfg.get("use_dora") and not cfg.get("use_rslora") and cfg.get("bias", "none") == "none"
    r = cfg["r"]
    want = {}
    for i in range(LAYERS):
        for name, (fan_in, fan_out) in SHAPES.items():
            stem = f"base_model.model.model.layers.{i}.{name}"
            want[f"{stem}.lora_A.weight"] = (r, fan_in)
            want[f"{stem}.lora_B.weight"] = (fan_out, r)
    with safe_open(ADAPTER / "adapter_model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(want)
        for key, shape in want.items():
            t = f.get_tensor(key)
            assert tuple(t.shape) == shape, key
            assert torch.isfinite(t).all(), key
            if ".lora_B." in key:  # B starts at zero: a trained adapter has moved every one of them
                assert t.abs().max() > 0, key
    card = (ADAPTER / "README.md").read_text()
    assert "qwen2.5-coder-0.5b" in card.lower()


@pytest.mark.slow
def test_shipped_adapter_loaded_merged_and_packed_matches_peft(default_model):
    """infer.py's path (bf16 base, load_adapter, merge_lora, pack_linears) against transformers + PEFT (fp32)
    on the real default model. The merged LoRA layers are packed too, not left as plain matmuls."""
    import transformers
    from peft import PeftModel

    from route.lora import LoRALinear, load_adapter, lora_modules, merge_lora
    from route.model import PackedLinear, pack_linears
    from route.tokenizer import Tokenizer
    from route.weights import load_model

    path = default_model
    tok = Tokenizer.from_dir(path)
    ids = torch.tensor([tok.encode(tok.chat([{"role": "user", "content": QUESTION}]))])
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        plain = base(ids).logits[0]
        ref = PeftModel.from_pretrained(base, ADAPTER).eval()
        want = ref(ids).logits[0]
    assert (want - plain).abs().max() > 0.1  # the adapter changes the model's predictions (it is not a no-op)

    ours = load_adapter(load_model(path, dtype=torch.float32), ADAPTER)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], want, rtol=0, atol=2e-3)  # unmerged, fp32: the same function

    model = load_adapter(load_model(path, dtype="bf16"), ADAPTER)  # what infer.py does
    n_lora = len(lora_modules(model))
    assert n_lora == LAYERS * len(SHAPES)
    merge_lora(model)
    with torch.no_grad():
        merged = model(ids)[0].float()
    packed = pack_linears(model)
    if packed:  # (0 where torch lacks the oneDNN ops: nothing to check then)
        assert not any(isinstance(m, LoRALinear) for m in model.modules())  # merged LoRA layers packed as well
        assert packed == n_lora + 1 == sum(isinstance(m, PackedLinear) for m in model.modules())  # + the head
    with torch.no_grad():
        got = model(ids)[0].float()
    # bf16 weights: within bf16 rounding of the fp32 reference, the same top token everywhere it is clear
    scale = want.abs().max()
    assert (merged - want).abs().max() < 0.05 * scale and (got - want).abs().max() < 0.05 * scale
    assert (got - merged).abs().max() < 0.02 * scale  # packing changes the layout, not the numbers
    # the greedy token agrees wherever the reference's top-2 margin exceeds twice the error (it cannot flip)
    top2 = want.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * (got - want).abs().max(-1).values
    assert clear.sum() >= len(clear) // 2  # (measured: 26 of 36 positions, max error 0.44 against logits up to 30)
    assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])


def test_the_shipped_adapter_names_its_base_as_training_writes_it(tmp_path, monkeypatch):
    """The adapter names the default model by its release name (hub.portable_name, what train.py writes), which
    resolves on any machine; a local path would resolve on the one that trained it only."""
    import json

    from route import hub

    monkeypatch.setenv("ROUTE_HOME", str(tmp_path))
    default = tmp_path / "models" / hub.DEFAULT.name
    default.mkdir(parents=True)
    (default / "config.json").write_text("{}")
    cfg = json.loads((Path(__file__).resolve().parents[1] / "adapters/qwen2.5-coder-0.5b-route/adapter_config.json")
                     .read_text())
    assert cfg["base_model_name_or_path"] == hub.portable_name(default) == hub.DEFAULT.name
    assert hub.resolve_model(cfg["base_model_name_or_path"]) == default
    assert hub.portable_name(tmp_path / "other") == str(tmp_path / "other")
