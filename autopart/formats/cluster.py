"""The machines a plan runs on: nodes of identical devices and the links between them.

    --nodes 4 --devices-per-node 8xH100-80GB --link 450GB/s,50GB/s
    --cluster cluster.toml          (or cluster.json: the same keys)

    # cluster.toml
    nodes = 4                           # default 1
    devices_per_node = "8xH100-80GB"    # one --devices entry: COUNTxNAME-or-MEMORY[@SPEED]
    [link]                              # absent: free links
    intra_node = "450GB/s"              # or a number of bytes per second
    inter_node = "50GB/s"               # absent: the same as intra_node

``--link INTRA[,INTER]``: one value is the same inside and between nodes.

Bandwidths are per device and per direction: inside a node (NVLink), between
nodes (each device's own network port, as on H100 nodes with one NIC per
GPU). A ring all-reduce over a group runs at the slowest link it crosses.
Ranks are numbered as torchrun numbers them: node by node, ``rank = node *
devices_per_node + local_rank``. Pure standard library.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from autopart.errors import AutopartError
from autopart.formats.devices import Device, parse_devices
from autopart.formats.jsonfields import Fields, load_json_file
from autopart.formats.record import read_record, saved, write_record
from autopart.formats.units import format_bytes, parse_bandwidth

__all__ = ["Cluster", "parse_cluster"]


@dataclass(frozen=True)
class Cluster:
    """``nodes`` nodes of ``devices_per_node`` identical devices each."""

    nodes: int = field(metadata=saved(minimum=1))
    devices_per_node: int = field(metadata=saved(minimum=1))
    device_name: str = ""
    """The devices' name (``H100-80GB``), or their memory when given as a size."""
    memory_bytes: int | None = field(default=None, metadata=saved(minimum=1))
    """Memory of each device; None: unlimited."""
    speed: float = 1.0
    """Compute speed of each device relative to the profiled one."""
    intra_node_bytes_per_s: float | None = None
    """Per-device bandwidth to a device of the same node; None: free."""
    inter_node_bytes_per_s: float | None = None
    """Per-device bandwidth to a device of another node; None: free."""

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.devices_per_node < 1:
            raise AutopartError(f"a cluster needs >= 1 node of >= 1 device, got {self.nodes} x {self.devices_per_node}")
        if not (math.isfinite(self.speed) and self.speed > 0):
            raise AutopartError(f"cluster speed must be > 0 (relative to the profiled device), got {self.speed}")
        if self.memory_bytes is not None and self.memory_bytes < 1:
            raise AutopartError(f"cluster memory_bytes must be >= 1, got {self.memory_bytes}")
        for name in ("intra_node_bytes_per_s", "inter_node_bytes_per_s"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise AutopartError(f"cluster {name} must be > 0, got {value}")

    @property
    def num_devices(self) -> int:
        return self.nodes * self.devices_per_node

    @property
    def device(self) -> Device:
        """One device of the cluster (all are the same)."""
        return Device(name=self.device_name or "device", memory_bytes=self.memory_bytes, speed=self.speed)

    def node_of(self, rank: int) -> int:
        """The node that holds global ``rank`` (torchrun's numbering)."""
        return rank // self.devices_per_node

    def link_bytes_per_s(self, a: int, b: int) -> float | None:
        """Bandwidth between ranks ``a`` and ``b``; None: free."""
        return self.intra_node_bytes_per_s if self.node_of(a) == self.node_of(b) else self.inter_node_bytes_per_s

    def flags(self) -> str:
        """The ``partition`` flags that give this cluster back: ``--nodes 2 --devices-per-node 4xH100-80GB --link
        450GB/s,50GB/s`` (no ``--link`` for free links)."""
        from autopart.formats.devices import KNOWN_MEMORY

        if self.device_name in KNOWN_MEMORY and KNOWN_MEMORY[self.device_name] == self.memory_bytes:
            what = self.device_name
        elif self.memory_bytes is not None:
            what = _size_text(self.memory_bytes)
        else:
            what = self.device_name or "DEVICE"
        speed = "" if self.speed == 1.0 else f"@{_number(self.speed)}"
        out = f"--nodes {self.nodes} --devices-per-node {self.devices_per_node}x{what}{speed}"
        intra, inter = self.intra_node_bytes_per_s, self.inter_node_bytes_per_s
        links = [_rate_text(v) for v in (intra, inter) if v is not None]
        if links:
            out += f" --link {links[0] if len(set(links)) == 1 else ','.join(links)}"
        return out

    def describe(self) -> str:
        """``2 nodes x 4 H100-80GB (74.5 GiB), links 450 GB/s inside a node, 50 GB/s between``."""
        mem = f" ({format_bytes(self.memory_bytes)})" if self.memory_bytes else ""
        device = f"{self.devices_per_node} {self.device_name}{mem}"
        if not self.device_name:
            device = f"{self.devices_per_node} devices{mem}"
        elif mem == f" ({self.device_name})":
            device = f"{self.devices_per_node} devices of {self.device_name}"
        speed = f" @{self.speed:g}" if self.speed != 1.0 else ""
        links = f"{_bandwidth_text(self.intra_node_bytes_per_s)} inside a node"
        if self.nodes > 1:
            links += f", {_bandwidth_text(self.inter_node_bytes_per_s)} between"
        nodes = "1 node" if self.nodes == 1 else f"{self.nodes} nodes"
        return f"{nodes} x {device}{speed}, links {links}"

    def to_dict(self) -> dict[str, Any]:
        return write_record(self)

    @staticmethod
    def from_dict(raw: Any, where: str) -> "Cluster":
        return read_record(Cluster, Fields(raw, where))


def _number(x: float) -> str:
    """``x`` as decimal text that reads back as ``x`` (``1.5``; no exponent, which ``--devices`` does not read)."""
    text = f"{x:g}"
    return text if "e" not in text and float(text) == x else f"{x:.17f}".rstrip("0").rstrip(".")


def _size_text(n: int) -> str:
    """Bytes as ``--devices-per-node`` reads them back exactly: ``24GiB``, ``80GB``, else the count."""
    return f"{n // 2**30}GiB" if n % 2**30 == 0 else f"{n // 10**9}GB" if n % 10**9 == 0 else str(n)


def _rate_text(bytes_per_s: float) -> str:
    """Bytes per second as ``--link`` reads them back exactly: ``450GB/s``, else ``12345B/s``."""
    if bytes_per_s % 1e9 == 0:
        return f"{bytes_per_s / 1e9:.0f}GB/s"
    return f"{bytes_per_s:.0f}B/s" if bytes_per_s == int(bytes_per_s) else f"{_number(bytes_per_s)}B/s"


def _bandwidth_text(bytes_per_s: float | None) -> str:
    return "free" if bytes_per_s is None else f"{bytes_per_s / 1e9:.3g} GB/s"


_FILE_KEYS = ("nodes", "devices_per_node", "link")
_LINK_KEYS = ("intra_node", "inter_node")


def _devices(text: str, where: str) -> tuple[int, Device]:
    """``8xH100-80GB`` -> (8, the device): one entry of identical devices."""
    if "," in text or Path(text).suffix in (".json", ".toml"):
        raise AutopartError(f"{where} {text!r} must be one kind of device, like 8xH100-80GB or 4x16GiB@1.5")
    try:
        devices = parse_devices(text)
    except AutopartError as exc:
        raise AutopartError(f"{where} {text!r}: {exc}") from None
    return len(devices), devices[0]


def _bandwidth(value: Any, where: str) -> float:
    """A bandwidth as text (``450GB/s``) or a number of bytes per second."""
    if isinstance(value, str):
        try:
            return parse_bandwidth(value)
        except AutopartError as exc:
            raise AutopartError(f"{where}: {exc}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise AutopartError(f"{where} is {value!r}, must be a bandwidth like 450GB/s or a number of bytes/s > 0")
    return float(value)


def _links(text: str, where: str = "--link") -> tuple[float | None, float | None]:
    """``INTRA[,INTER]`` (``--link``, or a file's ``link``) -> bytes per second inside and between nodes."""
    parts = [part.strip() for part in text.split(",")]
    if len(parts) > 2 or not all(parts):
        raise AutopartError(f"{where} {text!r} is not INTRA[,INTER] like 450GB/s,50GB/s or 100GB/s")
    intra = _bandwidth(parts[0], f"{where} {text!r}")
    inter = _bandwidth(parts[1], f"{where} {text!r}") if len(parts) == 2 else intra
    return intra, inter


def _read_file(file: str) -> tuple[int, str, tuple[float | None, float | None], str]:
    """(nodes, devices_per_node text, links, where) from a ``.toml`` or ``.json`` cluster file."""
    path = Path(file)
    where = f"cluster file {file!r}"
    if path.suffix not in (".toml", ".json"):
        raise AutopartError(f"--cluster {file!r} must be a .toml or .json file")
    if path.suffix == ".json":
        raw: Any = load_json_file(path, "cluster")
    else:
        import tomllib

        if not path.exists():
            raise AutopartError(f"{where} does not exist")
        if path.is_dir():
            raise AutopartError(f"{where} is a directory")
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            raise AutopartError(f"cannot read {where}: {exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise AutopartError(f"{where} is not valid TOML: {exc}") from None
    f = Fields(raw, where)
    unknown = sorted(set(f.obj) - set(_FILE_KEYS))
    if unknown:
        raise AutopartError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(_FILE_KEYS)})")
    nodes = f.integer("nodes", required=False, default=1, minimum=1)
    per_node = f.string("devices_per_node")
    link = f.obj.get("link")
    if link is None:
        return nodes, per_node, (None, None), where
    if isinstance(link, str):
        return nodes, per_node, _links(link, f.at("link")), where
    if not isinstance(link, dict):
        raise AutopartError(f"{where}: link must be a table with intra_node and inter_node, or a string like "
                            f"'450GB/s,50GB/s', got {link!r}")
    links = Fields(link, f.at("link"))
    unknown = sorted(set(links.obj) - set(_LINK_KEYS))
    if unknown:
        raise AutopartError(f"{where}: unknown key link.{unknown[0]} (known: link.intra_node, link.inter_node)")
    if "intra_node" not in links.obj:
        raise AutopartError(f"{where}: link needs intra_node (the bandwidth inside a node)")
    intra = _bandwidth(links.obj["intra_node"], f"{where}: link.intra_node")
    inter = _bandwidth(links.obj["inter_node"], f"{where}: link.inter_node") if "inter_node" in links.obj else intra
    return nodes, per_node, (intra, inter), where


def parse_cluster(nodes: int | None, devices_per_node: str | None, link: str | None,
                  file: str | None) -> Cluster | None:
    """The cluster from ``--nodes N --devices-per-node 8xH100-80GB --link 450GB/s,50GB/s`` or from
    ``--cluster FILE.toml|.json``; None when none of them is given. Bad values: :class:`AutopartError`."""
    flags = [name for name, value in (("--nodes", nodes), ("--devices-per-node", devices_per_node),
                                      ("--link", link)) if value is not None]
    if file is not None:
        if flags:
            raise AutopartError(f"--cluster {file!r} and {' '.join(flags)} together: give the cluster one way")
        count, per_node, (intra, inter), where = _read_file(file)
        what = f"{where}: devices_per_node"
    elif not flags:
        return None
    else:
        if devices_per_node is None:
            raise AutopartError(f"{' '.join(flags)} needs --devices-per-node (like 8xH100-80GB)")
        if nodes is not None and (isinstance(nodes, bool) or not isinstance(nodes, int) or nodes < 1):
            raise AutopartError(f"--nodes {nodes!r} must be an integer >= 1")
        count, per_node = (1 if nodes is None else nodes), devices_per_node
        intra, inter = _links(link) if link is not None else (None, None)
        what = "--devices-per-node"
    per_node_count, device = _devices(per_node, what)
    return Cluster(nodes=count, devices_per_node=per_node_count, device_name=device.name,
                   memory_bytes=device.memory_bytes, speed=device.speed,
                   intra_node_bytes_per_s=intra, inter_node_bytes_per_s=inter)
