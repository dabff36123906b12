"""Errors a swarm user sees, each with a message that says what went wrong and where."""


class SwarmError(RuntimeError):
    """Base class of every error the client raises about the swarm. `node_id` names the node the error
    is about, when it is about one."""

    def __init__(self, message: str, node_id: str | None = None):
        super().__init__(message)
        self.node_id = node_id


class SwarmConnectionError(SwarmError):
    """The DHT could not be joined, or a node could not be reached."""


class NodeUnavailableError(SwarmConnectionError):
    """A node is unreachable, stalled, leaving, busy or crashed: another node may well succeed."""


class NodeBusyError(NodeUnavailableError):
    """A node has no room for this work now (slots or KV-cache memory taken): try another, and leave it
    alone for `retry_after` seconds, as it asked (protocol.busy)."""

    def __init__(self, message: str, node_id: str | None = None, retry_after: float = 0.0):
        super().__init__(message, node_id)
        self.retry_after = retry_after


class PushedInputError(NodeUnavailableError):
    """A node refused the input another node pushed to it (hop-to-hop forwarding): the pusher or the
    node itself lies, and which one cannot be told."""


class NoRouteError(SwarmError):
    """The online nodes do not cover every block of the model."""


class RemoteError(SwarmError):
    """A node refused a request as invalid; sending it elsewhere would fail the same way."""
