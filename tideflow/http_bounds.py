"""The bounds every HTTP endpoint of Tideflow keeps against a flood of connections.

Both sides serve a small HTTP port (metrics, probes).  The servers they used
took a thread per connection and kept it for as long as the client stayed
silent: 300 idle connections were 300 threads, for good.  Each now reads a
request within :data:`REQUEST_SECONDS` and keeps at most
:data:`MAX_CONNECTIONS` open, a new one closing the oldest, so a probe still
gets through a flood: the agent's from its event loop (``edge_agent.metrics``),
the operator's from one thread that reads every request head and a bounded
thread per complete request (``tideflow_operator.http_servers``), so that only
connections that have not sent their request are ever evicted; there at most
:data:`MAX_CONNECTIONS` threads answer, and as many complete requests wait for one.
The web console (``tideflow.tools.fleet.console``) keeps the same request time
and a bound of its own, :data:`CONSOLE_MAX_CONNECTIONS`.
"""

from __future__ import annotations

MAX_CONNECTIONS = 32
REQUEST_SECONDS = 5.0
# The most a request's head (request line and headers) may take.
MAX_HEAD_BYTES = 8192
# The web console (``tideflow console``) keeps more: each browser tab holds its
# events stream open and fetches over a few more connections of its own, so the
# bound is a team's tabs, not a probe's.
CONSOLE_MAX_CONNECTIONS = 256
