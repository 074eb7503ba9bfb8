"""Batches onto the device: every batch in order, the model inputs moved, the lengths left on the host."""

import torch

from make_dist.data.stream import Batch
from make_dist.train.prefetch import prefetch


def host_batches(n=3, b=4, slots=5):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        tokens = torch.randint(1, 100, (b, slots, 12), generator=g)
        tokens[..., 7:] = 0  # padding after 7 real tokens
        mask = torch.rand(b, slots, generator=g) > 0.3
        mask[:, 0] = True
        yield Batch(image=torch.randint(0, 256, (b, 3, 8, 8), generator=g, dtype=torch.uint8), tokens=tokens,
                    mask=mask, lengths=7 * mask.long(), keys=[f"{i}-{j}" for j in range(b)], skipped_samples=i)


def test_prefetch_hands_over_every_batch_in_order():
    got = list(prefetch(host_batches(), torch.device("cpu")))
    want = list(host_batches())
    assert len(got) == 3
    for a, b in zip(got, want):
        assert a.image.dtype == torch.uint8 and torch.equal(a.image, b.image)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask) and torch.equal(a.lengths, b.lengths)
        assert a.keys == b.keys and a.skipped_samples == b.skipped_samples


def test_a_batch_moves_its_model_inputs_and_keeps_its_lengths_on_the_host():
    """The text tower is planned from the lengths without reading the device."""
    batch = next(host_batches())
    moved = batch.to(torch.device("meta"))
    assert {f for f in ("image", "tokens", "mask", "lengths") if getattr(moved, f).is_meta} == set(Batch.DEVICE_FIELDS)
    assert moved.lengths.device.type == "cpu" and len(moved) == 4
