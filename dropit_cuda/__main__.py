"""Command line: ``python -m dropit_cuda <command>`` (also installed as ``dropit-cuda``).

Commands:
  demo   train a small ResNet on digits and a small GPT on Python source, baseline against DropIT
  info   print how the native code was built (``dropit_cuda.extension_info()``)
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

COMMANDS = {
    "demo": "train a small ResNet on digits and a small GPT on Python source, baseline against DropIT",
    "info": "print how the native code was built",
}


def _usage(prog: str) -> str:
    lines = [f"usage: {prog} <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {text}" for name, text in COMMANDS.items()]
    lines += ["", f"`{prog} <command> --help` describes a command's options."]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None, prog: Optional[str] = None) -> int:
    """Dispatches to a command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if prog is None:
        prog = "python -m dropit_cuda" if sys.argv and sys.argv[0].endswith("__main__.py") else "dropit-cuda"
    if not argv:
        print(_usage(prog), file=sys.stderr)
        return 2
    if argv[0] in ("-h", "--help"):
        print(_usage(prog))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import main as demo_main

        return demo_main(rest, prog=f"{prog} demo")
    if command == "info":
        import json

        from . import extension_info

        print(json.dumps(extension_info(), indent=2))
        return 0
    print(f"{prog}: unknown command {command!r}\n\n{_usage(prog)}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
