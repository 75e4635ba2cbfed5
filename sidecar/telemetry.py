"""OpenTelemetry traces (docs/operations.md, "Traces"): the tracer provider's lifecycle and the
few calls the rest of the sidecar makes.

Off (no `telemetry.otlp_endpoint`) the sidecar holds `None` instead of a `Tracing`: the request
span's middleware is not installed, the session manager is the plain one, and the upstream
checks `None` once per request, so no span, context or attribute is ever built. On, the
`otel` extra is imported here and nowhere else: the base install does not need it.

What goes into a span is chosen by its caller from values that are never secret: methods,
paths without their query, routes, status codes, outcome words, the session hash. Exceptions
are recorded by type only (`error.type`): a message may hold a token.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Final, Literal

from sidecar import __version__
from sidecar.config import TelemetryConfig

if TYPE_CHECKING:
    from contextvars import Token

    from opentelemetry.context import Context
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span as OTelSpan

__all__ = [
    "NO_SPAN",
    "TRACE_HEADERS",
    "Attributes",
    "Span",
    "SpanKindName",
    "Tracing",
    "current_span",
    "span",
]

# The W3C Trace Context headers (https://www.w3.org/TR/trace-context/): with tracing on, the
# client's are continued and replaced upstream by ours (docs/decisions.md).
TRACE_HEADERS: Final = frozenset({"traceparent", "tracestate"})
_EXPORT_TIMEOUT: Final = 5.0  # seconds one OTLP export may take; the queue waits meanwhile
_SHUTDOWN_TIMEOUT: Final = 5.0  # seconds the last export may take at shutdown

Attributes = Mapping[str, str | bool | int | float]
SpanKindName = Literal["internal", "server", "client"]


class Span:
    """What the sidecar does with a span: attributes, a name, a failure kind (never a message).

    `NO_SPAN` is the one instance without a span behind it, for code paths that run whether
    tracing is on or not and are not the per-request hot path.
    """

    __slots__ = ("_span",)

    def __init__(self, span: OTelSpan | None) -> None:
        self._span = span

    def set(self, key: str, value: str | bool | int | float) -> None:
        if self._span is not None:
            self._span.set_attribute(key, value)

    def rename(self, name: str) -> None:
        if self._span is not None:
            self._span.update_name(name)

    def fail(self, kind: str) -> None:
        """Status error with `error.type` = `kind`: an exception's type or a status code."""
        if self._span is not None:
            from opentelemetry.trace import Status, StatusCode

            self._span.set_attribute("error.type", kind)
            self._span.set_status(Status(StatusCode.ERROR))


class _Open:
    """One span's block: current while it runs, ended after; an exception marks it failed
    by type only. A class rather than a generator: it is on every request's path."""

    __slots__ = ("_parent", "_span", "_token", "_tracing")

    def __init__(self, tracing: Tracing, span: OTelSpan, parent: Context | None) -> None:
        self._tracing = tracing
        self._span = span
        self._parent = parent
        self._token: Token[Context] | None = None

    def __enter__(self) -> Span:
        tracing = self._tracing
        self._token = tracing._attach(tracing._in_context(self._span, self._parent))
        return Span(self._span)

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if kind is not None:
            Span(self._span).fail(kind.__name__)
        if self._token is not None:
            self._tracing._detach(self._token)
        self._span.end()


NO_SPAN: Final = Span(None)
_OFF: Final = contextlib.nullcontext(NO_SPAN)  # reusable: entering it builds nothing


class Tracing:
    """The tracer provider of one process: built at start-up, flushed and shut down at exit.

    Spans go to `telemetry.otlp_endpoint` in batches from the SDK's own thread, or to
    `exporter` one by one as they end (tests keep them in memory).
    """

    def __init__(self, config: TelemetryConfig, exporter: SpanExporter | None = None) -> None:
        from opentelemetry import context, trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace import SpanKind
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._provider = TracerProvider(
            resource=Resource.create(
                {"service.name": config.service_name, "service.version": __version__}
            ),
            # A caller's sampled flag decides for its trace; new traces by the ratio.
            sampler=ParentBased(TraceIdRatioBased(config.sampling)),
        )
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            exporter = OTLPSpanExporter(endpoint=config.otlp_endpoint, timeout=_EXPORT_TIMEOUT)
            self._provider.add_span_processor(BatchSpanProcessor(exporter))
        else:
            self._provider.add_span_processor(SimpleSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("sidecar", __version__)
        self._propagator = TraceContextTextMapPropagator()
        # Looked up once: each request opens several spans.
        self._attach, self._detach = context.attach, context.detach
        self._in_context, self._current = trace.set_span_in_context, trace.get_current_span
        self._kinds = {
            "internal": SpanKind.INTERNAL,
            "server": SpanKind.SERVER,
            "client": SpanKind.CLIENT,
        }

    @classmethod
    def open(cls, config: TelemetryConfig, exporter: SpanExporter | None = None) -> Tracing | None:
        """A `Tracing` when `telemetry.otlp_endpoint` is set, else None (tracing off)."""
        return cls(config, exporter) if config.otlp_endpoint else None

    async def close(self) -> None:
        """Export the spans still queued, then stop the exporter (after the last request)."""
        provider = self._provider
        await asyncio.to_thread(provider.force_flush, int(_SHUTDOWN_TIMEOUT * 1000))
        await asyncio.to_thread(provider.shutdown)

    def span(
        self,
        name: str,
        *,
        kind: SpanKindName = "internal",
        attributes: Attributes | None = None,
        parent: Context | None = None,
    ) -> contextlib.AbstractContextManager[Span]:
        """A span, current until the block ends; an exception marks it failed, by type only.

        `parent`: a context extracted from a request (`continued`); by default the span is a
        child of the current one.
        """
        started = self._tracer.start_span(
            name,
            context=parent,
            kind=self._kinds[kind],
            attributes=attributes,
            record_exception=False,  # an exception's message may hold a token
            set_status_on_exception=False,
        )
        return _Open(self, started, parent)

    def current(self) -> Span:
        """The span the running code is in (the innermost open `span` block)."""
        return Span(self._current())

    def continued(self, headers: Mapping[str, str]) -> Context:
        """The caller's trace from its `traceparent` / `tracestate`, or a new one if invalid."""
        return self._propagator.extract(headers)

    def inject(self, headers: list[tuple[str, str]]) -> None:
        """Add the current span's `traceparent` (and `tracestate`) to outgoing headers."""
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier)
        headers.extend(carrier.items())


def span(
    tracing: Tracing | None,
    name: str,
    *,
    kind: SpanKindName = "internal",
    attributes: Attributes | None = None,
) -> contextlib.AbstractContextManager[Span]:
    """`tracing.span(...)`, or with tracing off a shared block that does nothing: for the
    paths that are not run per request (logins, refreshes, IdP calls)."""
    if tracing is None:
        return _OFF
    return tracing.span(name, kind=kind, attributes=attributes)


def current_span(tracing: Tracing | None) -> Span:
    """`tracing.current()`, or `NO_SPAN` with tracing off."""
    return NO_SPAN if tracing is None else tracing.current()
