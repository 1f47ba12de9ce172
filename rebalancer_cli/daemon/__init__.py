"""The daemon: many portfolios, continuously, on one or several instances.

Each portfolio runs on its own interval in a worker pool, so one slow or failing portfolio never delays the
others: threads of the daemon's process, or (`processes` > 1) worker processes with stores and exchange clients of
their own (an idle cycle costs ~1 ms of CPU: one process carries 10,000 portfolios a minute). The daemon's process
alone keeps the schedule, the leases, the metrics and the logs. Instances share the work through leases
(`leases.py`): the main loop heartbeats, renews every lease it holds in one round trip and claims its fair share
of the rest (portfolios over live instances) in chunks, so a second instance started beside a first one takes half
the work, and a dead instance's portfolios are claimed once its leases expire.
A portfolio is worked only while this instance holds its lease, and the lease's fencing token guards every
ledger write. The time of each portfolio's last cycle is kept in the store too, so a portfolio taken over from
another instance keeps its schedule instead of running twice. An idle check runs the executor's first steps
(halt check, recovery) on market data shared by every portfolio of the process and writes only what changed;
a cycle with anything to do goes through `executor.Executor.run` on fresh reads, the path of `rebalance execute`.

Parts, one module each: `configs` (which files are portfolios, reloads), `leasing` (this instance's fair share of
the leases), `scheduling` (cycle threads and worker processes, due times, backoff), `health` (metrics, logs,
/healthz), `cycle` (one cycle: stores, pooled exchange clients, the schedule in the ledger); `state` declares what
they share, and `core.Daemon` composes them.
"""

from .configs import discover
from .core import Daemon, run_daemon
from .cycle import CycleResult, CycleRunner
from .scheduling import CycleThreads, WorkerProcesses
from .state import Slot

__all__ = ["CycleResult", "CycleRunner", "CycleThreads", "Daemon", "Slot", "WorkerProcesses", "discover", "run_daemon"]
