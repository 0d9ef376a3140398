"""The `hotcold` command. Each subcommand lives in its room as `add_arguments(parser)` + `run(args)`;
modules are imported only for the chosen subcommand so `hotcold loadtest` never pays for torch."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("hotcold.engine.commands_generate", "stream a completion to stdout"),
    "perplexity": ("hotcold.engine.commands_perplexity", "perplexity of the model over a text file"),
    "profile": ("hotcold.profiler.commands", "profile activations and write a hot/cold plan"),
    "plan": ("hotcold.profiler.commands_plan", "plan tools: `plan import` turns shipped predictors into a plan"),
    "serve": ("hotcold.server.commands", "OpenAI-compatible HTTP server"),
    "loadtest": ("hotcold.server.loadtest", "load-test an OpenAI-compatible server"),
    "info": ("hotcold.engine.commands_info", "the CPU, ISA level, threads and kernel paths chosen here"),
}


def _top_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hotcold", description="Activation-sparsity LLM serving.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, helptext) in COMMANDS.items():
        sub.add_parser(name, help=helptext, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # also while the subcommand's modules (torch: seconds) are imported
        print("hotcold: interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        parser = _top_parser()
        if not argv or argv[0] in ("-h", "--help"):
            parser.print_help()
            return 0 if argv else 2
        parser.error(f"unknown command {argv[0]!r} (choose from {', '.join(COMMANDS)})")
    name = argv[0]
    module_name, helptext = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"hotcold {name}", description=helptext)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from hotcold.engine.errors import HotcoldError

    try:
        return int(module.run(args) or 0)
    except BrokenPipeError:
        return 0
    except (HotcoldError, FileNotFoundError, IsADirectoryError, PermissionError) as exc:
        if os.environ.get("HOTCOLD_DEBUG"):
            raise
        print(f"hotcold {name}: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # last resort: one line, never a traceback (HOTCOLD_DEBUG=1 shows it)
        if os.environ.get("HOTCOLD_DEBUG"):
            raise
        print(f"hotcold {name}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
