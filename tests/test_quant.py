"""Weight-only int8/int4 linear layers (route/quant.py) on a tiny random model: against a dequantized reference."""
import copy

import pytest
import torch
import torch.nn as nn

from route.generate import generate, load_for_inference
from route.quant import GROUP, QuantLinear, int4_weight, int8_weight, quantize
from route.weights import load_model
from tiny import write_tiny_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_dir(tmp_path_factory.mktemp("tiny"))


def dequantized(linear: nn.Linear, quant: str) -> torch.Tensor:
    """The fp32 weight the kernels stand for, rebuilt from route.quant's own (unpacked) integers and scales."""
    w = linear.weight.detach()
    if quant == "int8":
        q, scale = int8_weight(w)
        return q.float() * scale.float()[:, None]
    q, sz = int4_weight(w, min(GROUP, w.shape[1]))
    scale, zero = sz.float().transpose(0, 1).unbind(-1)  # (N, K/group) each
    group = w.shape[1] // scale.shape[1]
    return (q.float() - 8) * scale.repeat_interleave(group, 1) + zero.repeat_interleave(group, 1)


@pytest.mark.parametrize("quant, weight_err", [("int8", 0.01), ("int4", 0.15)])
@pytest.mark.parametrize("rows", [1, 5, 40])  # 40 > KERNEL_ROWS: int8 prefill takes the dense path
def test_quant_linear_matches_dequantized_matmul(quant, weight_err, rows):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96, bias=True)
    w_hat = dequantized(linear, quant)
    # the quantization itself: the weight comes back within a few percent (int8: half a step of 1/127 of the
    # row's max; int4: half a step of 1/15 of a group's range, relative to the weight's norm)
    assert (w_hat - linear.weight).norm() / linear.weight.norm() < weight_err
    x = torch.randn(2, rows, 256)
    want = x @ w_hat.T + linear.bias
    got = QuantLinear(linear, quant)(x)
    assert got.shape == want.shape and got.dtype == x.dtype
    # the kernel sees x rounded to bf16 (8 bits of mantissa) and rounds its output to bf16: ~2^-8 relative each
    assert (got - want).abs().max() / want.abs().max() < 1e-2


def test_scales_are_per_channel_and_per_group():
    w = torch.randn(8, 256)
    w[3] *= 100  # one loud output channel must not coarsen the others
    q, scale = int8_weight(w)
    assert scale.shape == (8,) and q.abs().amax(1).min() >= 126
    q4, sz = int4_weight(w, 64)
    assert sz.shape == (4, 8, 2) and q4.min() >= 0 and q4.max() <= 15


def with_dequantized_weights(model: nn.Module, quant: str) -> nn.Module:
    """A copy of `model` whose linear layers hold the fp32 weights the quantized ones stand for (lm_head untied)."""
    model = copy.deepcopy(model)
    model.lm_head = nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=False)
    model.lm_head.weight = nn.Parameter(model.model.embed_tokens.weight.detach().clone())
    for m in model.modules():
        if type(m) is nn.Linear:
            m.weight.data = dequantized(m, quant)
    return model


# Bounds against the unquantized model. The tiny model's random weights are large (initializer_range 0.25, so that
# greedy outputs vary), which amplifies weight error through its two layers far more than a trained model does:
# int4 (groups of 32) becomes ~0.91 cosine here (int8: 0.9995). Against the same model with the
# dequantized weights, both must agree to kernel rounding: that checks the kernels, not the quantization.
@pytest.mark.parametrize("quant, cos_min, rel_max", [("int8", 0.998, 0.05), ("int4", 0.85, 0.5)])
def test_quantized_model_logits_stay_close(tiny, quant, cos_min, rel_max):
    ref = load_model(tiny, dtype=torch.float32)
    model = copy.deepcopy(ref)
    assert quantize(model, quant) == 2 * 7 + 1  # 7 linear layers per block, and lm_head
    assert model.lm_head is not ref.lm_head and model.model.embed_tokens.weight.dtype == torch.float32
    same_weights = with_dequantized_weights(ref, quant)
    tokens = torch.randint(3, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    for n in (24, 4):  # 48 rows, and 8 (int8: the kernel, not the dense prefill path)
        with torch.inference_mode():
            want, got, exact = (m.logits(tokens[:, :n]) for m in (ref, model, same_weights))
        for w, cos_bound, rel_bound in ((want, cos_min, rel_max), (exact, 0.999, 0.03)):
            cos = torch.cosine_similarity(got.flatten(1), w.flatten(1), dim=-1)
            assert cos.min() > cos_bound, (n, cos)
            assert (got - w).norm() / w.norm() < rel_bound, n


def test_a_merged_lora_layer_is_quantized_with_its_update(tiny):
    from route.lora import add_lora, merge_lora

    torch.manual_seed(0)
    base = load_model(tiny, dtype=torch.float32)
    model = add_lora(copy.deepcopy(base), r=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)  # a real update (B starts at zero), of the size of the weights
    merge_lora(model)
    merged = copy.deepcopy(model)
    assert quantize(model, "int8") == 2 * 7 + 1 and not any("lora" in n for n, _ in model.named_parameters())
    tokens = torch.randint(3, 384, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got, without = merged.logits(tokens), model.logits(tokens), base.logits(tokens)
    assert torch.cosine_similarity(got.flatten(), want.flatten(), dim=0) > 0.99
    assert (got - want).norm() < 0.2 * (without - want).norm()  # the update is in: far closer to merged than base


def test_greedy_generation_runs_with_int8(tiny):
    model, tok = load_for_inference(tiny, "fp32", "cpu", quant="int8")
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    prompts = ["SELECT count(*) FROM", "How many singers do we have?"]
    out = generate(model, tok, prompts, max_new_tokens=8, progress=False)
    assert len(out) == 2 and all(isinstance(s, str) for s in out)
    # batching does not change a quantized model's greedy answers either
    assert out == [generate(model, tok, [p], max_new_tokens=8, progress=False)[0] for p in prompts]


def test_unknown_quant_is_an_error_naming_the_option(tiny):
    with pytest.raises(ValueError, match=r"quant='int3': unknown.*int8, int4"):
        load_for_inference(tiny, "fp32", "cpu", quant="int3")


def test_a_device_without_the_kernel_is_an_error():
    model = nn.Sequential(nn.Linear(64, 64, device="meta"))  # stands in for a device route/quant.py has no kernel for
    for quant in ("int8", "int4"):
        with pytest.raises(ValueError, match=rf"quant='{quant}': no {quant} weight kernel for meta"):
            quantize(model, quant)


def test_infer_rejects_unknown_quant(capsys):
    import infer

    with pytest.raises(SystemExit):
        infer.parse_args(["--quant", "int2"])
    assert "--quant" in capsys.readouterr().err
