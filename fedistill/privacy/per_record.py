"""Per-record gradients with ``torch.func``: one vmapped gradient per record, no module hooks.

DP gradient matching clips each record's gradient, so it needs them one by
one. Opacus' ``GradSampleModule`` computes them with hooks that stay on the
network between real passes, so the synthetic side's double backward and the
inner training loop also run through them, and on channels-last activations
its per-sample gradients of every convolution past the first come out as
zeros (opacus 1.6; scikit-learn's digits arrived with such strides).
``vmap(grad(loss of one record))`` over chunks of records gives the same
gradients within float rounding, whatever the memory layout, leaves the
network a plain module, and is faster on the 2-core CPU (``python -m
benchmarks.bench_dp_gm_speed``). Written here because Opacus' functorch mode
still goes through its hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from fedistill.models import has_batch_statistics

RECORD_CHUNK = 32
"""Records per vmapped call: bounds the memory of the per-record activations. On the 2-core CPU (550 records,
ConvNet-3 width 64, 1 thread) 16 and 32 took 2.2 s, 64 2.6 s, 128 3.2 s, all 550 at once 5.8 s."""


def per_record_gradients(
    net: nn.Module,
    parameters: list[nn.Parameter],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    chunk: int = RECORD_CHUNK,
) -> torch.Tensor:
    """Gradient of each record's cross-entropy with respect to ``parameters``, flattened: ``(records, params)``.

    Columns follow ``parameters`` in order, each flattened. Refuses networks
    with batch statistics: there a record's output depends on the others.
    """
    if has_batch_statistics(net):
        raise ValueError("per-record gradients need a network without batch norm (instance or group norm)")
    names_by_id = {id(p): name for name, p in net.named_parameters()}
    missing = [i for i, p in enumerate(parameters) if id(p) not in names_by_id]
    if missing:
        raise ValueError(f"parameters {missing} are not parameters of the network")
    names = [names_by_id[id(p)] for p in parameters]
    width = sum(p.numel() for p in parameters)
    if len(inputs) == 0:
        return inputs.new_zeros((0, width))
    detached = {name: p.detach() for name, p in zip(names, parameters, strict=True)}

    def record_loss(params: dict[str, torch.Tensor], image: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(net, params, (image.unsqueeze(0),)), target.unsqueeze(0))

    per_record = vmap(grad(record_loss), in_dims=(None, 0, 0))
    pieces = []
    for start in range(0, len(inputs), chunk):
        grads = per_record(detached, inputs[start : start + chunk], targets[start : start + chunk])
        pieces.append(torch.cat([grads[name].flatten(1) for name in names], dim=1))
    return torch.cat(pieces)
