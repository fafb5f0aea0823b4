"""The model and its loader against transformers on the same random weights."""
import json

import pytest
import torch

from route.model import IGNORE, KVCache
from route.weights import load_model, save_model
from tiny import VOCAB, write_tiny


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    ref = write_tiny(path, request.param)
    return ref, load_model(path), path


def test_logits_match_transformers(pair):
    ref, ours, _ = pair
    x = torch.randint(0, VOCAB, (2, 100))  # > 64 positions: exercises Llama-3 rope scaling too
    with torch.no_grad():
        assert (ref(x).logits - ours(x)).abs().max() <= 1e-4


def test_sharded_checkpoint(tmp_path):
    ref = write_tiny(tmp_path, "qwen2", max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert (ref(x).logits - load_model(tmp_path)(x)).abs().max() <= 1e-4


def test_sharded_save_roundtrip(tmp_path):
    """save_model splits its weights into shards of at most shard_bytes (a tensor larger than that alone), with
    an index that transformers and our loader read back to the same model."""
    import transformers
    from safetensors import safe_open

    from route.weights import read_config

    write_tiny(tmp_path / "m", "qwen2")
    m, (_, hf) = load_model(tmp_path / "m"), read_config(tmp_path / "m")
    save_model(m, tmp_path / "out", hf, shard_bytes=60_000)
    index = json.loads((tmp_path / "out/model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (tmp_path / "out/model.safetensors").exists()
    for f in shards:
        with safe_open(tmp_path / "out" / f, "pt") as h:
            sizes = [h.get_tensor(k).nbytes for k in h.keys()]
        assert sum(sizes) <= 60_000 or len(sizes) == 1
    x = torch.randint(0, VOCAB, (1, 30))
    with torch.no_grad():
        assert torch.equal(m(x), load_model(tmp_path / "out")(x))
        ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", torch_dtype=torch.float32)
        assert (ref(x).logits - m(x)).abs().max() <= 1e-4


def test_kv_cache_decoding_equals_full_recompute(pair):
    _, m, _ = pair
    x = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        full = m(x)
        cache = KVCache(m.config, 2, 24, torch.float32, "cpu")
        steps = [m.logits(x[:, :16], cache=cache)]  # prefill 16 tokens, then decode one at a time
        for t in range(16, 24):
            mask = torch.ones(2, 1, 1, t + 1, dtype=torch.bool)
            steps.append(m.logits(x[:, t:t + 1], cache=cache, start=t, mask=mask))
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-4


def test_save_roundtrip_and_bf16(pair, tmp_path):
    _, m, path = pair
    cfg = json.loads((path / "config.json").read_text())
    save_model(m, tmp_path / "out", cfg)
    again = load_model(tmp_path / "out")
    x = torch.randint(0, VOCAB, (1, 20))
    with torch.no_grad():
        assert torch.equal(m(x), again(x))
        # transformers reads what we wrote (names, shapes, config) and computes the same logits
        import transformers
        theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
        assert (theirs(x).logits - m(x)).abs().max() <= 1e-4
        half = load_model(path, dtype="bf16")
        assert half.model.embed_tokens.weight.dtype == torch.bfloat16
        assert (half(x).float() - m(x)).abs().max() < 0.1 * m(x).abs().max()  # bf16 through 2 layers of large random weights


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_model(tmp_path / "nope")
    write_tiny(tmp_path / "m", "qwen2")
    cfg = json.loads((tmp_path / "m/config.json").read_text())

    bad = dict(cfg, model_type="gpt2")
    (tmp_path / "m/config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="unsupported model_type 'gpt2'"):
        load_model(tmp_path / "m")

    (tmp_path / "m/config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "hidden_size"}))
    with pytest.raises(ValueError, match="missing field 'hidden_size'"):
        load_model(tmp_path / "m")

    (tmp_path / "m/config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=3)))
    with pytest.raises(KeyError, match="model.layers.2.input_layernorm.weight"):
        load_model(tmp_path / "m")

    (tmp_path / "m/config.json").write_text(json.dumps(dict(cfg, intermediate_size=96)))
    with pytest.raises(ValueError, match=r"model.safetensors: tensor 'model.layers.0.mlp.gate_proj.weight' has shape"):
        load_model(tmp_path / "m")

    (tmp_path / "m/config.json").write_text(json.dumps(dict(cfg, num_hidden_layers=1)))
    with pytest.raises(KeyError, match="unexpected tensor 'model.layers.1"):
        load_model(tmp_path / "m")


def test_packed_linears_same_logits(tmp_path):
    """Packed layers compute the same function: their bf16 logits are as close to the fp32 model's as the plain
    bf16 model's are."""
    from route.model import pack_linears

    write_tiny(tmp_path, "qwen2")
    ref, m = load_model(tmp_path, dtype="fp32"), load_model(tmp_path, dtype="bf16")
    x = torch.randint(0, VOCAB, (2, 30))
    with torch.no_grad():
        exact, before = ref(x), m(x).float()
        n = pack_linears(m)
        after = m(x).float()
    if n == 0:
        pytest.skip("this torch build or CPU has no oneDNN bf16 linear packing (AVX512 or AVX-NE-CONVERT)")
    assert n == 2 * 7 + 1  # every projection of both layers, and the (tied) output head
    assert (after - before).abs().max() <= 0.02 * before.abs().max()
    assert (after - exact).abs().max() <= 1.5 * (before - exact).abs().max()
    agree = lambda y: (y.argmax(-1) == exact.argmax(-1)).float().mean()  # noqa: E731
    assert agree(after) >= agree(before) - 0.05


def test_packing_falls_back_where_the_cpu_cannot(tmp_path, monkeypatch):
    """On a CPU without AVX512 oneDNN refuses the bf16 layout (a RuntimeError infer.py used to die of): the
    layers stay plain, and the model computes what it did."""
    import route.model as model_module
    from route.model import PackedLinear, pack_linears

    write_tiny(tmp_path, "qwen2")
    m = load_model(tmp_path, dtype="bf16")
    x = torch.randint(0, VOCAB, (2, 30))

    def refuse(self, linear):
        raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")

    monkeypatch.setattr(model_module.PackedLinear, "__init__", refuse)
    with torch.no_grad():
        before = m(x)
        assert pack_linears(m) == 0 and not any(isinstance(l, PackedLinear) for l in m.modules())
        assert torch.equal(m(x), before)


def test_inference_dtype_follows_the_hardware(tmp_path, monkeypatch):
    """dtype "auto" (infer.py's default): bf16 where the hardware multiplies it fast, else fp32 (an AVX2 CPU
    emulates bf16 about 5x slower); an explicit dtype is taken as given."""
    import route.hardware
    from route.generate import load_for_inference
    from tiny import write_tiny_tokenizer

    write_tiny(tmp_path, "qwen2")
    write_tiny_tokenizer(tmp_path, "qwen2")
    for fast in (torch.float32, torch.bfloat16):
        monkeypatch.setattr(route.hardware, "compute_dtype", lambda name, device, fast=fast: fast)
        lm, _ = load_for_inference(tmp_path, "auto", "cpu")
        assert {p.dtype for p in lm.parameters()} == {fast}
    lm, _ = load_for_inference(tmp_path, "fp32", "cpu")
    assert {p.dtype for p in lm.parameters()} == {torch.float32}


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    write_tiny(tmp_path, "qwen2")
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=r"model.safetensors: tensor '.*': file is truncated"):
        load_model(tmp_path)
    f.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        load_model(tmp_path)


def test_quantized_checkpoint_is_a_clear_error(tmp_path):
    """A tensor stored in a dtype the model cannot hold (an FP8 or int8-quantized checkpoint) names itself."""
    from safetensors.torch import load_file, save_file

    write_tiny(tmp_path, "qwen2")
    f = tmp_path / "model.safetensors"
    state = load_file(f)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name] = state[name].to(torch.int8)
    save_file(state, f)
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{name}': dtype I8 is not supported"):
        load_model(tmp_path)


def test_chunked_head_loss_equals_plain_cross_entropy(tmp_path):
    """loss() gives the summed cross-entropy through 1,024-position chunks: the same value and gradients
    as cross-entropy over the full logits (here 2,400 positions, 3 chunks)."""
    import torch.nn.functional as F

    write_tiny(tmp_path, "qwen2")
    m = load_model(tmp_path, dtype="fp32").requires_grad_(True)
    x = torch.randint(0, VOCAB, (4, 601))
    inputs, targets = x[:, :-1], x[:, 1:]
    keep = torch.ones_like(targets, dtype=torch.bool)
    keep[0, :100] = False
    plain = F.cross_entropy(m.head(m.hidden(inputs)[keep]), targets[keep], reduction="sum")
    plain.backward()
    want = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    chunked = m.loss(inputs, targets.masked_fill(~keep, IGNORE))
    chunked.backward()
    assert int(keep.sum()) > 2048 and torch.allclose(chunked, plain, rtol=1e-5)
    for n, p in m.named_parameters():  # fp32 sums over 2,400 positions in another order: relative to the scale
        torch.testing.assert_close(p.grad, want[n], rtol=1e-4, atol=1e-6 * want[n].abs().max().item(), msg=n)
