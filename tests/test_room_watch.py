"""The dispatcher's warning when a cluster that lost nodes has no CPU left for shard tasks."""

from __future__ import annotations

import logging

import ray

from tasks import dispatch


def test_warns_once_when_the_pools_hold_every_cpu_left(monkeypatch, caplog):
    cpus = {"CPU": 2.0}
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(cpus))
    clock = [100.0]
    monkeypatch.setattr(dispatch.time, "monotonic", lambda: clock[0])
    watch = dispatch._RoomWatch(pool_cpus=2.0, every_s=60)
    with caplog.at_level(logging.WARNING, logger="tasks.dispatch"):
        clock[0] += 30
        watch.check(False)
        assert not caplog.records  # not yet a minute without progress
        clock[0] += 31
        watch.check(False)
        watch.check(False)
        assert len(caplog.records) == 1 and "model pools hold 2" in caplog.text
        watch.check(True)  # a shard finished: the next stall is reported again
        clock[0] += 61
        cpus["CPU"] = 3.0  # a node joined: room for one shard task
        watch.check(False)
        assert len(caplog.records) == 1
