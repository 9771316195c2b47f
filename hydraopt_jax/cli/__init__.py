"""The `hydraopt` command: thin callers of the library, one module per command.

```
hydraopt merge DIR... --out OUT [--plan shared-a|shared-b|full-merge|separate|FILE.yaml]
               [--rank K] [--solver exact|als|adam|lbfgs] [--steps N] [--names a,b,...]
               [--weighting relative|uniform|adapter] [--config PLAN.yaml]
               [--dtype float32|bfloat16|float16] [--json] [--resume]
               [--checkpoint-every N] [--max-memory SIZE]
hydraopt export OUT --to DIR [--task NAME[,NAME...]] [--dtype ...]  # DIR/<task>/ per task
hydraopt inspect DIR... [--rank K] [--names ...] [--json]
hydraopt plan DIR... --budget 0.3 --out PLAN.yaml [...]              # see cli/plan.py
hydraopt sweep DIR... --plot FILE.png [...]
hydraopt demo
```

Every bad input prints one line `hydraopt: PATH: cause` (or `hydraopt: --flag: cause`) to
stderr, exits with status 2 and leaves no output behind (outputs are written atomically).
docs/errors.md lists every refusal with its message. What the commands do lives in the
library: `merge` is `hydraopt_jax.merge_collection` (streaming, memory guard, checkpoints
and `--resume`), `plan` is `hydraopt_jax.plan_budget`, plan files are
`hydraopt_jax.planner.planfile`, `export` is `hydraopt_jax.io.export_peft`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import typer

from ..io import AdapterError
from ._common import CliError, claimed

__all__ = ["CliError", "app", "main"]

app = typer.Typer(
    name="hydraopt",
    help="Shrink a collection of LoRA adapters with shared and task-specific factors.",
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    no_args_is_help=True,
)


def _register() -> None:
    from . import demo, export, inspect, merge, plan, sweep

    app.command(name="merge")(merge.merge)
    app.command(name="export")(export.export)
    app.command(name="inspect")(inspect.inspect)
    app.command(name="plan")(plan.plan)
    app.command(name="sweep")(sweep.sweep)
    app.command(name="demo")(demo.demo)


_register()


# --------------------------------------------------------------------------- entry point
def _fail(message: str) -> int:
    sys.stderr.write(f"hydraopt: {' '.join(message.split())}\n")
    sys.stderr.flush()
    return 2


INTERRUPTED = 130


def _interrupted() -> int:
    sys.stderr.write(
        "hydraopt: interrupted; no output written (an iterative merge continues with --resume)\n"
    )
    sys.stderr.flush()
    return INTERRUPTED


CACHE_ENV = "HYDRAOPT_CACHE_DIR"
CACHE_MAX_BYTES = 1 << 30  # least recently used entries are evicted beyond 1 GiB


def compilation_cache_dir() -> str | None:
    """The folder of the command's persistent compilation cache, or `None` (disabled).

    `HYDRAOPT_CACHE_DIR` if set (an empty value disables the cache), else
    `$XDG_CACHE_HOME/hydraopt/jax` (`~/.cache/hydraopt/jax`).
    """
    path = os.environ.get(CACHE_ENV)
    if path is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "hydraopt", "jax")
    return path or None


def _enable_compilation_cache() -> None:
    """JAX's persistent compilation cache for the `hydraopt` command: a fresh process loads
    the solvers it compiled before from disk (a 16-module full merge: see the cold-command
    rows of `benchmarks/speed.py`). Entries are keyed by program, shapes, jaxlib and device,
    so a stale entry is never used; a folder that cannot be written only costs the speed-up
    (JAX warns about it on stderr). The cache is capped at `CACHE_MAX_BYTES`.
    """
    path = compilation_cache_dir()
    if path is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 2 bad input, 1 internal error,
    130 interrupted). Run as the `hydraopt` command (`argv` None), it enables the persistent
    compilation cache (`compilation_cache_dir`). A failed command leaves no directory it
    created behind (`_common.claim_output`)."""
    from ..io._files import remove_empty_dirs

    claimed().clear()
    status = 1  # if _main raises (HYDRAOPT_DEBUG=1 re-raises internal errors)
    try:
        status = _main(argv)
    finally:
        if status != 0:
            remove_empty_dirs(claimed())
        claimed().clear()
    return status


def _main(argv: Sequence[str] | None) -> int:
    if argv is None:
        _enable_compilation_cache()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        result = app(args=args, prog_name="hydraopt", standalone_mode=False)
        if result == INTERRUPTED:  # Typer turns Ctrl-C (KeyboardInterrupt) into 130
            return _interrupted()
        return result if isinstance(result, int) else 0
    except CliError as err:
        return _fail(f"{err.where}: {err.cause}")
    except AdapterError as err:
        return _fail(str(err))
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as err:
        # Typer >= 0.29 vendors click (`typer._click`), so match click's classes by name.
        kinds = {cls.__name__ for cls in type(err).__mro__}
        if "Exit" in kinds:
            return int(getattr(err, "exit_code", 0))
        if "Abort" in kinds:
            return _fail("aborted")
        if "ClickException" in kinds:
            ctx = getattr(err, "ctx", None)
            where = ctx.command_path.removeprefix("hydraopt").strip() if ctx is not None else ""
            return _fail(f"{where + ': ' if where else ''}{err.format_message()}")
        if os.environ.get("HYDRAOPT_DEBUG"):
            raise
        sys.stderr.write(
            f"hydraopt: internal error: {type(err).__name__}: {' '.join(str(err).split())} "
            "(set HYDRAOPT_DEBUG=1 for a traceback)\n"
        )
        return 1
