"""The OS priority of the inference scheduler threads."""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger(__name__)


def run_nicer(nice: int) -> None:
    """Lower the calling thread's OS priority by `nice` (Linux: niceness is per thread).

    A batch that never empties keeps its scheduler thread busy; on a CPU-bound server it
    would then take the core from the threads that answer `/health`, files and jobs, and that
    admit other tenants' requests. At a higher niceness the OS runs those first whenever they
    have work, and the batch takes the rest. On a GPU the thread mostly waits on the device,
    and this costs nothing. Where the OS refuses (another platform), the thread runs as is.
    """
    if nice <= 0:
        return
    thread = threading.get_native_id()
    try:  # niceness is absolute: add to what the process runs at (a CI under `nice`, say)
        os.setpriority(
            os.PRIO_PROCESS, thread, min(19, os.getpriority(os.PRIO_PROCESS, thread) + nice)
        )
    except OSError as exc:
        logger.info("could not lower the inference thread's priority: %s", exc)
