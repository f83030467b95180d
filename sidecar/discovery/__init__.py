"""Discovery: what a sidecar and the control plane say to each other, and the sidecar's side.

``protocol`` (the wire protocol, shared with the control plane) and ``origin`` are stdlib
only. ``join``, ``state``, ``client`` and ``startup`` are the joined sidecar's control-plane
client (certs, websockets); they are imported only when the bootstrap has ``control:``.
None of them imports aiohttp or ``control``.
"""
