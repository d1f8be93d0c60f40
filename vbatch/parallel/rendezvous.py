"""Where the ranks of a single-node engine meet, without opening a port to the network.

A ``tcp://`` init method makes rank 0 serve torch's TCPStore, and torch binds that store to
every interface whatever host the URL names; gloo (and NCCL's bootstrap) then listen on the
interface the machine's hostname resolves to. When every rank runs on this node neither needs
the network: `LocalRendezvous` is a `file://` store in a private temporary directory (mode
0700, removed by `close`), and `use_loopback_interfaces` points gloo and NCCL at the loopback
interface. Ranks spread over several nodes keep a ``tcp://`` rendezvous on the cluster's
addresses (the ray executor across nodes).
"""
from __future__ import annotations

import os
import shutil
import socket
import tempfile
from pathlib import Path

#: The environment variables gloo and NCCL read for the interface their sockets bind to.
SOCKET_INTERFACE_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")


class LocalRendezvous:
    """A private directory holding a torch FileStore for the ranks of one engine on this node.

    `init_method` is the ``file://`` URL every rank passes to `init_parallel_state`; `close()`
    removes the directory (idempotent; the ranks must have joined or exited by then).
    """

    def __init__(self):
        self.directory = Path(tempfile.mkdtemp(prefix="vbatch-rendezvous-"))
        self.init_method = (self.directory / "store").as_uri()

    def close(self) -> None:
        """Remove the store's directory (nothing happens if it is already gone)."""
        shutil.rmtree(self.directory, ignore_errors=True)


def loopback_interface() -> str | None:
    """The name of this machine's loopback interface (``lo`` on Linux, ``lo0`` on macOS), or
    None when neither exists."""
    names = {name for _, name in socket.if_nameindex()}
    return next((name for name in ("lo", "lo0") if name in names), None)


def use_loopback_interfaces() -> None:
    """Make gloo and NCCL groups created from now on in this process bind to the loopback
    interface only. Overrides GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME: the caller knows every
    rank is on this node, where loopback always reaches them."""
    interface = loopback_interface()
    if interface is None:
        return
    for name in SOCKET_INTERFACE_VARIABLES:
        os.environ[name] = interface
