"""User errors, and the wrapper every command runs under (`run_cli`).

Two kinds of failure reach a command's user. A *user error* is something they can fix: a
missing or unreadable file, a bad option or override, a checkpoint of the wrong kind, a
training run that diverged. It is raised as a `UserError` whose message names the file,
field, class or key; `run_cli` prints it as one line on stderr and exits with status 2 (the
status argparse gives a bad command line). Anything else is a bug and keeps its traceback,
so the wrapper catches this one type only, never every ValueError. `--debug` on the command
line, or FREESEG_DEBUG=1 in the environment, shows the traceback of user errors too.

Stopping: Ctrl-C raises KeyboardInterrupt, and `run_cli` turns SIGTERM (what `kill`, batch
schedulers and torchrun send) into the `Terminated` exception in the main process. Both
unwind the stack, so every atomic write in progress removes its temporary file
(`freeseg.data.io.atomic_write`) before the command exits with 130 or 143, as a shell
reports those signals.

Not in the official code, which runs under detectron2's launcher and shows every error as
a traceback.
"""

import os
import signal
import sys
from typing import Any, Callable


class UserError(Exception):
    """An error in what the user gave; the message names the file, field, class or key."""


class ConfigError(UserError, ValueError):
    """A bad `--set KEY=VALUE` override, preset or config value."""


class ConfigKeyError(UserError, KeyError):
    """An override naming a config key that does not exist."""

    def __str__(self) -> str:  # KeyError quotes its message; this one is a sentence
        return str(self.args[0]) if self.args else ""


class CheckpointError(UserError, ValueError):
    """A checkpoint that is unreadable, unsafe to read, or of the wrong stage, kind or size."""


class MissingFileError(UserError, FileNotFoundError):
    """A file the command was told to read does not exist."""


class TrainingDiverged(UserError):
    """A non-finite loss: training stops before the weights it produced are saved."""


class Terminated(BaseException):
    """SIGTERM arrived. A BaseException, like KeyboardInterrupt: no `except Exception` stops it."""


def _raise_terminated(signum: int, frame: Any) -> None:
    if os.getpid() != _handler_pid:
        # A worker forked from the command (DataLoader, multiprocessing pool) inherited this
        # handler: it dies the default way, as its parent expects of terminate().
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        return
    raise Terminated()


_handler_pid = -1


def _default_sigterm_in_child() -> None:
    # A process forked from the command (multiprocessing pool, DataLoader worker) dies at once
    # on SIGTERM, as its parent's terminate() expects. A Python handler would wait for the
    # interpreter to run it, which a child stuck on a lock inherited through fork never does:
    # terminate() then waited for it forever.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


os.register_at_fork(after_in_child=_default_sigterm_in_child)


def debug_requested(argv: list[str]) -> bool:
    return "--debug" in argv or os.environ.get("FREESEG_DEBUG", "") not in ("", "0")


def _rank_prefix() -> str:
    """'[rank 1] ' under torchrun with several processes: each failing rank says who it is."""
    return f"[rank {os.environ['RANK']}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ else ""


def _peer_stopped(err: BaseException) -> bool:
    """A collective failed because another rank of the run exited (that rank prints why)."""
    import torch.distributed as dist

    text = str(err)
    return (dist.is_available() and dist.is_initialized() and isinstance(err, RuntimeError)
            and ("closed by peer" in text or "reset by peer" in text))


def one_line(err: BaseException) -> str:
    """The message of `err` on one line. An error re-raised by a DataLoader from one of its
    worker processes carries the worker's traceback; its own message is the last line of it."""
    text = str(err)
    if "\nOriginal Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def run_cli(main: Callable[[list[str]], Any], argv: list[str] | None = None, prog: str | None = None) -> int:
    """Run `main(argv)` as a command; returns the exit status (`sys.exit(run_cli(main))`).

    User errors become one line `PROG: error: MESSAGE` on stderr and status 2; SIGINT and
    SIGTERM one line and 130 / 143. `main` may return an int status; anything else means 0.
    """
    global _handler_pid
    argv = sys.argv[1:] if argv is None else list(argv)
    prog = prog or os.path.basename(sys.argv[0])
    debug = debug_requested(argv)
    previous, _handler_pid = signal.getsignal(signal.SIGTERM), os.getpid()
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        status = main(argv)
        return status if isinstance(status, int) else 0
    except UserError as err:
        if debug:
            raise
        message, status = f"error: {one_line(err)}", 2
    except KeyboardInterrupt:
        message, status = "stopped by SIGINT (Ctrl-C); files being written were removed", 130
    except Terminated:
        message, status = "stopped by SIGTERM; files being written were removed", 143
    except RuntimeError as err:
        if debug or not _peer_stopped(err):
            raise
        message, status = "stopped: another process of this run failed (its error is above)", 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"{prog}: {_rank_prefix()}{message}", file=sys.stderr, flush=True)
    return status
