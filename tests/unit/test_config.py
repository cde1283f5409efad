"""Config: embedded defaults, the documented keys, one-line errors naming the bad key."""

import json

import pytest

from extproc import config
from extproc.config import ConfigError, Duration

EXAMPLE = """
listen: "127.0.0.1:9002"
routingHeader: "x-gateway-destination-endpoint"
index: {backend: redis, redisUrl: "redis://127.0.0.1:6379/0", keyPrefix: "matrix:kv:block:", timeout: "50ms"}
blockSizeToHash: 128
maxBlocksToMatch: 128
hashScheme: chained
models:
  - {name: "Qwen/Qwen3-0.6B", tokenizer: "/path/to/tokenizer/dir"}
pods:
  - {id: "pod-a", address: "10.0.0.5:8000", models: ["Qwen/Qwen3-0.6B"]}
"""


def test_no_file_gives_embedded_defaults():
    c = config.load(None)
    assert c.listen == "127.0.0.1:9002"
    assert c.routing_header == "x-gateway-destination-endpoint"
    assert (c.block_size_to_hash, c.max_blocks_to_match, c.hash_scheme) == (128, 128, "chained")
    assert c.index.key_prefix == "matrix:kv:block:"
    assert c.index.backend == "memory"


def test_the_documented_example_loads(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(EXAMPLE)
    c = config.load(path)
    assert c.index.backend == "redis"
    assert c.index.timeout == pytest.approx(0.05)
    assert c.pods[0].id == "pod-a" and c.pods[0].models == ["Qwen/Qwen3-0.6B"]
    assert c.models[0].tokenizer == "/path/to/tokenizer/dir"


def test_json_files_load_too(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"blockSizeToHash": 16, "hashScheme": "kthena"}))
    c = config.load(path)
    assert (c.block_size_to_hash, c.hash_scheme) == (16, "kthena")


@pytest.mark.parametrize(
    "data, names",
    [
        ({"blockSize": 16}, "blockSize"),
        ({"index": {"backend": "etcd"}}, "$.index.backend"),
        ({"index": {"timeout": "fast"}}, "$.index"),
        ({"blockSizeToHash": 0}, "blockSizeToHash"),
        ({"hashScheme": "md5"}, "$.hashScheme"),
        ({"pods": [{"id": "a", "address": "nowhere"}]}, "$.pods[0]"),
        ({"pods": [{"id": "a", "address": "h:1", "models": ["m"]}]}, "unknown model"),
        ({"pods": [{"id": "a", "address": "h:1"}, {"id": "a", "address": "h:2"}]}, "twice"),
        ({"routingHeader": "X-Upper"}, "routingHeader"),
    ],
)
def test_bad_values_are_one_line_errors_naming_the_key(data, names):
    with pytest.raises(ConfigError) as err:
        config.from_dict(data)
    message = str(err.value)
    assert names in message
    assert "\n" not in message


def test_unreadable_or_malformed_files_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("listen: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


@pytest.mark.parametrize("text, seconds", [("50ms", 0.05), ("30s", 30.0), ("2m", 120.0), (1.5, 1.5), ("7", 7.0)])
def test_durations(text, seconds):
    assert Duration.parse(text) == pytest.approx(seconds)


def test_cli_rejects_a_bad_config_with_one_line(tmp_path, capsys):
    from extproc.__main__ import main

    path = tmp_path / "c.yaml"
    path.write_text("index: {bogus: 1}\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kv-extproc: invalid config") and "bogus" in err and "\n" not in err


@pytest.mark.parametrize(
    "index, names",
    [
        ({"mode": "cluster", "nodes": ["a:1"]}, "set backend: redis"),
        ({"backend": "redis", "mode": "cluster"}, "needs nodes"),
        ({"backend": "redis", "mode": "cluster", "nodes": ["nohost"]}, "nodes must be 'host:port'"),
        ({"backend": "redis", "mode": "cluster", "nodes": ["a:1"], "redisUrl": "redis://b:2/0"}, "redisUrl is for mode standalone"),
        ({"backend": "redis", "mode": "cluster", "nodes": ["a:1"], "keyPrefix": "kv:{m}:"}, "keyPrefix must not contain"),
        ({"backend": "redis", "nodes": ["a:1"]}, "set mode: cluster"),
        ({"backend": "redis", "sentinels": ["a:1"]}, "set mode: sentinel"),
        ({"backend": "redis", "tls": True}, "rediss://"),
        ({"backend": "redis", "mode": "sentinel", "sentinels": ["a:1"]}, "sentinelService"),
        ({"backend": "redis", "mode": "sentinel", "sentinelService": "s"}, "sentinels"),
        ({"backend": "redis", "mode": "sentinel", "sentinels": ["a:1"], "sentinelService": "s", "nodes": ["b:2"]},
         "nodes is for mode cluster"),
        ({"backend": "redis", "mode": "sentinel", "sentinels": ["a:1"], "sentinelService": "s",
          "sentinelPasswordFile": "f", "sentinelPasswordEnv": "E"}, "not both"),
        ({"backend": "redis", "mode": "replicated"}, "$.index.mode"),
    ],
)
def test_index_modes_are_checked_with_one_line_errors(index, names):
    with pytest.raises(ConfigError) as err:
        config.from_dict({"index": index})
    assert names in str(err.value)
    assert "\n" not in str(err.value)


def test_index_modes_load():
    c = config.from_dict({"index": {"backend": "redis", "mode": "cluster", "nodes": ["10.0.0.1:6379", "r-1.redis:6379"],
                                    "tls": True, "username": "kv"}})
    assert (c.index.mode, c.index.nodes, c.index.tls) == ("cluster", ["10.0.0.1:6379", "r-1.redis:6379"], True)
    s = config.from_dict({"index": {"backend": "redis", "mode": "sentinel", "sentinels": ["s1:26379", "s2:26379"],
                                    "sentinelService": "kvindex"}})
    assert (s.index.mode, s.index.sentinel_service) == ("sentinel", "kvindex")
    assert config.from_dict({}).index.mode == "standalone"
