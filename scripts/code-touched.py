#!/usr/bin/env python3
"""How much of each binary's code a run executed, from a callgrind profile recorded with
instruction addresses: distinct 64-byte lines, 4 KiB pages and 64 KiB windows per object.

    valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.out \\
        target/release/metricsd -c CONFIG run      # stop it with Ctrl-C after a while
    python3 scripts/code-touched.py /tmp/cg.out

Compare the 64 KiB windows with the RSS of the same files (scripts/rss-breakdown.py): the
kernel maps code around each first-run page in windows of about that size.
"""

import collections
import re
import sys

NAMED = re.compile(r"c?ob=\((\d+)\)(?: (.*))?")
SKIP = ("fn=", "fl=", "fi=", "fe=", "cfn=", "cfi=", "cfl=", "calls=", "jump=", "jcnd=")


def touched(path):
    names, addresses = {}, collections.defaultdict(set)
    current, last = None, 0
    with open(path) as profile:
        for line in profile:
            if line.startswith(("ob=", "cob=")):
                match = NAMED.match(line.strip())
                if match:
                    if match.group(2):
                        names[match.group(1)] = match.group(2)
                    if line.startswith("ob="):
                        current = match.group(1)
                continue
            if line.startswith(SKIP) or not line[:1] in ("0", "+", "-", "*"):
                continue
            token = line.split(" ", 1)[0]
            try:
                if token.startswith("0x"):
                    last = int(token, 16)
                elif token[0] in "+-":
                    last += int(token)
                elif token != "*":
                    continue
            except ValueError:
                continue
            if current is not None:
                addresses[current].add(last)
    return {names.get(k, k): v for k, v in addresses.items()}


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
