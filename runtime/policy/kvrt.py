"""`kvrt`: everything in `tokencake`, plus position-independent reuse of segments with the reuse
planner's collective step (runtime/kv/reuse/planner.py): text that many agents' prompts share
at different positions is computed once, by one of them, and read in place by the others, who
recompute only its first tokens (their diff against that master copy).

`kvrt-per-request` is the same with the collective step off: each call reuses what the segment
index holds when it is admitted, as a per-request position-independent cache (CacheBlend or
EPIC behind vLLM) would. It is the ablation that shows what the collective step adds.

Options: tokencake's (TokencakeConfig) and the reuse parameters (ReuseConfig, but its mode).
"""

from __future__ import annotations

from dataclasses import replace

from kvrt.runtime.kv.reuse.config import ReuseConfig
from kvrt.runtime.policy.base import register_policy
from kvrt.runtime.policy.config import TokencakeConfig
from kvrt.runtime.policy.tokencake import TokencakePolicy


@register_policy("kvrt")
class KvrtPolicy(TokencakePolicy):
    options = (TokencakeConfig, ReuseConfig)
    fixed_options = ("mode",)
    reuse_mode = "collective"

    def __init__(self, config: TokencakeConfig | None = None,
                 reuse: ReuseConfig | None = None) -> None:
        super().__init__(config)
        self.reuse = replace(reuse or ReuseConfig(), mode=self.reuse_mode)


@register_policy("kvrt-per-request")
class KvrtPerRequestPolicy(KvrtPolicy):
    reuse_mode = "per-request"
