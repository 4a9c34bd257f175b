"""The ``fastrm`` command. Thin: each subcommand parses its own arguments and calls one entry point."""

from __future__ import annotations

import sys

COMMANDS = {
    "selfcheck": ("fastrm.selfcheck", "check every op against float64 on this machine, then a quick benchmark"),
}


def usage() -> str:
    lines = ["usage: fastrm <command> [args]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "fastrm <command> --help for a command's options"]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fastrm: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[command][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
