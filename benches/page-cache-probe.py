#!/usr/bin/env python3
"""What writing a growing file costs when its pages stay in the page cache, and when
each synced range is dropped from it (what `--page-cache-mib-per-shard` does).

    python3 benches/page-cache-probe.py [DIR] [MiB]

Writes MiB (default 1024) into a new, fallocated file in DIR (default: the current
directory) in 64 KiB pwrites, with an fdatasync every 4 MiB, twice per mode, and
prints the wall time and the process's user and system CPU. In "drop" mode,
everything synced but the last 8 MiB is dropped after each sync with
posix_fadvise(POSIX_FADV_DONTNEED). Bounded: one file, MiB × 4 written in all.
"""
import os
import sys
import time

STEP = 4 << 20
KEEP = 8 << 20
CHUNK = b"x" * 65536


def run(directory, total, mode):
    path = os.path.join(directory, "page-cache-probe.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.posix_fallocate(fd, 0, total)
        t0, c0 = time.perf_counter(), os.times()
        off = 0
        while off < total:
            os.pwrite(fd, CHUNK, off)
            off += len(CHUNK)
            if off % STEP == 0:
                os.fdatasync(fd)
                if mode == "drop" and off > KEEP:
                    os.posix_fadvise(fd, 0, off - KEEP, os.POSIX_FADV_DONTNEED)
        t1, c1 = time.perf_counter(), os.times()
    finally:
        os.close(fd)
        os.unlink(path)
    print(f"{mode}: wall {t1 - t0:.2f} s, user {c1.user - c0.user:.2f} s, "
          f"system {c1.system - c0.system:.2f} s for {total >> 20} MiB")


def main():
    directory = sys.argv[1] if len(sys.argv) > 1 else "."
    total = (int(sys.argv[2]) if len(sys.argv) > 2 else 1024) << 20
    for mode in ["keep", "drop", "keep", "drop"]:
        # Let the page cache of the run before settle (free memory handed back).
        time.sleep(5)
        run(directory, total, mode)


if __name__ == "__main__":
    main()
