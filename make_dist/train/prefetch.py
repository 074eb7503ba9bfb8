"""Batches onto the device ahead of the step that needs them.

On a GPU the loader's pinned host tensors are copied on a side CUDA stream
while the previous step computes, so the step never waits for its inputs
to cross PCIe; the compute stream waits only for that copy. On a CPU the
batch is handed over as it is. What moves is `Batch.DEVICE_FIELDS`; the
text lengths stay on the host on purpose (the text tower is planned from
them without a sync).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from ..data.stream import Batch


def prefetch(batches: Iterable[Batch], device: torch.device) -> Iterator[Batch]:
    """Yield each batch on the device; on CUDA the next one is already on its way."""
    if device.type != "cuda":
        for batch in batches:
            yield batch.to(device)
        return
    stream = torch.cuda.Stream(device)
    compute = torch.cuda.current_stream(device)

    def start(batch: Batch) -> Batch:
        with torch.cuda.stream(stream):
            return batch.to(device)

    source = iter(batches)
    ahead = next(source, None)
    ahead = start(ahead) if ahead is not None else None
    while ahead is not None:
        compute.wait_stream(stream)  # the copy of this batch is done before the step reads it
        batch = ahead
        for key in Batch.DEVICE_FIELDS:  # memory made on the side stream, used on the compute stream
            getattr(batch, key).record_stream(compute)
        following = next(source, None)
        ahead = start(following) if following is not None else None
        yield batch
