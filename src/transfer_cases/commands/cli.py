"""Shared pieces of the command-line entry points: config tree, metric table, clean errors."""

from __future__ import annotations

import atexit
import difflib
import functools
import gc
import os
import sys
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.syntax import Syntax
from rich.table import Table
from rich.tree import Tree

from transfer_cases.utils.atomic import OUTPUT_ERRNOS, output_error
from transfer_cases.utils.config import exception_chain, register_resolvers
from transfer_cases.utils.errors import ConfigError, TransferCasesError

F = TypeVar("F", bound=Callable[..., Any])
console = Console(stderr=False)

# Groups shown first in the printed config tree, in this order; the rest follow.
TREE_ORDER = ("case", "backbone", "data", "model", "trainer", "callbacks", "logger", "paths")


def friendly_errors(fn: F) -> F:
    """Errors a user can fix from the config print as one message and exit with status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except TransferCasesError as e:
            # Every DDP rank checks the same settings: rank 0 says it once. Data errors are per rank.
            exit_with_error(user_message(e), quiet=isinstance(e, ConfigError) and rank_zero_only.rank > 0)
        except Exception as e:
            if rank_zero_only.rank > 0 and _peer_failed(e):
                print(
                    f"\nrank {rank_zero_only.rank}: stopped, another process of this DDP run failed first "
                    "(its error is above)",
                    file=sys.stderr,
                )
                sys.exit(2)
            raise

    return wrapper  # type: ignore[return-value]


# What a rank's collective raises when the rank it talks to has exited (gloo, NCCL).
PEER_FAILED = (
    "Connection closed by peer",
    "Connection reset by peer",
    "remote worker crashing",
    "Broken pipe",
)


def _peer_failed(error: BaseException) -> bool:
    return any(
        isinstance(e, RuntimeError) and any(m in str(e) for m in PEER_FAILED) for e in exception_chain(error)
    )


def skip_final_collection() -> None:
    """Exit without the interpreter's last garbage collection, which walks every object the run made
    (configs, modules, tensors' wrappers) only to free memory the OS takes back anyway: `gc.freeze`
    at exit, after the other exit handlers (registered later, they run first: logs and files are
    closed by then). The objects' memory is returned by the process ending."""
    global _final_collection_skipped
    if not _final_collection_skipped:
        atexit.register(gc.freeze)
        _final_collection_skipped = True


_final_collection_skipped = False


def run_hydra(task_main: Callable[[], Any]) -> None:
    """Run a `@hydra.main` task; errors in the command line itself (an override Hydra cannot parse, a key
    the config does not have) print as one `error:` line naming the fix and exit with status 2, like
    every other setting. Hydra's own handler printed them as its message with exit status 1.

    Hydra re-raises instead of printing when HYDRA_FULL_ERROR=1: set here for this process (and the
    DDP workers it starts); a user who set it keeps the full traceback of these errors too."""
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from transfer_cases.reporting.terminal import quiet_upstream_noise

    quiet_upstream_noise()
    register_resolvers()
    skip_final_collection()
    full = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        task_main()
    except (OverrideParseException, ConfigCompositionException) as e:
        if full:
            raise
        exit_with_error(command_line_message(e))
    except OSError as e:
        # Hydra writing the run folder's .hydra/ files, before the task: a full or read-only disk.
        if full or e.errno not in OUTPUT_ERRNOS:
            raise
        where, what = (e.filename, "file") if e.filename else ("(Hydra's .hydra/ config files)", "run folder")
        exit_with_error(str(output_error(e, where, what)))


def command_line_message(error: Exception) -> str:
    """One line for an override Hydra refused, with the likely fix."""
    from hydra.errors import OverrideParseException

    text = " ".join(str(error).split())
    if isinstance(error, OverrideParseException):
        override = error.override
        if "=" not in override and not override.startswith(("-", "~")):
            # An unquoted value with a space: the shell split `data.root=/my images` into two arguments.
            return (
                f"'{override}' is not a key=value override; if it is the rest of a value with spaces, "
                "quote the whole override, e.g. 'data.root=\"/data/my images\"'"
            )
        return (
            f"cannot read the override '{override}'; quote a value with spaces or characters other than "
            "letters, digits and /._-, e.g. 'data.root=\"/data/café photos\"'"
        )
    if text.startswith("Could not override '") and "struct" in str(error.__cause__):
        return _unknown_key_hint(text.split("'")[1], error)
    return text


def _unknown_key_hint(key: str, error: Exception) -> str:
    parent, _, name = key.rpartition(".")
    if key == "case.keep":
        return (
            "case.keep is not a setting of this case: with case=auto the advisor picks the cut; to choose "
            "it yourself pick the case too, e.g. case=small_different case.keep=2"
        )
    node = getattr(error.__cause__, "parent_node", None)
    known = [str(k) for k in node] if node is not None and hasattr(node, "keys") else []
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    if close:
        return f"unknown setting {key}; did you mean {parent}.{close[0]}?"
    return f"unknown setting {key}; check the spelling, or add a new key with a leading +: +{key}=..."


def exit_with_error(message: str, *, quiet: bool = False) -> NoReturn:
    """The one way a command stops on an error the user can fix: `error: <message>` on stderr, status 2."""
    if not quiet:
        print(f"\nerror: {message}", file=sys.stderr)
    sys.exit(2)


def user_message(error: BaseException) -> str:
    """The error's message. A DataLoader worker re-raises an error with the worker's whole traceback
    as its text ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): the
    original message is what follows the error's qualified name on the traceback's last entry."""
    text = str(error)
    if text.startswith("Caught ") and "Original Traceback" in text:
        name = f"{type(error).__module__}.{type(error).__qualname__}: "
        at = text.rfind(name)
        if at != -1:
            return text[at + len(name) :].strip()
    return text


def find_user_error(error: BaseException) -> BaseException:
    """The error to show for `error`: the first of ours in its chain (an error raised while Lightning
    was handling ours hides it in `__context__`), a write failure made readable, or `error` itself."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, TransferCasesError):
            return current
        current = current.__cause__ or current.__context__
    if isinstance(error, OSError) and error.errno in OUTPUT_ERRNOS and error.filename:
        return output_error(error, error.filename, "file")
    return error


@rank_zero_only
def print_config(cfg: DictConfig) -> None:
    """The composed config as a tree, main groups first (like `--cfg job`, but at every run)."""
    tree = Tree("config", guide_style="dim")
    keys = [k for k in TREE_ORDER if k in cfg] + [k for k in cfg if k not in TREE_ORDER]
    for key in keys:
        value = cfg[key]
        text = OmegaConf.to_yaml(value, resolve=True) if isinstance(value, DictConfig) else str(value)
        tree.add(f"[bold]{key}[/bold]").add(Syntax(text.rstrip(), "yaml", theme="ansi_dark"))
    console.print(tree)


@rank_zero_only
def print_metrics(result: dict[str, Any]) -> None:
    # val/* and test/* are the best checkpoint's (what is deployed); train/* the last epoch's.
    table = Table(title="metrics: val/test of the best checkpoint, train of the last epoch")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in sorted(result["metrics"].items()):
        table.add_row(name, f"{value:.4f}")
    console.print(table)
    if result.get("best_checkpoint"):
        console.print(f"best checkpoint: {result['best_checkpoint']}", soft_wrap=True)
    console.print(f"run directory:   {result['output_dir']}", soft_wrap=True)
