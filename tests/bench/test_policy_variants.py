"""`--policies` takes variants, `NAME:KEY=VALUE[:KEY=VALUE]`: a policy with some of its options
set, compared beside the others (an ablation), each checked before any run."""

from __future__ import annotations

import pytest

from kvrt.runtime.bench.runner import with_policy
from kvrt.runtime.cli import main
from kvrt.runtime.config import EngineConfig, ServeConfig


def test_a_variant_sets_its_options_over_the_shared_ones() -> None:
    shared = ServeConfig(engine=EngineConfig(policy_options={"offload_margin": "3",
                                                             "aging": "0.5"}))
    config = with_policy(shared, "tokencake:cross_run=false:aging=0")
    assert config.engine.policy == "tokencake"
    assert config.engine.policy_options == {"offload_margin": "3", "cross_run": "false",
                                            "aging": "0"}
    plain = with_policy(shared, "lru-offload")  # takes none of them
    assert (plain.engine.policy, plain.engine.policy_options) == ("lru-offload", {})


@pytest.mark.parametrize(("policies", "words"), [
    ("lru,tokencake:cross_run", "a variant's options are KEY=VALUE, not 'cross_run'"),
    ("tokencake:bogus=1", "unknown policy option bogus"),
    ("tokencake:retention=forever", "retention must be one of next-use, pins, none"),
    ("nosuch:aging=1", "unknown policies ['nosuch']"),
])
def test_a_bad_variant_is_refused_before_any_run(policies: str, words: str, capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["bench", "map-reduce", "--quick", "--policies", policies])
    assert words in str(exited.value)
