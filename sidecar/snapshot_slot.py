"""The snapshot new exchanges run under, as the listeners and the pipeline read it.

Its own module, below the listener: a listener's context holds the ``SnapshotSlot`` typed
as its class, so that compiled, ``hold`` is a native call (a stored bound method was a
generic call, ~300 instructions an exchange), and a compiled dataclass needs the classes of
its fields when its module loads, which ``pipeline`` (it imports the listener) could not give.
"""

from __future__ import annotations

from .snapshot import Snapshot

__all__ = ["SnapshotSlot", "SnapshotView"]


class SnapshotView:
    """What an exchange reads of its snapshot, as fields of a compiled class. ``Snapshot``
    stays interpreted (a frozen dataclass the sidecar weak-references to retire its
    clusters), and compiled code reads each of its fields by name (~160 instructions, six
    an exchange). Made once a snapshot by ``SnapshotSlot.set``; it holds the snapshot, so an
    exchange holding the view keeps the snapshot (and its clusters) alive as before."""

    __slots__ = ("snapshot", "routes", "local_service", "filters", "body_filters", "clusters", "choosers")

    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        self.routes = snapshot.routes
        self.local_service = snapshot.local_service
        self.filters = snapshot.filters
        self.body_filters = snapshot.body_filters
        self.clusters = snapshot.clusters
        self.choosers = snapshot.choosers


class SnapshotSlot:
    """Where the snapshot new exchanges run under lives; a reload swaps it whole (``set``).
    Compiled, because ``hold`` runs for every request: as a method of the (interpreted)
    ``Sidecar`` it cost an interpreted call each time."""

    __slots__ = ("view",)

    def __init__(self) -> None:
        self.view: SnapshotView | None = None  # set before the first listener starts

    @property
    def current(self) -> Snapshot | None:
        return self.view.snapshot if self.view is not None else None

    def set(self, snapshot: Snapshot) -> None:
        self.view = SnapshotView(snapshot)

    def hold(self) -> SnapshotView:
        """The snapshot a new exchange runs under, held until ``Pipeline.finish``."""
        view = self.view
        assert view is not None
        view.clusters.hold()
        return view
