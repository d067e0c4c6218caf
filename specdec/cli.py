"""`specdec` command line: fetch, serve, generate, bench."""

from __future__ import annotations

import argparse
import os
import sys


def default_openmp_wait_policy() -> bool:
    """Set OMP_WAIT_POLICY=passive for this process unless the user set it; True if set here.

    NOTE: libgomp reads the variable once, when torch loads it, so this runs first in every
    entry point (`specdec ...`, `python -m server`) and does nothing once torch is imported.
    Unset, OpenMP's workers spin ~300 000 iterations after every torch op, but only while the
    process has no more libgomp threads than CPUs: one stepping thread (the offline API) spins,
    the server (the loader's executor thread keeps its own team, the engine thread another)
    spins 100 iterations, by accident of its threads. On 2 busy cores a spinning worker holds
    the core the q4 kernel's helper needs: a 1.5B decode step took 135-760 ms instead of 48-69
    ms (docs/BENCHMARKS.md, "Server path at batch 1"). Passive: the same regime either way,
    at the cost of 5-15 % on an idle machine, where the spinning worker is ready sooner.
    """
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ:
        return False
    os.environ["OMP_WAIT_POLICY"] = "passive"
    return True


def main(argv: list[str] | None = None) -> int:
    default_openmp_wait_policy()
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="specdec")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("fetch", help="download, verify and convert a known model", add_help=False)
    sub.add_parser("serve", help="run the OpenAI-compatible server", add_help=False)
    sub.add_parser("generate", help="offline generation from a config", add_help=False)
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "fetch":
        from specdec.fetch import main as fetch_main
        return fetch_main(rest)
    if command == "serve":
        from server.__main__ import main as serve_main
        return serve_main(rest)
    if command == "generate":
        from specdec.llm import generate_main
        return generate_main(rest)
    parser.parse_args(argv)
    return 2


if __name__ == "__main__":
    sys.exit(main())
