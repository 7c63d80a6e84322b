"""Errors raised by bmsd.

Every error bmsd raises on purpose derives from one root, so callers can
catch them all without catching programming mistakes::

    BmsdError
     ├── ConfigError        a config file or environment value is wrong
     ├── MigrationError     the schema scripts cannot be applied as they are
     │    └── EditionError  the server lacks TimescaleDB community features
     ├── DatabaseError      the database is unreachable or failed a statement
     ├── BrokerError        the MQTT broker is unreachable or refused us
     │    └── SessionTakenOver  another client took our session (two instances)
     └── LocalStackError    a throwaway local server could not be started

Foreign errors (psycopg, paho, pydantic) are converted where they enter bmsd,
with ``raise ... from exc`` so the cause stays visible. A bad payload is not
an error: it is data, and it goes to the ``ingest_rejects`` table.
"""

from __future__ import annotations


class BmsdError(Exception):
    """Base class of every error bmsd raises on purpose."""


class ConfigError(BmsdError):
    """A configuration file or environment value is wrong."""


class MigrationError(BmsdError):
    """The schema scripts cannot be applied as they are."""


class EditionError(MigrationError):
    """The server lacks the TimescaleDB community features a script needs."""


class DatabaseError(BmsdError):
    """The database is unreachable or failed a statement."""


class BrokerError(BmsdError):
    """The MQTT broker is unreachable or refused us."""


class SessionTakenOver(BrokerError):
    """Another client connected with our client id and took the session."""


class LocalStackError(BmsdError):
    """A throwaway local PostgreSQL or Mosquitto could not be started."""
