"""States, their precedence, and exceptions that keep their arguments."""

from __future__ import annotations

import pickle

import pytest

from engine import states
from engine.exceptions import (
    Ignore,
    MaxRetriesExceededError,
    NotRegistered,
    Reject,
    Retry,
    SoftTimeLimitExceeded,
    TimeLimitExceeded,
    WorkerLostError,
)


def test_state_sets_match_celery():
    assert states.READY_STATES == {"SUCCESS", "FAILURE", "REVOKED"}
    assert states.UNREADY_STATES == {"PENDING", "RECEIVED", "STARTED", "REJECTED", "RETRY"}
    assert states.EXCEPTION_STATES == {"RETRY", "FAILURE", "REVOKED"}
    assert states.PROPAGATE_STATES == {"FAILURE", "REVOKED"}


def test_precedence_orders_states_and_places_custom_ones_between():
    assert states.precedence(states.SUCCESS) < states.precedence(states.FAILURE)
    assert states.precedence("PROGRESS") < states.precedence(states.STARTED)
    assert states.precedence("PROGRESS") > states.precedence(states.FAILURE)
    assert states.state(states.SUCCESS) > states.state(states.PENDING)
    assert states.state("PROGRESS") > states.state(states.STARTED)
    assert not states.state("PROGRESS") > states.state(states.SUCCESS)


@pytest.mark.parametrize("name,valid", [("PROGRESS", True), ("ABORTED", True), ("progress", False),
                                        ("", False), (None, False), (3, False)])
def test_custom_states_are_upper_case_strings(name, valid):
    assert states.is_valid_state(name) is valid


@pytest.mark.parametrize("exc", [
    Retry("again", ValueError("boom"), 5),
    Reject("bad input", requeue=True),
    Ignore(),
    MaxRetriesExceededError("too many", task_args=(1,), task_kwargs={}),
    NotRegistered("proj.missing"),
    WorkerLostError("child 123 died"),
    TimeLimitExceeded(10.0),
    SoftTimeLimitExceeded(),
])
def test_exceptions_survive_pickle_with_their_args(exc):
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is type(exc)
    assert repr(copy.args) == repr(exc.args)


def test_retry_and_reject_expose_their_fields():
    retry = Retry("why", KeyError("k"), 3)
    assert (retry.message, type(retry.exc), retry.when) == ("why", KeyError, 3)
    reject = Reject("reason", requeue=True)
    assert (reject.reason, reject.requeue) == ("reason", True)
    assert "proj.missing" in str(NotRegistered("proj.missing"))
