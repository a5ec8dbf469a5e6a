"""Random networks and the fast no-grad forward pass over real images.

The real-image forward pass is most of the cost of distribution matching. It
needs no autograd graph, so it runs under ``torch.no_grad``, in chunks
small enough that activations stay in cache and are recycled by the allocator
(one 640-image batch of ConvNet-3 activations is 335 MB per layer on 28x28
inputs, which makes the pass memory-bound), and in bf16 where the hardware has
fast bf16 matrix units (AVX512-BF16/AMX on CPU, tensor cores on GPU).
"""

from __future__ import annotations

import torch
from torch import nn

from fedistill.models import ModelSpec, build_model

REAL_CHUNK = 32
"""Images per chunk of the real forward pass on CPU; measured fastest of 8-640 on ConvNet-3 (BENCHMARKS.md)."""


def random_network(
    spec: ModelSpec,
    image_shape: tuple[int, ...] | torch.Size,
    num_classes: int,
    generator: torch.Generator,
    device: torch.device,
) -> nn.Module:
    """A freshly initialised network whose weights depend only on ``generator``, with frozen parameters."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(spec, tuple(image_shape), num_classes)  # type: ignore[arg-type]
    net.to(device).train()
    for parameter in net.parameters():
        parameter.requires_grad_(False)
    return net


def has_batch_statistics(net: nn.Module) -> bool:
    """Batch norm mixes images of a batch, so chunked or batched forwards would change the result."""
    return any(isinstance(module, nn.modules.batchnorm._BatchNorm) for module in net.modules())


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """``auto`` picks bf16 only where the hardware runs bf16 matmuls natively."""
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"distill.real_precision: unknown value {precision!r}; allowed: auto, fp32, bf16")
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    cpu = torch.cpu
    fast_bf16 = getattr(cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        cpu, "_is_amx_tile_supported", lambda: False
    )()
    return torch.bfloat16 if fast_bf16 else torch.float32


def real_embeddings(net: nn.Module, images: torch.Tensor, precision: str = "auto") -> torch.Tensor:
    """``net.embed(images)`` in float32 without autograd, chunked on CPU, autocast to bf16 where fast."""
    dtype = resolve_precision(precision, images.device)
    chunk = REAL_CHUNK if images.device.type == "cpu" and not has_batch_statistics(net) else max(len(images), 1)
    outputs = []
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(images), chunk):
            outputs.append(net.embed(images[start : start + chunk]).float())
    return torch.cat(outputs) if outputs else images.new_zeros((0, 0))
