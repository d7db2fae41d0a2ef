"""Schemathesis hooks for T12 (tests/schemathesis/run): keep long-polls short.

A receive waits up to `wait_ms` (default 20 s) and a request call up to `timeout_ms`
(default 30 s) when nothing comes, which would spend the run's time waiting. Values the
schema allows are lowered to a few hundred milliseconds (and a missing one is set so);
values outside the schema are left as generated, so negative cases stay negative.
"""

import schemathesis
from schemathesis.core import NotSet

SHORT_MS = 200


def _shortened(value, low, high):
    """`value` lowered to SHORT_MS if it is a valid duration in [low, high] or absent."""
    if value is None:
        return SHORT_MS
    if isinstance(value, int) and not isinstance(value, bool) and low <= value <= high:
        return min(value, SHORT_MS)
    return value


@schemathesis.hook
def before_call(context, case, **kwargs):
    path = case.operation.path
    if path == "/v1/agents/{agent}/receive":
        if case.body is None or isinstance(case.body, NotSet):
            # No body reads as `{}`: the default wait.
            case.body = {}
        if isinstance(case.body, dict):
            case.body["wait_ms"] = _shortened(case.body.get("wait_ms"), 0, 60_000)
    if path == "/v1/requests":
        query = case.query if isinstance(case.query, dict) else {}
        timeout = query.get("timeout_ms")
        if isinstance(timeout, str) and timeout.isdigit():
            timeout = int(timeout)
        query["timeout_ms"] = _shortened(timeout, 1, 300_000)
        case.query = query
