"""kvrt.runtime.policy: scheduling policies, registered by name."""

from kvrt.runtime.policy import kvrt, lru, lru_offload, tokencake, ttl  # noqa: F401  (register)
from kvrt.runtime.policy.base import (
    Policy,
    make_policy,
    options_for,
    policy_names,
    policy_option_names,
    register_policy,
)

__all__ = ["Policy", "make_policy", "options_for", "policy_names", "policy_option_names",
           "register_policy"]
