"""DM iteration time: the shipped implementation against the paper code's per-class loop.

Both run the same maths (fresh random ConvNet each iteration, per-class siamese
augmentation, sum over classes of squared mean-embedding distance, SGD step on
the images) on the same real Fashion-MNIST batches; iterations alternate between
the two so that machine noise hits both alike, and the ratio of medians is
reported. Also prints achieved GFLOP/s of the shipped iteration against this
machine's measured fp32 and bf16 matmul peaks.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import torch

from benchmarks.common import hardware, write_result
from fedistill.augment import SiameseAugment
from fedistill.data import load_dataset
from fedistill.device import pick_device
from fedistill.distill import DistillSettings, get_distiller
from fedistill.distill.embedding import random_network, resolve_precision
from fedistill.models import ModelSpec


def paper_loop_iteration(
    images: torch.Tensor, rows: list[torch.Tensor], syn: torch.Tensor, ipc: int, batch: int,
    augment: SiameseAugment | None, spec: ModelSpec, generator: torch.Generator, optimizer: torch.optim.Optimizer,
) -> None:
    """One DM iteration written as in the paper's code: a loop over classes, real embeddings with autograd, detached."""
    device = images.device
    net = random_network(spec, images.shape[1:], 10, generator, device)
    loss = syn.new_zeros(())
    for cls, class_rows in enumerate(rows):
        real = images[class_rows[torch.randperm(len(class_rows), generator=generator)[:batch].to(device)]]
        mine = syn[cls * ipc : (cls + 1) * ipc]
        if augment is not None:
            params = augment.sample(1, generator, device, siamese=True)
            real, mine = augment.apply(real, params), augment.apply(mine, params)
        real_mean = net.embed(real.requires_grad_(True)).detach().mean(0)
        loss = loss + ((real_mean - net.embed(mine).mean(0)) ** 2).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def conv_flops(spec: ModelSpec, image: tuple[int, int, int]) -> float:
    """Multiply-add FLOPs (x2) of one ConvNet forward pass."""
    channels, height, width = image
    if (height, width) == (28, 28):
        height, width = 32, 32
    flops = 0.0
    for _ in range(spec.depth):
        flops += 2 * height * width * spec.width * channels * 9
        channels = spec.width
        height, width = height // 2, width // 2
    return flops


def matmul_peak(dtype: torch.dtype, device: torch.device, size: int = 2048, repeats: int = 5) -> float:
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=64, help="real images per class per iteration")
    parser.add_argument("--ipc", type=int, default=10)
    parser.add_argument("--iterations", type=int, default=20, help="timed iterations per implementation")
    parser.add_argument("--dsa", action="store_true", help="use siamese augmentation in both")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--compile", default="on", choices=["auto", "on", "off"])
    parser.add_argument("--variants", action="store_true", help="also time fp32/bf16 x eager/compiled side by side")
    parser.add_argument("--record", action="store_true", help="write benchmarks/results/dm-batched-vs-loop-speedup.json")
    args = parser.parse_args()

    device = pick_device(args.device)
    train = load_dataset("fashion-mnist", "train")
    keep = torch.cat([torch.nonzero(torch.from_numpy(train.labels) == c).flatten()[: args.per_class * 4] for c in range(10)])
    images = train.subset(keep.numpy()).normalized(device)
    labels = torch.from_numpy(train.labels[keep.numpy()]).to(device)
    rows = [torch.nonzero(labels == c).flatten() for c in range(10)]
    spec = ModelSpec()
    strategy = "color_crop_cutout_flip_scale_rotate"
    augment = SiameseAugment(strategy) if args.dsa else None
    settings = DistillSettings(
        ipc=args.ipc, iterations=1, batch_real=args.per_class, dsa=args.dsa, dsa_strategy=strategy,
        real_precision=args.precision, compile=args.compile,
    )
    shipped = get_distiller("dm")(spec, settings, device)
    syn = images[torch.cat([r[: args.ipc] for r in rows])].clone().requires_grad_(True)
    optimizer = torch.optim.SGD([syn], lr=1.0, momentum=0.5)
    generator = torch.Generator().manual_seed(0)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def shipped_with(precision: str, compile_mode: str):  # type: ignore[no-untyped-def]
        variant = get_distiller("dm")(spec, replace(settings, real_precision=precision, compile=compile_mode), device)
        return lambda: variant.distill(images, labels, 10, generator)

    implementations = {
        "paper loop": lambda: paper_loop_iteration(
            images, rows, syn, args.ipc, args.per_class, augment, spec, generator, optimizer
        ),
        "shipped": lambda: shipped.distill(images, labels, 10, generator),
    }
    if args.variants:
        for precision in ("fp32", "bf16"):
            for compile_mode in ("off", "on"):
                implementations[f"batched {precision} compile={compile_mode}"] = shipped_with(precision, compile_mode)
    times: dict[str, list[float]] = {name: [] for name in implementations}
    for step in range(args.iterations + 2):
        for name, run in implementations.items():
            sync()
            start = time.perf_counter()
            run()
            sync()
            if step >= 2:
                times[name].append(time.perf_counter() - start)
    for name, values in times.items():
        print(f"{name:32s} median {statistics.median(values):.3f} s/it")
    loop_times, shipped_times = times["paper loop"], times["shipped"]
    loop_median = statistics.median(loop_times)
    shipped_median = statistics.median(shipped_times)
    speedup = loop_median / shipped_median
    dtype = resolve_precision(args.precision, device)
    per_image = conv_flops(spec, tuple(images.shape[1:]))
    flops = per_image * 10 * args.per_class + 3 * per_image * 10 * args.ipc
    fp32_peak = matmul_peak(torch.float32, device)
    bf16_peak = matmul_peak(torch.bfloat16, device)
    print(f"hardware: {hardware()}")
    print(f"setting: ConvNet-3 w128, {args.per_class} real/class, IPC {args.ipc}, dsa={args.dsa}, real pass {dtype}, compile={args.compile}")
    print(f"speedup (ratio of medians): {speedup:.2f}x")
    print(f"shipped conv throughput: {flops / shipped_median / 1e9:.0f} GFLOP/s "
          f"(matmul peak fp32 {fp32_peak:.0f}, bf16 {bf16_peak:.0f} GFLOP/s)")
    if args.record:
        path = write_result(
            "dm-batched-vs-loop-speedup", round(speedup, 2), "x (ratio of median s/iteration)",
            f"ConvNet-3 w128, {args.per_class} real/class, IPC {args.ipc}, dsa={args.dsa}, real pass {dtype}, "
            f"compile={args.compile}; "
            f"loop {loop_median:.3f} s/it vs shipped {shipped_median:.3f} s/it, {len(loop_times)} alternating iterations",
        )
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
