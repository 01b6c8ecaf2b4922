"""Command-line values checked where they enter: argparse types with ranges, and a parser whose errors are one line
(``error: ... (see --help)``, exit 2, no usage dump)."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {' '.join(message.split())} (see {self.prog} --help)\n")


def integer(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in [minimum, maximum]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be >= {minimum}" + (f" and <= {maximum}" if maximum is not None
                                                                         else "") + f", got {value}")
        return value
    parse.__name__ = "integer"  # argparse names the type in its messages
    return parse


def number(minimum: float | None = None, maximum: float | None = None, below: float | None = None,
           above: float | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float with inclusive (minimum, maximum) or exclusive (above, below) bounds."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = (not math.isfinite(value) or (minimum is not None and value < minimum)
               or (maximum is not None and value > maximum) or (below is not None and value >= below)
               or (above is not None and value <= above))
        if bad:
            parts = [f">= {minimum:g}" if minimum is not None else "", f"> {above:g}" if above is not None else "",
                     f"<= {maximum:g}" if maximum is not None else "", f"< {below:g}" if below is not None else ""]
            bounds = " and ".join(p for p in parts if p)
            raise argparse.ArgumentTypeError(f"must be a finite number{' ' + bounds if bounds else ''}, got {text}")
        return value
    parse.__name__ = "number"
    return parse


threshold = number(minimum=0.0)
threshold.__doc__ = "A gate threshold: a softmax margin, a finite number >= 0 (above 1: never exit there)."


def key_value(text: str) -> tuple[str, int | str]:
    """An argparse type: ``KEY=VALUE`` (a backend property); an integer VALUE is passed as an integer."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    value = value.strip()
    return key.strip(), int(value) if value.lstrip("-").isdigit() else value


def exit_with(main: Callable[[], int]) -> None:
    """``sys.exit(main())`` for a command whose output may go to a pipe that closes early (``| head``): that ends the
    command quietly (exit 0), as it does for other Unix tools, instead of a BrokenPipeError traceback."""
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the interpreter's own flush at exit
        code = 0
    sys.exit(code)


def unwritable(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why ``path`` (a file, or with ``folder`` a folder) cannot be written, as far as can be told before writing: a
    folder where the file goes, a file where a folder goes, a folder that does not let us in; None where it can."""
    p = Path(path).expanduser()
    if p.exists():
        return None if p.is_dir() == folder else f"{p} is a file, not a folder" if folder else f"{p} is a folder"
    parent = p.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is a file, not a folder"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot create anything in {parent}"


def output_file(text: str) -> str:
    """An argparse type: a file to write, refused before any work where it cannot be written."""
    why = unwritable(text)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {why}")
    return text


def output_folder(text: str) -> str:
    """An argparse type: a folder to create or write into, refused before any work where it cannot be."""
    why = unwritable(text, folder=True)
    if why:
        raise argparse.ArgumentTypeError(f"cannot write {text}: {why}")
    return text
