"""Request validation and backend choice of the router (no Ray)."""

from __future__ import annotations

import grpc
import pytest

from dgserve.serving.client import make_request
from dgserve.serving.errors import ServingError
from dgserve.serving.router import DIFFUSION, FALLBACK, plan_request


@pytest.mark.parametrize("req, fallback, overflow, backends", [
    (make_request("hi"), True, True, (DIFFUSION, FALLBACK)),
    (make_request("hi"), True, False, (DIFFUSION,)),
    (make_request("hi"), False, True, (DIFFUSION,)),
    (make_request("hi", routing="diffusion"), True, True, (DIFFUSION,)),
    (make_request("hi", routing="autoregressive"), True, True, (FALLBACK,)),
    (make_request("hi", pinned=[(3, 7)]), True, True, (DIFFUSION,)),  # pins exist only on a canvas
    (make_request("hi", infill=("a", "b"), max_new_tokens=8), True, True, (DIFFUSION,)),
    (make_request(messages=[("user", "hi")]), True, True, (DIFFUSION, FALLBACK)),
])
def test_backend_choice(req, fallback, overflow, backends):
    assert plan_request(req, fallback=fallback, overflow=overflow).backends == backends


@pytest.mark.parametrize("req, fallback, code, match", [
    (make_request(), True, grpc.StatusCode.INVALID_ARGUMENT, "empty request"),
    (make_request("a", messages=[("user", "b")]), True, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
    (make_request(messages=[("", "b")]), True, grpc.StatusCode.INVALID_ARGUMENT, "role is empty"),
    (make_request("a", max_new_tokens=0), True, grpc.StatusCode.INVALID_ARGUMENT, "max_new_tokens"),
    (make_request("a", pinned=[(0, 1)], infill=("x", "y")), True, grpc.StatusCode.INVALID_ARGUMENT,
     "cannot be combined"),
    (make_request("a", routing="autoregressive", pinned=[(0, 1)]), True, grpc.StatusCode.INVALID_ARGUMENT,
     "AUTOREGRESSIVE_ONLY"),
    (make_request("a", routing="autoregressive"), False, grpc.StatusCode.FAILED_PRECONDITION, "no autoregressive"),
])
def test_refusals_carry_their_code(req, fallback, code, match):
    with pytest.raises(ServingError, match=match) as info:
        plan_request(req, fallback=fallback, overflow=True)
    assert info.value.code == code


def test_fields_reach_the_backend_request():
    req = make_request("hi", max_new_tokens=12, seed=7, stop_token_ids=[5], entropy_bound=0.2, temperature=0.5,
                       request_id="abc")
    b = plan_request(req, fallback=True, overflow=True).request
    assert (b.request_id, b.prompt, b.max_new_tokens, b.seed, b.stop_token_ids) == ("abc", "hi", 12, 7, (5,))
    assert b.sampling == pytest.approx({"entropy_bound": 0.2, "temperature": 0.5})
    assert plan_request(make_request("x"), fallback=True, overflow=True).request.request_id  # generated
