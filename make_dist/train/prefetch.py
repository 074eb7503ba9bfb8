"""Batches onto the device ahead of the step that needs them.

On a GPU the loader's pinned host tensors are copied on a side CUDA stream
while the previous step computes, so the step never waits for its inputs
to cross PCIe; the compute stream waits only for that copy. On a CPU the
batch is handed over as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

DEVICE_KEYS = ("image", "tokens", "mask")  # the rest (lengths, keys, counts) stays on the host


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch with its model inputs (uint8 images, tokens, mask) on `device`."""
    return {**batch, **{k: batch[k].to(device, non_blocking=True) for k in DEVICE_KEYS}}


def prefetch(batches: Iterable[dict], device: torch.device) -> Iterator[dict]:
    """Yield each batch on the device; on CUDA the next one is already on its way."""
    if device.type != "cuda":
        for batch in batches:
            yield to_device(batch, device)
        return
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def start(batch):
        with torch.cuda.stream(stream):
            return to_device(batch, device)

    source = iter(batches)
    ahead = next(source, None)
    ahead = start(ahead) if ahead is not None else None
    while ahead is not None:
        compute.wait_stream(stream)  # the copy of this batch is done before the step reads it
        batch = ahead
        for key in DEVICE_KEYS:  # memory made on the side stream, used on the compute stream
            batch[key].record_stream(compute)
        following = next(source, None)
        ahead = start(following) if following is not None else None
        yield batch
