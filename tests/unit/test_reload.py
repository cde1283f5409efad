"""Reloads: live settings are applied, the rest are named at once (one line) as needing a
restart, and every later reload is compared against what really runs."""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace

import pytest

from extproc import config as config_mod
from extproc.__main__ import ConfigWatcher

BASE = {"pods": [{"id": "pod-a", "address": "10.0.0.1:8000"}], "decisionTimeout": "300ms"}


class Process:
    """What a reload sees of the running process: its config, changed only by ``apply``."""

    def __init__(self, config: config_mod.Config):
        self.config = config
        self.applied: list[config_mod.Config] = []

    async def apply(self, new: config_mod.Config) -> None:
        self.applied.append(new)
        self.config = new


@pytest.fixture()
def setup(tmp_path):
    path = tmp_path / "kv.json"

    def write(**changes) -> None:
        path.write_text(json.dumps({**BASE, **changes}))

    write()
    process = Process(config_mod.load(path))
    watcher = ConfigWatcher(str(path), SimpleNamespace(reload=asyncio.Event()), lambda: process.config, process.apply)
    return write, process, watcher


def restart_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "need a restart" in r.getMessage()]


async def test_live_changes_apply_and_the_others_are_named_in_one_line(setup, caplog):
    write, process, watcher = setup
    write(decisionTimeout="1s", limits={"maxBodyBytes": 1000, "maxConcurrentStreams": 10},
          index={"timeout": "80ms", "maxEntryAge": "1h"}, listen="127.0.0.1:9999")
    with caplog.at_level(logging.WARNING):
        await watcher.reload()
    running = process.config
    assert running.decision_timeout == 1.0 and running.limits.max_body_bytes == 1000
    assert running.index.max_entry_age == 3600
    # Not applied: still the running values, so nothing pretends they are in force.
    assert running.listen == "127.0.0.1:9002" and running.index.timeout == 0.05
    assert running.limits.max_concurrent_streams == 4096
    lines = restart_lines(caplog)
    assert len(lines) == 1
    for key in ("index.timeout", "limits.maxConcurrentStreams", "listen"):
        assert key in lines[0]
    assert "decisionTimeout" not in lines[0] and "maxBodyBytes" not in lines[0]


async def test_later_reloads_compare_against_the_running_config(setup, caplog):
    write, process, watcher = setup
    write(listen="127.0.0.1:9999")
    await watcher.reload()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        write(listen="127.0.0.1:9999", logLevel="debug")
        await watcher.reload()
    assert process.config.log_level == "debug"
    assert ["listen" in line for line in restart_lines(caplog)] == [True], "still not running: still said"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        write(logLevel="debug")  # back to the running listen address
        await watcher.reload()
    assert restart_lines(caplog) == []


async def test_an_unchanged_file_applies_nothing_and_a_bad_one_changes_nothing(setup, caplog):
    write, process, watcher = setup
    await watcher.reload()
    assert process.applied == []
    with open(watcher.path, "w") as f:
        f.write("{not json")
    with caplog.at_level(logging.ERROR):
        await watcher.reload()
    assert process.applied == [] and "config not reloaded" in caplog.text


@pytest.mark.parametrize("key", sorted(config_mod.LIVE_KEYS))
def test_every_live_key_names_a_real_setting(key):
    node: object = config_mod.Config()
    for part in key.split("."):
        fields = {f.encode_name: f.name for f in __import__("msgspec").structs.fields(type(node))}
        assert part in fields, f"{key}: no such setting"
        node = getattr(node, fields[part])
