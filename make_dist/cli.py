"""`make-dist`: the command line. Each subcommand is a small function that
parses its config once and hands over to the library."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, dump_config, load_config
from .errors import UserError


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="YAML", help="config file (default: built-in defaults)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
        help="override one key, e.g. --set loss.lam=0.5 (repeatable)",
    )


def cmd_config(args) -> int:
    """Check a config and print it resolved, defaults and overrides applied."""
    config = load_config(args.config, args.overrides)
    print(dump_config(config), end="")
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"make-dist: bad config: {e}", file=sys.stderr)
        return 2
    except UserError as e:
        print(f"make-dist: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
