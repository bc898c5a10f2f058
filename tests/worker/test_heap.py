"""glibc's mmap threshold fixed in a job's process (worker/heap.py): freed big blocks go
back to the system instead of staying in the heap, where the memory plan does not count
them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# After a freed 8 MiB block has raised glibc's dynamic threshold, 20 blocks of 2 MiB come
# from the heap; a small block allocated after them pins the heap's top, so freeing them
# returns nothing. Prints the MiB the process still holds after the free.
FREED_BUT_HELD = """
import sys
from pathlib import Path

def rss():
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096

if sys.argv[1] == "fixed":
    from worker.heap import fix_mmap_threshold
    assert fix_mmap_threshold()
MIB = 1 << 20
first = bytearray(8 * MIB)
del first
before = rss()
blocks = [bytearray(2 * MIB) for _ in range(20)]
pinned = bytearray(64 * 1024)
del blocks
print((rss() - before) / MIB)
"""


def held_mib(mode: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    root = str(Path(__file__).resolve().parents[2])
    done = subprocess.run(
        [sys.executable, "-c", FREED_BUT_HELD, mode],
        capture_output=True, text=True, check=True, timeout=60,
        env=env | {"PYTHONPATH": os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))},
    )  # fmt: skip
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_big_blocks_leave_the_process_once_the_threshold_is_fixed() -> None:
    assert held_mib("dynamic") >= 30  # the heap keeps them: what the plan cannot count
    assert held_mib("fixed") < 4
