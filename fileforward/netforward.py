"""The two processes of ssh-style forwarding, each an async context manager that runs while open.

- serving() is `fileforward serve` (login node, like sshd): serves the tunnel
  directory and carries out what requesting processes ask (forwarding.ServeSide).
- requesting() is `fileforward -L/-R/-D/--http-proxy` (and `fileforward run`): its
  local listeners, its -R requests, and its proxy file (proxyfiles), all over one
  Connector (one endpoint, one I/O thread) however many forwards it has.

Any number of requesting processes share one `serve`, each coming and going on
its own. Their default tunnel directory is not the classic --server/--client one,
so that both can run at once.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import os
from pathlib import Path
from typing import AsyncIterator, Dict, List, Optional

from .cliargs import dir_option
from . import proxyfiles, tunneldir
from .statusfile import publishing
from .api import Connector, Server
from .errors import NoServerError
from .forward import Connections, Fatal, prepare_tunnel_dir, serving_tunnel
from .forwarding import ForwardCounters, Handshake, Requester, ServeSide, fixed_target
from .forwardspec import Forward, Listen, Permit
from .listeners import bind, start_listener, stop_listener
from .options import Options
from .proxyproto import Credentials, http_handshake, socks_handshake

log = logging.getLogger("fileforward")

ENV_NET_DIR = "FILEFORWARD_NET_DIR"
REVERSE_RETRY = 5.0  # seconds between attempts to (re)establish an -R listener


def default_net_dir() -> Path:
    """``$FILEFORWARD_NET_DIR``, else ``~/.cache/fileforward/net``: where `serve` and
    its requesters meet, apart from the classic --server/--client directory."""
    env = os.environ.get(ENV_NET_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fileforward" / "net"


@dataclasses.dataclass(frozen=True)
class Requests:
    """What a requesting process was asked to do."""

    local: List[Forward] = dataclasses.field(default_factory=list)    # -L
    remote: List[Forward] = dataclasses.field(default_factory=list)   # -R
    socks: List[Listen] = dataclasses.field(default_factory=list)     # -D
    http: List[Listen] = dataclasses.field(default_factory=list)      # --http-proxy
    credentials: Optional[Credentials] = None                         # --proxy-auth auto

    def __bool__(self) -> bool:
        return bool(self.local or self.remote or self.socks or self.http)


@dataclasses.dataclass
class Requesting:
    """A running requesting process: its tunnel (and the connector under it), its
    proxies' URLs, its forwards' counters."""

    tunnel_dir: Path
    connector: Connector
    proxies: proxyfiles.ProxyURLs
    proxy_file: Optional[Path]
    counters: Dict[str, ForwardCounters]


@dataclasses.dataclass
class Serving:
    """A running `serve`: its tunnel server, and the counters of its outgoing
    connections ("out") and of each -R listener."""

    server: Server
    counters: Dict[str, ForwardCounters]


@contextlib.asynccontextmanager
async def serving(tunnel_dir: Optional[Path], permit: Permit, options: Options,
                  force: bool = False) -> AsyncIterator[Serving]:
    """`fileforward serve` while the context is open."""
    side = ServeSide(permit)
    async with serving_tunnel(side.handle, tunnel_dir, options, force, "fileforward requester") as server:
        async with publishing(server.tunnel_dir, "serve", side.counters):
            yield Serving(server, side.counters)


@contextlib.asynccontextmanager
async def requesting(tunnel_dir: Optional[Path], requests: Requests, options: Options) -> AsyncIterator[Requesting]:
    """The listeners and -R requests of one requesting process, while the context is open."""
    connections = Connections()
    path = tunneldir.absolute(tunnel_dir)
    connector = Connector(path, options, peer_name="fileforward serve")
    requester = Requester(connector.open_connection, path)
    listeners: List["tuple[Listen, asyncio.AbstractServer]"] = []
    reversing: List[asyncio.Task] = []
    proxy_file: Optional[Path] = None

    async def listen(option: str, where: Listen, handshake: Handshake, meaning: str) -> Listen:
        try:
            actual, sock = bind(where)
        except OSError as exc:
            raise Fatal(f"{option}: {exc.strerror or exc}") from None
        handle = requester.handler(f"{option} {actual}", handshake)
        listeners.append((actual, await start_listener(sock, lambda r, w: connections.run(handle(r, w)))))
        log.info("%s %s: %s", option, actual, meaning)
        return actual

    try:
        await asyncio.to_thread(prepare_tunnel_dir, path)  # filesystem calls stay off the event loop
        await connector.start()
        for forward in requests.local:
            await listen("-L", forward.listen, fixed_target(forward.host, forward.port),
                         f"each connection goes to {forward.host}:{forward.port} from the serve side")
        socks = [await listen("-D", where,
                              functools.partial(socks_handshake, credentials=requests.credentials),
                              "SOCKS5/SOCKS4a proxy; connections leave from the serve side, "
                              "which resolves the names") for where in requests.socks]
        http = [await listen("--http-proxy", where,
                             functools.partial(http_handshake, credentials=requests.credentials),
                             "HTTP proxy (CONNECT and http:// URLs); connections leave from the serve side")
                for where in requests.http]
        for forward in requests.remote:
            reversing.append(asyncio.ensure_future(_keep_reverse(requester, forward)))
        urls = proxyfiles.ProxyURLs(
            next((proxyfiles.url("http", w, requests.credentials) for w in http if w.path is None), None),
            next((proxyfiles.url("socks5h", w, requests.credentials) for w in socks if w.path is None), None))
        if urls.http or urls.socks:
            proxy_file = await asyncio.to_thread(proxyfiles.write, connector.tunnel_dir or path, urls)
        log.info("requests go through tunnel %s (the other side, on the login node: fileforward serve %s)",
                 connector.tunnel_dir, dir_option(connector.tunnel_dir, "net"))
        async with publishing(connector.tunnel_dir or path, "requester", requester.counters):
            yield Requesting(connector.tunnel_dir or path, connector, urls, proxy_file, requester.counters)
    finally:
        for where, server in listeners:
            stop_listener(where, server)
        for task in reversing:
            task.cancel()
        await asyncio.gather(*reversing, return_exceptions=True)
        await connections.cancel_all()
        if proxy_file is not None:
            await asyncio.to_thread(proxyfiles.remove, proxy_file)
        await connector.close()


async def _keep_reverse(requester: Requester, forward: Forward) -> None:
    """-R for as long as this process runs: asked again whenever the serve side
    is not there yet, or went away (a restarted `serve` gets it back)."""
    last_problem = ""
    while True:
        listening: "asyncio.Future[str]" = asyncio.get_running_loop().create_future()
        run = asyncio.ensure_future(requester.reverse(forward, listening))
        try:
            where = await asyncio.shield(listening)
            log.info("-R %s: the serve side listens on %s; each connection comes to %s:%d here",
                     forward, where, forward.host, forward.port)
            last_problem = ""
            await run
            problem = "the serve side ended it"
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            raise
        except NoServerError:
            problem = requester.no_serve()
        except (OSError, ValueError) as exc:
            problem = str(exc) or type(exc).__name__
        await asyncio.gather(run, return_exceptions=True)
        if problem != last_problem:
            log.warning("-R %s: %s; trying again every %g s", forward, problem, REVERSE_RETRY)
            last_problem = problem
        await asyncio.sleep(REVERSE_RETRY)
