"""python -m route.export: base + adapter merged into a plain checkpoint that transformers loads unchanged, with
the dtype its files hold in its config, the tokenizer, and a README (tiny random model; the real model and the
shipped adapter under -m slow)."""
import json
from pathlib import Path

import pytest
import torch

from route.export import main
from route.lora import add_lora, lora_modules, load_adapter, merge_lora, save_adapter
from route.weights import load_model
from tiny import VOCAB, write_tiny, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "adapters" / "qwen2.5-coder-0.5b-route"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("export")
    write_tiny(d / "base")
    write_tiny_tokenizer(d / "base")
    model = add_lora(load_model(d / "base"), r=4, alpha=8)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter (B starts at zero)
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.1)
    save_adapter(model, d / "adapter", base_model_path=d / "base", dtype="fp32")
    return d / "base", d / "adapter"


def route_merged(base, adapter, dtype=torch.float32):
    model = load_adapter(load_model(base, dtype), adapter)
    merge_lora(model)
    return model


def test_export_loads_in_transformers_with_its_true_dtype(tiny, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, adapter = tiny
    out = tmp_path / "merged"
    main(["--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"])  # base: the adapter's
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json",
            "README.md"} <= {p.name for p in out.iterdir()}
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        want = route_merged(base, adapter)(x)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        assert hf.dtype == torch.float32
        assert (hf(x).logits - want).abs().max() < 1e-4
        # PEFT's own merge of the same adapter gives the same model
        peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
        assert (peft(x).logits - hf(x).logits).abs().max() < 1e-4
    text = "SELECT count(*) FROM singer"
    ids = AutoTokenizer.from_pretrained(out)(text)["input_ids"]
    assert ids == AutoTokenizer.from_pretrained(base)(text)["input_ids"]
    card = (out / "README.md").read_text()
    assert "Base model: `base`" in card and "Adapter: `adapter`" in card and "License:" in card
    assert f"--adapter {adapter} --out {out} --dtype fp32" in card


def test_bf16_export_says_bfloat16(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base, adapter = tiny
    out = tmp_path / "bf16"
    main(["--adapter", str(adapter), "--out", str(out), "--model", str(base), "--dtype", "bf16"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    x = torch.randint(0, VOCAB, (1, 16))
    with torch.no_grad():
        want = route_merged(base, adapter)(x)
        hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
        assert hf.dtype == torch.bfloat16
        # the same merged weights rounded once to bf16: within bf16's rounding of the fp32 logits
        assert (hf(x).logits.float() - want).abs().max() < 0.05 * want.abs().max()


def test_errors(tiny, tmp_path):  # as the command line shows them: test_cli_errors.py
    _, adapter = tiny
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        main(["--adapter", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="no config.json"):
        main(["--adapter", str(adapter), "--out", str(tmp_path / "o"), "--model", str(tmp_path)])


@pytest.mark.slow
def test_shipped_adapter_export_matches_route(tmp_path, default_model):
    """The real default model + the shipped adapter, exported in fp32: transformers' logits on a prompt are
    route's merged model's, and PEFT loads the adapter onto the converted base with nothing missing."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = default_model
    out = tmp_path / "merged"
    main(["--adapter", str(SHIPPED), "--out", str(out), "--dtype", "fp32"])
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert "Qwen2.5-Coder-0.5B-Instruct" in (out / "README.md").read_text()
    x = torch.tensor([[151644, 872, 198, 4340, 1657, 67167, 653, 582, 614, 30, 151645, 198, 151644, 77091, 198]])
    with torch.no_grad():
        want = route_merged(base, SHIPPED)(x)
        hf = AutoModelForCausalLM.from_pretrained(out).eval()
        got = hf(x).logits
        assert (got - want).abs().max() < 1e-3 * want.abs().max()
        assert torch.equal(got[0, -1].argmax(), want[0, -1].argmax())
        del hf
        # the base's config says bfloat16, which transformers 5 loads as such: ask for fp32 to compare
        fp32_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        peft = PeftModel.from_pretrained(fp32_base, SHIPPED).eval()
        assert (peft(x).logits - got).abs().max() < 1e-3 * want.abs().max()


def test_config_names_the_dtype_the_files_hold(tiny, tmp_path):
    """export_merged without a dtype keeps the model's (fp32 here); the base's config said bfloat16."""
    import shutil

    from safetensors import safe_open

    from route.lora import export_merged

    base, adapter = tiny
    bf16_base = tmp_path / "base"
    shutil.copytree(base, bf16_base)
    cfg = json.loads((bf16_base / "config.json").read_text())
    (bf16_base / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "bfloat16", "dtype": "bfloat16"}))
    export_merged(load_adapter(load_model(bf16_base, torch.float32), adapter), tmp_path / "out", bf16_base)
    written = json.loads((tmp_path / "out/config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float32"
    with safe_open(tmp_path / "out/model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
