"""The status endpoint's child process, from the supervisor's side: forked, watched, stopped."""
from __future__ import annotations

import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext

from kgsupervisor.pool.ports import StatusServer
from kgsupervisor.worker.main import signals_held


class StatusChild:
    """One child serving `server`; no thread in the forking supervisor, so none to fork with it."""

    def __init__(self, server: StatusServer, ctx: BaseContext, parent_pid: int) -> None:
        self.server = server
        self.ctx = ctx
        self.parent_pid = parent_pid
        self.listening_fd: int | None = None
        self.process: multiprocessing.process.BaseProcess | None = None

    def bind(self) -> int:
        """Listen now, before any fork; the descriptor every other child must close."""
        self.listening_fd = self.server.bind()
        return self.listening_fd

    def start(self, fds: list[int]) -> Connection:
        """Fork the child, which closes `fds` but its listening one; our end of its request pipe."""
        mine, theirs = self.ctx.Pipe()
        fds = [fd for fd in fds if fd != self.listening_fd]
        self.process = self.ctx.Process(target=self.server.serve, name="kgsupervisor-status",
                                        args=(theirs, self.parent_pid, fds))
        with signals_held():
            self.process.start()
        theirs.close()
        return mine

    def gone(self) -> bool:
        """True once the child has died (and is reaped)."""
        if self.process is None or self.process.is_alive():
            return False
        self.process.join()
        return True

    def stop(self) -> None:
        """Terminate it, then kill it if it lingers: it holds nothing, never wait on it."""
        if self.process is None or not self.process.is_alive():
            return
        self.process.terminate()
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
