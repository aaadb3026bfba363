"""How the command line reports failures and renders help (used by `modelfold.cli`).

Every command runs inside `Command.invoke`: whatever it raises ends as one line on stderr,
"error: <message>", and exit code 2 for bad input (a `CliError`, a `FoldError`, an `OSError`,
a `ValueError`, unreadable JSON or safetensors, input nested too deeply, running out of
memory), or exit code 1 for anything else, which is a bug in modelfold (`MODELFOLD_DEBUG=1`
shows its traceback). Messages written for the Python API are rewritten in terms of the
command's options (`calibration=` -> --calibration, `ignored=[model.b]` -> --ignore b, ...).
Warnings print as one "warning: ..." line each, rewritten the same way.

Help: square brackets in help text are shown as written (rich would read `modelfold[eval]` as
markup), and flags get no type label.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterable
from typing import Any, NoReturn

import typer
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup, TyperOption

try:  # typer >= 0.20 vendors click: usage errors derive from TyperException
    from typer.exceptions import TyperException as _TyperError
except ImportError:  # pragma: no cover
    from click.exceptions import ClickException as _TyperError

from modelfold.errors import FoldError, UntrustedFactoryError

DEBUG_ENV = "MODELFOLD_DEBUG"
MAX_MESSAGE = 500


class CliError(Exception):
    """A failure already worded for the command line."""


def fail(message: str) -> NoReturn:
    raise CliError(message)


# --- messages ---------------------------------------------------------------------------------

# Python-API wording -> command line wording (applied before the option names below)
_PHRASES: list[tuple[str, str]] = [
    (r"`ignored=\[model\.([\w.]+)\]`", r"--ignore \1"),
    (r"`ignored=`", "--ignore"),
    (r"Give example inputs that run every branch, or, if", "If"),
    (r"`example_inputs`", "the zero inputs of --input-shape"),
    (r"`calibration=` data: a tensor, a DataLoader or an iterable of input batches",
     "--calibration (a tensor file, .safetensors or .pt, or 'fashion-mnist')"),
    (r"modelfold\.load will build it only where it is registered "
     r"\(@modelfold\.register_factory\) or with trust_factory=True",
     "commands that load it will need --trust-factory"),
    (r"\. Load the model and use modelfold\.fold instead", "; drop --stream"),
    (r"^fold_checkpoint: ", "--stream: "),
    (r"parts=\('mlp',\)", "--parts mlp"),
    (r"^(LLM)?FoldConfig: ", ""),
    (r"\bLLMFoldConfig\.", "FoldConfig."),
]
# API argument -> command option, where the names differ
_ALIASES = {"ignored": "ignore", "factory": "model", "factory_kwargs": "model_kwargs",
            "example_inputs": "input_shape"}
# API names that mean something else than the command option of the same name
_NOT_OPTIONS = {"model"}
_NAME = re.compile(r"`(?P<q>\w+)(?P<qeq>=)?`(?P<qeq2>=)?|FoldConfig\.(?P<c>\w+)(?P<ceq>=)?"
                   r"|(?<![\w.`/-])(?P<k>[a-z_]\w*)(?P<keq>=)")


def _options(params: Iterable[Any]) -> dict[str, str]:
    """Python name (and option name with underscores) -> the option's long form."""
    out: dict[str, str] = {}
    for p in params:
        if not isinstance(p, TyperOption) or p.name is None:
            continue
        long = next((o for o in p.opts if o.startswith("--")), p.opts[0])
        out[p.name] = long
        out.setdefault(long.lstrip("-").replace("-", "_"), long)
    return out


def translate(message: str, params: Iterable[Any] = ()) -> str:
    """Rewrite a Python-API message in terms of the command's options."""
    for pattern, replacement in _PHRASES:
        message = re.sub(pattern, replacement, message)
    options = _options(params)
    has_config = "config" in options

    def option(match: re.Match) -> str:
        name = match["q"] or match["c"] or match["k"]
        eq = match["qeq"] or match["qeq2"] or match["ceq"] or match["keq"]
        alias = _ALIASES.get(name)
        opt = options.get(alias) if alias else (None if name in _NOT_OPTIONS
                                                  else options.get(name))
        if opt is None:
            if match["c"] and has_config:
                return f"'{name}' in --config" + (" = " if eq else "")
            if match["k"]:
                return match[0]
            return f"'{name}'" + ("=" if eq else "")
        if not eq:
            return opt
        following = match.string[match.end():match.end() + 1]
        spaced = following != "" and (following.isalnum() or following in "'\"([{-")
        return f"{opt} " if spaced else opt

    return _NAME.sub(option, message)


def one_line(message: str) -> str:
    """Whitespace collapsed; very long messages keep their start and end."""
    message = " ".join(str(message).split())
    if len(message) > MAX_MESSAGE:
        message = message[:MAX_MESSAGE - 150] + " ... " + message[-145:]
    return message


def _os_message(exc: OSError) -> str:
    import errno

    text = exc.strerror or str(exc)
    where = exc.filename
    if exc.errno == errno.ENOSPC:
        text = f"{text}; is the disk full?"
    return f"{where}: {text}" if where else text


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("can't allocate memory", "out of memory", "Cannot allocate")))


def describe(exc: BaseException, params: Iterable[Any] = ()) -> tuple[str, int]:
    """(one-line message, exit code) for an exception a command raised."""
    from safetensors import SafetensorError

    if isinstance(exc, CliError):
        return one_line(str(exc)), 2
    if isinstance(exc, UntrustedFactoryError):
        return one_line(
            f"{exc.where} names the factory {exc.target!r}, which is neither modelfold's zoo "
            "nor a registered factory; loading it would import and run that code. Rerun with "
            "--trust-factory only if you trust this folder."), 2
    if isinstance(exc, FoldError):
        return one_line(translate(str(exc), params)), 2
    if isinstance(exc, ConnectionError):
        return one_line(f"a download failed ({exc}); check the internet connection."), 2
    if isinstance(exc, OSError):
        return one_line(_os_message(exc)), 2
    if isinstance(exc, SafetensorError):
        return one_line(f"cannot read a safetensors file ({exc})."), 2
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply to be read.", 2
    if _out_of_memory(exc):
        return one_line(f"out of memory ({type(exc).__name__}: {exc}); the input asks for "
                        "more memory than this machine has."), 2
    if isinstance(exc, ImportError):
        return one_line(f"a dependency is missing ({exc}): pip install 'modelfold[llm]' (LLM "
                        "commands) or 'modelfold[eval]' (eval-zero-shot)."), 2
    if isinstance(exc, ValueError):  # json.JSONDecodeError and UnicodeError included
        return one_line(translate(f"{exc}", params)), 2
    return one_line(f"internal error ({type(exc).__name__}: {exc}); this is a bug in modelfold, "
                    f"please report it (set {DEBUG_ENV}=1 to see the traceback)."), 1


def print_error(message: str) -> None:
    typer.echo(f"{typer.style('error:', fg='red', bold=True)} {message}", err=True)


# --- commands ---------------------------------------------------------------------------------

def _tidy_help(command: Any) -> None:
    """Escape rich markup in the help texts; no `<bool>` label on flags."""
    for attr in ("help", "short_help", "epilog"):
        text = getattr(command, attr, None)
        if text:
            setattr(command, attr, escape(text))
    for param in command.params:
        if getattr(param, "help", None):
            param.help = escape(param.help)
        if isinstance(param, TyperOption) and param.is_flag and param.metavar is None:
            param.metavar = ""


def _untyped_help_option(option: Any) -> Any:
    if option is not None and option.metavar is None:
        option.metavar = ""
    return option


class Command(TyperCommand):
    """A command whose failures end in one line on stderr (see the module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped_help_option(super().get_help_option(ctx))

    def invoke(self, ctx: Any) -> Any:
        with warnings.catch_warnings():
            warnings.showwarning = self._show_warning
            try:
                return super().invoke(ctx)
            except (typer.Exit, typer.Abort, _TyperError):
                raise
            except Exception as exc:
                if os.environ.get(DEBUG_ENV):
                    raise
                message, code = describe(exc, self.params)
                print_error(message)
                raise typer.Exit(code) from None

    def _show_warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = one_line(translate(str(message), self.params))
        typer.echo(f"{typer.style('warning:', fg='yellow', bold=True)} {text}", err=True)


class Group(TyperGroup):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _tidy_help(self)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped_help_option(super().get_help_option(ctx))


class App(typer.Typer):
    """`typer.Typer` whose commands are `Command`s unless told otherwise."""

    def command(self, *args: Any, cls: type[TyperCommand] | None = None, **kwargs: Any):
        return super().command(*args, cls=cls or Command, **kwargs)
