#!/usr/bin/env python3
"""Writes the linker scripts of build-support/data-order/: for each object, the read-only data
(`.rodata` input sections) its ordered functions read, for lld to place side by side at the
start of the file, next to the ELF headers the loader reads anyway.

    python3 scripts/data-order.py --static ORDER_FILE OUT_DIR OBJECT=MAP...
    python3 scripts/data-order.py --faults PERF_SCRIPT OUT_DIR OBJECT=MAP...
    python3 scripts/data-order.py --check OUT_DIR OBJECT=MAP...

OBJECT is a built binary or plugin, MAP the lld map of the same link (build with
`METRICSD_LINK_MAP=DIR`, see build-support/src/lib.rs); the script written for it is
OUT_DIR/<MAP's name>.ld, the map being named after the package.

`--static` starts from the code: every instruction of the functions in ORDER_FILE
(build-support/code-order.txt, the functions the agent runs) that addresses read-only data,
and the pointers of the tables it addresses (`.data.rel.ro`, `.data`: tracing's call-site
metadata, vtables with their names), two levels deep. `--faults` adds the sections that took a
page fault in a native run and are not listed yet (`perf record -e page-faults -d`, then
`perf script --show-mmap-events -F addr`): data reached some other way. Only the first page of
each window faults, so it takes a few rounds of faults, appends and relinks, as for the code.
`--check` says how many of a script's sections a build still has and how much they weigh.

Why: Rust puts its string constants, format templates, jump tables and lookup tables into
unnamed `.rodata` sections in no useful order, so the few KiB an idle agent reads were spread
over the whole 640 KiB of the binary's `.rodata`, and the kernel maps a 64 KiB window (or a
whole large folio) around each page first read. Unnamed sections cannot be named in lld's
symbol-ordering file, but a linker script can name them (`.rodata..Lanon.<hash>.<n>`: the
hash is of the crate's code unit, stable like symbol hashes for a given toolchain and
dependency set; a name that no longer exists matches nothing and is ignored).
"""

import importlib.util
import os
import re
import struct
import subprocess
import sys

_spec = importlib.util.spec_from_file_location(
    "code_order", os.path.join(os.path.dirname(os.path.abspath(__file__)), "code-order.py")
)
code_order = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(code_order)

# Tables whose pointers are followed, and how many levels deep.
POINTER_TABLES = (".data.rel.ro", ".data")
DEPTH = 2
MAP_LINE = re.compile(r"^\s*([0-9a-f]+)\s+[0-9a-f]+\s+([0-9a-f]+)\s+\d+ (\s*)(\S.*)$")
LISTED = re.compile(r"^\s*\*\((\.rodata\S*)\)\s*$")
REFERENCE = re.compile(r"^\s*([0-9a-f]+):.*# ([0-9a-f]+) <")


class Link:
    """An object and the input sections its lld map places, by address."""

    def __init__(self, binary, map_file):
        self.binary = binary
        self.sections = []  # (address, end, output section, input section name)
        output = None
        with open(map_file) as lines:
            for line in lines:
                match = MAP_LINE.match(line.rstrip("\n"))
                if not match:
                    continue
                address, size = int(match.group(1), 16), int(match.group(2), 16)
                indent, text = len(match.group(3)), match.group(4)
                if indent == 0:
                    output = text
                elif indent == 8 and size and address and text.endswith(")") and ":(" in text:
                    name = text[text.rindex(":(") + 2:-1]
                    self.sections.append((address, address + size, output, name))
        self.sections.sort()
        self.section_at = code_order.containing(self.sections)
        with open(binary, "rb") as f:
            self.image = f.read()
        self.loads = []  # (address, file offset, size in the file)
        headers = subprocess.run(["readelf", "-lW", binary], check=True, capture_output=True,
                                 text=True).stdout
        for line in headers.splitlines():
            fields = line.split()
            if fields and fields[0] == "LOAD":
                self.loads.append((int(fields[2], 16), int(fields[1], 16), int(fields[4], 16)))

    def words(self, section):
        """The 8-byte words of a section as the file holds them (with packed or REL-style
        relocations, a pointer's link-time value)."""
        address, end = section[0], section[1]
        for start, offset, length in self.loads:
            if start <= address and end <= start + length:
                at = offset + address - start
                size = (end - address) // 8 * 8
                return [w for (w,) in struct.iter_unpack("<Q", self.image[at:at + size])]
        return []


def referenced(binary, order_file):
    """Addresses that instructions of the functions in `order_file` name (RIP-relative
    operands), in `binary`."""
    ordered = set(code_order.read_order(order_file))
    ranges = [row for row in code_order.functions(binary) if row[2] in ordered]
    if not ranges:
        return set()
    range_at = code_order.containing(ranges)
    dump = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", f"--start-address={ranges[0][0]:#x}",
         f"--stop-address={max(r[1] for r in ranges):#x}", binary],
        check=True, capture_output=True, text=True).stdout
    found = set()
    for line in dump.splitlines():
        match = REFERENCE.match(line)
        if match and range_at(int(match.group(1), 16)):
            found.add(int(match.group(2), 16))
    return found


def hot_rodata(link, order_file):
    """The `.rodata` input sections the ordered functions read, in their present order."""
    todo = [(address, 0) for address in referenced(link.binary, order_file)]
    seen = set()
    while todo:
        address, depth = todo.pop()
        section = link.section_at(address)
        if section is None or section in seen:
            continue
        seen.add(section)
        if section[2] in POINTER_TABLES and depth < DEPTH:
            todo.extend((word, depth + 1) for word in link.words(section))
    return [s[3] for s in sorted(seen) if s[2] == ".rodata"]


def script_path(out_dir, map_file):
    return os.path.join(out_dir, os.path.basename(map_file).removesuffix(".map") + ".ld")


def listed(path):
    try:
        with open(path) as lines:
            return [m.group(1) for m in map(LISTED.match, lines) if m]
    except FileNotFoundError:
        return []


def write_script(path, names):
    body = "\n".join(f"    *({name})" for name in names)
    with open(path, "w") as out:
        out.write(f"""/* Generated by scripts/code-order.sh (scripts/data-order.py): the read-only data the agent
   reads, first in .rodata, and .rodata before the exception tables (read only when a panic
   unwinds), so that it shares the first pages of the file with the ELF headers. */
SECTIONS {{
  .debug_gdb_scripts : {{ *(.debug_gdb_scripts) }}
  .rodata : {{
{body}
  }}
}} INSERT BEFORE .gcc_except_table;
""")


def pairs(args):
    for arg in args:
        binary, _, map_file = arg.partition("=")
        if not map_file:
            sys.exit(f"{arg}: expected OBJECT=MAP")
        yield binary, map_file


def static(order_file, out_dir, args):
    for binary, map_file in pairs(args):
        names = hot_rodata(Link(binary, map_file), order_file)
        write_script(script_path(out_dir, map_file), names)
        print(f"{binary}: {len(names)} .rodata sections", file=sys.stderr)


def faults(perf_script, out_dir, args):
    links = {os.path.realpath(b): (Link(b, m), m) for b, m in pairs(args)}
    added = {real: [] for real in links}
    known = {real: set(listed(script_path(out_dir, m))) for real, (_, m) in links.items()}
    for real, offset in code_order.fault_offsets(perf_script, list(links)):
        section = links[real][0].section_at(offset)
        if section is not None and section[2] == ".rodata" and section[3] not in known[real]:
            known[real].add(section[3])
            added[real].append(section[3])
    for real, names in added.items():
        if names:
            path = script_path(out_dir, links[real][1])
            write_script(path, listed(path) + names)
        for name in names:
            print(f"{os.path.basename(real)} {name}")


def check(out_dir, args):
    for binary, map_file in pairs(args):
        link = Link(binary, map_file)
        names = set(listed(script_path(out_dir, map_file)))
        present = [s for s in link.sections if s[2] == ".rodata" and s[3] in names]
        size = sum(s[1] - s[0] for s in present)
        end = max((s[1] for s in present), default=0)
        print(f"{binary}: {len({s[3] for s in present})} of the {len(names)} listed sections "
              f"({size // 1024} KiB), ending {end // 1024} KiB into the file")


def main():
    if len(sys.argv) >= 5 and sys.argv[1] == "--static":
        static(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) >= 5 and sys.argv[1] == "--faults":
        faults(sys.argv[2], sys.argv[3], sys.argv[4:])
    elif len(sys.argv) >= 4 and sys.argv[1] == "--check":
        check(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
