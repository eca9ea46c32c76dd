"""Every exception hetero_ps raises on purpose, in one tree.

::

    HeteroPSError
     ├── ConfigError                 a flag, environment variable or job setting is wrong
     ├── DataError                   a data set is missing or malformed
     ├── TrainingDiverged            the loss became non-finite or exploded (lower the learning rate)
     ├── ProtocolError               bytes on the wire do not follow docs/PROTOCOL.md
     │    ├── LocalProtocolError     we were asked to send something the protocol forbids (our bug)
     │    └── RemoteProtocolError    the peer sent something invalid
     │         ├── LimitExceeded     a length, count or shape is over a configured limit
     │         ├── ChecksumError     a header or payload checksum does not match
     │         ├── VersionMismatch   the peer speaks another protocol (or code) version
     │         └── UnknownMessage    a message type we do not know
     ├── AuthenticationError         the HMAC challenge-response failed
     ├── TransportError              the connection itself failed
     │    ├── ConnectionClosed       the peer went away (cleanly or not)
     │    └── TransportTimeout       a network wait ran past its deadline
     └── RemoteError                 the peer sent an ERROR frame; ``code`` says which

Kernels raise the built-in ``TypeError``/``ValueError`` for wrong dtypes, sizes or layouts, as numpy
does, so they are not part of this tree.
"""


class HeteroPSError(Exception):
    """Base of every error hetero_ps raises deliberately."""


class ConfigError(HeteroPSError):
    """A command-line flag, environment variable or job setting is invalid."""


class DataError(HeteroPSError):
    """A data set cannot be found or read."""


class TrainingDiverged(HeteroPSError):
    """The training loss became non-finite or exploded: the optimizer settings do not suit the model."""


class ProtocolError(HeteroPSError):
    """Bytes on the wire do not follow the protocol."""


class LocalProtocolError(ProtocolError):
    """We were asked to send something the protocol forbids: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something invalid; the connection cannot be trusted any more."""


class LimitExceeded(RemoteProtocolError):
    """A length, count or shape read from the network is over its configured limit."""


class ChecksumError(RemoteProtocolError):
    """A header or payload checksum does not match the bytes received."""


class VersionMismatch(RemoteProtocolError):
    """The peer speaks another protocol version, or runs another hetero_ps version."""


class UnknownMessage(RemoteProtocolError):
    """The peer sent a message type this version does not know."""


class AuthenticationError(HeteroPSError):
    """The shared-token challenge-response failed (wrong or missing token)."""


class TransportError(HeteroPSError):
    """The connection failed."""


class ConnectionClosed(TransportError):
    """The peer closed the connection or it broke."""


class TransportTimeout(TransportError):
    """A network wait ran past its deadline."""


class RemoteError(HeteroPSError):
    """The peer reported an error in an ERROR frame.

    ``code`` is a short machine-readable string (``auth_failed``, ``version_mismatch``, ...),
    the message is meant for people.
    """

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
