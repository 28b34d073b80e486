"""Invocation: calling slice entry points anywhere in the cluster (docs/invocation.md, docs/architecture.md).

Owns instance choice (local first, else round robin over remote ACTIVE endpoints), retries with
exponential backoff and failover as each entry's policy allows (at most once for entries that are
not idempotent: `IndeterminateOutcome`), idempotency keys, the circuit breaker, per-call
deadlines, request-id propagation, the peer messages of remote calls (tags 40-49) and the server
that runs them on the target node.

Layering: may import `aether.core` and `aether.transport`; reaches the slice runtime, the endpoint
registry and the transport only through the Protocols in `aether.invoke.ports` (never imports
`aether.slices` or `aether.deploy` modules; the request-id context variable is
`aether.core.context.current_request_id`). See docs/invocation.md.
"""

from aether.invoke.breaker import CircuitBreaker
from aether.invoke.catalog import StoreCatalog
from aether.invoke.context import new_request_id
from aether.invoke.errors import (
    EndpointUnavailable,
    IndeterminateOutcome,
    InvokeBadRequest,
    InvokeError,
    InvokeOverloaded,
    InvokerClosed,
    InvokeTimeout,
    NotDeployed,
    PoisonRequest,
    SliceAppError,
    UnknownEntryError,
    classify,
)
from aether.invoke.invoker import Invoker, InvokerStats
from aether.invoke.messages import (
    INVOKE_MESSAGE_TYPES,
    KIND_APP_ERROR,
    KIND_BAD_REQUEST,
    KIND_DEADLINE,
    KIND_INDETERMINATE,
    KIND_INTERRUPTED,
    KIND_NO_INSTANCE,
    KIND_OVERLOADED,
    KIND_SHUTTING_DOWN,
    KIND_UNKNOWN_ENTRY,
    RETRYABLE_KINDS,
    InvokeMessage,
    InvokeRequest,
    InvokeResponse,
)
from aether.invoke.ports import Catalog, Endpoint, LocalSlices, PeerLink, PeerSender, Registry, Traffic
from aether.invoke.server import InvokeServer

__all__ = [
    "INVOKE_MESSAGE_TYPES",
    "KIND_APP_ERROR",
    "KIND_BAD_REQUEST",
    "KIND_DEADLINE",
    "KIND_INDETERMINATE",
    "KIND_INTERRUPTED",
    "KIND_NO_INSTANCE",
    "KIND_OVERLOADED",
    "KIND_SHUTTING_DOWN",
    "KIND_UNKNOWN_ENTRY",
    "RETRYABLE_KINDS",
    "Catalog",
    "CircuitBreaker",
    "Endpoint",
    "EndpointUnavailable",
    "IndeterminateOutcome",
    "InvokeBadRequest",
    "InvokeError",
    "InvokeMessage",
    "InvokeOverloaded",
    "InvokeRequest",
    "InvokeResponse",
    "InvokeServer",
    "InvokeTimeout",
    "Invoker",
    "InvokerClosed",
    "InvokerStats",
    "LocalSlices",
    "NotDeployed",
    "PeerLink",
    "PeerSender",
    "PoisonRequest",
    "Registry",
    "SliceAppError",
    "StoreCatalog",
    "Traffic",
    "UnknownEntryError",
    "classify",
    "new_request_id",
]
