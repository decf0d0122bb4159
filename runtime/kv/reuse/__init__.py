"""Position-independent reuse of segments, in one place.

    config.py   ReuseConfig: off, per request, or collective; how much a reader recomputes
    index.py    SegmentIndex: where each segment's copy lies in the device pool, by content
    planner.py  ReusePlanner: which copies a request reads (splices), who computes a round's
                shared text, and the diff a reader keeps against the master copy
"""
