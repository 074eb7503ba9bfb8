"""`make-dist`: the command line. Each subcommand is a small function that
parses its config once and hands over to the library. Each imports what it
needs when it runs, so `make-dist config` does not wait for torch and Ray."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading

from .config import TASKS, dump_config, load_config
from .errors import ConfigError, Interrupted, UserError

# The paper's model: ViT-B/16 from OpenAI's weights, which open_clip builds with QuickGELU.
PAPER_ARCHITECTURE = "ViT-B-16-quickgelu"


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (default: built-in defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one key, e.g. --set loss.lam=0.5 (repeatable)",
    )


def cmd_config(args) -> int:
    """Check a config and print it resolved, defaults and overrides applied (and,
    with train.epochs, the step count the shards' manifest gives)."""
    from .data.shards import read_manifest, with_shards_manifest

    config = load_config(args.config, args.overrides)
    epochs = config.train.epochs
    if epochs is not None and not config.data.train_shards:
        print(dump_config(config), end="")
        print(f"# train.epochs = {epochs}: train.steps follows from the sample count of data.train_shards' "
              f"manifest (not set here)")
        return 0
    resolved = with_shards_manifest(config)
    print(dump_config(resolved), end="")
    if epochs is not None:
        world = config.data.batch_size * config.train.workers
        samples = read_manifest(config.data.train_shards)["samples"]
        print(f"# train.steps = {resolved.train.steps}: {epochs:g} epochs of {samples:,} samples "
              f"at {world:,} a step ({config.train.workers} x {config.data.batch_size})")
    return 0


def cmd_model(args) -> int:
    """Build the configured model; print its size; optionally export it."""
    from .model import build_model, export_open_clip

    config = load_config(args.config, args.overrides)
    model = build_model(config.model)
    visual = sum(p.numel() for p in model.clip.visual.parameters())
    total = sum(p.numel() for p in model.parameters())
    print(f"model {config.model.name}: {total / 1e6:.2f} M parameters "
          f"(image tower {visual / 1e6:.2f} M, text tower {(total - visual) / 1e6:.2f} M), "
          f"image {model.image_size} px, context {model.context_length}")
    if args.export:
        out = export_open_clip(model, args.export)
        print(f"exported to {out}: load it with open_clip.create_model_and_transforms('local-dir:{out}')")
    return 0


def cmd_synth(args) -> int:
    """Write the synthetic dermatology set: images, train table, held-out evaluation tables."""
    from .data.synth import synthesize

    rows = synthesize(args.out, n=args.n, n_eval=args.n_eval, size=args.size, seed=args.seed,
                      workers=args.workers, fmt=args.format, named=args.named)
    print(f"synth: {len(rows['train'])} training and {len(rows['eval'])} held-out images in {args.out} "
          f"(train.csv, eval/classify.csv, eval/concepts.csv, eval/retrieval.csv, classes.yaml)")
    return 0


def cmd_shards(args) -> int:
    """Turn a CSV or Parquet table of images and captions into WebDataset shards."""
    from .data.schema import load_column_map
    from .data.shards import write_shards

    columns = load_column_map(args.columns)
    write_shards(args.table, args.out, columns, images_root=args.images_root, shard_size=args.shard_size,
                 image_max_side=args.image_max_side, k=args.subtexts, workers=args.workers,
                 images_anywhere=args.images_anywhere)
    return 0


def cmd_train(args) -> int:
    """Train with Ray Train + DeepSpeed, tracked in MLflow; resumes a run of the same name.
    --no-ray: in this process, one worker, no Ray (to step through with a debugger or a profiler)."""
    from .train.launch import fit

    overrides = args.overrides + ([f"tracking.register={args.register}"] if args.register else [])
    config = load_config(args.config, overrides)
    result = fit(config, ray=not args.no_ray)
    print(f"make-dist: trained; run folder {result.run_dir}, MLflow run {result.run.id} ({result.run.uri})")
    return 0


def cmd_demo(args) -> int:
    """Synthesise a dermatology set, shard it, train the tiny model with MAKE, with the CLIP objective and
    with the CLIP objective on knowledge-augmented captions (2 Ray workers, ZeRO-2, CPU), score all three
    zero-shot on the same held-out images, with 95% bootstrap intervals."""
    from .demo import run_demo

    run_demo(args.out, n=args.n, n_eval=args.n_eval, steps=args.steps, workers=args.workers, seed=args.seed,
             named=args.named)
    return 0


def cmd_eval(args) -> int:
    """Zero-shot classification, concept annotation or retrieval of a model on a
    table (--task, --table), or the paper's whole benchmark suite on the
    authors' data folder (--suite paper --data DIR): Table 1 and Table 2."""
    from .config import ModelConfig
    from .evaluate.evaluation import Evaluation
    from .files import write_atomic
    from .model import build_model, tokenizer
    from .tracking import Run, tracking_uri

    if args.suite:
        if args.task or args.table:
            raise UserError("--suite scores its own sets: leave out --task and --table")
        if not args.data:
            raise UserError("--suite paper needs --data DIR, the authors' data/ folder (PAD/, F17K/, ...)")
        if not args.model and not args.weights:
            raise UserError(f"--suite paper scores a trained model: give --weights FILE (e.g. the authors' "
                            f"epoch_15.pt, loaded into {PAPER_ARCHITECTURE}) or --model (an exported or "
                            f"downloaded model folder, e.g. the authors' MAKE from Hugging Face)")
        args.model = args.model or PAPER_ARCHITECTURE
        evaluation = Evaluation(suite_data=args.data, concept_terms=args.concept_terms, batch_size=args.batch_size)
    elif not (args.task and args.table and args.model):
        raise UserError("give --model, --task and --table (one table), or --suite paper --data DIR "
                        "(the paper's sets)")
    else:
        if args.task == "classify" and not args.classes:
            raise UserError("classify needs a class list (--classes YAML)")
        evaluation = Evaluation({args.task: args.table}, args.classes, args.images_root, args.images_anywhere,
                                batch_size=args.batch_size)
    evaluation = evaluation.check(config_keys=False)  # a wrong folder or file fails before the model loads
    model_cfg = ModelConfig(name=args.model, pretrained=args.weights)
    results = evaluation.run(build_model(model_cfg), tokenizer(model_cfg))
    print(results.printout(args.model))
    if args.out:
        write_atomic(args.out, json.dumps(results.to_json(args.model), indent=1))
        print(f"results written to {args.out}")
    if not args.no_mlflow:
        uri = tracking_uri(args.tracking_uri)
        name = f"{args.suite or args.task} {args.model}"
        run = Run(uri, args.run_id) if args.run_id else Run.create(uri, "make-dist-eval", name)
        if args.suite:
            run.log_params({"suite": args.suite, "data": args.data, "model": args.model,
                            "weights": args.weights or "", "concept_terms": results.concept_terms()})
        results.log(run, prefix="" if args.suite else "eval")
        if not args.run_id:
            run.finish()
        print(f"MLflow run {run.id}")
    if results.failed():
        print(f"make-dist: stopped by an error: {', '.join(results.failed())} (see above)", file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    """A Ray Tune sweep over training configs; rerun the same sweep to resume it."""
    from .sweep import load_sweep, run_sweep

    sweep, base = load_sweep(args.config, args.overrides)
    run_sweep(sweep, base)
    return 0


def cmd_wheelhouse(args) -> int:
    """The offline wheel set: what a GPU host with Python and a CUDA torch lacks, and make-dist itself."""
    from .wheelhouse import PLATFORMS, build

    build(args.out, python=args.python, platforms=tuple(args.platform or PLATFORMS), also=tuple(args.also))
    return 0


IMAGES_ANYWHERE = ("also read image paths that leave --images-root (absolute paths, '..', URLs) as written "
                   "(default: such a row is skipped: a table must not make make-dist read what its user never named)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="make-dist",
        description="MAKE vision-language pretraining for dermatology, from a laptop to a Ray cluster.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("config", help="check a config and print it resolved", description=cmd_config.__doc__)
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("model", help="build the configured model, print its size, export it",
                       description=cmd_model.__doc__)
    _add_config_args(p)
    p.add_argument("--export", metavar="DIR", help="write an open_clip-loadable checkpoint folder")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("train", help="train (Ray Train + DeepSpeed + MLflow)", description=cmd_train.__doc__)
    _add_config_args(p)
    p.add_argument("--register", metavar="NAME", help="register the trained model in MLflow's model registry "
                   "under NAME (same as --set tracking.register=NAME)")
    p.add_argument("--no-ray", action="store_true",
                   help="train in this process, one worker, without Ray (checkpoints, resume, MLflow and the "
                        "exported model as in a Ray run): for a debugger or a profiler")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="the whole path on this machine: data, shards, training, evaluation",
                       description=cmd_demo.__doc__)
    p.add_argument("--out", default="demo", help="folder for data, shards and runs (default: demo)")
    p.add_argument("--n", type=int, default=4000, help="training images (default: 4000)")
    p.add_argument("--n-eval", type=int, default=1000, help="held-out images (default: 1000)")
    p.add_argument("--steps", type=int, default=250, help="training steps of each objective (default: 250)")
    p.add_argument("--workers", type=int, default=2, help="Ray workers (default: 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and of the training (default: 0)")
    p.add_argument("--named", type=float, default=0.3,
                   help="fraction of captions that name the diagnosis (default: 0.3)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sweep", help="hyperparameter sweep (Ray Tune, MLflow parent and nested runs)",
                       description=cmd_sweep.__doc__)
    p.add_argument("--config", required=True, metavar="YAML", help="sweep file, e.g. configs/sweep_ablation.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a key of the base training config (repeatable)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("eval", help="zero-shot classification, concept annotation, retrieval",
                       description=cmd_eval.__doc__)
    p.add_argument("--model",
                   help="an exported model folder, an open_clip name (ViT-B-16) or a config .json "
                        f"(--suite: default {PAPER_ARCHITECTURE}, the paper's, for --weights)")
    p.add_argument("--weights", help="a checkpoint file (e.g. the authors' epoch_15.pt) or an open_clip "
                                     "pretrained tag for --model")
    p.add_argument("--task", choices=TASKS, help="one task on one table (with --table)")
    p.add_argument("--table", help="CSV or Parquet: image + label | concept 0/1 columns | caption")
    p.add_argument("--suite", choices=("paper",), help="the paper's seven benchmark sets (with --data)")
    p.add_argument("--data", metavar="DIR", help="--suite: the authors' data/ folder (PAD/, F17K/, SNU/, SD-128/, "
                   "skincon/, derm7pt/, skin_cap/)")
    p.add_argument("--concept-terms", metavar="JSON|CHECKOUT",
                   help="--suite: concept synonym terms: a JSON file, or a checkout of the authors' repository "
                        "(its ConceptTerms.json is read). Default: the authors' file when DIR is their checkout's "
                        "data/, else make-dist's own terms (marked as not comparable with the paper)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    p.add_argument("--images-root", help="folder or URL that relative image paths are under")
    p.add_argument("--images-anywhere", action="store_true", help=IMAGES_ANYWHERE)
    p.add_argument("--classes", help="classify: YAML of class names (and synonyms) the labels use")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///mlflow.db here)")
    p.add_argument("--run-id", help="log onto this MLflow run (default: a new run in make-dist-eval)")
    p.add_argument("--no-mlflow", action="store_true", help="do not log to MLflow")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("synth", help="write the synthetic dermatology set", description=cmd_synth.__doc__)
    p.add_argument("--out", default="data/synth", help="output folder (default: data/synth)")
    p.add_argument("--n", type=int, default=1000, help="training images (default: 1000)")
    p.add_argument("--n-eval", type=int, default=None, help="held-out images (default: max(50, n/10))")
    p.add_argument("--size", type=int, default=224, help="image side in pixels (default: 224)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=("jpg", "png"), default="jpg")
    p.add_argument("--named", type=float, default=0.3,
                   help="fraction of captions that name the diagnosis (default: 0.3; the aspect texts always do)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("shards", help="write WebDataset shards from a table", description=cmd_shards.__doc__)
    p.add_argument("--table", required=True, help="CSV or Parquet file (path or fsspec URL)")
    p.add_argument("--images-root", help="folder or URL that relative image paths are under")
    p.add_argument("--images-anywhere", action="store_true", help=IMAGES_ANYWHERE)
    p.add_argument("--out", required=True, help="output folder or fsspec URL (s3://, gs://, memory://, ...)")
    p.add_argument("--columns", required=True, metavar="YAML",
                   help="column mapping, e.g. configs/columns/synthetic.yaml, make_example.yaml, derm1m.yaml")
    p.add_argument("--shard-size", type=int, default=1000, help="table rows per shard (default: 1000)")
    p.add_argument("--image-max-side", type=int, default=None, metavar="PX",
                   help="downscale images so the longer side is at most PX (e.g. 320 for 224-px training)")
    p.add_argument("--subtexts", type=int, default=8, metavar="K", help="at most K sentences per caption")
    p.add_argument("--workers", type=int, default=None, help="processes for image work (default: one per core)")
    p.set_defaults(func=cmd_shards)

    p = sub.add_parser("wheelhouse", help="the offline wheel set for a GPU host without internet",
                       description=cmd_wheelhouse.__doc__)
    p.add_argument("--out", default="wheelhouse", help="folder for the wheels (default: wheelhouse)")
    p.add_argument("--python", default="3.12", help="the host's Python version (default: 3.12)")
    p.add_argument("--platform", action="append", metavar="TAG",
                   help="the host's platform tags (default: manylinux x86_64; repeatable)")
    p.add_argument("--also", action="append", default=[], metavar="NAME",
                   help="one more package the host lacks, at the lock's version (repeatable)")
    p.set_defaults(func=cmd_wheelhouse)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if threading.current_thread() is threading.main_thread():  # SIGTERM stops as Ctrl-C does
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        return args.func(args)
    except (KeyboardInterrupt, Interrupted) as e:
        print(f"make-dist: {e or 'stopped'}", file=sys.stderr)
        if _stop_ray():  # after a signal, Ray's C++ core can abort at interpreter exit: leave now, cleaned up
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130
    except ConfigError as e:
        print(f"make-dist: bad config: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"make-dist: {e}", file=sys.stderr)
        return 2


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _stop_ray() -> bool:
    """End the Ray instance this process started (its workers too), or leave a
    cluster it joined; whether there was one."""
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()
            return True
    return False


if __name__ == "__main__":
    sys.exit(main())
