"""Random networks and the fast forward passes of distribution matching.

The real-image forward pass is most of the cost of DM. It needs no autograd
graph, so it runs under ``torch.no_grad``, in fixed-size chunks small enough
that activations stay in cache and are recycled by the allocator (one 640-image
batch of ConvNet-3 activations on 28x28 inputs is 335 MB per layer, which makes
an unchunked pass memory-bound), and in bf16 where the hardware multiplies bf16
natively (AVX512-BF16/AMX on CPU, tensor cores on GPU). For the ConvNet both
passes can also be compiled with ``torch.compile``, which fuses norm, ReLU and
pooling around the convolutions; the chunk size is fixed (the tail chunk is
padded) so that a whole run compiles each pass once. Measured choices are in
BENCHMARKS.md.
"""

from __future__ import annotations

import copy
import shutil

import torch
import torch.nn.functional as F
from torch import nn

from fedistill.models import ConvNet, ModelSpec, build_model, has_batch_statistics

REAL_CHUNK = 64
"""Images per chunk of the real pass on CPU; 64 measured fastest compiled (32 eager) among 16-640 on ConvNet-3."""

COMPILE_MIN_ITERATIONS = 200
"""Below this many iterations, compiling (about 40 s on 2 cores) costs more than it saves."""

Layout = tuple[tuple[int, int, str], ...]
Params = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


def random_network(
    spec: ModelSpec,
    image_shape: tuple[int, ...] | torch.Size,
    num_classes: int,
    generator: torch.Generator,
    device: torch.device,
    trainable: bool = False,
) -> nn.Module:
    """A freshly initialised network whose weights depend only on ``generator``; frozen unless ``trainable``."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = build_model(spec, tuple(image_shape), num_classes)  # type: ignore[arg-type]
    net.to(device).train()
    for parameter in net.parameters():
        parameter.requires_grad_(trainable)
    return net


def perturbed_copies(model: nn.Module, perturbation: float, device: torch.device):  # type: ignore[no-untyped-def]
    """A network source (see ``distill.base.NetworkSource``) of noisy copies of ``model`` (FedDM).

    Each copy adds Gaussian noise of ``perturbation`` times each weight
    tensor's own std, drawn from the caller's generator, so matching sees the
    global model's neighbourhood rather than one point, and runs repeat.
    """
    template = copy.deepcopy(model).to(device)
    scales = {name: perturbation * float(tensor.float().std()) if tensor.numel() > 1 else 0.0
              for name, tensor in template.state_dict().items() if tensor.is_floating_point()}

    def source(generator: torch.Generator, trainable: bool) -> nn.Module:
        net = copy.deepcopy(template)
        with torch.no_grad():
            for name, tensor in net.state_dict().items():
                scale = scales.get(name, 0.0)
                if scale > 0:
                    noise = torch.randn(tensor.shape, generator=generator)
                    tensor.add_(noise.to(tensor.device, tensor.dtype), alpha=scale)
        net.train()
        for parameter in net.parameters():
            parameter.requires_grad_(trainable)
        return net

    return source


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


def resolve_compile(setting: str, iterations: int, device: torch.device) -> bool:
    """``auto`` compiles long runs where inductor has a backend: a C compiler on CPU, triton on GPU."""
    if setting in ("on", "off"):
        return setting == "on"
    if setting != "auto":
        raise ValueError(f"distill.compile: unknown value {setting!r}; allowed: auto, on, off")
    if iterations < COMPILE_MIN_ITERATIONS:
        return False
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return False
        return True
    return any(shutil.which(name) for name in ("cc", "gcc", "g++", "clang"))


def convnet_layout(net: nn.Module) -> Layout | None:
    """(padding, norm groups or 0, pooling) per block of a ConvNet, or None for anything else."""
    if not isinstance(net, ConvNet) or has_batch_statistics(net):
        return None
    blocks: list[list] = []
    for module in net.features:
        if isinstance(module, nn.Conv2d):
            blocks.append([int(module.padding[0]), 0, "none"])  # type: ignore[index]
        elif isinstance(module, nn.GroupNorm):
            blocks[-1][1] = module.num_groups
        elif isinstance(module, nn.AvgPool2d):
            blocks[-1][2] = "avg"
        elif isinstance(module, nn.MaxPool2d):
            blocks[-1][2] = "max"
    return tuple((padding, groups, pool) for padding, groups, pool in blocks)


def convnet_params(net: ConvNet, dtype: torch.dtype) -> Params:
    """Per block: conv weight and bias, norm scale and shift (None without norm), cast to ``dtype``."""
    params: Params = []
    for module in net.features:
        if isinstance(module, nn.Conv2d):
            params.append((module.weight.to(dtype), module.bias.to(dtype), None, None))  # type: ignore[union-attr]
        elif isinstance(module, nn.GroupNorm):
            weight, bias, _, _ = params[-1]
            params[-1] = (weight, bias, module.weight.to(dtype), module.bias.to(dtype))
    return params


def convnet_embed(x: torch.Tensor, params: Params, layout: Layout) -> torch.Tensor:
    """ConvNet.embed written as one function over explicit weights, so that it can be compiled once per run."""
    h = x
    for (weight, bias, gamma, beta), (padding, groups, pool) in zip(params, layout):
        h = F.conv2d(h, weight, bias, padding=padding)
        if groups:
            h = F.group_norm(h, groups, gamma, beta)
        h = F.relu(h)
        if pool == "avg":
            h = F.avg_pool2d(h, 2)
        elif pool == "max":
            h = F.max_pool2d(h, 2)
    return h.flatten(1)


_compiled_embed = torch.compile(convnet_embed, dynamic=False)


class Embedder:
    """The two forward passes of DM for one network: real images (no grad, fast dtype) and synthetic (with grad)."""

    def __init__(self, net: nn.Module, precision: str, compiled: bool) -> None:
        self.net = net
        self.layout = convnet_layout(net)
        self.compiled = compiled and self.layout is not None
        self.dtype = resolve_precision(precision, next(net.parameters()).device)

    def _function(self):  # type: ignore[no-untyped-def]
        return _compiled_embed if self.compiled else convnet_embed

    def real(self, images: torch.Tensor) -> torch.Tensor:
        """float32 embeddings of ``images`` without autograd."""
        if len(images) == 0:
            return images.new_zeros((0, 0))
        if self.layout is None:
            return real_embeddings(self.net, images, self.dtype)
        chunk = REAL_CHUNK if images.device.type == "cpu" else len(images)
        params = convnet_params(self.net, self.dtype)  # type: ignore[arg-type]
        function = self._function()
        outputs = []
        with torch.no_grad():
            for start in range(0, len(images), chunk):
                part = images[start : start + chunk].to(self.dtype)
                missing = chunk - len(part)
                if self.compiled and missing:
                    part = torch.cat([part, part.new_zeros((missing, *part.shape[1:]))])
                outputs.append(function(part, params, self.layout)[: chunk - missing].float())
        return torch.cat(outputs)

    def synthetic(self, images: torch.Tensor) -> torch.Tensor:
        """float32 embeddings of the synthetic batch, differentiable w.r.t. the images."""
        if self.layout is None:
            return self.net.embed(images)
        return self._function()(images, convnet_params(self.net, torch.float32), self.layout)  # type: ignore[arg-type]


def real_embeddings(net: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``net.embed`` in float32 without autograd for any architecture; chunked on CPU unless it has batch norm."""
    chunk = REAL_CHUNK if images.device.type == "cpu" and not has_batch_statistics(net) else max(len(images), 1)
    outputs = []
    with torch.no_grad(), torch.autocast(images.device.type, dtype=dtype, enabled=dtype != torch.float32):
        for start in range(0, len(images), chunk):
            outputs.append(net.embed(images[start : start + chunk]).float())
    return torch.cat(outputs) if outputs else images.new_zeros((0, 0))
