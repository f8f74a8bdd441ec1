"""The gRPC control API of a node: servicers, the event fan-out, backend edits.

Owns translating API calls into pool store writes and node reads; never
changes the data plane (every change reaches it through the store's watch).
"""
