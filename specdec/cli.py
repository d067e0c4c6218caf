"""`specdec` command line: fetch, serve, generate, bench."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
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
