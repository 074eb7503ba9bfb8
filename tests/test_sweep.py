"""Sweep files: parsing, search spaces, trial configs (the real sweeps run in test_jobs.py; a sweep
on object storage, killed and resumed, in test_object_storage.py)."""

import dataclasses

import pytest
import yaml

from make_dist.errors import ConfigError, UserError
from make_dist.sweep import (
    SweepConfig, check_same_settings, load_sweep, search_algorithm, search_space, summarize, trial_config,
    trial_count,
)


def write(tmp_path, repo_root, **sweep):
    sweep.setdefault("base", str(repo_root / "configs/tiny.yaml"))
    sweep.setdefault("set", ["data.train_shards=x/manifest.json"])
    sweep.setdefault("space", {"optim.lr": {"grid": [1e-4, 5e-4]}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(sweep))
    return path


def test_shipped_sweeps_load(repo_root):
    ablation, base = load_sweep(repo_root / "configs/sweep_ablation.yaml")
    rows = ablation.space["config"]["grid"]
    assert [r["name"] for r in rows] == ["CLIP", "CLIP + knowledge", "mkcl w/o subtexts", "mkcl", "+ slra",
                                         "+ dkw (MAKE)"]
    arms = [trial_config(base, {"config": r}).objective() for r in rows]
    assert arms == ["clip", "clip-knowledge", "make", "make", "make", "make"]
    assert trial_config(base, {"config": rows[-1]}).loss == trial_config(base, {}).loss  # MAKE: every term
    assert ablation.metric == "eval/classify/top1" and base["evaluation"]["classify_table"]
    assert ablation.seeds == 3 and trial_count(ablation) == 18
    lr, _ = load_sweep(repo_root / "configs/sweep_lr_lambda.yaml")
    space = search_space(lr.space)
    assert space["loss.lam"] == {"grid_search": [0.3, 0.7, 1.0]} and lr.scheduler == "asha"
    assert 1e-4 <= space["optim.lr"].sample() <= 2e-3 and trial_count(lr) == 6


def test_seeds_are_a_grid_over_train_seed(tmp_path, repo_root):
    sweep, _ = load_sweep(write(tmp_path, repo_root, seeds=3))
    assert search_space(sweep)["train.seed"] == {"grid_search": [0, 1, 2]}
    assert trial_count(sweep) == 6  # 2 learning rates x 3 seeds
    with pytest.raises(ConfigError, match="both set the seed"):
        load_sweep(write(tmp_path, repo_root, seeds=2, space={"train.seed": {"grid": [1, 2]}}))


def drawn(sweep: SweepConfig) -> list[dict]:
    """The trials' parameters in the order Tune's generator hands them out
    (all at once: none is running to hold the next back)."""
    from ray.tune.experiment import Experiment

    generator = search_algorithm(dataclasses.replace(sweep, max_concurrent=0))
    generator.add_configurations([Experiment("draws", lambda config: None, config=search_space(sweep),
                                             num_samples=sweep.samples)])
    trials = []
    while (trial := generator.next_trial()) is not None:
        trials.append(trial.config)
    return trials


def test_the_random_draws_follow_the_sample_seed(repo_root):
    """The shipped lr x lambda sweep: the same file draws the same trials, run
    after run; another seed (`--set sweep.sample_seed=1`) draws others."""
    path = repo_root / "configs/sweep_lr_lambda.yaml"
    sweep, _ = load_sweep(path)
    first = drawn(sweep)
    assert len(first) == trial_count(sweep) == 6 and sorted(t["loss.lam"] for t in first) == [0.3, 0.3, 0.7, 0.7, 1, 1]
    assert all(1e-4 <= t["optim.lr"] <= 2e-3 for t in first) and len({t["optim.lr"] for t in first}) == 6
    assert drawn(load_sweep(path)[0]) == first
    other = drawn(load_sweep(path, ["sweep.sample_seed=1"])[0])
    assert {t["optim.lr"] for t in other}.isdisjoint(t["optim.lr"] for t in first)


def test_the_sweeps_own_keys_take_set(tmp_path, repo_root):
    """--set sweep.KEY overrides the sweep file; other --set keys the base config."""
    sweep, base = load_sweep(write(tmp_path, repo_root), ["sweep.name=other", "sweep.storage=s3://b/x",
                                                          "sweep.seeds=2", "optim.lr=0.002"])
    assert (sweep.name, sweep.storage, sweep.seeds, base["optim"]["lr"]) == ("other", "s3://b/x", 2, 0.002)
    with pytest.raises(ConfigError, match="--set: sweep.seeds = 'x': expected an integer"):
        load_sweep(write(tmp_path, repo_root), ["sweep.seeds=x"])


def test_summary_groups_seeds_into_rows_and_picks_the_best():
    trials = [
        {"trial": "a", "params": {"loss.lam": 0.3, "train.seed": 0}, "value": 0.2, "status": "finished"},
        {"trial": "b", "params": {"loss.lam": 0.3, "train.seed": 1}, "value": 0.4, "status": "finished"},
        {"trial": "c", "params": {"loss.lam": 0.7, "train.seed": 0}, "value": 0.5, "status": "stopped by ASHA at step 50"},
        {"trial": "d", "params": {"loss.lam": 0.7, "train.seed": 1}, "value": 0.35, "status": "finished"},
        {"trial": "e", "params": {"loss.lam": 0.9, "train.seed": 0}, "value": None, "status": "failed"},
    ]
    s = summarize(trials, SweepConfig(metric="m", mode="max"))
    rows = {r["params"]["loss.lam"]: r for r in s["rows"]}
    assert rows[0.3]["mean"] == pytest.approx(0.3) and rows[0.3]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert rows[0.7]["seeds"] == 1 and rows[0.7]["mean"] == 0.35  # a stopped trial's value is not a final one
    assert rows[0.9]["mean"] is None and s["best"]["trial"] == "b"  # the best finished trial
    assert (s["errors"], s["stopped"]) == (1, 1)
    assert summarize(trials, SweepConfig(metric="m", mode="min"))["best"]["trial"] == "a"


def test_a_sweep_folder_resumes_only_the_same_settings(tmp_path, repo_root):
    sweep, base = load_sweep(write(tmp_path, repo_root), ["train.steps=200"])
    check_same_settings(sweep, base, str(tmp_path / "s"))  # first start: recorded
    check_same_settings(sweep, base, str(tmp_path / "s"))  # the same again: resumes
    _, other = load_sweep(write(tmp_path, repo_root), ["train.steps=60"])
    with pytest.raises(UserError, match=r"base.train.steps: 200 then, 60 now.*--set sweep.name=NEW"):
        check_same_settings(sweep, other, str(tmp_path / "s"))


def test_trial_config_applies_keys_and_sections(tmp_path, repo_root):
    _, base = load_sweep(write(tmp_path, repo_root))
    cfg = trial_config(base, {"optim.lr": 3e-4, "loss": {"slra": False, "dkw": False}})
    assert cfg.optim.lr == 3e-4 and cfg.loss.slra is False and cfg.loss.dkw is False and cfg.loss.mkcl_subtexts is True
    assert cfg.model.name == "make-tiny"  # the rest from the base


@pytest.mark.parametrize("change,message", [
    ({"space": {}}, "space is empty"),
    ({"space": {"optim.lr": [1, 2]}}, "space.optim.lr: expected one of choice, grid, uniform, loguniform"),
    ({"space": {"optim.lr": {"loguniform": [0, 1]}}}, "0 < low < high"),
    ({"space": {"optim.lrr": {"grid": [1e-4]}}}, "unknown key optim.lrr"),
    ({"space": {"train.zero_stage": {"grid": [2, 7]}}}, "train.zero_stage = 7: must be 0, 1, 2 or 3"),
    ({"space": {"lossy": {"grid": [{"slra": False}]}}}, "unknown section 'lossy'"),
    ({"mode": "best"}, "sweep.mode = 'best': must be min or max"),
    ({"metric": "eval/classify/top1"}, "evaluates no 'classify' table"),
    ({"metric": "eval/classify/top7"}, "no trial reports it"),
    ({"metric": "accuracy"}, "no trial reports it"),
    ({"metric": "eval/paper/classify_avg_top1"}, "the base config runs no suite"),
    ({"metric": "eval/classify/top1", "set": ["data.train_shards=x", "evaluation.classify_table=t.csv",
                                              "evaluation.classes=c.yaml"]}, "evaluation.every_steps = 0"),
    ({"asha": {"grace": 3}}, "sweep.asha.grace: unknown"),
    ({"space": {"config": {"grid": [1]}}}, "each value is a mapping of sections"),
    ({"samples": "many"}, "sweep.samples = 'many': expected an integer"),
    ({"scheduler_x": 1}, "unknown key sweep.scheduler_x"),
])
def test_bad_sweeps_name_the_key(tmp_path, repo_root, change, message):
    with pytest.raises(ConfigError, match=message):
        load_sweep(write(tmp_path, repo_root, **change))
