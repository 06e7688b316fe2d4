"""``autopart partition`` on a cluster (issue 20): it picks the pipeline depth and the replicas itself, says
why, writes a plan ``simulate`` reads, and refuses bad flags with one line."""
from __future__ import annotations

import json

from pathlib import Path

import pytest

from autopart.formats.plan import Plan
from conftest import assert_one_line_error, run_cli_here

ROOT = Path(__file__).resolve().parent.parent
TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")
DONE_WHEN = ("partition", TINY, "--nodes", "2", "--devices-per-node", "2x24GiB", "--global-batch", "8")


def test_a_cluster_gets_depth_and_replicas_chosen_with_a_what_if_table(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = run_cli_here(*DONE_WHEN, "--link", "10GB/s,100MB/s", "-o", str(out))
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "what if:" in text and "why it loses" in text and "chosen:" in text
    assert "placement (" in text and "replica 1:" in text
    plan = Plan.from_json(out)
    assert plan.world_size == 4 and plan.num_ranks * plan.data_parallel == 4
    assert plan.cluster is not None and plan.cluster.inter_node_bytes_per_s == 1e8
    assert plan.cluster.memory_bytes == 24 * 2**30 and plan.microbatches * plan.microbatch_size * plan.data_parallel == 8
    assert len({r for row in plan.mesh() for r in row}) == 4
    best_row = next(line for line in text.split("what if:")[1].splitlines() if "best" in [cell.strip() for cell in line.split("│")])
    assert f"{plan.num_ranks}x{plan.data_parallel}" in best_row and plan.schedule in best_row
    if plan.data_parallel > 1:
        assert plan.features == ("data_parallel",)
        sim = run_cli_here("simulate", str(out))
        assert sim.returncode == 0, sim.stderr
        assert f"data parallel: {plan.data_parallel} replicas of this pipeline on 4 ranks" in sim.stdout


def test_the_done_when_command_and_json_output() -> None:
    result = run_cli_here(*DONE_WHEN, "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert plan.num_ranks * plan.data_parallel == 4 and plan.cluster is not None
    pinned = run_cli_here(*DONE_WHEN, "--data-parallel", "2", "--format", "json")
    assert Plan.from_dict(json.loads(pinned.stdout)).data_parallel == 2
    deep = run_cli_here(*DONE_WHEN, "--stages", "4", "--format", "json")
    assert Plan.from_dict(json.loads(deep.stdout)).num_ranks == 4


def test_a_cluster_file_is_the_same_cluster(tmp_path: Path) -> None:
    toml = tmp_path / "cluster.toml"
    toml.write_text('nodes = 2\ndevices_per_node = "2x24GiB"\n[link]\nintra_node = "10GB/s"\ninter_node = "100MB/s"\n')
    a = run_cli_here("partition", TINY, "--cluster", str(toml), "--global-batch", "8", "--format", "json")
    b = run_cli_here(*DONE_WHEN, "--link", "10GB/s,100MB/s", "--format", "json")
    assert a.returncode == 0 and b.returncode == 0, (a.stderr, b.stderr)
    pa, pb = (Plan.from_dict(json.loads(r.stdout)) for r in (a, b))
    assert (pa.num_ranks, pa.data_parallel, pa.balance, pa.predicted) == (pb.num_ranks, pb.data_parallel, pb.balance,
                                                                         pb.predicted)


@pytest.mark.parametrize("extra, fragments", [
    (("--devices", "4x24GiB"), ("--devices with a cluster", "the cluster gives the devices")),
    (("--data-parallel", "3"), ("data parallel 3 does not divide the cluster's 4 devices",)),
    (("--data-parallel", "4", "--global-batch", "6"), ("global batch 6 is not divisible by 4 replicas",)),
    (("--bandwidth", "1GB/s"), ("--bandwidth with a cluster", "--link")),
    (("--stages", "3"), ("3 stages do not divide the cluster's 4 devices",)),
])
def test_bad_cluster_flags_are_one_line(extra: tuple[str, ...], fragments: tuple[str, ...]) -> None:
    assert_one_line_error(run_cli_here(*DONE_WHEN, *extra), *fragments)


def test_data_parallel_needs_a_cluster() -> None:
    assert_one_line_error(run_cli_here("partition", TINY, "--stages", "2", "--data-parallel", "2"),
                          "--data-parallel needs a cluster")
    assert_one_line_error(run_cli_here("partition", TINY, "--nodes", "2", "--global-batch", "8"),
                          "--nodes needs --devices-per-node (like 8xH100-80GB)")


def test_without_a_global_batch_each_device_gets_the_profiles_micro_batch() -> None:
    result = run_cli_here("partition", TINY, "--nodes", "2", "--devices-per-node", "2x24GiB", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = Plan.from_dict(json.loads(result.stdout))
    assert plan.data_parallel * plan.microbatches * (plan.microbatch_size or 0) == 4 * 4  # gpt2-tiny's mb 4 x 4
    table = run_cli_here("partition", TINY, "--nodes", "2", "--devices-per-node", "2x24GiB")
    assert "note: global batch 16: the profile's micro-batch of 4 on each of the 4 devices" in table.stdout
