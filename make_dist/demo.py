"""`make-dist demo`: the paper's claim as a small experiment on a laptop.

    synthesise a dermatology set whose captions often omit the diagnosis
    (the knowledge texts never do) -> write shards -> train the tiny model
    three ways on the same data and steps (2 Ray workers, ZeRO-2, CPU,
    tracked in MLflow), as in the paper's Table 1:
        MAKE                  every term of the objective
        CLIP                  the CLIP objective on the raw captions
        CLIP + knowledge      the CLIP objective on the captions with the
                              disease and concept texts put before them
    -> score each zero-shot on the same held-out images -> print every
    metric with its 95% bootstrap interval, and MAKE minus each baseline
    with its paired interval.

The terminal shows the stages and a step bar; Ray's, the workers' and the
libraries' logs go to files whose paths are printed. In MLflow the demo is a
parent run (its description and artifacts: the comparison) with the three
arms nested under it, each named after its arm first.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .config import load_config
from .data.schema import load_column_map
from .data.shards import write_shards
from .data.synth import synthesize
from .evaluate import bootstrap
from .files import write_atomic
from .progress import logs_to_file
from .tracking import Run, tracking_uri
from .train.cluster import ray_logs
from .train.launch import fit

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tiny.yaml"
CLIP = ["loss.dkw=false", "loss.slra=false", "loss.mkcl_subtexts=false", "loss.mkcl_aspects=false"]
ARMS = {  # label -> overrides of the demo's config
    "MAKE": [],
    "CLIP": CLIP,
    "CLIP + knowledge": CLIP + ["data.caption=knowledge"],
}
BASELINES = ("CLIP", "CLIP + knowledge")


@dataclass
class DemoResult:
    minutes: float
    estimates: dict  # arm -> metric -> Estimate
    differences: dict  # baseline -> metric -> Estimate (MAKE minus the baseline)
    runs: dict  # arm -> run folder
    chance_top1: float


def run_demo(out: str = "demo", n: int = 4000, n_eval: int = 1000, steps: int = 250, workers: int = 2,
             seed: int = 0, named: float = 0.3) -> DemoResult:
    out_dir = Path(out).resolve()
    data = out_dir / "data"
    started = time.time()
    log_file = logs_to_file(str(out_dir / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"))
    stages = 2 + len(ARMS)
    print(f"make-dist demo: seed {seed}; the libraries' logs go to {log_file}")
    print(f"[1/{stages}] synthesising {n} training and {n_eval} held-out images (64 px) in {data}; "
          f"{named:.0%} of the captions name the diagnosis")
    synthesize(data, n=n, n_eval=n_eval, size=64, seed=seed, named=named)
    print(f"[2/{stages}] writing shards to {out_dir}/shards")
    manifest = write_shards(str(data / "train.csv"), str(out_dir / "shards"),
                            load_column_map(ROOT / "configs/columns/synthetic.yaml"),
                            images_root=str(data), shard_size=max(50, n // 20))
    stamp = time.strftime("%Y%m%d-%H%M%S")
    common = [
        f"data.train_shards={out_dir}/shards/manifest.json", f"train.storage={out_dir}/runs",
        f"train.steps={steps}", f"train.workers={workers}", f"train.checkpoint_every={steps}",
        f"train.seed={seed}", "train.log_every=10", f"tracking.experiment={EXPERIMENT}",
        f"evaluation.classify_table={data}/eval/classify.csv", f"evaluation.classes={data}/classes.yaml",
        f"evaluation.concepts_table={data}/eval/concepts.csv",
        f"evaluation.retrieval_table={data}/eval/retrieval.csv", f"evaluation.images_root={data}",
    ]
    parent = Run.create(tracking_uri(load_config(CONFIG, common).tracking.uri), EXPERIMENT, f"demo s{seed} {stamp}",
                        {"make_dist.demo": "MAKE against the CLIP baselines"})
    parent.log_params({"seed": seed, "steps": steps, "workers": workers, "n": n, "n_eval": n_eval, "named": named})
    try:
        result, cfg, fitted = _arms_and_scores(parent, common, stamp, seed, steps, workers, named, stages, started,
                                               out_dir)
    except BaseException:
        parent.finish("FAILED")
        raise

    print()
    print(f"make-dist demo: done in {result.minutes:.1f} minutes; {manifest['samples']} training samples, "
          f"{steps} steps x {workers} workers x batch {cfg.data.batch_size} for each objective")
    print(report(result, n_eval))
    for label, r in fitted.items():
        print(f"  {label}: model {r.run_dir}/model, MLflow run {r.run.id}")
    print(f"  MLflow: mlflow ui --backend-store-uri {fitted['MAKE'].run.uri}   (the comparison: run {parent.id}; "
          f"results: {out_dir}/results.json)")
    return result


EXPERIMENT = "make-dist-demo"


def _arms_and_scores(parent: Run, common: list[str], stamp: str, seed: int, steps: int, workers: int, named: float,
                     stages: int, started: float, out_dir: Path):
    """Train the three arms under the demo's parent run, score them, and put
    the comparison on the parent (its description, results.json, comparison.md)."""
    fitted = {}
    for stage, (label, extra) in enumerate(ARMS.items(), start=3):
        # what differs leads: the runs table and the chart legends cut long names at the end
        cfg = load_config(CONFIG, common + extra + [f"train.name={_slug(label)}-demo-s{seed}-{stamp}",
                                                    f"tracking.run_name={label} · demo s{seed} {stamp}"])
        print(f"[{stage}/{stages}] {label} ({cfg.objective()}): {steps} steps x {workers} Ray workers x batch "
              f"{cfg.data.batch_size}, ZeRO-2 on the CPU, then zero-shot evaluation")
        fitted[label] = fit(cfg, quiet=True, tags={"mlflow.parentRunId": parent.id})
        if stage == 3:
            print(f"  Ray's and the workers' logs: {ray_logs()}")

    print("scoring: 95% bootstrap intervals (1,000 draws of the held-out images)")
    details = {label: _details(r.run) for label, r in fitted.items()}
    estimates = {label: {m: bootstrap.interval(m, details[label][task])
                         for m, (task, _) in bootstrap.STATISTICS.items()} for label in ARMS}
    differences = {base: {m: bootstrap.difference(m, details["MAKE"][task], details[base][task])
                          for m, (task, _) in bootstrap.STATISTICS.items()} for base in BASELINES}
    chance = float(fitted["MAKE"].run.tags().get("eval/classify/chance_top1", "nan"))
    result = DemoResult((time.time() - started) / 60, estimates, differences,
                        {label: r.run_dir for label, r in fitted.items()}, chance)
    plain = json.dumps(_plain(result, seed, steps, workers, named), indent=1)
    write_atomic(str(out_dir / "results.json"), plain)
    table = markdown(result)
    parent.log_text(plain, "results.json")
    parent.log_text(table, "comparison.md")
    parent.log_metrics({f"make_minus_{_slug(base)}/{m}": e.value for base, row in differences.items()
                        for m, e in row.items()})
    parent.set_tags({"mlflow.note.content": table})  # the run's description in the UI
    parent.finish("FINISHED")
    return result, cfg, fitted


def markdown(result: DemoResult) -> str:
    """The comparison as a Markdown table: a row per arm, then MAKE minus each baseline."""
    metrics = list(bootstrap.STATISTICS)
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    lines += [f"| {label} | " + " | ".join(str(row[m]) for m in metrics) + " |"
              for label, row in result.estimates.items()]
    lines += [f"| **MAKE - {base}** | " + " | ".join(_signed(row[m]) for m in metrics) + " |"
              for base, row in result.differences.items()]
    lines.append("")
    lines.append(f"95% bootstrap intervals over the held-out images; a difference whose interval excludes 0 is "
                 f"resolved. Chance top-1: {result.chance_top1:.3f}.")
    return "\n".join(lines)


def report(result: DemoResult, n_eval: int) -> str:
    """The table: one column per metric, a row per arm, then MAKE minus each baseline."""
    metrics = list(bootstrap.STATISTICS)
    lines = [f"zero-shot on {n_eval} held-out images, 95% bootstrap intervals:",
             f"  {'':22}" + "".join(f"{m:>26}" for m in metrics)]
    for label, row in result.estimates.items():
        lines.append(f"  {label:22}" + "".join(f"{str(row[m]):>26}" for m in metrics))
    for base, row in result.differences.items():
        lines.append(f"  {'MAKE - ' + base:22}" + "".join(f"{_signed(row[m]):>26}" for m in metrics))
    top1 = result.estimates["MAKE"]["classify/top1"].value
    lines.append(f"  classification chance top-1 is {result.chance_top1:.3f}; MAKE reaches "
                 f"{top1 / result.chance_top1:.1f}x chance. A difference whose interval excludes 0 is resolved.")
    return "\n".join(lines)


def _signed(e: bootstrap.Estimate) -> str:
    return f"{e.value:+.3f} [{e.low:+.3f}, {e.high:+.3f}]"


def _details(run) -> dict:
    """task -> details of the run's final evaluation (its results.json in MLflow)."""
    return {r["task"]: r["details"] for r in json.loads(run.read_text("eval/results.json"))}


def _slug(label: str) -> str:
    return "-".join(label.lower().replace("+", "").split())


def _plain(result: DemoResult, seed: int, steps: int, workers: int, named: float) -> dict:
    def row(estimates):
        return {m: {"value": e.value, "low": e.low, "high": e.high} for m, e in estimates.items()}

    return {"seed": seed, "steps": steps, "workers": workers, "named": named, "minutes": result.minutes,
            "chance_top1": result.chance_top1, "runs": result.runs,
            "arms": {label: row(e) for label, e in result.estimates.items()},
            "make_minus": {base: row(e) for base, e in result.differences.items()}}
