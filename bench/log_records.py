"""What one log record costs the event loop: access lines and audit records, µs per record.

Records go through the real ``LogOutputs`` to a pipe that a thread drains (as a log shipper
reading stdout would). Prints, per log: the loop thread's CPU time per record while the
writer runs beside it (thread CPU, not wall: on a shared machine wall time mostly measures the
neighbours), and the process's CPU per record once everything is written (loop and writer
together: what a record costs the machine). ``python -m bench.log_records [-n N]``
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

from sidecar.audit import AuditLog
from sidecar.exchange import Exchange
from sidecar.http.message import RequestHead
from sidecar.observability.access_log import AccessLog
from sidecar.observability.log_writer import MAX_CHARS, LogOutputs

__all__ = ["main"]


def _exchange() -> Exchange:
    """An inbound mTLS request that an RBAC rule allowed: every optional field set."""
    head = RequestHead(method="GET", target=b"/orders/1?x=1", path="/orders/1", authority="orders:8080",
                       host="orders", version="1.1", headers=[])
    ex = Exchange(request=head, listener="inbound", downstream_address="10.0.0.7",
                  request_id="3f2a9c1e-1b7d-4b8e-9c61-3a1f0b2d4e5f", start=0.0,
                  peer_identity="spiffe://pake.local/service/web", principal="spiffe://pake.local/service/web",
                  trace_id="4bf92f3577b34da6a3ce929d0e0e4736", service="orders", cluster="orders",
                  upstream="127.0.0.1:8080", attempts=1, status=200, bytes_out=512)
    ex.tags.update(filter="authz_rbac", rbac="allow", rbac_rule="reads")
    return ex


def _measure(name: str, count: int, record: Callable[[], None], outputs: LogOutputs) -> None:
    cpu, loop_cpu = time.process_time(), time.thread_time()
    for _ in range(count):
        record()
    loop_cpu = time.thread_time() - loop_cpu
    outputs.close()
    total_cpu = time.process_time() - cpu
    dropped = sum(outputs.dropped().values())
    print(f"{name:7} {loop_cpu / count * 1e6:6.2f} µs/record on the loop, "
          f"{total_cpu / count * 1e6:6.2f} µs CPU/record in all, dropped {dropped}/{count}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", "--records", type=int, default=50_000)
    args = parser.parse_args()
    read_end, write_end = os.pipe()

    def drain() -> None:
        while os.read(read_end, 1 << 16):
            pass

    threading.Thread(target=drain, daemon=True).start()
    ex = _exchange()
    unbounded = {"max_lines": args.records, "max_chars": MAX_CHARS * 64}  # measure cost, not drops

    outputs = LogOutputs(stdout_fd=write_end)
    access = AccessLog(outputs.channel("access", **unbounded))
    _measure("access", args.records, lambda: access.log(ex, 0.00123), outputs)

    outputs = LogOutputs(stdout_fd=write_end)
    audit = AuditLog(outputs.channel("audit", **unbounded))
    reason = "rule 'reads' allows GET /orders/1 from spiffe://pake.local/service/web"
    _measure("audit", args.records, lambda: audit.record(ex, "authz", "allow", "reads", reason), outputs)


if __name__ == "__main__":
    main()
