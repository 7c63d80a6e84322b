"""One Sparkplug host per host_id (bmsd/ingest/sparkplug_link.py, `claim`), on the real
stack without an edge node: a host that lost its lock with its database session,
to another meanwhile, stops and says why; the standby then takes over.
tests/test_sparkplug.py covers the takeover at a kill -9 with an edge node sending."""

from __future__ import annotations

import os

import psycopg

from bmsd.database import ADVISORY_NAMESPACE
from tests.fix_daemon import DaemonFactory, wait_until


def config(host: str) -> str:
    return f'[sparkplug]\nenabled = true\ngroups = ["claim-{host}"]\nhost_id = "{host}"\n'


def test_a_host_whose_lock_another_took_stops_saying_so_and_the_standby_takes_over(
    bmsd_daemon: DaemonFactory, db_url: str,
) -> None:
    host = f"claim-{os.getpid()}"
    topic = f"spBv1.0/STATE/{host}"
    first = bmsd_daemon(config(host))
    wait_until(lambda: first.metric("bmsd_sparkplug_host_online") == 1, what="a host")
    second = bmsd_daemon(config(host))
    wait_until(lambda: second.metric("bmsd_sparkplug_standby") == 1, what="a standby")
    with psycopg.connect(db_url, autocommit=True) as thief:
        # The host's lock session ends (as at a database restart), and someone
        # else takes the lock before the host tries again.
        [(pid,)] = thief.execute(
            "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s"
            " AND objid::bigint = (hashtext(%s)::bigint & 4294967295)",
            (ADVISORY_NAMESPACE, topic)).fetchall()
        # (with a timeout, it waits for the session to end and let go of the lock)
        assert thief.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,)).fetchone() == (
            True,)
        assert thief.execute("SELECT pg_try_advisory_lock(%s, hashtext(%s))",
                             (ADVISORY_NAMESPACE, topic)).fetchone() == (True,)
        assert first.proc is not None
        assert first.proc.wait(timeout=20) == 1
        assert "Sparkplug host lock of" in first.output()
        assert "taken by server session" in first.output()
        assert second.metric("bmsd_sparkplug_host_online") == 0  # the lock is the thief's
    # The thief's session ended: the standby takes the lock and is the host.
    wait_until(lambda: second.metric("bmsd_sparkplug_host_online") == 1, timeout_s=20,
               what="the standby is the host")
    assert second.metric("bmsd_sparkplug_standby") == 0
