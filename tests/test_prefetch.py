"""Batches onto the device: what the step reads, and the host-side lengths."""

import torch

from make_dist.config import Config, LossConfig
from make_dist.train.loop import Worker, step_inputs
from make_dist.train.prefetch import prefetch


def host_batches(n=3, b=4, slots=5):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        tokens = torch.randint(1, 100, (b, slots, 12), generator=g)
        tokens[..., 7:] = 0  # padding after 7 real tokens
        mask = torch.rand(b, slots, generator=g) > 0.3
        mask[:, 0] = True
        yield {"image": torch.randint(0, 256, (b, 3, 8, 8), generator=g, dtype=torch.uint8), "tokens": tokens, "mask": mask,
               "keys": [f"{i}-{j}" for j in range(b)], "skipped": torch.tensor(i)}


def test_prefetch_hands_over_every_batch_in_order():
    got = list(prefetch(host_batches(), torch.device("cpu")))
    want = list(host_batches())
    assert len(got) == 3
    for a, b in zip(got, want):
        assert a["image"].dtype == torch.uint8 and torch.equal(a["image"], b["image"])
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["mask"], b["mask"])
        assert a["keys"] == b["keys"] and int(a["skipped"]) == int(b["skipped"])


def test_step_inputs_count_lengths_of_the_slots_the_loss_reads():
    clip = Config(loss=LossConfig(dkw=False, slra=False, subtexts=False, aspects=False))
    for cfg, read in ((Config(), [0, 1, 2, 3, 4]), (clip, [0])):
        w = Worker(cfg, 0, 1, torch.device("cpu"), None, None, 0, 0)
        batch = next(host_batches())
        inputs = step_inputs(w, batch)
        keep = torch.zeros(5, dtype=torch.bool)
        keep[read] = True
        assert torch.equal(inputs["mask"], batch["mask"] & keep)
        assert torch.equal(inputs["lengths"], 7 * inputs["mask"].long())
