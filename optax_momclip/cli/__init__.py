"""The application beside the library: `python -m optax_momclip demo|bench`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = """usage: python -m optax_momclip {demo,bench} [options]

commands:
  demo    train the exploding-gradient temporal-order task and a digits learning-rate sweep
          with and without clipping; prints a table, writes plots and results.json
  bench   the performance table of the fused step on this machine, against its targets

'python -m optax_momclip demo --help' lists a command's options."""


def main(argv: Sequence[str] | None = None) -> int:
  """Dispatches to a subcommand; returns the exit status (2 for a usage error)."""
  args = list(sys.argv[1:] if argv is None else argv)
  if not args or args[0] in ("-h", "--help"):
    print(USAGE, file=sys.stdout if args else sys.stderr)
    return 0 if args else 2
  command, rest = args[0], args[1:]
  if command == "demo":
    from optax_momclip.cli import demo

    return demo.main(rest)
  if command == "bench":
    from optax_momclip.cli import bench

    return int(bench.main(rest) or 0)
  print(f"{USAGE}\n\npython -m optax_momclip: error: unknown command {command!r}", file=sys.stderr)
  return 2


def run() -> None:
  """The console script: exits with `main`'s status; Ctrl-C exits 130 without a traceback."""
  try:
    sys.exit(main())
  except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
