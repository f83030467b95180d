"""Discovery: what a sidecar and the control plane say to each other (the wire protocol).

Stdlib only: the sidecar imports this and must stay lean (no aiohttp, no control).
"""
