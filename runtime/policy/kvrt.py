"""`kvrt`: everything in `tokencake`, plus position-independent reuse of segments with the KV
Collector's collective step (runtime/engine/collector.py): text that many agents' prompts share
at different positions is computed once, by one of them, and read in place by the others, who
recompute only its first tokens (their diff against that master copy).

`kvrt-per-request` is the same with the collective step off: each call reuses what the segment
index holds when it is admitted, as a per-request position-independent cache (CacheBlend or
EPIC behind vLLM) would. It is the ablation that shows what the collective step adds.
"""

from __future__ import annotations

from kvrt.runtime.policy.base import register_policy
from kvrt.runtime.policy.config import ReuseConfig
from kvrt.runtime.policy.tokencake import TokencakePolicy


@register_policy("kvrt")
class KvrtPolicy(TokencakePolicy):
    reuse = ReuseConfig(mode="collective")


@register_policy("kvrt-per-request")
class KvrtPerRequestPolicy(TokencakePolicy):
    reuse = ReuseConfig(mode="per-request")
