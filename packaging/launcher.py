"""Entry point of the packaged app: with no arguments it opens the window; document
paths given by the desktop (a file dropped on the Dock or opened with Quire) are
added to the library; `--selftest` runs the installation check offscreen."""

from __future__ import annotations

import sys

from app.cli import main

if __name__ == "__main__":
    arguments = sys.argv[1:]
    if arguments[:1] and arguments[0] in ("generate", "models", "bench", "add", "list", "show", "remove",
                                          "search", "cache", "ask", "gui"):
        sys.exit(main(arguments))  # the full command line is in the bundle too
    sys.exit(main(["gui", *arguments]))
