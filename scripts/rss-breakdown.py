#!/usr/bin/env python3
"""Where a process's resident memory is: RSS per mapped file and anonymous, from
/proc/PID/smaps, with the size of the page-cache folios its code is mapped in.

    python3 scripts/rss-breakdown.py PID [PID...]

The folio column needs root (it reads /proc/PID/pagemap and /proc/kpageflags). When code is
first run, the kernel maps not only its page but the pages around it that are in the page
cache: a 64 KiB window (fault-around), or the whole large folio the page is in (ext4 since
Linux 6.16, XFS earlier). A binary's resident code therefore grows with how widely the code it
runs is spread over the file, more than with how much of it runs.
"""

import collections
import os
import struct
import sys

KPF_COMPOUND_HEAD = 1 << 15
KPF_COMPOUND_TAIL = 1 << 16


def mappings(pid):
    """Yields (start, end, perms, path, rss_kib) per mapping."""
    current = None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                path = fields[5] if len(fields) > 5 else ""
                current = [start, end, fields[1], path]
            elif fields[0] == "Rss:" and current is not None:
                yield (*current, int(fields[1]))


def folio_pages(pid, start, end):
    """Number of resident pages of [start, end) and how many of them sit in large folios,
    or None when pagemap or kpageflags cannot be read."""
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as pagemap, open("/proc/kpageflags", "rb") as kpf:
            pagemap.seek(start // 4096 * 8)
            entries = pagemap.read((end - start) // 4096 * 8)
            resident = large = 0
            for (entry,) in struct.iter_unpack("<Q", entries):
                if not entry >> 63:
                    continue
                resident += 1
                pfn = entry & ((1 << 55) - 1)
                if pfn == 0:
                    return None  # no CAP_SYS_ADMIN: frame numbers are hidden
                kpf.seek(pfn * 8)
                (flags,) = struct.unpack("<Q", kpf.read(8))
                if flags & (KPF_COMPOUND_HEAD | KPF_COMPOUND_TAIL):
                    large += 1
            return resident, large
    except OSError:
        return None


def report(pid):
    with open(f"/proc/{pid}/comm") as comm:
        name = comm.read().strip()
    by_file = collections.defaultdict(lambda: [0, 0, 0])  # rss KiB, resident pages, large
    anon = 0
    folios_known = True
    for start, end, perms, path, rss in mappings(pid):
        if not path.startswith("/"):
            anon += rss
            continue
        entry = by_file[path]
        entry[0] += rss
        if rss and "x" in perms:
            pages = folio_pages(pid, start, end)
            if pages is None:
                folios_known = False
            else:
                entry[1] += pages[0]
                entry[2] += pages[1]
    total = anon + sum(e[0] for e in by_file.values())
    print(f"{name} (pid {pid}): RSS {total / 1024:.1f} MiB")
    print()
    print("| mapping | RSS | code pages in large folios |")
    print("|---|---|---|")
    for path, (rss, pages, large) in sorted(by_file.items(), key=lambda kv: -kv[1][0]):
        if rss == 0:
            continue
        folio = f"{large} of {pages}" if folios_known and pages else "-"
        print(f"| {os.path.basename(path)} | {rss} KiB | {folio} |")
    print(f"| anonymous (heap, stacks, arenas) | {anon} KiB | - |")
    print()


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    for pid in sys.argv[1:]:
        report(int(pid))


if __name__ == "__main__":
    main()
