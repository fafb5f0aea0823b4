"""Weight-only int8 / int4 linear layers for inference (`infer.py --quant`), after gpt-fast's quantize.py.

Decoding a few rows is bound by reading the weights: every step reads each linear layer's weight once, and at batch
1 that is nearly all the bytes a token costs (the fp32 Qwen2.5-0.5B reads 2 GB per token, int8 0.5 GB, int4 0.31).
So the weights are stored in fewer bits and torch's kernels widen them on the fly, in registers; activations, the
KV cache, norms and the embedding keep the model's dtype. Only the CPU kernels are wired up (README: the CUDA int8
kernel is a plain fp32 loop, and no GPU was at hand to test int4's). A merged LoRA layer quantizes like a plain one.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

KERNELS = {"int8": "_weight_int8pack_mm", "int4": "_weight_int4pack_mm_for_cpu"}  # CPU ops in torch.ops.aten
GROUP = 32  # int4: a scale and zero per 32 input channels (gpt-fast: 128; 32 is as fast here, and closer: README)
KERNEL_ROWS = 16   # int8 with more rows than this (prefill): dequantize and run the dense GEMM (README)


def int8_weight(w: torch.Tensor):
    """(N, K) -> int8 (N, K), bf16 scales (N,): symmetric, one scale per output channel, w ~= q * scale. A row's
    largest |w| maps to 127; the scale is rounded to bf16 (the kernel's dtype) before q is computed from it."""
    scale = (w.float().abs().amax(1) / 127).clamp(min=1e-10).to(torch.bfloat16)
    return (w.float() / scale.float()[:, None]).round().clamp(-128, 127).to(torch.int8), scale


def int4_weight(w: torch.Tensor, group: int):
    """(N, K) -> int32 values 0..15 (N, K), bf16 (K/group, N, 2) scale-and-zero, the kernel's layout. Asymmetric per
    group of `group` input channels: w ~= (q - 8) * scale + zero, the group's min..max spread over 16 levels.
    Small groups follow a row's outliers where one scale per row would waste most of 16 levels on them."""
    N, K = w.shape
    g = w.float().reshape(N, K // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp(min=1e-10).to(torch.bfloat16)
    zero = (lo + 8 * scale.float()).to(torch.bfloat16)
    q = ((g - zero.float()[..., None]) / scale.float()[..., None]).round() + 8
    return q.clamp(0, 15).to(torch.int32).reshape(N, K), torch.stack([scale, zero], -1).transpose(0, 1).contiguous()


class QuantLinear(nn.Module):
    """Stand-in for an inference nn.Linear with an int8 or int4 weight. x86 CPUs have vectorized kernels for bf16
    activations only (fp32 ones take a scalar loop, ~8x slower: README), so rows go in as bf16 and come back in
    x's dtype; the bias is added in x's dtype."""

    def __init__(self, linear: nn.Linear, quant: str):
        super().__init__()
        w, self.quant, self.out_features = linear.weight.detach(), quant, linear.out_features
        self.bias = None if linear.bias is None else linear.bias.detach()
        if quant == "int8":
            self.weight, self.scale = int8_weight(w)
        else:
            self.group = min(GROUP, w.shape[1])
            q, self.scale = int4_weight(w, self.group)
            self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)  # 2: inner k tiles (CPU: unused)

    def forward(self, x):
        x2 = x.reshape(-1, x.shape[-1])
        if self.quant == "int4":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.bfloat16(), self.weight, self.group, self.scale)
        elif len(x2) <= KERNEL_ROWS:  # decode: read 1 byte per weight, widen it in registers
            y = torch.ops.aten._weight_int8pack_mm(x2.bfloat16(), self.weight, self.scale)
        else:  # prefill is compute-bound: the kernel's GEMM is slower than widening the weight once for a dense one
            y = F.linear(x2, self.weight.to(x.dtype)) * self.scale.to(x.dtype)
        y = y.to(x.dtype) if self.bias is None else y.to(x.dtype) + self.bias
        return y.view(*x.shape[:-1], self.out_features)


def quantize(model: nn.Module, quant: str) -> int:
    """Replace the linear layers (plain, and merged LoRA ones) of an inference model by QuantLinear, lm_head
    included (untied from the embedding, which stays in the model's dtype); returns how many."""
    if quant not in KERNELS:
        raise ValueError(f"quant={quant!r}: unknown (choose one of {', '.join(KERNELS)}, or none)")
    device = next(model.parameters()).device
    if device.type != "cpu" or not hasattr(torch.ops.aten, KERNELS[quant]):
        raise ValueError(f"quant={quant!r}: no {quant} weight kernel for {device.type} in torch "
                         f"{torch.__version__} (route/quant.py runs torch.ops.aten.{KERNELS[quant]}, a CPU kernel)")
    n = 0
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear or getattr(child, "merged", False):
                setattr(module, name, QuantLinear(child, quant))
                n += 1
    return n
