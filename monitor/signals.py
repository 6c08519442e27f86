"""SIGTERM and SIGINT: each live run writes its end before the process dies of the signal.

When one rank of a ``torchrun`` job fails, torchrun sends SIGTERM to the others (and
SIGKILL 30 s later); a scheduler's preemption or time limit sends SIGTERM too. Without a
handler the process dies at once and the run's meta keeps no status. So the first session
built with ``handle_signals=True`` (the default) installs, process-wide:

* a handler for **SIGTERM** (unless it is ignored, or handled by code that is not Python),
  and for **SIGINT** where Python's own default (``KeyboardInterrupt``) is in place;
* a **watcher thread**: Python runs a signal handler only when the main thread comes back
  to the interpreter, which a main thread blocked in C code (a gloo or NCCL collective
  waiting for a dead peer, a device synchronisation) never does. The C-level handler still
  writes the signal's number to the wakeup fd (``signal.set_wakeup_fd``) at once, and the
  watcher thread, blocked on the other end, wakes up and does the work.

The watcher calls :meth:`MonitorSession.terminate` on every live session of this process,
in the order they were built: no collective, no wait on the device (see there). The main
thread's handler, when it runs, waits for that (it never ends the runs from inside the
monitor's own critical section, where it may have stopped the main thread: then it lets
the watcher finish after the section and get the signal back); without a watcher it ends
them itself. Then the signal goes on as it would have without the monitor:

* the previous disposition was the default (``SIG_DFL``): the process dies *by the
  signal* (exit status ``-SIGTERM`` as a parent sees it; torchrun reports it as such). The
  main thread's handler restores the default and re-sends the signal; the watcher thread,
  which may not call ``signal.signal``, restores the default through libc (``ctypes``) and
  re-sends it, so a blocked main thread is no obstacle;
* the previous handler was a Python callable (Python's ``KeyboardInterrupt`` for SIGINT,
  or the script's own handler): the main thread's handler calls it, with the same
  arguments, when the main thread comes back to the interpreter (only the main thread may
  run it). If that handler lets the process go on, the monitor has ended nonetheless:
  later logging is ignored with a warning (turn the monitor's handling off with
  ``handle_signals=False`` when your handler saves a checkpoint and calls ``finalize()``).

The monitor never swallows a signal and never replaces a handler installed after it (the
watcher acts only while the monitor's handler is the one in place). A child process made
by ``os.fork`` (a DataLoader worker) gets the previous handlers back and no wakeup fd, so
a signal to the child never ends the parent's run. Handlers can only be installed from
the main thread: a session built in another thread handles no signal (meta says so).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time
import weakref
from typing import Any, Protocol

log = logging.getLogger("monitor")

HANDLED = (signal.SIGTERM, signal.SIGINT)


class Terminable(Protocol):
    closed: bool
    lock: Any

    def terminate(self, signal_name: str) -> None: ...


WATCHER_WAIT_S = 5.0
"""How long the main thread's handler waits for the watcher thread to end the runs before
it does so itself (the watcher normally takes milliseconds)."""


_sessions: list[weakref.ref] = []  # live sessions, in the order they were built
_registry_lock = threading.RLock()  # re-entrant: the main thread's handler may need it
_ending = threading.RLock()  # the watcher and the main thread's handler end runs one at a
# time; re-entrant: a second signal can interrupt the main thread while it writes
_previous: dict[int, Any] = {}  # signum -> disposition before the monitor's (a handler)
_wakeup: tuple[int, int] | None = None  # the pipe: (read end, write end = the wakeup fd)
_pid: int | None = None  # the process that installed the handlers
_watcher: threading.Thread | None = None
_deferred: set[int] = set()  # signals the main thread left to the watcher (see _on_signal)
_defer_lock = threading.RLock()  # deferring and taking a deferred signal, one at a time
_redelivered: set[int] = set()  # signals the watcher sent back to the main thread


def watch(session: Terminable) -> list[str]:
    """End ``session`` (``session.terminate(name)``) when SIGTERM/SIGINT arrives.

    Installs the process-wide handlers the first time (main thread only). Returns the
    names of the signals handled in this process (empty outside the main thread).
    """
    _install()
    with _registry_lock:
        _sessions[:] = [r for r in _sessions if r() is not None]
        _sessions.append(weakref.ref(session))
    return handled()


def unwatch(session: Terminable) -> None:
    """``session`` ended: a signal no longer concerns it."""
    with _registry_lock:
        _sessions[:] = [r for r in _sessions if r() is not None and r() is not session]


def handled() -> list[str]:
    """The signals whose monitor handler is in place now."""
    return [signal.Signals(s).name for s in _previous if signal.getsignal(s) is _on_signal]


def _install() -> None:
    global _pid
    if _pid == os.getpid() or threading.current_thread() is not threading.main_thread():
        return
    _pid = os.getpid()
    for signum in HANDLED:
        current = signal.getsignal(signum)
        wanted = current is signal.SIG_DFL or (
            callable(current) and (signum != signal.SIGINT
                                   or current is signal.default_int_handler))
        if not wanted:  # ignored, not Python's, or SIGINT handled by the script already
            continue
        _previous[signum] = current
        signal.signal(signum, _on_signal)
    if _previous:
        _start_watcher()


def _start_watcher() -> None:
    global _wakeup
    reader, writer = os.pipe()  # not inherited by exec'd programs (PEP 446)
    os.set_blocking(writer, False)  # the C-level handler must never block
    try:
        old = signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    except (ValueError, OSError):
        old = None
    if old != -1:  # failed, or someone else (an event loop) reads it: leave it theirs
        if old is not None:
            signal.set_wakeup_fd(old)
        os.close(reader)
        os.close(writer)
        return
    global _watcher
    _wakeup = (reader, writer)
    _watcher = threading.Thread(target=_watch, args=(reader,), name="monitor-signal-watcher",
                                daemon=True)
    _watcher.start()


def _watch(reader: int) -> None:
    while True:
        try:
            data = os.read(reader, 64)
        except OSError:
            return
        if not data:
            return
        for signum in data:
            # only while the monitor's handler is in place (a later handler is the boss)
            if signum in _previous and signal.getsignal(signum) is _on_signal:
                _end_runs(signum)
                if _previous[signum] is signal.SIG_DFL:
                    _die_from_any_thread(signum)  # returns only where libc is out of reach
                with _defer_lock:
                    if signum not in _deferred:
                        continue
                    _deferred.discard(signum)  # the main thread runs what comes next
                    _redelivered.add(signum)
                signal.pthread_kill(threading.main_thread().ident or 0, signum)


def _on_signal(signum: int, frame) -> None:
    """The Python-level handler (main thread): the runs' end, then what was there before.

    The main thread may be stopped anywhere, also in the middle of the monitor's own
    critical section (holding a session's lock: a record half written). Ending the runs
    from there would see that half-done state, so where the watcher runs, the end is
    always its work: interrupted inside the monitor, this handler returns at once (the
    watcher ends the runs as soon as the section is left, then sends the signal back to
    the main thread for what comes next); elsewhere it waits for the watcher (bounded by
    :data:`WATCHER_WAIT_S`, then it ends them itself).
    """
    if signum in _redelivered:
        _redelivered.discard(signum)
    elif _watcher_running():
        with _defer_lock:  # the watcher closes the runs before it looks: consistent
            if _inside_the_monitor():
                _deferred.add(signum)
                return
        _wait_for_the_watcher()
    _end_runs(signum)  # nothing left to do once the watcher ended them
    _chain(signum, frame)


def _chain(signum: int, frame) -> None:
    previous = _previous.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    signal.signal(signum, signal.SIG_DFL)  # die by the signal, as without the monitor
    os.kill(os.getpid(), signum)


def _live_sessions() -> list[Terminable]:
    with _registry_lock:
        sessions = [r() for r in _sessions]
    return [s for s in sessions if s is not None and not s.closed]


def _watcher_running() -> bool:
    """Whether the watcher thread gets the signals (its pipe is still the wakeup fd)."""
    if _wakeup is None or _watcher is None or not _watcher.is_alive():
        return False
    current = signal.set_wakeup_fd(-1)  # (no other way to read it)
    signal.set_wakeup_fd(current, warn_on_full_buffer=False)
    return current == _wakeup[1]


def _inside_the_monitor() -> bool:
    """Whether this thread holds a live session's lock (is inside the monitor)."""
    return any(getattr(s.lock, "_is_owned", lambda: False)() for s in _live_sessions())


def _wait_for_the_watcher() -> None:
    deadline = time.monotonic() + WATCHER_WAIT_S
    while _live_sessions() and time.monotonic() < deadline:
        time.sleep(0.005)


def _end_runs(signum: int) -> None:
    if os.getpid() != _pid:
        return
    name = signal.Signals(signum).name
    with _ending:
        with _registry_lock:
            sessions = [r() for r in _sessions]
        for session in sessions:
            if session is None:
                continue
            try:
                session.terminate(name)
            except Exception:  # a failure here must not keep the signal from its course
                log.exception("monitor: writing the run's end at %s failed", name)


def _die_from_any_thread(signum: int) -> None:
    """Restore the default disposition through libc (``signal.signal`` is main-thread only)
    and re-send the signal: the process dies of it wherever its main thread is blocked."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        set_handler = libc.signal
        set_handler.restype = ctypes.c_void_p
        set_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
        set_handler(signum, None)  # None is NULL: SIG_DFL
    except (OSError, AttributeError):
        return  # no libc here: the main thread's handler re-sends it when it can
    os.kill(os.getpid(), signum)


def _after_fork_in_child() -> None:
    """A forked child must never end its parent's run: previous handlers back, no wakeup fd.

    The wakeup pipe is shared with the parent, whose watcher would read the child's
    signals as its own: its fd is pointed at ``/dev/null`` first, so nothing the child's
    C-level handler writes can reach the parent (or a file that reuses the fd number).
    """
    global _wakeup, _pid, _watcher
    with _registry_lock:
        _sessions.clear()
    _deferred.clear()
    _redelivered.clear()
    _watcher = None  # threads do not survive a fork
    if _pid is None:
        return
    _pid = None
    if _wakeup is not None:
        reader, writer = _wakeup
        _wakeup = None
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, writer, inheritable=False)
        os.close(null)
        os.close(reader)
        try:
            signal.set_wakeup_fd(-1)
            os.close(writer)
        except ValueError:  # forked from a thread that is not the main one: leave it open
            pass
    for signum, previous in _previous.items():
        try:
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
        except ValueError:
            pass  # not the main thread: the handler stays, and only chains in this process


os.register_at_fork(after_in_child=_after_fork_in_child)
