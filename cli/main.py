"""Assemble ``spl`` from the commands that plugins register, and run it.

Errors a user can cause end in one line on stderr and exit code 2 (click's own usage errors
included); anything else is a bug: one line plus a hint to rerun with ``SPL_TRACE=1``, which
shows the traceback. A command run with ``--json`` prints its error as JSON on stdout instead,
in the HTTP API's shape (``{"error": {"message", "type", "param", "code"}}``), with the same exit
code, so a script reads one format whatever happens.
"""

from __future__ import annotations

import inspect
import json
import os
import sys

import click

from superlinear import __version__
from superlinear.bus import as_user_error
from superlinear.errors import UserError

USAGE_EXIT = 2


def build_cli() -> click.Group:
    from superlinear.pluginloader import collect

    @click.group(
        context_settings={"help_option_names": ["-h", "--help"]},
        help="spl: long-context inference with superlinear attention. Commands come from plugins "
        "(`spl plugins` lists them).",
    )
    @click.version_option(__version__, "-V", "--version", prog_name="spl")
    def cli() -> None:
        pass

    for plugin, args, _kwargs in collect("register_commands"):
        command = args[0]
        if command.name in cli.commands:
            print(f"spl: warning: plugin {plugin!r}: command {command.name!r} already exists; skipped",
                  file=sys.stderr)
            continue
        cli.add_command(command)
    _whole_first_sentences(cli)
    return cli


def _whole_first_sentences(command: click.Command) -> None:
    """Command lists show each command's first sentence whole (wrapped to the terminal), where
    click would cut it at the column's width with "..."."""
    if command.short_help is None and command.help:
        words = inspect.cleandoc(command.help).split("\f", 1)[0].split("\n\n", 1)[0].split()
        end = next((i for i, word in enumerate(words) if word.endswith(".")), len(words) - 1)
        command.short_help = " ".join(words[:end + 1])
    for sub in getattr(command, "commands", {}).values():
        _whole_first_sentences(sub)


def fail(message: str, code: int = USAGE_EXIT, error: UserError | None = None, label: str = "error") -> None:
    first_line = message.strip().splitlines()[0] if message.strip() else "failed"
    if _json_output:
        body = error.to_openai() if error is not None else {"error": {
            "message": first_line, "type": "invalid_request_error" if code == USAGE_EXIT else "internal_error",
            "param": None, "code": None}}
        print(json.dumps(body), flush=True)
    else:
        print(f"spl: {label}: {first_line}", file=sys.stderr)
    sys.exit(code)


_json_output = False  # the command line asked for --json: errors come out as JSON too


def main(argv: list[str] | None = None) -> None:
    global _json_output
    if os.environ.get("_SPL_COMPLETE"):
        # A shell asks for completions on Tab: whatever goes wrong, nothing may reach the terminal.
        sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this short process
    args = sys.argv[1:] if argv is None else list(argv)
    _json_output = "--json" in args[: args.index("--")] if "--" in args else "--json" in args
    cli = build_cli()
    try:
        result = cli.main(args=args, prog_name="spl", standalone_mode=False)
    except click.exceptions.NoSuchOption as exc:
        fail(exc.format_message())
    except click.UsageError as exc:
        hint = " (try `spl --help`)" if "No such command" in exc.format_message() else ""
        fail(exc.format_message() + hint)
    except click.ClickException as exc:
        fail(exc.format_message())
    except (click.Abort, KeyboardInterrupt):
        print("spl: interrupted", file=sys.stderr)
        sys.exit(130)
    except UserError as exc:
        fail(exc.message, error=exc)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:
        mapped = as_user_error(exc)
        if mapped is not None:
            fail(mapped.message, error=mapped)
        if os.environ.get("SPL_TRACE") == "1":
            raise
        fail(f"{type(exc).__name__}: {exc} (rerun with SPL_TRACE=1 for the traceback)", code=1, label="internal error")
    if isinstance(result, int):
        sys.exit(result)


if __name__ == "__main__":
    main()
