"""Real multi-process gloo worlds for tests.

``run_world(fn, world_size, tmp_path)`` spawns ``world_size`` processes; each joins a gloo
group through a FileStore in ``tmp_path`` (no ports: safe under pytest-xdist), with a
``timeout=`` on ``init_process_group``, and runs ``fn(rank, world_size, **kwargs)``. The
parent joins with a deadline, kills every other rank at the first failure and raises one
``WorldFailure`` carrying every failed rank's traceback. A hang is reported, never waited
out.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from datetime import timedelta

GROUP_TIMEOUT_S = 30
GRACE_S = 2.0


class WorldFailure(AssertionError):
    pass


def _report(results, message) -> None:
    """Put ``message`` on the pipe now, before any teardown can go wrong."""
    results.put(message)
    results.close()
    results.join_thread()


def _child(fn, rank, world_size, store_path, init, env, kwargs, results,
           group_timeout=GROUP_TIMEOUT_S, teardown=True, parent=None):
    if parent is not None:  # a forkserver child starts with the server's; take the parent's
        environ, cwd, path = parent
        os.environ.clear()
        os.environ.update(environ)
        os.chdir(cwd)
        sys.path[:] = path
    os.environ.update({k: v.format(rank=rank) for k, v in (env or {}).items()})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        if init:
            store = dist.FileStore(store_path, world_size)
            dist.init_process_group(
                "gloo", store=store, rank=rank, world_size=world_size,
                timeout=timedelta(seconds=group_timeout),
            )
        value = fn(rank, world_size, **kwargs)
    except BaseException:  # noqa: BLE001 - report everything, KeyboardInterrupt/SystemExit too
        _report(results, (rank, "error", traceback.format_exc()))
        return
    _report(results, (rank, "ok", value))
    if not teardown:  # a world where a rank died: no barrier can complete, leave at once
        os._exit(0)
    if init:  # clean path only
        dist.barrier()
        dist.destroy_process_group()
        gc.collect()  # gloo threads end while the interpreter is alive


_PRELOAD = ["torch", "torch.distributed", "monitor", "monitor.testing", "workers"]


def _context():
    """A forkserver that has imported torch and the package once: each rank is a fork of
    it (milliseconds) instead of a fresh interpreter importing torch (seconds). The ranks
    still share nothing with the test process: the server is a clean process of its own,
    and each child takes the parent's environment, working directory and ``sys.path``."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_world(fn, world_size, tmp_path, *, timeout=90.0, init=True, env=None,
              group_timeout=GROUP_TIMEOUT_S, may_die=(), teardown=None, **kwargs):
    """Run ``fn`` on every rank of a fresh gloo world; returns the per-rank return values.

    ``group_timeout``: seconds of ``init_process_group(timeout=)``. ``may_die``: ranks that
    are meant to die (fault injection): they are not waited for, their return value is
    None, and no rank tears the group down (no barrier a dead rank could answer).
    ``teardown=False``: no barrier and no ``destroy_process_group()`` after ``fn`` (for a
    ``fn`` that destroys the group itself); default: ``not may_die``.
    """
    ctx = _context()
    results = ctx.Queue()
    store_path = str(tmp_path / f"store-{time.monotonic_ns()}")
    procs = [
        ctx.Process(
            target=_child,
            args=(fn, rank, world_size, store_path, init, env, kwargs, results, group_timeout,
                  not may_die if teardown is None else teardown,
                  (dict(os.environ), os.getcwd(), list(sys.path))),
            daemon=True,
        )
        for rank in range(world_size)
    ]
    for p in procs:
        p.start()
    done, errors = {}, {}
    deadline = time.monotonic() + timeout
    try:
        awaited = [r for r in range(world_size) if r not in may_die]
        while any(r not in done and r not in errors for r in awaited):
            now = time.monotonic()
            if now >= deadline:
                break
            try:
                rank, status, payload = results.get(timeout=min(0.2, deadline - now))
            except queue.Empty:
                for rank, p in enumerate(procs):
                    if rank in may_die:
                        continue
                    if p.exitcode not in (None, 0) and rank not in done and rank not in errors:
                        errors[rank] = f"rank {rank} exited with code {p.exitcode} without a report"
                continue
            if status != "ok" and rank in may_die:
                continue  # the injected fault: a rank that raised is meant to
            (done if status == "ok" else errors)[rank] = payload
            if errors:
                deadline = min(deadline, time.monotonic() + GRACE_S)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        for p in procs:
            p.join(5)
    missing = [r for r in awaited if r not in done and r not in errors]
    if errors or missing:
        parts = [f"--- rank {r} failed ---\n{tb}" for r, tb in sorted(errors.items())]
        if missing:
            parts.append(f"--- ranks {missing} did not finish within {timeout:g} s (killed) ---")
        raise WorldFailure("\n".join(parts))
    return [done.get(r) for r in range(world_size)]
