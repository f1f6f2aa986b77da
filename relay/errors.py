"""One exception root for everything outbox-relay raises; each docstring is the default message."""

from __future__ import annotations


class OutboxError(Exception):
    """outbox-relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class InvalidEvent(OutboxError, ValueError):
    """The event was rejected at write time and nothing was written."""


class InvalidTopic(InvalidEvent):
    """Kafka topic names are 1-249 characters of [a-zA-Z0-9._-] and not '.' or '..'."""


class InvalidKey(InvalidEvent):
    """Keys are bytes, str, int or uuid.UUID (or None)."""


class InvalidHeader(InvalidEvent):
    """Header names must be str and header values bytes or str."""


class EventTooLarge(InvalidEvent):
    """The event is larger than the configured maximum message size."""


class SerializationError(InvalidEvent):
    """The value could not be serialized."""


class InvalidPartition(InvalidEvent):
    """An explicit partition must be a non-negative int."""


class InvalidSchedule(InvalidEvent):
    """available_at must be timezone-aware and delay a non-negative timedelta; give one or neither."""


class InvalidTarget(InvalidEvent):
    """enqueue writes into your transaction: pass a SQLAlchemy Session, Connection, AsyncSession or AsyncConnection."""


class DuplicateEvent(InvalidEvent):
    """An event with this event_id is already in the outbox; the transaction is aborted: roll it back."""


class ConfigurationError(OutboxError):
    """The relay's configuration is invalid."""


class SchemaError(OutboxError):
    """The outbox schema is missing or behind this relay: run `outbox-relay migrate`."""


class ConnectionTrouble(OutboxError):
    """An outside system could not be reached; the relay backs off and retries."""


class DatabaseError(OutboxError):
    """PostgreSQL refused a statement of the relay."""


class DatabaseUnavailable(ConnectionTrouble, DatabaseError):
    """PostgreSQL could not be reached."""


class StatementCancelled(DatabaseUnavailable):
    """PostgreSQL cancelled a statement of the relay (its statement_timeout, or an operator)."""


class LockTimeout(DatabaseUnavailable):
    """PostgreSQL gave up waiting for a lock (the session's lock_timeout)."""


class MigrationBlocked(ConnectionTrouble):
    """A migration gave up waiting for a table lock another session holds; running it again carries on."""


class BrokerUnavailable(ConnectionTrouble):
    """Kafka could not be reached."""
