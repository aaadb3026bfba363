"""The `modelfold` console script (and `python -m modelfold`): the command line of `modelfold.cli`.

The command line needs typer and rich, the `cli` extra; without them it says which pip command
installs them (one line on stderr, exit code 2) instead of a traceback.
"""

from __future__ import annotations

import importlib.util
import sys

CLI_DEPENDENCIES = ("typer", "rich")


def missing_cli_dependencies() -> list[str]:
    """The command line's dependencies that cannot be imported here."""
    missing = []
    for name in CLI_DEPENDENCIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a module set to None in sys.modules, a broken one
            found = False
        if not found:
            missing.append(name)
    return missing


def main() -> None:
    missing = missing_cli_dependencies()
    if missing:
        print(f"error: the modelfold command needs {' and '.join(missing)} (the cli extra): "
              "pip install 'modelfold[cli]'", file=sys.stderr)
        sys.exit(2)
    from modelfold.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
