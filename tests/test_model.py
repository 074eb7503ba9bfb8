"""Encoders: what they return, the exactness of the fast text path, export."""

import json
import os
import subprocess
import sys

import open_clip
import pytest
import torch
import torch.nn.functional as F

from make_dist.config import ModelConfig
from make_dist.model import MAX_SCALE, ModelLoadError, build_model, export_open_clip, text_groups, tokenizer
from make_dist.tokens import token_lengths

TINY = ModelConfig(name="make-tiny")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def batch():
    tok = tokenizer(TINY)
    texts = [
        ["Scaly red plaques on both elbows for two years. They itch at night.", "This is a skin photo diagnosed as inflammatory, psoriasis.",
         "This skin photo shows plaque, scale, erythema.", "Scaly red plaques on both elbows for two years", "They itch at night"],
        ["A dark irregular mole", "", "This skin photo shows hyperpigmentation.", "A dark irregular mole", ""],
        ["Small blisters", "This is a skin photo diagnosed as infectious, herpes simplex.", "", "Small blisters", ""],
    ]
    tokens = tok([t for row in texts for t in row]).reshape(3, 5, -1)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 1, 1, 0], [1, 1, 0, 1, 0]], dtype=torch.bool)
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 3, 64, 64, generator=g), tokens, mask


def test_outputs_are_normalised_with_patch_tokens(model, batch):
    images, tokens, mask = batch
    out = model(images, tokens, mask)
    assert out["image"].shape == (3, 128) and out["patches"].shape == (3, 64, 128)  # (64/8)^2 patches
    assert out["texts"].shape == (3, 5, 128) and out["scale"].shape == (1,)
    for key in ("image", "patches"):
        assert torch.allclose(out[key].norm(dim=-1), torch.ones(out[key].shape[:-1]), atol=1e-5)
    assert torch.allclose(out["texts"][mask].norm(dim=-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert torch.equal(out["texts"][~mask], torch.zeros_like(out["texts"][~mask]))


def test_image_embedding_is_open_clips(model, batch):
    images = batch[0]
    pooled = model.clip.visual(images)[0]
    assert torch.allclose(model(images, batch[1], batch[2])["image"], F.normalize(pooled, dim=-1), atol=1e-6)


def test_uint8_images_are_normalised_as_on_the_host(model):
    """The loader sends uint8; the model's scaling and normalisation equal
    torchvision's ToTensor + Normalize with the tower's statistics."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD
    from torchvision import transforms as T

    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (2, 3, 64, 64), generator=g, dtype=torch.uint8)
    host = torch.stack([T.Normalize(OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)(T.ToTensor()(T.ToPILImage()(x)))
                        for x in images])
    assert torch.equal(model.normalize(images), host)
    assert torch.equal(model.encode_image(images)[0], model.encode_image(host)[0])


def test_patches_are_the_final_normed_tokens_projected(model, batch):
    images = batch[0]
    visual = model.clip.visual
    x = visual.transformer(visual._embeds(images))
    want = F.normalize(visual.ln_post(x)[:, 1:] @ visual.proj, dim=-1)
    assert torch.allclose(model.encode_image(images)[1], want, atol=1e-5)


def test_cut_context_and_skipped_slots_equal_full_encoding(model, batch):
    """The exactness rule (docs/spec.md, section 2): against every slot encoded at 77 tokens
    by open_clip's own encode_text."""
    images, tokens, mask = batch
    fast = model.encode_texts(tokens, mask)
    full = F.normalize(model.clip.encode_text(tokens.reshape(-1, tokens.shape[-1])), dim=-1).reshape(fast.shape)
    assert torch.allclose(fast[mask], full[mask], atol=1e-5)
    assert token_lengths(tokens[mask]).max() < 40  # the cut really was a cut


@pytest.mark.parametrize("batching", ["buckets", "longest", "full"])
def test_every_text_batching_equals_open_clips_full_encoding(batching, batch):
    """The three ways of batching the texts (the exactness rule of docs/spec.md, section 2),
    with the lengths counted here or handed in from the host."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="make-tiny", text_batching=batching, text_bucket=8)).eval()
    images, tokens, mask = batch
    full = F.normalize(model.clip.encode_text(tokens.reshape(-1, tokens.shape[-1])), dim=-1).reshape(3, 5, -1)
    lengths = token_lengths(tokens) * mask
    for texts in (model.encode_texts(tokens, mask), model.encode_texts(tokens, mask, lengths)):
        assert torch.allclose(texts[mask], full[mask], atol=1e-5)
        assert torch.equal(texts[~mask], torch.zeros_like(texts[~mask]))


def test_a_zero_token_inside_a_text_does_not_cut_it_short():
    """Token 0 pads, but is also "!" inside a word in CLIP's vocabulary: the
    length runs to the last non-pad token, and the bucketed encoding of such
    a text, 17 tokens long, still equals the full one."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="make-tiny", text_bucket=16)).eval()
    tokens = tokenizer(TINY)(["a red scaly plaque on the left elbow with crusts and itching"])
    assert int(token_lengths(tokens)) == 17
    tokens[0, 5] = 0  # a zero inside the text; counting non-zeros would say 16 and cut the end token off
    assert int(token_lengths(tokens)) == 17
    tokens, mask = tokens.reshape(1, 1, -1), torch.ones(1, 1, dtype=torch.bool)
    full = F.normalize(model.clip.encode_text(tokens[0]), dim=-1)
    assert torch.allclose(model.encode_texts(tokens, mask)[0], full, atol=1e-5)


def test_text_groups_cut_each_text_to_its_bucket():
    lengths = torch.tensor([0, 5, 16, 17, 40, 77, 3, 0])
    groups = {cut: index.tolist() for index, cut in text_groups(lengths, 16, 77)}
    assert groups == {16: [1, 2, 6], 32: [3], 48: [4], 77: [5]}  # the last edge is the context
    assert [(i.tolist(), c) for i, c in text_groups(lengths, None, 77)] == [([1, 2, 3, 4, 5, 6], 77)]
    assert text_groups(torch.zeros(4, dtype=torch.long), 16, 77) == []


def test_train_flops_match_the_counted_forward(batch):
    """Model FLOPs (3 forwards) against torch's FLOP counter on the forward,
    attention through its plain matmul path so that the counter sees it."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(TINY).train()
    images, tokens, mask = batch
    lengths = token_lengths(tokens) * mask
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(images, tokens, mask, lengths)
    cut = [c for index, c in text_groups(lengths.flatten(), model.text_bucket, 77) for _ in index]
    assert 3 * counter.get_total_flops() == pytest.approx(model.train_flops(3, torch.tensor(cut)), rel=1e-9)


def trained_once(batch, **model_config):
    """A tiny model from seed 0 after one backward of a loss on all outputs."""
    images, tokens, mask = batch
    torch.manual_seed(0)
    model = build_model(ModelConfig(name="make-tiny", **model_config)).train()
    out = model(images, tokens, mask)
    (out["image"].sum() + out["patches"].pow(2).sum() + out["texts"].pow(3).sum()).backward()
    return model, out


def test_checkpointing_one_tower_keeps_gradients(batch):
    def grads(checkpointing):
        model, _ = trained_once(batch, grad_checkpointing=checkpointing)
        flags = (model.clip.visual.transformer.grad_checkpointing, model.clip.transformer.grad_checkpointing)
        return flags, [p.grad.clone() for p in model.parameters() if p.grad is not None]

    flags, plain = grads(False)
    assert flags == (False, False)
    for setting, want in (("image", (True, False)), ("text", (False, True)), (True, (True, True))):
        flags, got = grads(setting)
        assert flags == want
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, got))


@pytest.mark.slow
def test_compiled_blocks_match_eager(batch):
    """model.compile: torch.compile (inductor, on the CPU here) of every block,
    same outputs and gradients, same state dict."""
    eager, want = trained_once(batch, compile=False)
    compiled, got = trained_once(batch, compile=True)
    assert list(eager.state_dict()) == list(compiled.state_dict())
    for key in ("image", "patches", "texts"):
        assert torch.allclose(want[key], got[key], atol=1e-5)
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters()):
        assert (a.grad is None) == (b.grad is None), name
        assert a.grad is None or torch.allclose(a.grad, b.grad, atol=1e-5), name


def test_gradients_flow_through_fast_path(model, batch):
    images, tokens, mask = batch
    out = model(images, tokens, mask)
    (out["texts"].sum() + out["patches"].sum() + out["scale"].sum()).backward()
    assert model.clip.token_embedding.weight.grad is not None
    assert model.clip.visual.proj.grad is not None and model.clip.logit_scale.grad is not None
    model.zero_grad()


def test_logit_scale_is_shape_1_and_clamped():
    model = build_model(TINY)
    assert model.clip.logit_scale.shape == (1,)
    with torch.no_grad():
        model.clip.logit_scale.fill_(10.0)  # exp(10) >> 100
    assert model.scale().item() == MAX_SCALE


def test_export_round_trip_with_open_clip_loaders(model, batch, tmp_path):
    images, tokens, mask = batch
    with torch.no_grad():
        model.clip.logit_scale.fill_(3.0)
    out = export_open_clip(model, tmp_path / "export")
    assert not list(out.glob(".*tmp"))
    loaded, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    loaded.eval()
    assert preprocess.transforms[0].size == 64
    flat = tokens.reshape(-1, tokens.shape[-1])
    want = model.encode_text(flat)
    assert torch.allclose(F.normalize(loaded.encode_text(flat), dim=-1), want, atol=1e-6)
    assert torch.allclose(F.normalize(loaded.encode_image(images), dim=-1), model(images, tokens, mask)["image"], atol=1e-6)
    assert loaded.logit_scale.item() == pytest.approx(3.0)
    # and back into make-dist, by folder or as weights of the architecture
    again = build_model(ModelConfig(name=str(out))).eval()
    assert torch.allclose(again.encode_text(flat), want, atol=1e-6)
    again = build_model(ModelConfig(name="make-tiny", pretrained=str(out / "open_clip_pytorch_model.bin"))).eval()
    assert torch.allclose(again.encode_text(flat), want, atol=1e-6)


def test_config_file_path_builds(repo_root):
    model = build_model(ModelConfig(name=str(repo_root / "make_dist/model_configs/make-tiny.json")))
    assert model.image_size == 64


def test_unknown_name_and_bad_weights_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="unknown model 'ViT-Q-99'"):
        build_model(ModelConfig(name="ViT-Q-99"))
    with pytest.raises(ModelLoadError, match="neither a local file nor a pretrained tag"):
        build_model(ModelConfig(name="make-tiny", pretrained=str(tmp_path / "missing.pt")))


@pytest.mark.slow
def test_pretrained_tag_offline_says_pass_a_local_file():
    """No internet here: the tag cannot be fetched; the CLI says what to do."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # fail at once instead of after retries
    run = subprocess.run(
        [sys.executable, "-m", "make_dist.cli", "model", "--set", "model.name=ViT-B-16-quickgelu",
         "--set", "model.pretrained=openai"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 2
    assert "set model.pretrained to the local file's path" in run.stderr
    assert "Traceback" not in run.stderr


# ---------------------------------------------------------------------------
# The authors' weights: QuickGELU, their training checkpoints, their config keys


def _authors_checkpoint(model, path):
    """A checkpoint as the authors' training writes it (open_clip_train under
    DDP): a dict with the epoch, the run's name, the optimizer, and the weights
    under `state_dict` with DDP's `module.` before every key."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {f"module.{k}": v.clone() for k, v in model.clip.state_dict().items()}
    torch.save({"epoch": 15, "name": "2025_05_01-model_ViT-B-16-lr_0.0001-b_2048",
                "state_dict": state, "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4}]}}, path)
    return path


def test_the_authors_checkpoint_is_refused_in_a_gelu_model(model, tmp_path):
    """The authors train from OpenAI's weights, which open_clip builds with
    QuickGELU: their checkpoint loaded into a GELU architecture is refused,
    the message naming the QuickGELU twin; into a QuickGELU config it loads
    (the `module.` prefix stripped) and gives the same weights."""
    from make_dist.model import check_activation

    ckpt = str(_authors_checkpoint(model, tmp_path / "epoch_15.pt"))
    with pytest.raises(ModelLoadError, match=r"epoch_15.pt: it is a checkpoint of the authors' MAKE training .* "
                                             r"but ViT-B-16 builds GELU: every score would move. "
                                             r"Use --model ViT-B-16-quickgelu"):
        check_activation("ViT-B-16", open_clip.get_model_config("ViT-B-16"), ckpt)
    check_activation("ViT-B-16-quickgelu", open_clip.get_model_config("ViT-B-16-quickgelu"), ckpt)
    with pytest.raises(ModelLoadError,
                       match="make-tiny builds GELU.* Use a model config .json with \"quick_gelu\": true as --model"):
        build_model(ModelConfig(name="make-tiny", pretrained=ckpt))
    with pytest.raises(ModelLoadError, match="'openai' weights were trained with QuickGELU.*ViT-B-16-quickgelu"):
        check_activation("ViT-B-16", open_clip.get_model_config("ViT-B-16"), "openai")  # before any download
    from make_dist.model import CONFIG_DIR

    arch = json.loads((CONFIG_DIR / "make-tiny.json").read_text())
    for quick in (True, False):  # a config that says it either way is taken at its word
        config = tmp_path / f"tiny-{quick}.json"
        config.write_text(json.dumps(dict(arch, quick_gelu=quick)))
        loaded = build_model(ModelConfig(name=str(config), pretrained=ckpt))
        state = loaded.clip.state_dict()
        assert all(torch.equal(state[k], v) for k, v in model.clip.state_dict().items())
        assert isinstance(loaded.clip.visual.transformer.resblocks[0].mlp.gelu, open_clip.transformer.QuickGELU) \
            == quick


def test_the_checkpoints_own_run_record_decides(model, tmp_path):
    """open_clip_train keeps params.txt two folders above its checkpoints: a
    run that started from OpenAI's weights is refused in a GELU model, one
    that started from GELU weights loads."""
    from make_dist.model import quick_gelu_origin

    ckpt = str(_authors_checkpoint(model, tmp_path / "logs/run/checkpoints/epoch_1.pt"))
    (tmp_path / "logs/run/params.txt").write_text("model: ViT-B-16\npretrained: OPENAI\nlr: 0.0001\n")
    assert "logs/run/params.txt says it started from OPENAI" in quick_gelu_origin("ViT-B-16", ckpt)
    (tmp_path / "logs/run/params.txt").write_text("model: ViT-B-16\npretrained: laion2b_s34b_b88k\n"
                                                  "force_quick_gelu: False\n")
    assert quick_gelu_origin("ViT-B-16", ckpt) is None
    stray = str(_authors_checkpoint(model, tmp_path / "logs/run/other/epoch_1.pt"))  # not open_clip_train's layout
    assert "checkpoint of the authors' MAKE training" in quick_gelu_origin("ViT-B-16", stray)
    loaded = build_model(ModelConfig(name="make-tiny", pretrained=ckpt))
    assert torch.equal(loaded.clip.visual.conv1.weight, model.clip.visual.conv1.weight)
    assert quick_gelu_origin("make-tiny", None) is None


def test_a_config_with_the_authors_training_keys(tmp_path, capsys):
    """The authors' open_clip fork writes `patch_embeddings` and `sigma` into
    vision_cfg; stock open_clip refuses them. A model folder with such a
    config that says quick_gelu loads (the keys dropped, and said) with its
    own weights; one that does not is refused: the fork's models start from
    OpenAI's weights, and the message says how to load them with QuickGELU."""
    from make_dist.model import CONFIG_DIR

    arch = dict(json.loads((CONFIG_DIR / "make-tiny.json").read_text()), quick_gelu=True)
    (tmp_path / "tiny-quick.json").write_text(json.dumps(arch))
    torch.manual_seed(0)
    quick = build_model(ModelConfig(name=str(tmp_path / "tiny-quick.json"))).eval()
    export_open_clip(quick, tmp_path / "MAKE")
    config = json.loads((tmp_path / "MAKE/open_clip_config.json").read_text())
    config["model_cfg"]["vision_cfg"].update(patch_embeddings=True, sigma=0.3)
    (tmp_path / "MAKE/open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(TypeError, match="patch_embeddings"):  # what stock open_clip does with it
        open_clip.create_model(f"local-dir:{tmp_path / 'MAKE'}")
    loaded = build_model(ModelConfig(name=str(tmp_path / "MAKE"))).eval()
    said = capsys.readouterr().out
    assert "sets vision_cfg.patch_embeddings, vision_cfg.sigma, which configure the authors' training loss" in said
    image = torch.randint(0, 256, (2, 3, quick.image_size, quick.image_size), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(image)[0], quick.encode_image(image)[0])
    assert "patch_embeddings" not in loaded.arch["vision_cfg"] and loaded.arch["quick_gelu"]
    assert tokenizer(ModelConfig(name=str(tmp_path / "MAKE")))(["a red plaque"]).shape == (1, 77)

    del config["model_cfg"]["quick_gelu"]
    (tmp_path / "MAKE/open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match=r"is the authors' open_clip fork's .* does not set quick_gelu.*"
                                             r"--model CONFIG.json .* --weights .*MAKE/open_clip_pytorch_model.bin"):
        build_model(ModelConfig(name=str(tmp_path / "MAKE")))
    vit = open_clip.get_model_config("ViT-B-16")  # their ViT-B-16.json: the twin has a name
    config["model_cfg"] = dict(vit, vision_cfg=dict(vit["vision_cfg"], patch_embeddings=True, sigma=0.3))
    (tmp_path / "MAKE/open_clip_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="--model ViT-B-16-quickgelu --weights"):
        build_model(ModelConfig(name=str(tmp_path / "MAKE")))


def test_weights_that_would_run_code_are_refused(tmp_path):
    """A weights file whose pickle calls a function: neither the QuickGELU
    check nor open_clip's loader runs it; the error names the file."""
    import pickle

    marker = tmp_path / "ran"

    class Planted:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "epoch_15.pt"
    torch.save({"state_dict": {"module.x": torch.zeros(1)}, "extra": Planted()}, path,
               pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ModelLoadError, match=f"{path}: refused: it holds pickled objects beyond tensors and "
                                             f"containers, and loading them could run code$"):
        build_model(ModelConfig(name="make-tiny", pretrained=str(path)))
    assert not marker.exists()
