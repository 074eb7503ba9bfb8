"""The encoders: open_clip's image and text towers, read for MAKE (docs/spec.md, section 2).

    images (B, 3, H, W)  -> image (B, D), patches (B, P, D)
    tokens (B, N, 77), mask (B, N) -> texts (B, N, D)

Every output is L2-normalised. Only the valid text slots are encoded, grouped
by length, each group with its context cut to a bucket edge at or above its
longest real token sequence: causal attention and EOT pooling make that
identical to the full-length encoding, and a sample's short
sentences no longer pay for the batch's longest caption. Images come as
uint8 (the loader's) and are normalised here, on the device. The logit
scale is a shape-(1,) parameter (ZeRO-2 in bf16 fails on 0-dim parameters),
exponentiated and clamped at 100 in the forward. `train_flops` counts a
step's model FLOPs, for MFU.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import NamedTuple

import open_clip
import torch
import torch.nn.functional as F
from torch import nn

from . import overrides
from .config import ModelConfig
from .errors import UserError
from .files import atomic_writer, write_atomic
from .progress import say
from .tokens import token_lengths

MAX_SCALE = 100.0
CONFIG_DIR = Path(__file__).parent / "model_configs"
# Files of an exported model, as open_clip's `local-dir:` loader expects them.
EXPORT_CONFIG, EXPORT_WEIGHTS = "open_clip_config.json", "open_clip_pytorch_model.bin"
# Keys the authors' open_clip fork (SiyuanYan1/MAKE) writes into a model
# config that configure its training loss, not the towers; stock open_clip
# refuses them (a TypeError), so a config carrying them loads without them.
TRAINING_ONLY_KEYS = {"vision_cfg": ("patch_embeddings", "sigma")}
REGISTERED = "make-dist-registered-"  # the names `_register` gives cleaned configs


class ModelLoadError(UserError, RuntimeError):
    """An architecture or weights that cannot be loaded; says what to do instead."""


class MakeModel(nn.Module):
    def __init__(self, clip: nn.Module, arch: dict, text_batching: str = "buckets", text_bucket: int = 16):
        super().__init__()
        if not isinstance(clip, open_clip.CLIP) or not isinstance(clip.visual, open_clip.transformer.VisionTransformer):
            raise ModelLoadError(
                f"make-dist needs an open_clip CLIP with a ViT image tower and the CLIP text "
                f"transformer; got {type(clip).__name__} with {type(clip.visual).__name__}"
            )
        if clip.visual.attn_pool is not None:
            raise ModelLoadError("image towers with attentional pooling have no patch tokens to pool")
        self.clip = clip
        self.arch = arch  # open_clip model config, written out on export
        self.text_batching, self.text_bucket = text_batching, text_bucket
        self._image_stats: dict[torch.device, list[torch.Tensor]] = {}  # mean, std in float32 (not parameters)
        clip.visual.output_tokens = True

    # -- image -------------------------------------------------------------

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> the tower's input: scaled to [0, 1] and
        normalised with its mean and std in float32 (as ToTensor + Normalize
        would on the host), then cast to the tower's dtype."""
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        visual = self.clip.visual
        if images.device not in self._image_stats:  # made once per device: no copy each step
            stats = [getattr(visual, "image_mean", None) or OPENAI_DATASET_MEAN,
                     getattr(visual, "image_std", None) or OPENAI_DATASET_STD]
            self._image_stats[images.device] = [
                torch.tensor(x, dtype=torch.float32, device=images.device).view(1, -1, 1, 1) for x in stats]
        mean, std = self._image_stats[images.device]
        return ((images.float() / 255 - mean) / std).to(visual.conv1.weight.dtype)

    def encode_image(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled embedding v (B, D) and projected patch tokens p (B, P, D) of
        uint8 images (normalised here) or already normalised float ones."""
        visual = self.clip.visual
        if images.dtype == torch.uint8:
            images = self.normalize(images)
        pooled, patches = overrides.open_clip_image_forward(visual, images)  # patches normed and projected as pooled
        return F.normalize(pooled, dim=-1), F.normalize(patches, dim=-1)

    # -- texts -------------------------------------------------------------

    def encode_texts(self, tokens: torch.Tensor, mask: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """Texts (B, N, D) from tokens (B, N, L); missing slots are zero vectors.

        lengths: (B, N) real token counts, 0 where a slot is not encoded, on the
        host. The trainer passes them from the batch before it moves to the GPU,
        so grouping reads nothing back from the device; without them they are
        counted here (one sync on a GPU).
        """
        B, N, L = tokens.shape
        flat = tokens.reshape(B * N, L)
        if self.text_batching == "full":  # the baseline: every slot at the full context
            return self.encode_text(flat).reshape(B, N, -1).masked_fill(~mask.bool()[..., None], 0.0)
        if lengths is None:
            lengths = (token_lengths(tokens) * mask).cpu()
        groups = text_groups(lengths.reshape(-1), self.text_bucket if self.text_batching == "buckets" else None, L)
        out = self.clip.token_embedding.weight.new_zeros(B * N, self.arch["embed_dim"])
        for index, cut in groups:
            index = index.to(tokens.device, non_blocking=True)
            out = out.index_copy(0, index, self.encode_text(flat.index_select(0, index)[:, :cut]).to(out.dtype))
        return out.reshape(B, N, -1)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalised embeddings (T, D) of token rows (T, L), any L <= context."""
        return F.normalize(overrides.open_clip_text_forward(self.clip, tokens), dim=-1)

    # -- both ----------------------------------------------------------------

    def scale(self) -> torch.Tensor:
        """s = exp(logit_scale), clamped inside the forward: an in-place clamp after
        the step would miss the fp32 master weights DeepSpeed keeps."""
        return self.clip.logit_scale.exp().clamp(max=MAX_SCALE)

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                lengths: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        image, patches = self.encode_image(images)
        return {
            "image": image,
            "patches": patches,
            "texts": self.encode_texts(tokens, mask, lengths),
            "scale": self.scale(),
        }

    def set_grad_checkpointing(self, image: bool = True, text: bool | None = None) -> None:
        """Recompute the activations of the image tower, the text tower or both."""
        self.clip.visual.set_grad_checkpointing(image)
        self.clip.transformer.grad_checkpointing = image if text is None else text

    def compile_blocks(self) -> None:
        """torch.compile every transformer block in place. The blocks of a tower
        share their code, so each tower compiles once (per text length bucket)."""
        for block in [*self.clip.visual.transformer.resblocks, *self.clip.transformer.resblocks]:
            block.compile()

    @property
    def image_size(self) -> int:
        size = self.clip.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else size

    @property
    def context_length(self) -> int:
        return self.clip.context_length

    # -- FLOPs, for model FLOPs utilisation ----------------------------------

    def train_flops(self, images: int, text_lengths: torch.Tensor) -> float:
        """Model FLOPs of one training step (forward + backward = 3 forwards) on
        `images` images and texts of these real token counts (0: not encoded).

        Counts the matrix products (projections, MLPs, attention scores and
        values, patch embedding); norms, activations and the loss (under 1 %
        at one rank) are left out. Padding and recomputation are not model
        FLOPs: every way of running the step is scored against the same work.
        """
        visual, text = self.clip.visual, self.clip.transformer
        D = self.arch["embed_dim"]
        patches = visual.grid_size[0] * visual.grid_size[1]
        seq = patches + 1  # and the class token
        image = (_tower_flops(visual.transformer, torch.tensor([seq]))
                 + 2 * patches * overrides.deepspeed_full_numel(visual.conv1.weight)
                 + 2 * seq * visual.transformer.width * D)
        lengths = text_lengths[text_lengths > 0]
        texts = _tower_flops(text, lengths) + 2 * lengths.numel() * text.width * D
        return 3 * (images * image + texts)


def _tower_flops(transformer, lengths: torch.Tensor) -> float:
    """Forward FLOPs of a transformer on sequences of these lengths: 2 per
    weight per token in the blocks' matrices, and 4 * length * width per
    token for attention (scores, then values)."""
    block = transformer.resblocks[0]
    per_token = 2 * sum(overrides.deepspeed_full_numel(p) for p in block.parameters() if p.ndim == 2)
    lengths = lengths.double()
    per_layer = per_token * lengths.sum() + 4 * transformer.width * (lengths**2).sum()
    return float(len(transformer.resblocks) * per_layer)


# ---------------------------------------------------------------------------
# Building, tokenizer, export


class Architecture(NamedTuple):
    """A model as open_clip builds it: the name it is created by, its config,
    and, for a folder whose config had to be cleaned, the weights found in it."""

    name: str
    arch: dict
    weights: str | None = None
    preprocess: dict | None = None


def resolve_architecture(name: str) -> Architecture:
    """The architecture of a built-in name, a config JSON path, a bare name
    from make_dist/model_configs, an exported model folder (or a downloaded
    Hugging Face one: the same files), or an hf-hub:ORG/REPO name."""
    path = Path(name)
    if path.suffix == ".json" or (not path.suffix and (CONFIG_DIR / f"{name}.json").is_file()):
        path = path if path.suffix == ".json" else CONFIG_DIR / f"{name}.json"
        if not path.is_file():
            raise ModelLoadError(f"model config file not found: {path}")
        arch = json.loads(path.read_text())
        if not all(k in arch for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ModelLoadError(f"{path}: an open_clip model config needs embed_dim, vision_cfg and text_cfg")
        open_clip.add_model_config(path)
        return Architecture(path.stem, arch)
    if path.is_dir() and (path / EXPORT_CONFIG).is_file():
        return _folder(f"local-dir:{path}", name, json.loads((path / EXPORT_CONFIG).read_text()),
                       lambda: _weights_in(path), str(_weights_in(path)))
    if name.startswith("hf-hub:"):  # e.g. the authors' released weights, hf-hub:xieji-x/MAKE
        repo = name[len("hf-hub:"):]
        try:
            config = open_clip.pretrained.download_pretrained_from_hf(repo, filename=EXPORT_CONFIG)
        except Exception as e:
            raise ModelLoadError(
                f"{name}: cannot fetch its {EXPORT_CONFIG} from the Hugging Face Hub ({str(e)[:200]}). Offline, "
                f"download the repository where there is a connection (huggingface-cli download REPO --local-dir "
                f"DIR) and pass DIR as the model") from None
        return _folder(name, name, json.loads(Path(config).read_text()),
                       lambda: open_clip.pretrained.download_pretrained_from_hf(repo),
                       f"WEIGHTS (its weights file, e.g. from huggingface-cli download {repo} --local-dir DIR)")
    arch = open_clip.get_model_config(name)
    if arch is None:
        raise ModelLoadError(
            f"unknown model {name!r}: not an open_clip architecture, a config .json file or an exported "
            f"model folder (e.g. ViT-B-16, {CONFIG_DIR / 'make-tiny.json'})"
        )
    return Architecture(name, arch)


def _folder(name: str, given: str, config: dict, weights, weights_said: str) -> Architecture:
    """A model folder's (or Hub repository's) architecture, `given` as the
    user named it. A config with the authors' training-only keys is
    registered without them under a name of its own, and its weights are
    loaded from the file `weights()` finds (`weights_said`: how to name it
    before it is fetched)."""
    if "model_cfg" not in config:
        raise ModelLoadError(f"{given}: its {EXPORT_CONFIG} has no model_cfg")
    arch, dropped = without_training_keys(config["model_cfg"])
    if not dropped:
        return Architecture(name, arch)
    if "quick_gelu" not in arch:  # the authors' fork trains from OpenAI's weights: QuickGELU, unsaid here
        twin = quick_gelu_twin(arch) or 'CONFIG.json (this model_cfg with "quick_gelu": true)'
        raise ModelLoadError(
            f"{given}: {EXPORT_CONFIG} is the authors' open_clip fork's (it sets {', '.join(dropped)}), whose "
            f"MAKE models start from OpenAI's weights (QuickGELU), but it does not set quick_gelu, so open_clip "
            f"would build GELU and every score would move. Load the weights into the QuickGELU architecture: "
            f"--model {twin} --weights {weights_said}")
    if (given, tuple(dropped)) not in _SAID:  # once, though the model and its tokenizer both resolve it
        _SAID.add((given, tuple(dropped)))
        say(f"{given}: {EXPORT_CONFIG} sets {', '.join(dropped)}, which configure the authors' training loss, "
            f"not the model: loaded without them")
    return Architecture(_register(arch), arch, str(weights() or ""), config.get("preprocess_cfg"))


_SAID: set = set()


def quick_gelu_twin(arch: dict) -> str | None:
    """The open_clip name of this architecture with QuickGELU, if it ships one
    (not a name `_register` made: it lives only in this process)."""
    plain = {k: v for k, v in arch.items() if k != "quick_gelu"}
    for name in open_clip.list_models():
        if name.startswith(REGISTERED):
            continue
        config = open_clip.get_model_config(name)
        if config.get("quick_gelu") and {k: v for k, v in config.items() if k != "quick_gelu"} == plain:
            return name
    return None


def without_training_keys(arch: dict) -> tuple[dict, list[str]]:
    """(a copy of the config without TRAINING_ONLY_KEYS, the keys dropped)."""
    arch = json.loads(json.dumps(arch))
    dropped = [f"{section}.{key}" for section, keys in TRAINING_ONLY_KEYS.items() for key in keys
               if key in arch.get(section, {})]
    for entry in dropped:
        section, key = entry.split(".")
        del arch[section][key]
    return arch, dropped


def _register(arch: dict) -> str:
    """open_clip's name for a config it does not ship, added to its registry
    through its one public way in, a file (read at once, then removed)."""
    text = json.dumps(arch, sort_keys=True)
    name = f"{REGISTERED}{hashlib.sha256(text.encode()).hexdigest()[:12]}"
    if open_clip.get_model_config(name) is None:
        with tempfile.TemporaryDirectory(prefix="make-dist-arch-") as folder:
            (Path(folder) / f"{name}.json").write_text(text)
            open_clip.add_model_config(Path(folder) / f"{name}.json")
    return name


def _weights_in(folder: Path) -> Path | None:
    """The weights file of a model folder, in open_clip's order of preference."""
    for pattern in ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "*.safetensors",
                    "open_clip_pytorch_model.bin", "*.bin", "*.pth"):
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
    return None


def quick_gelu_origin(name: str, pretrained: str | None) -> str | None:
    """Why `pretrained` is known to hold weights trained with QuickGELU (None
    when not known): an open_clip tag that says so (OpenAI's), or a
    checkpoint of the authors' training. Their training (open_clip_train:
    `--model ViT-B-16 --pretrained openai`) starts from OpenAI's weights,
    which open_clip builds with QuickGELU whatever the name says; its
    checkpoint is a dict with `state_dict`, keys `module.*` (DDP's), and the
    run's params.txt two folders up (logs/NAME/checkpoints/epoch_N.pt)."""
    if not pretrained:
        return None
    if not os.path.isfile(pretrained):
        tag = open_clip.get_pretrained_cfg(name, pretrained) or {}
        return f"open_clip's {pretrained!r} weights were trained with QuickGELU" if tag.get("quick_gelu") else None
    record = _run_record(Path(pretrained))
    if record is not None:  # the run's own record: what it started from
        params, started = record["params.txt"], record.get("pretrained", "").strip()
        if (started.lower() == "openai" or record.get("force_quick_gelu", "").strip() == "True"
                or record.get("model", "").strip().endswith("quickgelu")):
            return f"its run's {params} says it started from {started or 'QuickGELU'} weights (QuickGELU)"
        return None
    if _authors_checkpoint(pretrained):
        return ("it is a checkpoint of the authors' MAKE training (a dict with state_dict, keys module.*), "
                "which starts from OpenAI's weights (QuickGELU)")
    return None


def _run_record(checkpoint: Path) -> dict[str, str] | None:
    """open_clip_train's record of the run a checkpoint belongs to:
    NAME/params.txt beside NAME/checkpoints/epoch_N.pt, holding its `model`
    and `pretrained` lines; None when the checkpoint is not in that layout."""
    folder = checkpoint.resolve().parent
    params = folder.parent / "params.txt"
    if folder.name != "checkpoints" or not params.is_file():
        return None
    record = {k.strip(): v for k, v in (line.partition(": ")[::2]
                                        for line in params.read_text(errors="replace").splitlines())}
    if "model" not in record or "pretrained" not in record:
        return None
    return {**record, "params.txt": str(params)}


def _authors_checkpoint(path: str) -> bool:
    """Whether a file is an open_clip_train checkpoint saved under DDP. Read
    with torch's weights-only loader, memory-mapped: nothing in it runs, and a
    1.7 GB file costs only what is looked at."""
    try:
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # not a zip archive: the legacy format cannot be mapped
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False  # not a torch file (safetensors, ...): open_clip's loader says what it is
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    return isinstance(state, dict) and bool(state) and all(str(k).startswith("module.") for k in state)


def _mismatch(name: str, weights: str) -> str | None:
    """The first weight whose shape differs between a file and an
    architecture (or that one of them lacks), in a user's words."""
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    model = open_clip.create_model(name, pretrained=None, nonscalar_logit_scale=True).state_dict()
    for key, value in model.items():
        if key not in state:
            return f"{key} is not in the file"
        if state[key].numel() != value.numel():
            return f"{key}: {tuple(state[key].shape)} in the file, {tuple(value.shape)} in {name}"
    return None


def check_activation(name: str, arch: dict, pretrained: str | None) -> None:
    """Refuse weights trained with QuickGELU in an architecture built with
    GELU (every embedding would be off, silently). A config that sets
    `quick_gelu` either way is taken at its word."""
    if "quick_gelu" in arch:
        return
    why = quick_gelu_origin(name, pretrained)
    if why is None:
        return
    twin = quick_gelu_twin(arch)
    use = (f"Use --model {twin} (model.name in a config)" if twin else
           'Use a model config .json with "quick_gelu": true as --model (model.name in a config)')
    raise ModelLoadError(
        f"{pretrained}: {why}, but {name} builds GELU: every score would move. {use}. Weights trained with "
        f"GELU after all: name a model config .json that says \"quick_gelu\": false")


def build_model(cfg: ModelConfig, text_batching: str | None = None) -> MakeModel:
    """The model of a ModelConfig, with its weights if `pretrained` names any.
    text_batching: the effective one when the run changes it (Config.text_batching)."""
    name, arch, folder_weights, preprocess = resolve_architecture(cfg.name)
    pretrained = cfg.pretrained
    if pretrained and not os.path.isfile(pretrained):
        tags = open_clip.list_pretrained_tags_by_model(name)
        if pretrained not in tags:
            raise ModelLoadError(
                f"model.pretrained = {pretrained!r}: neither a local file nor a pretrained tag of {name} "
                f"(tags: {', '.join(tags) or 'none'})"
            )
    check_activation(name, arch, pretrained)
    if folder_weights is not None:  # a folder's cleaned config: its own weights, as local-dir: would load them
        pretrained = folder_weights or None
    try:
        clip = open_clip.create_model(name, pretrained=pretrained, nonscalar_logit_scale=True,
                                      force_preprocess_cfg=preprocess)
    except (RuntimeError, AssertionError, KeyError, ValueError, pickle.UnpicklingError) as e:
        if pretrained and not os.path.isfile(pretrained):
            raise ModelLoadError(
                f"could not fetch the pretrained weights {pretrained!r} of {name}: the tag is downloaded "
                f"from the internet ({e}). Offline, download the checkpoint where there is a connection "
                f"and set model.pretrained to the local file's path."
            ) from None
        if pretrained and isinstance(e, pickle.UnpicklingError):  # torch's weights-only loader said no
            raise ModelLoadError(f"{pretrained}: refused: it holds pickled objects beyond tensors and containers, "
                                 f"and loading them could run code") from None
        if pretrained:  # open_clip's loader: a state dict of another shape
            raise ModelLoadError(f"{pretrained}: cannot be loaded into {cfg.name} "
                                 f"({_mismatch(name, pretrained) or str(e).strip()[:200]}): name the architecture "
                                 f"these weights were trained as (--model, model.name)") from None
        raise
    model = MakeModel(clip, dict(arch), text_batching or cfg.text_batching, cfg.text_bucket)
    model.set_grad_checkpointing(cfg.checkpointed("image"), cfg.checkpointed("text"))
    if cfg.compile:
        model.compile_blocks()
    return model


def text_groups(lengths: torch.Tensor, bucket: int | None, context: int) -> list[tuple[torch.Tensor, int]]:
    """(indices, cut) of the texts to encode, grouped by the context each is cut to.

    lengths: (M,) real token counts, 0 for texts to skip. bucket None: one group
    cut to the longest. Otherwise each text goes to the group of the smallest
    multiple of `bucket` (at most `context`) that holds it; fixed edges keep the
    shapes few, which torch.compile needs.
    """
    keep = lengths.nonzero().squeeze(1)
    if keep.numel() == 0:
        return []
    kept = lengths[keep]
    if bucket is None:
        return [(keep, int(kept.max()))]
    cut = ((kept + bucket - 1) // bucket * bucket).clamp(max=context)
    return [(keep[cut == c], int(c)) for c in cut.unique().tolist()]


def tokenizer(cfg: ModelConfig):
    """open_clip's tokenizer for the architecture: texts -> (T, context) int64."""
    return open_clip.get_tokenizer(resolve_architecture(cfg.name).name)


def export_open_clip(model: MakeModel, out_dir: str | Path) -> Path:
    """Write the model as open_clip loads it: `open_clip.create_model('local-dir:OUT')`.

    Each file appears whole or not at all, the config last: a folder with a
    config holds its weights.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    arch = dict(model.arch, nonscalar_logit_scale=True)
    preprocess = dict(open_clip.get_model_preprocess_cfg(model.clip))
    # float32 whatever the training precision: what open_clip's loaders expect
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.clip.state_dict().items()}
    with atomic_writer(str(out / EXPORT_WEIGHTS)) as f:
        torch.save(state, f)
    write_atomic(str(out / EXPORT_CONFIG), json.dumps({"model_cfg": arch, "preprocess_cfg": preprocess}, indent=2))
    return out
