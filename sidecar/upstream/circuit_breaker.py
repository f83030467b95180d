"""The circuit breaker of one cluster: a state machine plus Envoy's concurrency limits.

CLOSED -> OPEN on N consecutive failures, or on an error rate over a bucketed sliding window
once it holds ``min_requests``; OPEN -> HALF_OPEN when the open interval has passed (on the
next ``try_acquire``); HALF_OPEN -> CLOSED when every trial request succeeded, or -> OPEN again
with a doubled interval (capped) when one failed. The breaker is for a service that fails as a
whole: a failure the caller classifies as isolated to one endpoint (``endpoint.isolated_failure``:
another endpoint in use still answers) counts for nothing here; the outlier detector and a
retry elsewhere deal with it. Every call takes ``now`` (monotonic seconds);
nothing here reads a clock, sleeps or logs: transitions go to ``on_transition`` and the sidecar
logs and meters them. Pure: no asyncio imports; ``try_acquire`` + ``record`` allocate nothing.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Final

from ..config.breaker import BreakerConfig
from ..errors import CircuitOpen, UpstreamOverflow
from .endpoint import Outcome

__all__ = [
    "Admission",
    "BreakerState",
    "CircuitBreaker",
    "Limit",
    "RejectReason",
    "Rejection",
    "RollingCounts",
    "TransitionCallback",
    "failure_outcomes",
]


class BreakerState(enum.IntEnum):
    """The value is the state gauge's: 0 closed, 1 open, 2 half-open."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class RejectReason(enum.IntEnum):
    OPEN = 0
    HALF_OPEN_BUSY = 1  # every trial slot is taken
    MAX_REQUESTS = 2
    MAX_RETRIES = 3
    MAX_PENDING = 4
    MAX_CONNECTIONS = 5


_SUCCESS: Final = Outcome.SUCCESS  # Final: compiled, a C static compared by identity
_REASON_TEXT: Final = {
    RejectReason.OPEN: "circuit breaker open",
    RejectReason.HALF_OPEN_BUSY: "circuit breaker half-open, trial requests in flight",
    RejectReason.MAX_REQUESTS: "max active requests reached",
    RejectReason.MAX_RETRIES: "max active retries reached",
    RejectReason.MAX_PENDING: "max pending requests reached",
    RejectReason.MAX_CONNECTIONS: "max connections reached",
}

TransitionCallback = Callable[[BreakerState, BreakerState, str], None]


@dataclass(frozen=True, slots=True)
class Admission:
    """A try may go. Give it back to ``record`` when the try ends. ``generation`` names the
    state period it was admitted in: results from before the last transition free their slot
    but move nothing (a slow request admitted while CLOSED must not close a HALF_OPEN breaker)."""

    generation: int
    trial: bool  # admitted as a HALF_OPEN trial
    retry: bool  # holds one of the ``max_retries`` slots

    @property
    def admitted(self) -> bool:  # a property, not a ClassVar: mypyc makes those read-only
        return True


@dataclass(frozen=True, slots=True)
class Rejection:
    """A try may not go: answer 503 ``UO`` at once (``error(cluster)``): ``circuit_open`` when
    the breaker refuses, ``upstream_overflow`` when a concurrency limit is full."""

    reason: RejectReason

    @property
    def admitted(self) -> bool:  # a property, not a ClassVar: mypyc makes those read-only
        return False

    @property
    def text(self) -> str:
        return _REASON_TEXT[self.reason]

    def error(self, cluster: str) -> CircuitOpen | UpstreamOverflow:
        if self.reason in (RejectReason.OPEN, RejectReason.HALF_OPEN_BUSY):
            return CircuitOpen(f"cluster {cluster}: {self.text}")
        return UpstreamOverflow(f"cluster {cluster}: {self.text}")


# One immutable instance per reason: a rejection must be as cheap as possible.
REJECTIONS: Final = {reason: Rejection(reason) for reason in RejectReason}


def failure_outcomes(names: Iterable[str]) -> frozenset[Outcome]:
    """``failure_on`` names -> outcomes. ``5xx`` includes 502/503/504."""
    table = {
        "connect-failure": (Outcome.CONNECT_FAILURE,),
        "reset": (Outcome.RESET,),
        "timeout": (Outcome.TIMEOUT,),
        "5xx": (Outcome.STATUS_5XX, Outcome.GATEWAY_ERROR),
        "gateway-error": (Outcome.GATEWAY_ERROR,),
    }
    return frozenset(o for name in names for o in table[name])


class Limit:
    """A counter with a ceiling (Envoy's max_connections, max_pending). ``try_acquire`` then,
    exactly once, ``release``."""

    __slots__ = ("name", "max", "current", "rejected")

    def __init__(self, name: str, maximum: int) -> None:
        self.name = name
        self.max = maximum
        self.current = 0
        self.rejected = 0

    def try_acquire(self) -> bool:
        if self.current >= self.max:
            self.rejected += 1
            return False
        self.current += 1
        return True

    def release(self) -> None:
        if self.current > 0:  # a double release must not open room beyond the limit
            self.current -= 1


class RollingCounts:
    """Two counts (``a``, ``b``) over a sliding window of ``buckets`` buckets: memory is fixed,
    and the window slides in steps of window/buckets. The sums are kept, so reading is O(1)."""

    __slots__ = ("_width", "_n", "_a", "_b", "_head", "a", "b")

    def __init__(self, window: float, buckets: int = 10) -> None:
        self._width = window / buckets
        self._n = buckets
        self._a = [0] * buckets
        self._b = [0] * buckets
        self._head = -(1 << 62)  # absolute index of the newest bucket; far past: all empty
        self.a = 0
        self.b = 0

    def advance(self, now: float) -> int:
        """Drop the buckets that slid out of the window; the slot of ``now``'s bucket."""
        index = int(now / self._width)
        head = self._head
        if index > head:
            steps = index - head
            if steps >= self._n:
                self.clear()
            else:
                a, b, n = self._a, self._b, self._n
                for k in range(head + 1, index + 1):
                    slot = k % n
                    self.a -= a[slot]
                    self.b -= b[slot]
                    a[slot] = 0
                    b[slot] = 0
            self._head = index
        # A clock that steps back (never, with a monotonic clock) counts in the newest bucket.
        return self._head % self._n

    def add(self, now: float, a: int, b: int) -> None:
        slot = self.advance(now)
        # ``x[i] = x[i] + a``: an item's ``+=`` is generic once compiled. Only a count that
        # changes is written: an item past 256 is a new int object each time (~90
        # instructions), and most adds have a 0 (a try that did not fail, a request's retries)
        if a:
            counts = self._a
            counts[slot] = counts[slot] + a
            self.a += a
        if b:
            counts = self._b
            counts[slot] = counts[slot] + b
            self.b += b

    def clear(self) -> None:
        for i in range(self._n):
            self._a[i] = 0
            self._b[i] = 0
        self.a = 0
        self.b = 0


def _ignore(old: BreakerState, new: BreakerState, reason: str) -> None:
    pass


class CircuitBreaker:
    """Admit or refuse each try of one cluster, and learn from how each try ended.

    ``try_acquire(now, retry=...)`` before a try is sent: an ``Admission`` or a ``Rejection``
    (check ``.admitted``). ``record(now, outcome, admission, isolated=...)`` exactly once when
    it ended; ``Outcome.CANCELLED``, and a failure isolated to one endpoint, free the slot and
    count for nothing. ``pending`` and
    ``connections`` are plain ``Limit`` counters for the pool.
    """

    __slots__ = (
        "name", "config", "pending", "connections", "trips", "isolated", "_on_transition",
        "_state", "_generation", "_admit", "_admit_retry", "_failing",
        "_consecutive_threshold", "_consecutive", "_window", "_rate_threshold", "_rate_min",
        "_open_for", "_open_until", "_trials", "_trial_successes", "_half_open_requests",
        "_active", "_active_retries", "_max_requests", "_max_retries", "_rejected",
    )

    def __init__(self, config: BreakerConfig, *, name: str = "",
                 on_transition: TransitionCallback | None = None, buckets: int = 10) -> None:
        self.name = name
        self.config = config
        self.pending = Limit("max_pending", config.max_pending)
        self.connections = Limit("max_connections", config.max_connections)
        self.trips = 0
        self.isolated = 0  # failures left to their endpoint (isolated), for /clusters
        self._on_transition = on_transition or _ignore
        failing = failure_outcomes(config.failure_on)
        self._failing = tuple(o in failing for o in Outcome)  # indexed by outcome: no hashing
        self._consecutive_threshold = config.consecutive_failures or (1 << 62)
        self._consecutive = 0
        rate = config.error_rate
        # a: requests, b: failures
        self._window = RollingCounts(rate.window, buckets) if rate else None
        self._rate_threshold = rate.threshold if rate else 2.0
        self._rate_min = rate.min_requests if rate else 0
        self._open_for = config.open_for
        self._open_until = 0.0
        self._half_open_requests = config.half_open_requests
        self._trials = 0  # trial admissions in this HALF_OPEN period (in flight or succeeded)
        self._trial_successes = 0
        self._active = 0
        self._active_retries = 0
        self._max_requests = config.max_requests
        self._max_retries = config.max_retries
        self._rejected = [0] * len(RejectReason)
        self._state = BreakerState.CLOSED
        self._generation = 0
        self._admit = Admission(0, False, False)
        self._admit_retry = Admission(0, False, True)

    # --- reading ----------------------------------------------------------------------
    @property
    def state(self) -> BreakerState:
        """The state as of the last call (OPEN turns HALF_OPEN on the next ``try_acquire``)."""
        return self._state

    @property
    def active_requests(self) -> int:
        return self._active

    @property
    def active_retries(self) -> int:
        return self._active_retries

    def rejections(self) -> dict[str, int]:
        counts = {r.name.lower(): self._rejected[r] for r in RejectReason}
        counts["max_pending"] = counts["max_pending"] + self.pending.rejected
        counts["max_connections"] = counts["max_connections"] + self.connections.rejected
        return counts

    def snapshot(self, now: float) -> dict[str, object]:
        """For ``/clusters``: state, counters, limits."""
        window = self._window
        if window is not None:
            window.advance(now)
        return {
            "state": self._state.name.lower(),
            "open_for": self._open_for,
            "reopens_in": round(max(0.0, self._open_until - now), 3)
            if self._state is BreakerState.OPEN else 0.0,
            "consecutive_failures": self._consecutive,
            "window": {"requests": window.a, "failures": window.b} if window is not None else None,
            "trips": self.trips,
            "isolated_failures": self.isolated,
            "rejections": self.rejections(),
            "active_requests": self._active,
            "active_retries": self._active_retries,
            "pending": self.pending.current,
            "connections": self.connections.current,
            "limits": {"max_requests": self._max_requests, "max_retries": self._max_retries,
                       "max_pending": self.pending.max, "max_connections": self.connections.max},
        }

    def _reject(self, reason: RejectReason) -> Rejection:
        rejected = self._rejected  # ``x[i] = x[i] + 1``: an item's ``+=`` is generic once compiled
        rejected[reason] = rejected[reason] + 1
        return REJECTIONS[reason]

    # --- the hot path -----------------------------------------------------------------
    def try_acquire(self, now: float, retry: bool = False) -> Admission | Rejection:
        """May a try (``retry``: a retry) be sent at ``now``? Admitting takes a request slot."""
        state = self._state
        if state is BreakerState.OPEN:
            if now < self._open_until:
                return self._reject(RejectReason.OPEN)
            self._set_state(BreakerState.HALF_OPEN, "open_interval_elapsed")
            state = BreakerState.HALF_OPEN
        if self._active >= self._max_requests:
            return self._reject(RejectReason.MAX_REQUESTS)
        if retry and self._active_retries >= self._max_retries:
            return self._reject(RejectReason.MAX_RETRIES)
        if state is BreakerState.HALF_OPEN:
            if self._trials >= self._half_open_requests:
                return self._reject(RejectReason.HALF_OPEN_BUSY)
            self._trials += 1
        self._active += 1
        if retry:
            self._active_retries += 1
            return self._admit_retry
        return self._admit

    def record(self, now: float, outcome: Outcome, admission: Admission, *,
               isolated: bool = False) -> None:
        """How an admitted try ended. Frees its slots; may trip, close or re-open.

        ``isolated``: the try failed, but the failure is its endpoint's alone (another endpoint
        in use still answers). It neither counts as a failure nor breaks a run of failures, and
        is left out of the error-rate window: it says nothing about the service as a whole. A
        HALF_OPEN trial counts whatever its scope: it is the probe of the service."""
        if self._active > 0:
            self._active -= 1
        if admission.retry and self._active_retries > 0:
            self._active_retries -= 1
        if admission.generation != self._generation:
            return  # admitted before the last transition: says nothing about the state now
        if admission.trial:
            self._record_trial(now, outcome)
            return
        if outcome is Outcome.CANCELLED:
            return
        # a success first, by identity: the tuple indexed by an IntEnum object is a generic
        # item look-up once compiled (~100 instructions, callgrind)
        failed = outcome is not _SUCCESS and self._failing[outcome]
        if failed and isolated:
            self.isolated += 1
            return
        window = self._window
        if window is not None:
            window.add(now, 1, failed)
        if not failed:
            self._consecutive = 0
            return
        self._consecutive += 1
        if self._consecutive >= self._consecutive_threshold:
            self._trip(now, "consecutive_failures")
        elif (window is not None and window.a >= self._rate_min
              and window.b >= self._rate_threshold * window.a):
            self._trip(now, "error_rate")

    # --- transitions ------------------------------------------------------------------
    def _record_trial(self, now: float, outcome: Outcome) -> None:
        if outcome is Outcome.CANCELLED:
            self._trials -= 1  # give the slot to another trial: a cancel proves nothing
        elif self._failing[outcome]:
            # Each failed probe doubles the wait, so a dead upstream is probed ever more rarely.
            self._open_for = min(self._open_for * 2.0, self.config.open_for_max)
            self._trip(now, "trial_failed")
        else:
            self._trial_successes += 1
            if self._trial_successes >= self._half_open_requests:
                self._open_for = self.config.open_for
                self._set_state(BreakerState.CLOSED, "trials_succeeded")

    def _trip(self, now: float, reason: str) -> None:
        self.trips += 1
        self._open_until = now + self._open_for
        self._set_state(BreakerState.OPEN, reason)

    def _set_state(self, new: BreakerState, reason: str) -> None:
        old = self._state
        self._state = new
        self._generation += 1
        trial = new is BreakerState.HALF_OPEN
        self._admit = Admission(self._generation, trial, False)
        self._admit_retry = Admission(self._generation, trial, True)
        # Every period starts from a clean slate: a CLOSED breaker forgets the failures that
        # opened it, and a HALF_OPEN one counts only its own trials.
        self._consecutive = 0
        self._trials = 0
        self._trial_successes = 0
        if self._window is not None:
            self._window.clear()
        self._on_transition(old, new, reason)

    def __repr__(self) -> str:
        return (f"<CircuitBreaker {self.name!r} {self._state.name} active={self._active} "
                f"trips={self.trips}>")
