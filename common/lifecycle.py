"""Process lifecycle shared by every service: logging, signals, the run directory.

A service is an `async def main(settings, stop)` that returns when `stop` is set. SIGTERM
and SIGINT set it; a second signal exits at once. A service that fails raises, the
process exits non-zero and supervisord restarts it: no component tries to limp on with
state it cannot trust.

A failure that a restart cannot fix (`PermanentError`: a bad setting, no driver with
failOnInitError, a MIG layout the strategy cannot serve, missing driver files, an untrusted
run dir) exits with EX_CONFIG (78) and records its cause in the file named by
GPU_PLUGIN_EXIT_CAUSE. The container's entry point (scripts/entrypoint.sh) sets that variable;
supervisord's event listener ends supervisord as soon as the file exists, and the entry point
exits non-zero with the cause as its last line, as NVIDIA's plugin does, instead of supervisord
restarting the service in vain and then exiting 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from common.logs import configure_logging
from common.reload import Reloader
from common.settings import Settings, SettingsError, add_arguments, resolve

log = logging.getLogger(__name__)

ServiceMain = Callable[[Settings, asyncio.Event], Awaitable[None]]

# The flags a service was started with: a reload resolves them again with the new file.
_given: argparse.Namespace | None = None


def remember_args(args: argparse.Namespace) -> None:
    global _given
    _given = args


EX_CONFIG = 78  # sysexits.h: a configuration error; restarting the same process cannot help
EXIT_CAUSE_ENV = "GPU_PLUGIN_EXIT_CAUSE"


class FatalError(RuntimeError):
    """A failure whose message says everything: logged without a traceback, exit status 1."""


class PermanentError(FatalError):
    """A FatalError that a restart cannot fix: exit status EX_CONFIG, cause recorded, container ends."""


class RunDirError(PermanentError):
    """The run directory cannot be trusted (a symlink, another owner, not a directory)."""


def record_exit_cause(service: str, cause: str) -> None:
    """Writes the cause for the entry point, first writer wins (three services may fail alike),
    and has supervisord stop the container.

    O_EXCL never follows a symlink planted at that name, and never overwrites the first cause.
    """
    path = os.environ.get(EXIT_CAUSE_ENV)
    if not path:
        return  # not under the entry point (by hand, tests of one service): the log says it
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        pass  # another service recorded its cause first, or the run dir is the problem itself
    else:
        with os.fdopen(fd, "w") as f:
            f.write(f"{service}: {cause}\n")
    if os.environ.get("SUPERVISOR_ENABLED"):
        # Our parent is supervisord: tell it to stop before we exit. Its event listener would
        # too, but only a tick after our exit, by when supervisord may have restarted us in
        # vain; a SIGTERM that arrives before the exit is handled before any restart.
        with contextlib.suppress(OSError):
            os.kill(os.getppid(), signal.SIGTERM)
        _wake_supervisord()


def _wake_supervisord() -> None:
    """Ends supervisord's 1 s poll now (it acts on a signal only when the poll returns): a
    connection to its control socket in the run dir does it. The entry point does the same."""
    run_dir = os.environ.get("GPU_PLUGIN_RUN_DIR")
    if not run_dir:
        return
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(0.2)
        s.connect(os.path.join(run_dir, "supervisor.sock"))


def bad_setting(service: str, error: SettingsError) -> int:
    """A setting a service cannot run with: said on stderr, recorded; the exit status for it.
    Permanent: it stays bad however often supervisord would restart the service."""
    print(f"gpu-plugin {service}: error: {error}", file=sys.stderr)
    record_exit_cause(service, f"bad setting: {error}")
    return EX_CONFIG


def service_entry(service: str, run: Callable[[Settings], int], argv: Sequence[str]) -> int:
    """`python -m services.<name> [flags]`: the service's own flags, then the service."""
    parser = argparse.ArgumentParser(prog=f"gpu-plugin {service}")
    add_arguments(parser)
    try:
        args = parser.parse_args(argv)
        settings = resolve(args)
    except SettingsError as e:
        return bad_setting(service, e)
    remember_args(args)
    return run(settings)


def exit_permanently(service: str, cause: str) -> int:
    """Logs and records a permanent failure; returns the exit status for it."""
    log.error("%s cannot continue (a restart will not help): %s", service, cause)
    record_exit_cause(service, cause)
    return EX_CONFIG


def check_dir_can_exist(path: Path, what: str) -> None:
    """Raises PermanentError when `path` names a directory below a file (KUBELET_SOCKET=
    /etc/passwd/kubelet.sock): no restart makes it a directory, so the container ends at once with
    the cause instead of three tracebacks and the crash-loop path. A missing directory is fine:
    the kubelet creates its own at start, and we create ours."""
    for part in (path, *path.parents):
        try:
            st = os.stat(part)
        except (FileNotFoundError, NotADirectoryError):
            continue
        except OSError as e:
            raise PermanentError(f"{what} {path}: cannot look at {part}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise PermanentError(f"{what} {path}: {part} is not a directory")
        return


def ensure_private_dir(path: Path) -> None:
    """Creates `path` (and parents) owner-only; tightens it if it already exists.

    Refuses (RunDirError) a symlink, a non-directory, or a directory of another user: our
    sockets and locks would be somewhere an attacker chose, and a chmod through a symlink
    would change the mode of whatever it points at. The check and the chmod use one
    O_NOFOLLOW descriptor, so the path cannot be swapped between them.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        if os.path.islink(path):
            raise RunDirError(f"run dir {path} is a symlink (to {os.readlink(path)}): refusing to follow it; "
                              "make it a directory of its own") from None
        if e.errno == errno.ENOTDIR:
            raise RunDirError(f"run dir {path} is not a directory") from None
        raise RunDirError(f"run dir {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid():
            raise RunDirError(f"run dir {path} is owned by uid {st.st_uid}, not by this process (uid "
                              f"{os.geteuid()}): refusing it; remove it or give it to uid {os.geteuid()}")
        if st.st_mode & 0o777 != 0o700:
            os.fchmod(fd, 0o700)
    finally:
        os.close(fd)


async def run_until_stopped(stop: asyncio.Event, *tasks: asyncio.Task[Any]) -> None:
    """Runs a service's eternal tasks until `stop` is set.

    A task that fails, or ends at all, stops the service with an error: supervisord then
    restarts the process, which is better than limping on without, say, its socket watcher.
    """
    stopper = asyncio.create_task(stop.wait(), name="stop")
    try:
        done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
        for t in done:
            if t is stopper:
                continue
            error = t.exception()
            if error is not None:
                raise error
            raise RuntimeError(f"task {t.get_name()} ended unexpectedly")
    finally:
        for t in (*tasks, stopper):
            t.cancel()
        await asyncio.gather(*tasks, stopper, return_exceptions=True)


def run_service(name: str, main: ServiceMain, settings: Settings) -> int:
    configure_logging(name, settings.log_level)

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = 0

        def on_signal(signum: int) -> None:
            nonlocal signals
            signals += 1
            if signals > 1:
                log.warning("second %s: exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("%s received: stopping", signal.Signals(signum).name)
            stop.set()

        for s in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(s, on_signal, s)
        # SIGHUP is NVIDIA's config-manager's "reload": by default it would kill the service.
        reloader = Reloader.current_for(name, settings, lambda: resolve(_given))
        loop.add_signal_handler(signal.SIGHUP, reloader.request)
        service: asyncio.Future[None] = asyncio.ensure_future(main(settings, stop))
        reloads = asyncio.create_task(reloader.run(), name="config-reload")
        try:
            await asyncio.wait([service, reloads], return_when=asyncio.FIRST_COMPLETED)
            if reloads.done():
                reloads.result()  # a reload that failed to apply raises here: the state is not to be trusted
                raise RuntimeError("config reload task ended")
            await service
        finally:
            for t in (service, reloads):
                t.cancel()
            await asyncio.gather(service, reloads, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGHUP)

    try:
        asyncio.run(runner())
    except PermanentError as e:
        return exit_permanently(name, str(e))
    except FatalError as e:
        log.error("%s cannot continue: %s", name, e)
        return 1
    except Exception:
        log.exception("%s failed", name)
        return 1
    log.info("%s stopped", name)
    return 0
