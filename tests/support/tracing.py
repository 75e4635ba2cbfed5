"""Spans the sidecar exported, as the trace tests read them: kept in memory by the SDK's
`InMemorySpanExporter`, or received over real OTLP/HTTP by `OTLPReceiver` (an aiohttp server
in a thread, so that sidecar processes reach it, decoding the protobuf with opentelemetry-proto).

Both become `Recorded` spans, so one set of helpers walks the tree and scans for secrets.
"""

from __future__ import annotations

import gzip
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span as ProtoSpan
from opentelemetry.proto.trace.v1.trace_pb2 import Status as ProtoStatus
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from tests.support.ports import free_port
from tests.support.threads import AppThread

__all__ = [
    "OTLPReceiver",
    "Recorded",
    "children",
    "from_memory",
    "named",
    "one",
    "secrets_in",
    "traceparent",
]

_PROTO_KINDS = {
    ProtoSpan.SPAN_KIND_SERVER: "server",
    ProtoSpan.SPAN_KIND_CLIENT: "client",
    ProtoSpan.SPAN_KIND_INTERNAL: "internal",
}
_SDK_KINDS = {SpanKind.SERVER: "server", SpanKind.CLIENT: "client", SpanKind.INTERNAL: "internal"}


@dataclass(frozen=True)
class Recorded:
    """One exported span: ids as lower-case hex, the status as "unset" / "ok" / "error"."""

    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_id: str | None
    attributes: dict[str, Any]
    status: str
    status_message: str
    service: str
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)


def from_memory(exporter: InMemorySpanExporter) -> list[Recorded]:
    """What the in-memory exporter holds, in the order the spans ended."""
    return [_from_sdk(s) for s in exporter.get_finished_spans()]


def _from_sdk(span: ReadableSpan) -> Recorded:
    context = span.context
    assert context is not None
    status = {StatusCode.UNSET: "unset", StatusCode.OK: "ok", StatusCode.ERROR: "error"}
    return Recorded(
        name=span.name,
        kind=_SDK_KINDS.get(span.kind, "other"),
        trace_id=f"{context.trace_id:032x}",
        span_id=f"{context.span_id:016x}",
        parent_id=None if span.parent is None else f"{span.parent.span_id:016x}",
        attributes=dict(span.attributes or {}),
        status=status[span.status.status_code],
        status_message=span.status.description or "",
        service=str(span.resource.attributes.get("service.name", "")),
        events=[(e.name, dict(e.attributes or {})) for e in span.events],
    )


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _decode(body: bytes) -> list[Recorded]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                status = {
                    ProtoStatus.STATUS_CODE_UNSET: "unset",
                    ProtoStatus.STATUS_CODE_OK: "ok",
                    ProtoStatus.STATUS_CODE_ERROR: "error",
                }[span.status.code]
                spans.append(
                    Recorded(
                        name=span.name,
                        kind=_PROTO_KINDS.get(span.kind, "other"),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex() or None,
                        attributes={kv.key: _value(kv.value) for kv in span.attributes},
                        status=status,
                        status_message=span.status.message,
                        service=str(resource.get("service.name", "")),
                        events=[
                            (e.name, {kv.key: _value(kv.value) for kv in e.attributes})
                            for e in span.events
                        ],
                    )
                )
    return spans


class OTLPReceiver:
    """An OTLP/HTTP traces endpoint (`url`, `.../v1/traces`) on 127.0.0.1 that keeps what it
    is sent; protobuf only, as the sidecar's exporter sends."""

    def __init__(self) -> None:
        self.spans: list[Recorded] = []
        self.requests = 0
        self._lock = threading.Lock()
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._server = AppThread(app, free_port(), "otlp-receiver")
        self.url = self._server.url + "/v1/traces"

    async def _export(self, request: web.Request) -> web.Response:
        if request.content_type != "application/x-protobuf":
            return web.Response(status=415)
        body = await request.read()
        if request.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
        spans = _decode(body)
        with self._lock:
            self.spans.extend(spans)
            self.requests += 1
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    def received(self) -> list[Recorded]:
        with self._lock:
            return list(self.spans)

    def stop(self) -> None:
        self._server.stop()


def named(spans: Iterable[Recorded], name: str, **attributes: Any) -> list[Recorded]:
    """The spans called `name` whose attributes include `attributes`."""
    return [
        s
        for s in spans
        if s.name == name and all(s.attributes.get(k) == v for k, v in attributes.items())
    ]


def one(spans: Iterable[Recorded], name: str, **attributes: Any) -> Recorded:
    """The only span called `name` with those attributes."""
    spans = list(spans)
    found = named(spans, name, **attributes)
    assert len(found) == 1, (name, attributes, [(s.name, s.attributes) for s in spans])
    return found[0]


def children(spans: Iterable[Recorded], parent: Recorded) -> list[Recorded]:
    """The direct children of `parent`, by name order."""
    return sorted(
        (s for s in spans if s.parent_id == parent.span_id and s.trace_id == parent.trace_id),
        key=lambda s: s.name,
    )


def traceparent(value: str) -> tuple[str, str, bool]:
    """A W3C `traceparent` header's trace id, parent span id and sampled flag."""
    version, trace_id, span_id, flags = value.split("-")
    assert version == "00", value
    return trace_id, span_id, bool(int(flags, 16) & 1)


def secrets_in(spans: Iterable[Recorded], secrets: Iterable[str]) -> list[str]:
    """Where any of `secrets` (or a 12-character piece of one) shows in a span's name,
    attributes, events or status message; empty when none does."""
    pieces = {s[i : i + 12] for s in secrets if s for i in range(0, max(1, len(s) - 11), 6)}
    found = []
    for span in spans:
        texts = [span.name, span.status_message, *_texts(span.attributes)]
        for event, attributes in span.events:
            texts += [event, *_texts(attributes)]
        for text in texts:
            for piece in pieces:
                if piece in text:
                    found.append(f"{span.name}: {piece!r} in {text!r}")
    return found


def _texts(attributes: dict[str, Any]) -> list[str]:
    out = []
    for key, value in attributes.items():
        out.append(key)
        if isinstance(value, list | tuple):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value))
    return out
