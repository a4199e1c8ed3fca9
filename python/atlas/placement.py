"""Which CPUs the serving thread and atlas's helpers run on (Linux).

On the CPU the serving thread does everything between target forwards on one
core (verification, drafting, the controller, the learning tap), while
helpers wake beside it: the native pool's workers (part of every forward),
the draft heads' cache warm-up threads (handed work right after a forward),
the learning loop's trainer process (resumed right after a forward) and its
service threads. Left to the scheduler, a helper woken onto the serving
thread's core can preempt it (the hand-overs' costs below). So for each
``generate`` / ``stream`` the engine pins its serving thread to one CPU (the
lowest it may use that no other serve of this process holds,
:func:`claim`) and hands the others to the helpers
(``atlas.Engine(pin_threads=)``): the native ones through
:func:`atlas._native.set_helper_cpus`, observers through their
``place_threads(cpus)`` method (the learning loop passes them to its
trainer). The serving thread gets its CPUs back when the serve ends.

Measured in full atlas on the 2-core machine (HumanEval requests 110-149
after 110 served, per decode step, beside the suffix speculator alone on the
same requests in the same process; three runs pinned, two not): the
trainer's resume took 0.04-0.05 ms instead of 0.10-0.15, the heads' warm-up
hand-over 0.04-0.05 ms instead of 0.16-0.17, the adaptive head's draft
1.0-1.4 ms a call instead of 1.4-2.3 (its warm-up now runs on the other
core while the serving thread works), the learning tap 0.49-0.55 ms as
before. See bench/results/CPU.md.
"""
from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Iterable, Optional, Set, Tuple

log = logging.getLogger("atlas")

# Linux: threads' CPUs can be set one by one (a thread id is a pid to
# sched_setaffinity), and /proc lists a process's threads.
SUPPORTED = sys.platform.startswith("linux") and hasattr(os, "sched_setaffinity")


_lock = threading.Lock()
_held: Set[int] = set()   # CPUs that serving threads of this process are pinned to now


def claim(cpus: Iterable[int]) -> Optional[Tuple[int, Set[int]]]:
    """For a serve whose thread may use ``cpus``: (the CPU to pin it to, the
    CPUs left to helpers), its CPU held until :func:`release`; the lowest
    CPU no other serve holds, the helpers getting what no serve holds. None
    when that leaves nothing for the serving thread or the helpers (fewer
    than two CPUs, or as many serves at once as CPUs), and the serve runs
    unpinned."""
    cpus = set(cpus)
    with _lock:
        free = sorted(cpus - _held)
        if len(free) < 2:
            return None
        _held.add(free[0])
        return free[0], set(free[1:])


def release(cpu: int) -> None:
    """Gives back a CPU :func:`claim` handed out."""
    with _lock:
        _held.discard(cpu)


def set_thread_cpus(tid: int, cpus: Iterable[int]) -> bool:
    """Restricts the thread (or single-threaded process) ``tid`` to ``cpus``;
    False when it cannot (it has ended, or the system refuses)."""
    try:
        os.sched_setaffinity(int(tid), set(cpus))
        return True
    except (ProcessLookupError, PermissionError):
        return False
    except OSError as e:
        log.debug("could not set thread %s's CPUs to %s: %s", tid, sorted(cpus), e)
        return False


def set_process_cpus(pid: int, cpus: Iterable[int]) -> None:
    """Restricts every thread that process ``pid`` has now to ``cpus`` (the
    threads it starts later take its creating thread's CPUs)."""
    cpus = set(cpus)
    try:
        tids = os.listdir(f"/proc/{int(pid)}/task")
    except OSError:
        tids = [str(pid)]
    for tid in tids:
        set_thread_cpus(int(tid), cpus)
