"""Policies are built by name with options by name (`--policy-option KEY=VALUE`): the fields of
their config dataclasses, converted to each field's type and validated by the config."""

from __future__ import annotations

import pytest

from kvrt.runtime.config import ConfigError
from kvrt.runtime.policy import make_policy, options_for, policy_names, policy_option_names
from kvrt.runtime.policy.kvrt import KvrtPolicy
from kvrt.runtime.policy.tokencake import TokencakePolicy
from kvrt.runtime.policy.ttl import TTLPolicy


def test_options_reach_the_policy_converted_to_their_types() -> None:
    policy = make_policy("tokencake", {"offload_margin": "3", "write_through": "off",
                                       "reserve_fraction": "0.5"})
    assert isinstance(policy, TokencakePolicy)
    assert policy.config.offload_margin == 3.0 and policy.config.write_through is False
    assert policy.config.reserve_fraction == 0.5
    assert policy.config.aging_per_s == 0.002  # untouched: its default
    ttl = make_policy("ttl", {"max_s": "30"})
    assert isinstance(ttl, TTLPolicy) and ttl.config.max_s == 30.0


def test_kvrt_takes_the_reuse_parameters_but_keeps_its_own_mode() -> None:
    policy = make_policy("kvrt", {"diff_keep": "0.5", "min_reused_tokens": "32",
                                  "upload_lead_s": "0.2"})
    assert isinstance(policy, KvrtPolicy)
    assert (policy.reuse.mode, policy.reuse.diff_keep) == ("collective", 0.5)
    assert policy.reuse.min_reused_tokens == 32 and policy.config.upload_lead_s == 0.2
    assert make_policy("kvrt-per-request").reuse.mode == "per-request"
    assert "mode" not in policy_option_names("kvrt")
    assert "diff_keep" in policy_option_names("kvrt")
    assert "diff_keep" not in policy_option_names("tokencake")
    assert policy_option_names("lru") == policy_option_names("lru-offload") == []


@pytest.mark.parametrize(("name", "options", "words"), [
    ("lru", {"offload_margin": "2"}, "takes: none"),
    ("tokencake", {"offload_margn": "2"}, "unknown policy option offload_margn"),
    ("kvrt", {"mode": "off"}, "unknown policy option mode"),
    ("tokencake", {"reserve_fraction": "lots"}, "takes a float"),
    ("tokencake", {"write_through": "maybe"}, "takes a bool"),
    ("kvrt", {"min_reused_tokens": "1.5"}, "takes a int"),
    ("tokencake", {"reserve_fraction": "2"}, "bad policy option"),  # the config's own check
    ("fifo", {}, "unknown policy 'fifo'"),
])
def test_a_bad_option_is_a_config_error_naming_it(name, options, words) -> None:
    with pytest.raises(ConfigError, match=words):
        make_policy(name, options)


def test_options_for_keeps_what_each_policy_takes() -> None:
    options = {"offload_margin": "3", "diff_keep": "0.5", "max_s": "9"}
    assert options_for("lru", options) == {}
    assert options_for("tokencake", options) == {"offload_margin": "3"}
    assert options_for("kvrt", options) == {"offload_margin": "3", "diff_keep": "0.5"}
    assert options_for("ttl", options) == {"max_s": "9"}
    for name in policy_names():  # each builds from its share of one set of flags
        assert make_policy(name, options_for(name, options)).name == name
