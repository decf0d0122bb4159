"""The host tier: KV moved off the device and back, in one place.

    moves.py      the two pools' bookkeeping of a move: planned (prepare), then completed
    mover.py      the data copier (`Mover`), off the engine's step loop
    host_tier.py  `HostTier`: starts moves on the mover and completes them (the engine thread)
"""
