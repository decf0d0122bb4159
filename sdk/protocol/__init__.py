"""Wire schemas (msgspec Structs) shared by the daemon and the SDK: one module per protocol.

The daemon decodes requests and encodes responses with these Structs, and /openapi.json is
generated from them; the SDK encodes and decodes with the same ones, so the two cannot drift.
Nothing here imports torch or anything from kvrt.runtime.
"""
