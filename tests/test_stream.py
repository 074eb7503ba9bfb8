"""Streaming: rank and worker splits, equal batch counts, corrupt samples and shards, URL policy."""

import io
import json
import tarfile
from dataclasses import replace

import pytest
import torch
from PIL import Image

from make_dist.config import DataConfig, ModelConfig
from make_dist.data.schema import Sample
from make_dist.data.stream import image_transform, make_loader, shard_urls
from make_dist.errors import DataError, UserError
from make_dist.model import tokenizer
from make_dist.slots import read_by_loss
from make_dist.tokens import token_lengths


@pytest.fixture(scope="module")
def tok():
    return tokenizer(ModelConfig(name="make-tiny"))


def jpeg(colour=(120, 60, 60), size=(48, 40)):
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def record(key):
    return json.dumps({"caption": f"Case {key}. Two sentences.", "disease_text": None,
                       "concept_text": "This skin photo shows papule.", "subtexts": []}).encode()


@pytest.fixture(scope="module")
def uneven_shards(tmp_path_factory):
    """7 shards of very different sizes: 1 to 25 samples."""
    root = tmp_path_factory.mktemp("shards")
    sizes = [25, 1, 9, 3, 14, 2, 6]
    keys, urls, n = [], [], 0
    for i, size in enumerate(sizes):
        members = []
        for _ in range(size):
            key = f"{n:09d}"
            members += [(f"{key}.jpg", jpeg()), (f"{key}.json", record(key))]
            keys.append(key)
            n += 1
        write_tar(root / f"shard-{i:06d}.tar", members)
        urls.append(str(root / f"shard-{i:06d}.tar"))
    return urls, keys


def keys_of(loader):
    return [k for batch in loader for k in batch.keys]


def in_order(urls, **data):
    """The data settings of evaluation: every sample once, no augmentation."""
    return DataConfig(**{"train_shards": urls, "augment": False, "resampled": False, "shuffle_buffer": 0,
                         "num_workers": 0, **data})


def test_exact_mode_two_ranks_two_workers_see_each_sample_once(uneven_shards, tok):
    urls, keys = uneven_shards
    seen = []
    for rank in range(2):
        data = in_order(urls, batch_size=4, num_workers=2)
        seen += keys_of(make_loader(data, tok, image_size=32, rank=rank, world=2))
    assert sorted(seen) == sorted(keys)  # every sample, none twice


def test_resampled_mode_gives_every_rank_the_same_batch_count(uneven_shards, tok):
    urls, _ = uneven_shards
    counts = []
    for rank in range(2):
        data = DataConfig(train_shards=urls[:3] if rank == 0 else urls[3:], batch_size=4, augment=True,
                          resampled=True, num_workers=2, shuffle_buffer=10)
        batches = list(make_loader(data, tok, image_size=32, rank=rank, world=2, batches_per_worker=5))
        counts.append(len(batches))
        assert all(b.image.shape == (4, 3, 32, 32) for b in batches)  # full batches only
    assert counts == [10, 10]  # batches_per_worker x workers, however uneven the shards


def test_the_same_seed_gives_the_same_batches(uneven_shards, tok):
    """Shards drawn, samples shuffled and images augmented from the seed
    alone (not the pid, the clock or the caller's generator): the same
    config and seed give the same batches, another seed others."""
    urls, _ = uneven_shards
    data = DataConfig(train_shards=urls, batch_size=4, augment=True, resampled=True, num_workers=1,
                      shuffle_buffer=10)

    def draw(seed):
        torch.manual_seed(seed + 99)  # the caller's generator, left elsewhere each time: no say in the data
        return list(make_loader(data, tok, image_size=32, rank=0, world=1, seed=seed, batches_per_worker=3))

    first, again, other = draw(5), draw(5), draw(6)
    assert [b.keys for b in first] == [b.keys for b in again]
    assert all(torch.equal(a.image, b.image) for a, b in zip(first, again))
    assert [b.keys for b in first] != [b.keys for b in other] or not all(
        torch.equal(a.image, b.image) for a, b in zip(first, other))


def test_each_epoch_read_in_order_is_shuffled_anew(uneven_shards, tok):
    """Read in order with a shuffle buffer: each epoch has an order of its
    own, and a second run with the same seed has the same ones."""
    urls, _ = uneven_shards
    data = DataConfig(train_shards=urls, batch_size=4, augment=False, resampled=False, num_workers=1,
                      shuffle_buffer=20)

    def two_epochs():
        loader = make_loader(data, tok, image_size=32, rank=0, world=1, seed=3)
        return keys_of(loader), keys_of(loader)

    first, second = two_epochs()
    assert sorted(first) == sorted(second) and first != second
    assert two_epochs() == (first, second)


def test_corrupt_samples_are_skipped_and_counted(tmp_path, tok):
    members = []
    for i in range(6):
        key = f"{i:09d}"
        image = b"\xff\xd8 not really a jpeg" if i in (1, 4) else jpeg()
        data = b"{broken json" if i == 2 else record(key)
        members += [(f"{key}.jpg", image), (f"{key}.json", data)]
    write_tar(tmp_path / "bad.tar", members)
    batches = list(make_loader(in_order([str(tmp_path / "bad.tar")], batch_size=2), tok, image_size=32))
    assert keys_of(batches) == [f"{i:09d}" for i in (0, 3, 5)]
    assert sum(b.skipped_samples for b in batches) == 3 and sum(b.skipped_shards for b in batches) == 0


def test_truncated_shard_keeps_what_it_can(tmp_path, tok):
    members = []
    for i in range(4):
        buf = io.BytesIO()
        Image.effect_noise((200, 200), 80).convert("RGB").save(buf, format="JPEG")  # ~20 kB each
        members += [(f"{i:09d}.jpg", buf.getvalue()), (f"{i:09d}.json", record(i))]
    write_tar(tmp_path / "whole.tar", members)
    data = (tmp_path / "whole.tar").read_bytes()
    (tmp_path / "cut.tar").write_bytes(data[: int(len(data) * 0.6)])
    batches = list(make_loader(in_order([str(tmp_path / "cut.tar"), str(tmp_path / "gone.tar"), str(tmp_path / "whole.tar")],
                                        batch_size=8), tok, image_size=32))
    kept = keys_of(batches)
    assert 4 + 1 <= len(kept) < 4 + 4  # the whole shard, and what the cut one held before it broke
    # Counted as what they are: two shards (one broken part-way, one missing), no sample (those lost are unknown).
    assert sum(b.skipped_shards for b in batches) == 2 and sum(b.skipped_samples for b in batches) == 0


def corrupt_shards(folder, n=4, per_shard=3):
    """n shards of undecodable samples (a tar whose images are not images)."""
    for i in range(n):
        write_tar(folder / f"bad-{i}.tar", [m for j in range(per_shard) for m in
                                            ((f"{i}{j:08d}.jpg", b"\xff\xd8 no jpeg"), (f"{i}{j:08d}.json", record(j)))])
    return [str(folder / f"bad-{i}.tar") for i in range(n)]


@pytest.mark.parametrize("loader_workers", [0, 2])
def test_shards_that_can_make_no_batch_stop_the_stream_naming_them(tmp_path, tok, loader_workers):
    """Drawn at random, unreadable shards used to be skipped forever (millions
    of skips, no step): the stream stops once every shard has failed without
    one good sample, in one line naming shards (also from a loader process)."""
    (tmp_path / "not-a-tar.tar").write_bytes(b"\0" * 100)
    (tmp_path / "cut.tar").write_bytes(b"\1" * 700)
    urls = [str(tmp_path / name) for name in ("not-a-tar.tar", "gone.tar", "cut.tar")]
    data = DataConfig(train_shards=urls, batch_size=2, augment=False, num_workers=loader_workers, shuffle_buffer=0)
    with pytest.raises(DataError) as caught:
        next(iter(make_loader(data, tok, image_size=32, batches_per_worker=10)))
    message = str(caught.value)
    assert message.startswith("data.train_shards: no batch can be made: every one of its 3 shards is unreadable, "
                              "and no sample was read (")
    assert f"{tmp_path}/gone.tar: FileNotFoundError" in message
    assert "\n" not in message and "Traceback" not in message


def test_a_long_run_of_corrupt_samples_stops_the_stream(tmp_path, tok):
    """A shard that opens but whose every sample is corrupt: the bound on reads that fail in a row."""
    urls = corrupt_shards(tmp_path, n=1, per_shard=30)
    good = tmp_path / "good.tar"
    write_tar(good, [(f"{9:09d}.jpg", jpeg()), (f"{9:09d}.json", record(9))])
    data = DataConfig(train_shards=[*urls, str(good)], batch_size=2, augment=False, num_workers=0, shuffle_buffer=0,
                      resampled=False, max_failures_in_a_row=20)
    with pytest.raises(DataError, match=r"20 reads failed in a row \(data.max_failures_in_a_row = 20\)"):
        list(make_loader(data, tok, image_size=32))
    assert len(keys_of(make_loader(replace(data, max_failures_in_a_row=31), tok, image_size=32))) == 1


def test_pipe_urls_need_explicit_permission(uneven_shards, tok):
    urls, keys = uneven_shards
    piped = f"pipe:cat {urls[1]}"
    with pytest.raises(UserError, match="allow_pipe"):
        shard_urls(piped)
    with pytest.raises(UserError, match="allow_pipe"):
        make_loader(in_order(piped, batch_size=4), tok, image_size=32)
    assert keys_of(make_loader(in_order(piped, batch_size=4, allow_pipe=True), tok, image_size=32)) == [keys[25]]


def test_only_the_slots_the_loss_reads_are_tokenised_with_their_lengths(uneven_shards, tok):
    """The CLIP baseline reads the caption alone: one text a sample is
    tokenised, and every encoded text's real length is counted on the way."""
    urls, _ = uneven_shards
    n = 8 + 3
    for read in (None, read_by_loss(n, dkw=False, slra=False, mkcl_subtexts=False, mkcl_aspects=False)):
        (batch,) = list(make_loader(in_order(urls[:1], batch_size=25), tok, image_size=32, read=read))
        assert batch.tokens.shape == (25, n, 77)
        expected = [0, 2, 3, 4] if read is None else [0]  # caption, concept text, 2 sentences; or the caption
        assert batch.mask.any(0).nonzero().flatten().tolist() == expected
        assert torch.equal(batch.lengths, token_lengths(batch.tokens) * batch.mask)
        assert not batch.tokens[~batch.mask].any()  # what is not read is not tokenised


def test_the_knowledge_caption_is_what_slot_0_encodes(uneven_shards, tok):
    """data.caption = knowledge (the Derm1M-dagger baseline): slot 0 holds the
    disease and concept texts followed by the caption, tokenised as one text."""
    urls, _ = uneven_shards
    clip = read_by_loss(11, dkw=False, slra=False, mkcl_subtexts=False, mkcl_aspects=False)
    raw, knowledge = (next(iter(make_loader(in_order(urls[:1], batch_size=25, caption=c), tok, image_size=32,
                                            read=clip))) for c in ("raw", "knowledge"))
    sample = Sample.from_json(json.loads(record(knowledge.keys[0])))
    assert sample.knowledge_caption() == f"This skin photo shows papule. Case {knowledge.keys[0]}. Two sentences."
    assert torch.equal(knowledge.tokens[0, 0], tok([sample.knowledge_caption()])[0])
    assert torch.equal(raw.tokens[0, 0], tok([sample.caption])[0]) and not torch.equal(raw.tokens, knowledge.tokens)
    assert knowledge.mask.any(0).nonzero().flatten().tolist() == [0]  # still one text a sample


def test_brace_patterns_expand(uneven_shards):
    urls, _ = uneven_shards
    pattern = urls[0].replace("shard-000000", "shard-{000000..000006}")
    assert shard_urls(pattern) == urls


def test_transforms_match_spec():
    train = image_transform(224, train=True)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["RandomResizedCrop", "RandomApply", "RandomGrayscale", "PILToTensor"]  # uint8: the model normalises
    crop, jitter, grey = train.transforms[0], train.transforms[1], train.transforms[2]
    assert crop.size == (224, 224) and crop.scale == (0.4, 1.0)
    assert jitter.p == 0.8 and grey.p == 0.2
    cj = jitter.transforms[0]
    ranges = [cj.brightness, cj.contrast, cj.saturation, cj.hue]
    assert ranges == [pytest.approx(r) for r in ((0.68, 1.32), (0.68, 1.32), (0.68, 1.32), (-0.08, 0.08))]
    out = image_transform(64, train=False)(Image.new("RGB", (100, 80)))
    assert out.shape == (3, 64, 64) and out.dtype == torch.uint8


def test_a_shard_that_fails_for_a_moment_is_read_again(tmp_path, tok):
    """A store that answers 503 once (a moment's outage) costs a retry, not
    the shard: every sample arrives and nothing is counted skipped."""
    import http.server
    import threading

    members = [m for i in range(3) for m in ((f"{i:09d}.jpg", jpeg()), (f"{i:09d}.json", record(i)))]
    write_tar(tmp_path / "shard.tar", members)
    body = (tmp_path / "shard.tar").read_bytes()
    asked = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            asked.append(self.path)
            if len(asked) == 1:
                self.send_response(503)
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/shard.tar"
        batches = list(make_loader(in_order([url], batch_size=2), tok, image_size=32))
    finally:
        server.shutdown()
    assert keys_of(batches) == [f"{i:09d}" for i in range(3)] and len(asked) >= 2
    assert sum(b.skipped_shards + b.skipped_samples for b in batches) == 0


def test_a_shard_with_no_sample_counts_as_unreadable(tmp_path, tok):
    """A valid but empty tar gives no error, and drawn at random would spin for ever."""
    write_tar(tmp_path / "empty.tar", [])
    data = DataConfig(train_shards=[str(tmp_path / "empty.tar")], batch_size=2, num_workers=0, shuffle_buffer=0)
    with pytest.raises(DataError, match=r"every one of its 1 shards is unreadable.*empty\.tar: ValueError: the "
                                        r"shard holds no sample"):
        next(iter(make_loader(data, tok, image_size=32, batches_per_worker=3)))
