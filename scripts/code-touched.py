#!/usr/bin/env python3
"""How much of each binary's code a run executed, from a callgrind profile recorded with
instruction addresses: distinct 64-byte lines, 4 KiB pages and 64 KiB windows per object.

    valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.out \\
        target/release/metricsd -c CONFIG run      # stop it with Ctrl-C after a while
    python3 scripts/code-touched.py /tmp/cg.out

Compare the 64 KiB windows with the RSS of the same files (scripts/rss-breakdown.py): the
kernel maps code around each first-run page in windows of about that size.
"""

import importlib.util
import os
import sys

# The profile parser is code-order.py's (one reader of callgrind's format in the repository).
_spec = importlib.util.spec_from_file_location(
    "code_order", os.path.join(os.path.dirname(os.path.abspath(__file__)), "code-order.py")
)
code_order = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_order)


def touched(path):
    """{object: set of instruction addresses that ran}."""
    return {name: set(counts) for name, counts in code_order.costs(path).items()}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    rows = []
    for name, addrs in touched(sys.argv[1]).items():
        lines = len({a >> 6 for a in addrs})
        rows.append((lines, name, len({a >> 12 for a in addrs}), len({a >> 16 for a in addrs})))
    print("| object | code run (64-byte lines) | 4 KiB pages | 64 KiB windows |")
    print("|---|---|---|---|")
    for lines, name, pages, windows in sorted(rows, reverse=True):
        if lines < 16:
            continue
        print(f"| {name} | {lines * 64 // 1024} KiB | {pages} ({pages * 4} KiB) | "
              f"{windows} ({windows * 64} KiB) |")


if __name__ == "__main__":
    main()
