"""The ``sims`` command line: the parser and the dispatch.

Each command group lives in its own module with ``add_parser(sub)``, which registers the
command and its handler (``set_defaults(func=...)``); :func:`main` parses and calls
``args.func(args)``. Every user mistake ends in one line, ``sims: error: ...``, and exit
status 2; any other exception (a bug, a full disk, a denied permission) ends in one line
``sims: error: <type>: <message>`` and exit status 1 (``SIMS_DEBUG=1`` adds the
traceback); nothing a run already wrote is touched by a failed command.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

from ..errors import SimsError
from .baseline import add_parser as add_baseline
from .evaluate import add_parser as add_evaluate
from .export import add_parser as add_export
from .generate import add_parser as add_generate
from .info import add_parser as add_info
from .leaderboards import add_parser as add_leaderboards
from .options import Parser
from .run import add_parser as add_run
from .serve import add_parser as add_serve
from .sweep import add_parser as add_sweep

#: Exit status of a known user mistake (a :class:`SimsError`) and of an unexpected error.
EXIT_MISTAKE = 2
EXIT_UNEXPECTED = 1
#: Exit status when the reader of the output closed it early (128 + SIGPIPE, as a shell
#: reports a tool that the closed pipe stopped); nothing is printed.
EXIT_BROKEN_PIPE = 141
#: Set to 1 to see the traceback of an unexpected error (the one line is printed too).
DEBUG_ENV = "SIMS_DEBUG"


def build_parser() -> argparse.ArgumentParser:
    """The ``sims`` parser with every command registered.

    Example:
        >>> args = build_parser().parse_args(["run", "-T", "2"])
        >>> args.iterations, args.func.__name__
        (2, 'cmd_run')
    """
    from .._version import __version__

    parser = Parser(prog="sims", description="Self-Improving Model Steering (SIMS).")
    parser.add_argument("--version", action="version", version=f"simsteer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    add_run(sub)
    add_generate(sub)
    add_info(sub)
    add_evaluate(sub)
    add_baseline(sub)
    add_sweep(sub, runner=main, parse=parse_given)  # each grid point is one in-process `sims run`
    add_leaderboards(sub)
    add_serve(sub)
    add_export(sub)
    return parser


def parse_given(argv: Sequence[str]) -> argparse.Namespace:
    """``argv`` parsed, with ``given``: the destinations of the options typed on it."""
    args = build_parser().parse_args(list(argv))
    args.given = given_options(argv)
    return args


def given_options(argv: Sequence[str]) -> frozenset[str]:
    """The destinations of the options typed on the command line (defaults left out).

    The arguments are parsed a second time by a parser whose defaults are all
    suppressed, so what lands in the namespace is exactly what the user gave, even when
    it equals a default (``sims run --resume RUN -T 3`` gives ``iterations``).
    """
    parser = build_parser()
    stack: list[argparse.ArgumentParser] = [parser]
    while stack:
        p = stack.pop()
        p._defaults.clear()  # set_defaults(func=...) is not something the user typed
        for action in p._actions:
            action.default = argparse.SUPPRESS
            if isinstance(action, argparse._SubParsersAction):
                stack.extend(action.choices.values())
    return frozenset(vars(parser.parse_args(list(argv)))) - {"command"}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one ``sims`` command; returns the exit status.

    Args:
        argv: the arguments after ``sims`` (default: ``sys.argv[1:]``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
        args.given = given_options(argv)
        _quiet_libraries()
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except BrokenPipeError:
        # Whoever read the output stopped (`sims info RUN | head`): nothing went wrong.
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except SimsError as exc:
        _report(str(exc))
        return EXIT_MISTAKE
    except KeyboardInterrupt:
        print("sims: interrupted; finished steps are saved (continue with --resume)", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: one line, never a traceback (unless asked)
        if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            traceback.print_exc()
        _report(f"{type(exc).__name__}: {exc}")
        return EXIT_UNEXPECTED


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what is still
    buffered for a closed pipe does not print a traceback at exit."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # stdout is not a file (captured): nothing buffered to lose
        pass


def _report(message: str) -> None:
    """Print ``sims: error: <message>`` as exactly one line (inner newlines folded)."""
    print("sims: error: " + " ".join(message.split()), file=sys.stderr)


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.basicConfig(level=logging.WARNING, format="sims: %(message)s")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
