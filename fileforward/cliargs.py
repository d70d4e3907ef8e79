"""What both command lines (`fileforward` and `python -m rpc`) share.

One spelling rule for flags (`--tunnel-dir` and `--tunnel_dir` are the same flag;
help shows the hyphenated one), a "did you mean" for mistyped flags, help that
states every default, `--job [JOBID]`, the logging options and their setup, and a
process that can hold many connections (the soft descriptor limit raised).
"""
from __future__ import annotations

import argparse
import difflib
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Iterator, List, NoReturn, Optional, Sequence

JOBS_DIR_ENV = "FILEFORWARD_JOBS_DIR"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def normalize_flags(argv: Sequence[str]) -> List[str]:
    """`--x_y[=v]` becomes `--x-y[=v]`; positional arguments and everything after
    `--` are left as they are."""
    out: List[str] = []
    for i, token in enumerate(argv):
        if token == "--":
            return out + list(argv[i:])
        if token.startswith("--"):
            name, eq, value = token.partition("=")
            token = "--" + name[2:].replace("_", "-") + eq + value
        out.append(token)
    return out


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to every
    option whose help does not state its default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("%(default)" in text or "default" in text.lower() or default in (None, False)
                or default is argparse.SUPPRESS or not action.option_strings):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser with our flag spelling rule, one-line errors, and a
    suggestion for a mistyped flag (even where argparse would first complain about
    a missing required argument)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self._argv: List[str] = []

    def parse_args(self, args: Optional[Sequence[str]] = None,  # type: ignore[override]
                   namespace: Optional[argparse.Namespace] = None) -> argparse.Namespace:
        self._argv = normalize_flags(sys.argv[1:] if args is None else args)
        return super().parse_args(self._argv, namespace)

    def error(self, message: str) -> NoReturn:
        root = self._root()
        unknown = root._first_unknown_flag()
        if unknown is not None:
            message = f"unknown option {unknown}"
            close = difflib.get_close_matches(unknown.partition("=")[0], list(root._known_flags()), n=1)
            if close:
                message += f"; did you mean {close[0]}?"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def _root(self) -> "Parser":
        parent = getattr(self, "_parent_parser", None)
        return parent._root() if isinstance(parent, Parser) else self

    def _known_flags(self) -> Iterator[str]:
        for action in self._actions:
            yield from (s for s in action.option_strings if s.startswith("--"))
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    if isinstance(sub, Parser):
                        yield from sub._known_flags()

    def _first_unknown_flag(self) -> Optional[str]:
        known = set(self._known_flags())
        for token in self._argv:
            if token == "--":
                return None
            if token.startswith("--") and token.partition("=")[0] not in known:
                return token
        return None

    def add_subparsers(self, **kwargs):  # type: ignore[override]
        """Subcommands are Parsers too, and find their way back to this one."""
        action = super().add_subparsers(**kwargs)
        original = action.add_parser

        def add_parser(name: str, **sub_kwargs) -> "Parser":
            sub = original(name, **sub_kwargs)
            sub._parent_parser = self
            return sub

        action.add_parser = add_parser  # type: ignore[method-assign]
        return action


def add_logging_options(parser: argparse.ArgumentParser, suppress_defaults: bool = False,
                        default_level: str = "INFO") -> None:
    """-v/--verbose, --log-level and --log-file. With suppress_defaults, an option
    not given leaves no attribute (so a parent and a subcommand can both offer it)."""
    default = (lambda value: argparse.SUPPRESS) if suppress_defaults else (lambda value: value)
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log debug messages (same as --log-level DEBUG; default: off)")
    parser.add_argument("--log-level", choices=LOG_LEVELS, default=default(None),
                        help=f"least severe messages to show (default: {default_level})")
    parser.add_argument("--log-file", metavar="FILE", default=default(None),
                        help="also append the log to FILE (default: stderr only)")


def setup_logging(name: str, args: argparse.Namespace, default_level: str = "INFO") -> None:
    """Logs go to stderr (and to --log-file if given), one line each, naming the
    program and its pid: both sides of a tunnel often log into one terminal."""
    level = "DEBUG" if getattr(args, "verbose", False) else (getattr(args, "log_level", None) or default_level)
    handlers: List[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    log_file = getattr(args, "log_file", None)
    if log_file:
        handlers.append(logging.FileHandler(log_file))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"%(asctime)s {name}[%(process)d] %(levelname)s %(message)s")


def add_job_option(parser: argparse.ArgumentParser, what: str) -> None:
    """`--job [JOBID]`: use the SLURM job's own directory instead of typing it."""
    parser.add_argument("--job", nargs="?", const="", metavar="JOBID",
                        help=f"use the {what} of SLURM job JOBID, ~/.cache/fileforward/jobs/JOBID/ "
                             f"(${JOBS_DIR_ENV} overrides the parent); without JOBID, this job's "
                             f"$SLURM_JOB_ID (default: off)")


def jobs_root() -> Path:
    """Where per-job directories live: $FILEFORWARD_JOBS_DIR or ~/.cache/fileforward/jobs."""
    env = os.environ.get(JOBS_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fileforward" / "jobs"


def job_tunnel_dir(job: str, kind: str) -> Path:
    """The tunnel directory `kind` ("tunnel" or "rpc") of SLURM job `job`; an empty
    `job` means this job's $SLURM_JOB_ID. Raises ValueError naming the fix."""
    job = job or os.environ.get("SLURM_JOB_ID", "")
    if not job:
        raise ValueError("--job without a JOBID works only inside a SLURM job ($SLURM_JOB_ID is not set); "
                         "give the job id: --job 12345")
    if not job.replace("_", "").isalnum():
        raise ValueError(f"--job {job!r} is not a SLURM job id")
    return jobs_root() / job / kind


def dir_option(tunnel_dir: Path, kind: str) -> str:
    """How the other side should name `tunnel_dir` on its command line: `--job JOBID`
    for a job's directory of this kind, else `--tunnel-dir PATH`."""
    path = Path(tunnel_dir)
    if path.name == kind and path.parent.parent == jobs_root():
        return f"--job {path.parent.name}"
    return f"--tunnel-dir {shlex.quote(str(path))}"


def raise_descriptor_limit() -> None:
    """Raise the soft limit on open files to the hard limit: every tunneled
    connection holds descriptors, and 1024 runs out at a few hundred connections."""
    try:
        import resource
    except ImportError:  # not on this platform
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logging.getLogger(__name__).debug("cannot raise the open-file limit to %d: %s", hard, exc)
