"""The ``embedforge`` command.

    embedforge models list [--cache-dir D]            name, kind, license, built?, folder
    embedforge models build NAME|all [--cache-dir D]  build once into the cache, print the folder(s)
    embedforge models resolve NAME [--cache-dir D]    what resolve_model returns for NAME

Jobs have their own entrypoints (``python -m jobs.<name> --config ...``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from embedforge.errors import EmbedforgeError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="embedforge", description=__doc__.split("\n\n")[0])
    groups = parser.add_subparsers(dest="group", required=True)
    models = groups.add_parser("models", help="packaged models and the model cache")
    cmds = models.add_subparsers(dest="command", required=True)
    cache_help = "model cache folder (default: $EMBEDFORGE_MODEL_CACHE, else ~/.cache/embedforge/models)"
    ls = cmds.add_parser("list", help="list packaged models and whether they are built")
    ls.add_argument("--cache-dir", default=None, help=cache_help)
    build = cmds.add_parser("build", help="build a packaged model (or 'all') into the cache")
    build.add_argument("name", help="a packaged model name, or 'all'")
    build.add_argument("--cache-dir", default=None, help=cache_help)
    resolve = cmds.add_parser("resolve", help="print the folder (or hub id) a model name resolves to")
    resolve.add_argument("name")
    resolve.add_argument("--cache-dir", default=None, help=cache_help)
    return parser


def _models(args: argparse.Namespace) -> None:
    from embedforge import models

    if args.command == "list":
        rows = [models.describe(n, args.cache_dir) for n in models.PACKAGED]
        print(f"{'name':<24} {'kind':<8} {'license':<20} {'built':<6} path")
        for r in rows:
            print(f"{r['name']:<24} {r['kind']:<8} {r['license']:<20} {'yes' if r['built'] else 'no':<6} {r['path']}")
    elif args.command == "build":
        names = list(models.PACKAGED) if args.name == "all" else [args.name]
        for name in names:
            print(models.build_model(name, args.cache_dir), flush=True)
    elif args.command == "resolve":
        print(models.resolve_model(args.name, args.cache_dir))


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.group == "models":
            _models(args)
    except EmbedforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
