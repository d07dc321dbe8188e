"""The exceptions memkv raises. One root, a few kinds; messages name the value, the limit and the
server so that a user can fix the cause without reading code."""


class MemkvError(Exception):
    """Root of every memkv error."""


class InvalidArgument(MemkvError, ValueError):
    """A call's arguments are wrong (all problems of the call are listed in one message)."""


class ConfigError(MemkvError, ValueError):
    """A server or client setting is wrong."""


class ConnectionFailed(MemkvError, ConnectionError):
    """A server could not be reached or dropped the connection."""


class AuthError(MemkvError, PermissionError):
    """The server refused the shared secret (or one was required and not given)."""


class ProtocolError(MemkvError):
    """A peer sent a frame that breaks the wire format."""


class ServerError(MemkvError):
    """The server rejected a request; the message is the server's own."""


class StoreError(MemkvError):
    """The server's storage (data files, journal, checkpoint) cannot be used as configured."""
