"""Errors a swarm user sees, each with a message that says what went wrong and where."""


class SwarmError(RuntimeError):
    """Base class of every error the client raises about the swarm."""


class SwarmConnectionError(SwarmError):
    """The DHT could not be joined, or a node did not answer."""


class NoRouteError(SwarmError):
    """The online nodes do not cover every block of the model."""


class RemoteError(SwarmError):
    """A node refused or failed a request; the message carries its status and reason."""
