#!/usr/bin/env python3
"""Measure envoy-data-plane (betterproto2 + pydantic dataclasses) against xds-protos (protobuf).

The question: may the typed ``envoy-data-plane`` messages go on the per-request path (decoding
Envoy's ProcessingRequest, encoding our ProcessingResponse), or only into tooling such as typed
generation of Envoy config? This times the work one request needs on each: decode a request-body
message carrying a chat completion, build and encode a body response with two header mutations.

envoy-data-plane is not a dependency of the gateway. Run it in a throwaway venv:

    python3 -m venv /tmp/edp && /tmp/edp/bin/pip install envoy-data-plane xds-protos
    /tmp/edp/bin/python benchmarks/bench_envoy_data_plane.py
"""

from __future__ import annotations

import json
import timeit

BODY = json.dumps({"model": "auto", "messages": [{"role": "user", "content": "Hello there " * 20}]}).encode()


def protobuf_case():
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    wire = pb.ProcessingRequest(request_body=pb.HttpBody(body=BODY, end_of_stream=True)).SerializeToString()

    def one():
        req = pb.ProcessingRequest.FromString(wire)
        body = req.request_body.body
        common = pb.CommonResponse(clear_route_cache=True)
        for k, v in (("x-extproc-tier", b"small"), (":path", b"/v2/models/llm-small/generate")):
            common.header_mutation.set_headers.add(header=base_pb2.HeaderValue(key=k, raw_value=v))
        common.body_mutation.body = body
        return pb.ProcessingResponse(request_body=pb.BodyResponse(response=common)).SerializeToString()

    return one


def betterproto_case():
    from envoy_data_plane.envoy.config.core.v3 import HeaderValue, HeaderValueOption
    from envoy_data_plane.envoy.service.ext_proc.v3 import (
        BodyMutation, BodyResponse, CommonResponse, HeaderMutation, HttpBody, ProcessingRequest,
        ProcessingResponse,
    )

    wire = bytes(ProcessingRequest(request_body=HttpBody(body=BODY, end_of_stream=True)))

    def one():
        req = ProcessingRequest.parse(wire)
        body = req.request_body.body
        mutation = HeaderMutation(set_headers=[
            HeaderValueOption(header=HeaderValue(key=k, raw_value=v))
            for k, v in (("x-extproc-tier", b"small"), (":path", b"/v2/models/llm-small/generate"))
        ])
        common = CommonResponse(clear_route_cache=True, header_mutation=mutation, body_mutation=BodyMutation(body=body))
        return bytes(ProcessingResponse(request_body=BodyResponse(response=common)))

    return one


def main() -> None:
    for name, make in (("xds-protos (protobuf, upb)", protobuf_case), ("envoy-data-plane (betterproto2)", betterproto_case)):
        try:
            fn = make()
        except ImportError as exc:
            print(f"{name}: not installed ({exc})")
            continue
        n = 20000
        best = min(timeit.repeat(fn, number=n, repeat=5)) / n
        print(f"{name:34s} {best * 1e6:8.1f} us per request message round (decode + build + encode)")


if __name__ == "__main__":
    main()
