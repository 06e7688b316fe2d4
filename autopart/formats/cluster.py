"""The machines a plan runs on: nodes of identical devices and the links between them.

    --nodes 4 --devices-per-node 8xH100-80GB --link 450GB/s,50GB/s
    --cluster cluster.toml

Bandwidths are per device and per direction: inside a node (NVLink), between
nodes (each device's own network port, as on H100 nodes with one NIC per
GPU). A ring all-reduce over a group runs at the slowest link it crosses.
Ranks are numbered as torchrun numbers them: node by node, ``rank = node *
devices_per_node + local_rank``. Pure standard library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.jsonfields import Fields
from autopart.formats.record import read_record, saved, write_record

__all__ = ["Cluster"]


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

    def to_dict(self) -> dict[str, Any]:
        return write_record(self)

    @staticmethod
    def from_dict(raw: Any, where: str) -> "Cluster":
        return read_record(Cluster, Fields(raw, where))
