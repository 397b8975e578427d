"""`kiln resume` decides whether a RUNNING run's driver is alive from what that driver recorded."""

from __future__ import annotations

from orchestrator.run.liveness import DriverIdentity, driver_alive, utc_seconds

HERE = {"host": "node-a", "pid_ns": "pid:[4026531836]"}
UPDATED = "2026-01-01T12:00:00Z"
T0 = utc_seconds(UPDATED)


def driver(**fields) -> dict:
    return {
        "host": "node-a",
        "pid_ns": "pid:[4026531836]",
        "pid": 4242,
        "started": 1000.0,
        "command": "kiln train",
        **fields,
    }


def processes(table: dict):
    return lambda pid: table.get(pid)


def test_on_the_same_host_a_driver_killed_a_second_ago_is_gone_at_once():
    verdict = driver_alive(driver(), UPDATED, T0 + 1, HERE, processes({}))
    assert not verdict.alive and "pid 4242 on this host" in verdict.reason and "gone" in verdict.reason


def test_on_the_same_host_a_running_driver_is_alive_however_old_its_heartbeat():
    verdict = driver_alive(driver(), UPDATED, T0 + 3600, HERE, processes({4242: 1000.0}))
    assert verdict.alive and "pid 4242" in verdict.reason and "kiln train" in verdict.reason


def test_a_reused_pid_is_not_the_driver():
    verdict = driver_alive(driver(), UPDATED, T0 + 1, HERE, processes({4242: 5000.0}))
    assert not verdict.alive and "another process" in verdict.reason


def test_a_container_with_the_same_hostname_but_another_pid_namespace_waits_for_the_heartbeat():
    elsewhere = {"host": "node-a", "pid_ns": "pid:[4026532000]"}
    verdict = driver_alive(driver(), UPDATED, T0 + 5, elsewhere, processes({}))
    assert verdict.alive and verdict.retry_in_s == 25


def test_on_another_host_the_heartbeat_decides_and_the_wait_is_said():
    other = {"host": "node-b", "pid_ns": "pid:[4026531836]"}
    fresh = driver_alive(driver(), UPDATED, T0 + 12, other, processes({4242: 1000.0}))
    assert fresh.alive and fresh.retry_in_s == 18
    assert fresh.reason == (
        "its driver on host node-a last recorded 12s ago; it is considered gone after 30s: retry in 18s"
    )
    stale = driver_alive(driver(), UPDATED, T0 + 30, other, processes({4242: 1000.0}))
    assert not stale.alive and "30s ago" in stale.reason


def test_a_record_without_a_driver_falls_back_to_the_heartbeat():
    assert driver_alive(None, UPDATED, T0 + 3, HERE, processes({})).alive
    assert not driver_alive(None, UPDATED, T0 + 31, HERE, processes({})).alive
    assert not driver_alive({"pid": "x"}, "not a time", T0, HERE, processes({})).alive


def test_this_process_recognizes_itself_as_alive():
    from orchestrator.run.liveness import pid_start_time, this_host

    me = DriverIdentity.here("kiln train").liveness_json()
    assert driver_alive(me, UPDATED, T0 + 3600, this_host(), pid_start_time).alive


def test_one_identity_writes_the_two_driver_shapes_records_have_always_held():
    me = DriverIdentity("trainer-1", 4242, "ada", "kiln train", pid_ns="4026531836", started=1748772000.5)
    # run.json's and sweep.json's `driver` (read by driver_alive), keys in the order files hold them
    assert list(me.liveness_json().items()) == [
        ("host", "trainer-1"),
        ("pid_ns", "4026531836"),
        ("pid", 4242),
        ("started", 1748772000.5),
        ("command", "kiln train"),
    ]
    # an event's and its attempt's `driver`
    assert me.event_json() == {"host": "trainer-1", "pid": 4242, "user": "ada", "command": "kiln train"}
    assert list(me.event_json()) == ["host", "pid", "user", "command"]
    assert me.who == "ada@trainer-1"
