"""What crosses between a replica's actor and the front (runtime/replicas/ray_actor.py), through
pickle as Ray sends it: engine errors come back as their own class with their message, the
ones pickle cannot carry (StepFailed) included."""

from __future__ import annotations

import pickle

import pytest

from kvrt.runtime.engine.protocol import (
    EngineError,
    ReplicaUnavailable,
    RequestRejected,
    RequestTimedOut,
    RunEnded,
    StepFailed,
)
from kvrt.runtime.replicas.ray_actor import RemoteError


def crossed(error: BaseException) -> EngineError:
    return pickle.loads(pickle.dumps(RemoteError.of(error))).rebuild()


def test_step_failed_does_not_pickle_as_itself_but_crosses_as_a_remote_error() -> None:
    error = StepFailed("step 7 failed", ["r1", "r2"], emitted=[object()])
    with pytest.raises(TypeError):
        pickle.loads(pickle.dumps(error))  # its __init__ takes more than its message
    back = crossed(error)
    assert type(back) is StepFailed
    assert (str(back), back.request_ids, back.emitted) == ("step 7 failed", ["r1", "r2"], [])


@pytest.mark.parametrize("error", [RequestRejected("too long"), RunEnded("run r was ended"),
                                   RequestTimedOut("timed out"), EngineError("plain")])
def test_engine_errors_cross_as_their_class(error: EngineError) -> None:
    back = crossed(error)
    assert type(back) is type(error) and str(back) == str(error)


def test_replica_unavailable_crosses_with_its_retry_after() -> None:
    back = pickle.loads(pickle.dumps(ReplicaUnavailable("gone", retry_after_s=4)))
    assert back.retry_after_s == 4 and str(back) == "gone"


def test_any_other_exception_is_an_engine_error_naming_it() -> None:
    back = crossed(ZeroDivisionError("division by zero"))
    assert type(back) is EngineError
    assert str(back) == "the replica failed: ZeroDivisionError: division by zero"
