"""Typed config: files, overrides, and errors that name the key and the file."""

import pytest

from make_dist.config import Config, ConfigError, dump_config, load_config


def test_shipped_configs_load(repo_root):
    tiny = load_config(repo_root / "configs/tiny.yaml")
    assert tiny.model.name == "make-tiny" and tiny.train.workers == 2 and tiny.optim.lr == 5e-4
    paper = load_config(repo_root / "configs/paper.yaml")
    # SPEC section 6
    assert paper.optim.betas == (0.9, 0.98) and paper.optim.eps == 1e-6 and paper.optim.lr == 1e-4
    assert paper.optim.weight_decay == 0.1 and paper.optim.warmup_steps == 1500
    assert paper.loss.lam == 0.7 and paper.data.subtexts == 8
    assert paper.data.batch_size * paper.train.workers == 2048


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
        ("- a\n", r"top level must be a mapping"),
        ("loss: {lam: 0.5\n", r"not valid YAML"),
        ("model:\n  grad_checkpointing: vision\n", r"model\.grad_checkpointing = 'vision': must be false, true, image"),
        ("model:\n  text_batching: packed\n", r"model\.text_batching = 'packed': must be one of"),
        ("model:\n  compile: true\ntrain:\n  zero_stage: 3\n", r"c\.yaml: model\.compile = true does not work with"),
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


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config file"):
        load_config("nope.yaml")


def test_flat_params():
    flat = Config().flat()
    assert flat["loss.lam"] == 0.7 and flat["train.zero_stage"] == 2
