"""The cluster description: ``--nodes --devices-per-node --link`` or ``--cluster FILE``, and its place in a plan."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopart.errors import AutopartError
from autopart.formats.cluster import Cluster, parse_cluster
from autopart.formats.devices import KNOWN_MEMORY
from autopart.formats.plan import Plan
from tests.test_plan import _plan

H100 = dict(device_name="H100-80GB", memory_bytes=80 * 10**9, speed=1.0)


def test_flags() -> None:
    assert parse_cluster(4, "8xH100-80GB", "450GB/s,50GB/s", None) == Cluster(
        nodes=4, devices_per_node=8, **H100, intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9)
    assert parse_cluster(None, "2x24GiB@1.5", None, None) == Cluster(
        nodes=1, devices_per_node=2, device_name="24 GiB", memory_bytes=24 * 2**30, speed=1.5)
    one_link = parse_cluster(2, "4xA100-40GB", "100Gbit/s", None)
    assert one_link is not None and one_link.intra_node_bytes_per_s == one_link.inter_node_bytes_per_s == 12.5e9
    assert parse_cluster(None, None, None, None) is None


def test_describe() -> None:
    cluster = parse_cluster(4, "8xH100-80GB", "450GB/s,50GB/s", None)
    assert cluster is not None
    assert cluster.describe() == "4 nodes x 8 H100-80GB (74.5 GiB), links 450 GB/s inside a node, 50 GB/s between"
    small = parse_cluster(None, "2x24GiB", None, None)
    assert small is not None and small.describe() == "1 node x 2 devices of 24 GiB, links free inside a node"
    assert Cluster(nodes=2, devices_per_node=3, speed=2.0).describe() == \
        "2 nodes x 3 devices @2, links free inside a node, free between"


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'nodes = 4\ndevices_per_node = "8xH100-80GB"\n[link]\nintra_node = "450GB/s"\ninter_node = "50GB/s"\n'),
    (".toml", 'nodes = 4\ndevices_per_node = "8xH100-80GB"\nlink = "450GB/s,50GB/s"\n'),
    (".toml", 'nodes = 4\ndevices_per_node = "8xH100-80GB"\n[link]\nintra_node = 450e9\ninter_node = 50000000000\n'),
    (".json", json.dumps({"nodes": 4, "devices_per_node": "8xH100-80GB",
                          "link": {"intra_node": "450GB/s", "inter_node": "50GB/s"}})),
])
def test_a_file_says_what_the_flags_say(tmp_path: Path, suffix: str, text: str) -> None:
    path = tmp_path / f"cluster{suffix}"
    path.write_text(text)
    assert parse_cluster(None, None, None, str(path)) == parse_cluster(4, "8xH100-80GB", "450GB/s,50GB/s", None)


def test_file_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('devices_per_node = "2x16GiB"\n')
    assert parse_cluster(None, None, None, str(path)) == parse_cluster(1, "2x16GiB", None, None)
    path.write_text('devices_per_node = "2x16GiB"\n[link]\nintra_node = "10GB/s"\n')
    assert parse_cluster(None, None, None, str(path)) == parse_cluster(None, "2x16GiB", "10GB/s", None)


_FOO = ("--devices-per-node '8xFOO': device 'FOO' is neither a memory size (40GB, 16GiB) nor a known device "
        f"({', '.join(KNOWN_MEMORY)})")


@pytest.mark.parametrize("nodes, per_node, link, message", [
    (0, "8xH100-80GB", None, "--nodes 0 must be an integer >= 1"),
    (-3, "8xH100-80GB", None, "--nodes -3 must be an integer >= 1"),
    (2, "8xFOO", None, _FOO),
    (2, "0x16GiB", None, "--devices-per-node '0x16GiB': device '0x16GiB': count must be >= 1"),
    (2, "8x16GiB@0", None, "--devices-per-node '8x16GiB@0': device '8x16GiB@0': speed must be > 0"),
    (2, "4xA100-40GB,4xH100-80GB", None,
     "--devices-per-node '4xA100-40GB,4xH100-80GB' must be one kind of device, like 8xH100-80GB or 4x16GiB@1.5"),
    (2, "devices.json", None,
     "--devices-per-node 'devices.json' must be one kind of device, like 8xH100-80GB or 4x16GiB@1.5"),
    (2, "8xH100-80GB", "450GB/s,fast",
     "--link '450GB/s,fast': bandwidth 'fast' is not like 25GB/s, 50GiB/s or 100Gbit/s"),
    (2, "8xH100-80GB", "0GB/s", "--link '0GB/s': bandwidth '0GB/s' must be positive"),
    (2, "8xH100-80GB", "1GB/s,2GB/s,3GB/s",
     "--link '1GB/s,2GB/s,3GB/s' is not INTRA[,INTER] like 450GB/s,50GB/s or 100GB/s"),
    (2, "8xH100-80GB", ",50GB/s", "--link ',50GB/s' is not INTRA[,INTER] like 450GB/s,50GB/s or 100GB/s"),
    (2, None, None, "--nodes needs --devices-per-node (like 8xH100-80GB)"),
    (2, None, "10GB/s", "--nodes --link needs --devices-per-node (like 8xH100-80GB)"),
])
def test_bad_flags(nodes: int | None, per_node: str | None, link: str | None, message: str) -> None:
    with pytest.raises(AutopartError) as caught:
        parse_cluster(nodes, per_node, link, None)
    assert str(caught.value) == message


_TOML_OK = 'devices_per_node = "2x16GiB"\n'


@pytest.mark.parametrize("name, text, message", [
    ("c.toml", _TOML_OK + "gpus = 3\n", "{p}: unknown key 'gpus' (known: nodes, devices_per_node, link)"),
    ("c.toml", _TOML_OK + 'nodes = "four"\n', "{p}: nodes must be an integer, got 'four'"),
    ("c.toml", _TOML_OK + "nodes = 2.5\n", "{p}: nodes must be an integer, got 2.5"),
    ("c.toml", _TOML_OK + "nodes = true\n", "{p}: nodes must be an integer, got True"),
    ("c.toml", _TOML_OK + "nodes = 0\n", "{p}: nodes is 0, must be >= 1"),
    ("c.toml", "nodes = 2\n", "{p}: missing field 'devices_per_node'"),
    ("c.toml", "devices_per_node = 8\n", "{p}: devices_per_node must be a string, got 8"),
    ("c.toml", 'devices_per_node = "8xFOO"\n', "{p}: devices_per_node " + _FOO[len("--devices-per-node "):]),
    ("c.toml", "nodes = \n", "{p} is not valid TOML: Invalid value (at line 1, column 9)"),
    ("c.toml", _TOML_OK + "[link]\nspeed = 3\n",
     "{p}: unknown key link.speed (known: link.intra_node, link.inter_node)"),
    ("c.toml", _TOML_OK + '[link]\ninter_node = "1GB/s"\n', "{p}: link needs intra_node (the bandwidth inside a node)"),
    ("c.toml", _TOML_OK + '[link]\nintra_node = "1GB/s"\ninter_node = "fast"\n',
     "{p}: link.inter_node: bandwidth 'fast' is not like 25GB/s, 50GiB/s or 100Gbit/s"),
    ("c.toml", _TOML_OK + "[link]\nintra_node = -1\n",
     "{p}: link.intra_node is -1, must be a bandwidth like 450GB/s or a number of bytes/s > 0"),
    ("c.toml", _TOML_OK + 'link = "1GB/s,x"\n', "{p}: link '1GB/s,x': bandwidth 'x' is not like 25GB/s, 50GiB/s or "
     "100Gbit/s"),
    ("c.toml", _TOML_OK + "link = [1, 2]\n", "{p}: link must be a table with intra_node and inter_node, or a string "
     "like '450GB/s,50GB/s', got [1, 2]"),
    ("c.json", '{"nodes": 2,', "{p} is not valid JSON: Expecting property name enclosed in double quotes at line 1 "
     "column 13"),
    ("c.json", "[1]", "{p} must be a JSON object, got list"),
])
def test_bad_files(tmp_path: Path, name: str, text: str, message: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(AutopartError) as caught:
        parse_cluster(None, None, None, str(path))
    assert str(caught.value) == message.format(p=f"cluster file {str(path)!r}")


def test_bad_file_paths(tmp_path: Path) -> None:
    for path, message in [(tmp_path / "none.toml", "cluster file '{p}' does not exist"),
                          (tmp_path / "none.json", "cluster file '{p}' does not exist"),
                          (tmp_path / "c.yaml", "--cluster '{p}' must be a .toml or .json file")]:
        with pytest.raises(AutopartError) as caught:
            parse_cluster(None, None, None, str(path))
        assert str(caught.value) == message.format(p=path)
    folder = tmp_path / "d.toml"
    folder.mkdir()
    with pytest.raises(AutopartError, match="^cluster file '.*d.toml' is a directory$"):
        parse_cluster(None, None, None, str(folder))
    with pytest.raises(AutopartError) as caught:
        parse_cluster(2, None, "1GB/s", str(tmp_path / "c.toml"))
    assert str(caught.value) == f"--cluster {str(tmp_path / 'c.toml')!r} and --nodes --link together: give the " \
                                "cluster one way"


_bandwidths = st.one_of(st.none(), st.floats(min_value=1.0, max_value=1e13, allow_nan=False))


@settings(max_examples=50)
@given(nodes=st.integers(1, 4096), per_node=st.integers(1, 64), memory=st.one_of(st.none(), st.integers(1, 2**45)),
       speed=st.floats(0.01, 100.0), intra=_bandwidths, inter=_bandwidths)
def test_cluster_round_trips_through_json(nodes: int, per_node: int, memory: int | None, speed: float,
                                         intra: float | None, inter: float | None) -> None:
    cluster = Cluster(nodes=nodes, devices_per_node=per_node, device_name="x", memory_bytes=memory, speed=speed,
                      intra_node_bytes_per_s=intra, inter_node_bytes_per_s=inter)
    assert Cluster.from_dict(json.loads(json.dumps(cluster.to_dict())), "cluster") == cluster


def test_a_plan_keeps_its_cluster_and_placement(tmp_path: Path) -> None:
    one = _plan()
    cluster = parse_cluster(2, "2x24GiB", "100GB/s,10GB/s", None)
    plan = dataclasses.replace(one, data_parallel=2, cluster=cluster, placement=((0, 2), (1, 3)), features=())
    assert "data_parallel" in plan.features and plan.world_size == 4
    back = Plan.from_json(plan.to_json(tmp_path / "plan.json"))
    assert back == plan and back.cluster == cluster and back.mesh() == [[0, 2], [1, 3]]
    assert back.position_of(3) == (1, 1)
    assert "cluster" not in one.to_dict() and "placement" not in one.to_dict()


@settings(max_examples=40)
@given(nodes=st.integers(1, 1024), count=st.integers(1, 64), gib=st.integers(1, 256),
       speed=st.sampled_from(["", "@0.5", "@2"]), intra=st.integers(1, 900),
       inter=st.one_of(st.none(), st.integers(1, 900)), suffix=st.sampled_from([".toml", ".json"]))
def test_flags_and_files_agree(tmp_path_factory: pytest.TempPathFactory, nodes: int, count: int, gib: int, speed: str,
                               intra: int, inter: int | None, suffix: str) -> None:
    per_node = f"{count}x{gib}GiB{speed}"
    link = f"{intra}GB/s" + (f",{inter}GB/s" if inter is not None else "")
    links = {"intra_node": f"{intra}GB/s", **({"inter_node": f"{inter}GB/s"} if inter is not None else {})}
    path = tmp_path_factory.mktemp("c") / f"cluster{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps({"nodes": nodes, "devices_per_node": per_node, "link": links}))
    else:
        table = "".join(f'{key} = "{value}"\n' for key, value in links.items())
        path.write_text(f'nodes = {nodes}\ndevices_per_node = "{per_node}"\n[link]\n{table}')
    expected = Cluster(nodes=nodes, devices_per_node=count, device_name=f"{gib} GiB", memory_bytes=gib * 2**30,
                       speed=float(speed[1:]) if speed else 1.0, intra_node_bytes_per_s=intra * 1e9,
                       inter_node_bytes_per_s=(inter if inter is not None else intra) * 1e9)
    assert parse_cluster(nodes, per_node, link, None) == expected
    assert parse_cluster(None, None, None, str(path)) == expected
