#!/usr/bin/env python3
"""Writes a linker symbol-ordering file from a callgrind profile: every function of the given
objects that ran, hottest first, by its exact (mangled) symbol name.

    valgrind --tool=callgrind --dump-instr=yes --callgrind-out-file=/tmp/cg.out \\
        target/release/metricsd -c CONFIG run      # stop it with SIGTERM after a while
    python3 scripts/code-order.py /tmp/cg.out target/release/metricsd \\
        target/release/libmetricsd_system.so ... > build-support/code-order.txt
    python3 scripts/code-order.py --check build-support/code-order.txt target/release/metricsd ...

`--faults PERF_SCRIPT ORDER_FILE OBJECTS...` prints the functions of the objects that took a
page fault in a native run (`perf record -e page-faults -d`, then `perf script
--show-mmap-events -F addr`) and are not in ORDER_FILE yet: code the profile cannot see, such
as CPU-feature paths valgrind does not emulate (SHA-NI in the plugin loader's hashing). Only
the first page of each window faults, so a few rounds of faults, appends and relinks find them.

`--check` says, for each object of a build, how many of the profile's functions it still has
under the same name (after a toolchain or dependency update the file goes stale) and how many
64 KiB windows of `.text` the ones it has span.

Addresses in the profile are offsets into each object; they are mapped to the functions that
hold them with `nm --defined-only -S` of the very files that were profiled, so the names carry
the same hashes as the build they came from. lld then lays those functions out side by side at
the start of `.text`, and the code the agent runs fills a few 64 KiB windows instead of being
spread over the whole binary (build-support/src/lib.rs explains why that is resident memory).
"""

import bisect
import collections
import os
import re
import subprocess
import sys

NAMED = re.compile(r"c?ob=\((\d+)\)(?: (.*))?")
SKIP = ("fn=", "fl=", "fi=", "fe=", "cfn=", "cfi=", "cfl=", "cob=", "jump=", "jcnd=")


def costs(path):
    """{object path: {address: instructions}} from a callgrind profile with --dump-instr=yes."""
    names, per_object = {}, collections.defaultdict(collections.Counter)
    current, last, after_call = None, 0, False
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
            if line.startswith("calls="):
                after_call = True
                continue
            if line.startswith(SKIP) or line[:1] not in ("0", "+", "-", "*"):
                continue
            fields = line.split()
            token = fields[0]
            try:
                if token.startswith("0x"):
                    last = int(token, 16)
                elif token[0] in "+-":
                    last += int(token)
                elif token != "*":
                    continue
                count = int(fields[-1]) if len(fields) > 2 else 1
            except ValueError:
                continue
            if current is not None:
                # The line after `calls=` is the call's inclusive cost: the call instruction ran
                # once, the rest of the count belongs to the callee.
                per_object[current][last] += 1 if after_call else count
            after_call = False
    return {names.get(k, k): v for k, v in per_object.items()}


def functions(binary):
    """Sorted [(start, end, name)] of the defined functions in a binary's symbol table."""
    out = subprocess.run(
        ["nm", "--defined-only", "-S", binary], check=True, capture_output=True, text=True
    ).stdout
    rows = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[2] in "tTwW":
            start, size = int(fields[0], 16), int(fields[1], 16)
            rows.append((start, start + size, fields[3]))
    rows.sort()
    return rows


def containing(rows):
    """For rows sorted by start, each (start, end, ...): a function from an address to the row
    whose [start, end) holds it, or None."""
    starts = [row[0] for row in rows]

    def row_at(address):
        i = bisect.bisect_right(starts, address) - 1
        return rows[i] if i >= 0 and rows[i][0] <= address < rows[i][1] else None

    return row_at


def locator(binary):
    """A function from an address of `binary` to the name of the function holding it (or None)."""
    row_at = containing(functions(binary))
    return lambda address: (row_at(address) or (None, None, None))[2]


def read_order(order_file):
    """The symbols of an ordering file, in order."""
    with open(order_file) as lines:
        return [line.strip() for line in lines if line.strip()]


def check(order_file, binaries):
    """Prints how much of the ordering file each binary matches."""
    order = read_order(order_file)
    for binary in binaries:
        table = {name: (start, end) for start, end, name in functions(binary)}
        ranges = [table[name] for name in order if name in table]
        windows = {w for start, end in ranges for w in range(start >> 16, ((end - 1) >> 16) + 1)}
        code = sum(end - start for start, end in ranges)
        print(f"{binary}: {len(ranges)} of the {len(order)} ordered functions "
              f"({code // 1024} KiB of code) in {len(windows)} windows of 64 KiB")


MMAP = re.compile(r"PERF_RECORD_MMAP2? .*\[0x([0-9a-f]+)\(0x([0-9a-f]+)\) @ (0x[0-9a-f]+|0)\b.*\]: \S+ (\S+)$")


def fault_offsets(perf_script, binaries):
    """Yields (real path, address in the object) for each page fault of `perf script
    --show-mmap-events -F addr` output that hit one of `binaries`."""
    by_name = {os.path.basename(b): os.path.realpath(b) for b in binaries}
    maps, bias = [], {}
    with open(perf_script) as lines:
        for line in lines:
            match = MMAP.search(line)
            if match:
                start, size, offset, path = match.groups()
                real = by_name.get(os.path.basename(path))
                if real is not None:
                    if int(offset, 16) == 0:
                        # A new load of the object (the next run in the file): forget the last.
                        maps = [m for m in maps if m[2] != real]
                        bias[real] = int(start, 16)
                    maps.append((int(start, 16), int(start, 16) + int(size, 16), real))
                continue
            fields = line.split()
            if len(fields) != 1:
                continue
            try:
                address = int(fields[0], 16)
            except ValueError:
                continue
            for start, end, real in maps:
                if start <= address < end and real in bias:
                    # The mapping of file offset 0 is where the object's address 0 was loaded.
                    yield real, address - bias[real]
                    break


def faulted(perf_script, order_file, binaries):
    """Prints the functions of `binaries` that page faults hit and `order_file` lacks."""
    ordered = set(read_order(order_file))
    function_at = {os.path.realpath(b): locator(b) for b in binaries}
    new = []
    for real, offset in fault_offsets(perf_script, binaries):
        name = function_at[real](offset)
        if name is not None and name not in ordered:
            ordered.add(name)
            new.append(name)
    for name in new:
        print(name)


def main():
    if len(sys.argv) >= 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3:])
        return
    if len(sys.argv) >= 5 and sys.argv[1] == "--faults":
        faulted(sys.argv[2], sys.argv[3], sys.argv[4:])
        return
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    profile = costs(sys.argv[1])
    heat = collections.Counter()
    for binary in sys.argv[2:]:
        real = os.path.realpath(binary)
        counts = next(
            (c for name, c in profile.items() if os.path.realpath(name) == real), None
        )
        if counts is None:
            sys.exit(f"{binary}: not in the profile (objects: {', '.join(sorted(profile))})")
        function_at = locator(binary)
        found = 0
        for address, count in counts.items():
            name = function_at(address)
            if name is not None:
                heat[name] += count
                found += 1
        print(f"{binary}: {found} of {len(counts)} addresses in named functions",
              file=sys.stderr)
    for name, _ in sorted(heat.items(), key=lambda item: (-item[1], item[0])):
        print(name)


if __name__ == "__main__":
    main()
