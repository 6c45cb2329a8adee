"""The gate: the local service that ``sendmail`` submits through on shared servers.

It runs under its own system user, owns the ledger, the queue and the relay
credentials, and listens on the UNIX socket ``[gate] socket`` (mode 0666 in a
directory only root or the gate can write, like OpenSMTPD's control socket).
Each connection is one message framed as ``gate_protocol`` describes. The
caller's identity comes from the kernel (``SO_PEERCRED``), never from argv,
the environment or headers; the gate re-parses the arguments itself and runs
the same pipeline as ``sendmail`` in-process, with one warm ``Runtime``.

Bounds: a connection gets ``[gate] request_timeout`` to deliver its request,
at most ``[gate] max_connections_per_uid`` run at once per Unix user and
``MAX_CONNECTIONS`` in all, frames have fixed maximum sizes and the message
``[message] max_size``. A message that grows past ``LARGE_MESSAGE`` waits for
a share of ``[gate] upload_memory`` before it is read on, at most ``[gate]
max_uploads_per_uid`` of them per Unix user at once (``UploadBudget``): small
messages never wait. A refused or broken connection never touches the ledger
or the upstream, and costs other callers nothing.

Before serving, the gate verifies that sites cannot reach the relay past it
(``trust.py``), refuses to run as root unless told which user to become
(``--user``, after the checks that need root), and refuses a socket whose
directory, or any parent, others could replace.

SIGTERM or SIGINT stop accepting, let the requests in progress finish (for at
most ``SHUTDOWN_GRACE`` seconds) and exit 0. SIGHUP reloads the config file
(``Reloader``): requests in progress finish with the config they started with.

Each reservation the gate commits names the gate (``holder``) before the
message goes to the upstream; a gate killed before settling one finds it at
its next start and logs its outcome as unknown (``report_unsettled``). Under systemd the listening
socket may be handed over (``LISTEN_FDS``, see packaging/systemd), so
connections made during a restart wait in the socket instead of failing.

Each concern is a module of this package: ``service`` (start and stop),
``guard`` (trust in the relay), ``reload`` (SIGHUP), ``listener`` (the
socket), ``files`` (what must be the gate's own), ``acceptor`` (connections
per Unix user), ``connection`` (one message), ``budget`` (memory for large
messages), ``recorder`` (the bookkeeping after the answer), ``instruments``
and ``metrics_http`` (Prometheus metrics on ``[metrics] listen``) and ``events``
(log lines); ``errors`` is the family of reasons not to start.
"""

from __future__ import annotations

from .errors import (
                     ActivationError,
                     ExposedSecret,
                     GateError,
                     LedgerNotReady,
                     RootRefused,
                     SocketInUse,
                     UnsafeSocketPlace,
)
from .listener import socket_place_problem
from .service import main, serve

__all__ = ["ActivationError", "ExposedSecret", "GateError", "LedgerNotReady", "RootRefused", "SocketInUse",
           "UnsafeSocketPlace", "main", "serve", "socket_place_problem"]
