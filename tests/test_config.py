"""Typed config: files, overrides, and errors that name the key and the file."""

import pytest

from make_dist.config import Config, dump_config, load_config
from make_dist.errors import ConfigError
from make_dist.typed import read_yaml


def test_shipped_configs_load(repo_root):
    tiny = load_config(repo_root / "configs/tiny.yaml")
    assert tiny.model.name == "make-tiny" and tiny.train.workers == 2 and tiny.optim.lr == 5e-4
    paper = load_config(repo_root / "configs/paper.yaml")
    # the paper's setup (docs/spec.md, section 6)
    assert paper.optim.betas == (0.9, 0.98) and paper.optim.eps == 1e-6 and paper.optim.lr == 1e-4
    assert paper.optim.weight_decay == 0.1 and paper.optim.warmup_steps == 1500
    assert paper.loss.lam == 0.7 and paper.data.subtexts == 8
    # the paper's run: one H200 at batch 2048, and the same as 8 GPUs x 256, 15 epochs each
    assert (paper.train.workers, paper.data.batch_size, paper.train.epochs) == (1, 2048, 15)
    assert paper.model.grad_checkpointing is True and paper.train.use_gpu and paper.train.precision == "bf16"
    node = load_config(repo_root / "configs/paper-8gpu.yaml")
    assert (node.train.workers, node.data.batch_size, node.train.epochs) == (8, 256, 15)
    same = ("optim", "loss", "tracking")
    assert all(getattr(node, k) == getattr(paper, k) for k in same)
    assert node.model.name == paper.model.name and node.model.pretrained == paper.model.pretrained


def write_manifest(path, samples, subtexts=8):
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"samples": samples, "shards": ["shard-000000.tar"], "subtexts": subtexts}))
    return str(path)


def test_epochs_resolve_to_steps_from_the_manifest(repo_root, tmp_path):
    """15 epochs of Derm1M's 403,563 pairs at 2048 a step: 2,956 steps, on one
    card or on eight."""
    from make_dist.data.shards import with_shards_manifest

    manifest = write_manifest(tmp_path / "shards/manifest.json", 403_563)
    for name in ("paper.yaml", "paper-8gpu.yaml"):
        cfg = with_shards_manifest(load_config(repo_root / "configs" / name, [f"data.train_shards={manifest}"]))
        assert cfg.train.steps == 2956 and cfg.train.epochs == 15
    small = load_config(None, [f"data.train_shards={manifest}", "train.epochs=2", "data.batch_size=4096"])
    assert with_shards_manifest(small).train.steps == 198  # 807,126 / 4096 = 197.05: the last step short
    exact = load_config(None, [f"data.train_shards={write_manifest(tmp_path / 'e/manifest.json', 640)}",
                               "train.epochs=0.1", "data.batch_size=64"])
    assert with_shards_manifest(exact).train.steps == 1


def test_epochs_need_a_manifest(tmp_path):
    from make_dist.errors import UserError
    from make_dist.data.shards import with_shards_manifest

    cfg = load_config(None, [f"data.train_shards={tmp_path}/shard-{{000..009}}.tar", "train.epochs=3"])
    with pytest.raises(UserError, match="train.epochs = 3.0: needs data.train_shards to name a manifest.json"):
        with_shards_manifest(cfg)


def test_steps_and_epochs_are_one_setting(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 15\n")
    assert load_config(path, ["train.steps=100"]).train.epochs is None  # a --set of steps replaces the file's epochs
    assert load_config(path, ["train.steps=100"]).train.steps == 100
    path.write_text("train:\n  steps: 60\n")
    assert load_config(path, ["train.epochs=2"]).train.epochs == 2.0
    path.write_text("train:\n  steps: 60\n  epochs: 2\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.steps = 60 and train\.epochs = 2 both set"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: train\.steps = 5 and train\.epochs = 1 both set"):
        load_config(None, ["train.steps=5", "train.epochs=1"])
    with pytest.raises(ConfigError, match=r"train\.epochs = 0\.0: must be > 0"):
        load_config(None, ["train.epochs=0"])


def test_shards_with_fewer_sentences_than_asked_are_refused(tmp_path):
    from make_dist.errors import UserError
    from make_dist.data.shards import with_shards_manifest

    manifest = write_manifest(tmp_path / "shards/manifest.json", 100, subtexts=4)
    with pytest.raises(UserError, match=r"data\.subtexts = 8, but the shards at .* were written with --subtexts 4"):
        with_shards_manifest(load_config(None, [f"data.train_shards={manifest}"]))
    assert with_shards_manifest(load_config(None, [f"data.train_shards={manifest}", "data.subtexts=4"]))
    assert with_shards_manifest(load_config(None, [f"data.train_shards={manifest}", "data.subtexts=2"]))


def test_defaults_without_file():
    assert load_config() == Config()


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["loss.dkw=false", "optim.lr=3e-4", "optim.betas=[0.8, 0.9]", "tracking.uri=http://x:5000"])
    assert cfg.loss.dkw is False and cfg.optim.lr == 3e-4 and cfg.optim.betas == (0.8, 0.9)
    assert cfg.tracking.uri == "http://x:5000"
    assert load_config(None, ["loss.lam=1"]).loss.lam == 1.0  # int widens to float


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(None, ["loss.sigma=0.1", "train.workers=4"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize(
    "text,message",
    [
        ("loss:\n  lamb: 0.5\n", r"c\.yaml: unknown key loss\.lamb"),
        ("losses:\n  lam: 0.5\n", r"c\.yaml: unknown section 'losses'"),
        ("train:\n  steps: many\n", r"c\.yaml: train\.steps = 'many': expected an integer"),
        ("train:\n  steps: 1.5\n", r"train\.steps = 1\.5: expected an integer"),
        ("loss:\n  dkw: 1\n", r"loss\.dkw = 1: expected true or false"),
        ("train:\n  zero_stage: 4\n", r"c\.yaml: train\.zero_stage = 4: must be 0, 1, 2 or 3"),
        ("loss:\n  lam: -1\n", r"loss\.lam = -1\.0: must be >= 0"),
        ("optim:\n  betas: [0.9]\n", r"optim\.betas = \[0\.9\]: expected a list of 2 values"),
        ("loss: [1, 2]\n", r"section 'loss' must be a mapping"),
        ("- a\n", r"c\.yaml: the top level of config file must be a YAML mapping, got list"),
        ("loss: {lam: 0.5\n", r"not valid YAML"),
        ("model:\n  grad_checkpointing: vision\n", r"model\.grad_checkpointing = 'vision': must be false, true, image"),
        ("model:\n  text_batching: packed\n", r"model\.text_batching = 'packed': must be one of"),
        ("model:\n  compile: true\ntrain:\n  zero_stage: 3\n", r"c\.yaml: model\.compile = true does not work with"),
        ("data:\n  context_length: 64\n", r"c\.yaml: unknown key data\.context_length"),  # the model's, not the data's
        ("tracking:\n  register: derm\n  log_model: false\n", r"tracking\.register = 'derm': needs tracking\.log_model"),
        ("evaluation:\n  suite: table1\n", r"evaluation\.suite = 'table1': must be paper"),
        ("evaluation:\n  suite: paper\n", r"evaluation\.suite_data = None: must name the authors' data/ folder"),
        # a key written twice: the safe loader kept the second value without a word
        ("optim:\n  lr: 1.0e-3\n  warmup_steps: 10\n  lr: 1.0e-5\n",
         r"c\.yaml: not valid YAML: line 4: the key 'lr' appears twice in one mapping"),
        ("train:\n  steps: 5\ntrain:\n  steps: 6\n", r"the key 'train' appears twice"),
        ("optim:\n  lr: .inf\n", r"optim\.lr = inf: expected a finite number"),
        ("optim:\n  lr: .nan\n", r"optim\.lr = nan: expected a finite number"),
        ("loss:\n  sigma: -5\n", r"loss\.sigma = -5\.0: must lie in \[-1, 1\)"),
        ("loss:\n  sigma: 1\n", r"loss\.sigma = 1\.0: must lie in \[-1, 1\)"),
        ("train:\n  name: ..\n", r"train\.name = '\.\.': must be a name of letters"),
        ("train:\n  name: .hidden\n", r"train\.name = '\.hidden': must be a name of letters"),
        ("train:\n  name: a/../../b\n", r"train\.name = 'a/\.\./\.\./b': must be a name of letters"),
    ],
)
def test_bad_files_name_key_and_file(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_bad_override_names_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loss:\n  lam: 0.5\n")
    with pytest.raises(ConfigError, match=r"--set: unknown key loss\.lamb"):
        load_config(path, ["loss.lamb=1"])
    with pytest.raises(ConfigError, match=r"--set: train\.workers = 0: must be >= 1"):
        load_config(path, ["train.workers=0"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(path, ["lam=1"])
    for item, message in (("optim.lr=inf", r"--set: optim\.lr = 'inf': expected a finite number"),
                          ("loss.sigma=-5", r"--set: loss\.sigma = -5\.0: must lie in \[-1, 1\)"),
                          ("train.name=..", r"--set: train\.name = '\.\.': must be a name")):
        with pytest.raises(ConfigError, match=message):
            load_config(path, [item])
    assert load_config(path, ["train.name=demo-2026_12.s0", "loss.sigma=-1", "optim.lr=1e-3"]).train.name == "demo-2026_12.s0"


def test_yaml_merge_keys_still_merge_and_override(tmp_path):
    """A key written twice is refused, but `<<: *anchor` and a key it brings overridden are YAML's own."""
    path = tmp_path / "c.yaml"
    path.write_text("x-optim: &optim {lr: 1.0e-3, warmup_steps: 10}\noptim:\n  <<: *optim\n  lr: 5.0e-4\n")
    raw = read_yaml(path, "config file")
    assert raw["optim"] == {"lr": 5.0e-4, "warmup_steps": 10}


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config("nope.yaml")


def test_flat_params():
    flat = Config().flat()
    assert flat["loss.lam"] == 0.7 and flat["train.zero_stage"] == 2


def test_the_objective_names_the_arm_of_table_1():
    """MLflow tags each run with it: any MAKE term on is MAKE; all off is CLIP,
    on the raw or the knowledge-augmented caption."""
    clip = ["loss.dkw=false", "loss.slra=false", "loss.mkcl_subtexts=false", "loss.mkcl_aspects=false"]
    assert load_config(None).objective() == "make"
    assert load_config(None, ["loss.slra=false"]).objective() == "make"
    assert load_config(None, clip).objective() == "clip"
    assert load_config(None, [*clip, "data.caption=knowledge"]).objective() == "clip-knowledge"
    with pytest.raises(ConfigError, match=r"data.caption = 'ontology': must be one of \['raw', 'knowledge'\]"):
        load_config(None, ["data.caption=ontology"])
