"""Data parallel x pipeline on real torchrun/gloo processes: 2 replicas x 2 stages on 4 ranks train what one
process does on the whole global batch (tied weights included), through ``autopart train`` too, on one launcher
or two torchrun agents as two nodes, and resume from a checkpoint one replica wrote. (A rank of the second replica
killed and restarted: tests/test_faults.py.)"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.formats.plan import Plan
from autopart.run.build import build_model
from autopart.run.checkpoint import load_stages, merge_checkpoint
from autopart.measure.spec import call_model, load_model
from autopart.run.data import default_corpus_files, training_data
from autopart.run.streams import BlockStreams
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here, run_two_agents
from tests.helpers import plan_for

MODELS = str(ROOT / "tests" / "graph_models.py")
TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("AUTOPART_TRACEBACK", None)
    return env


def _replicated(plan: Plan, path: Path, data_parallel: int = 2,
                placement: tuple[tuple[int, ...], ...] = ()) -> Plan:
    """``plan`` as ``data_parallel`` replicas (what ``partition --data-parallel`` will write), saved to ``path``."""
    out = dataclasses.replace(plan, data_parallel=data_parallel, placement=placement)
    out.to_json(path)
    return Plan.from_json(path)


def test_replicas_draw_the_masks_of_one_pipeline_of_all_their_microbatches() -> None:
    """Replica d's micro-batch m draws as micro-batch d*M+m of one pipeline running the whole global batch."""
    def mask(streams: BlockStreams, microbatch: int) -> torch.Tensor:
        streams.microbatch = microbatch
        streams.enter(3)
        return torch.rand(16)

    one, second = BlockStreams(7, torch.device("cpu"), 2), BlockStreams(7, torch.device("cpu"), 2, first_microbatch=2)
    assert torch.equal(mask(second, 0), mask(one, 2)) and torch.equal(mask(second, 1), mask(one, 3))
    assert not torch.equal(mask(second, 0), mask(one, 0))


GRAD_CASES = [  # schedule, bucket bytes, balance, stages per rank, micro-batches, replicas, placement
    ("GPipe", "", [3, 3], 1, 2, 2, ()),
    ("1F1B", "4096", [3, 3], 1, 2, 2, ((0, 1), (3, 2))),  # replica 1's pipeline on descending ranks
    ("Interleaved1F1B", "", [2, 1, 1, 2], 2, 4, 1, ((1, 0),)),  # one replica, not on ranks 0, 1 in order
    ("ZBVZeroBubble", "", [2, 1, 1, 2], 2, 4, 2, ((1, 0), (2, 3))),  # wte and the head tied on one rank (the V)
]


@pytest.mark.parametrize("schedule, bucket_bytes, balance, per_rank, microbatches, data_parallel, placement",
                         GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
@pytest.mark.slow
def test_replicas_of_a_pipeline_equal_one_process(schedule: str, bucket_bytes: str, balance: list[int],
                                                  per_rank: int, microbatches: int, data_parallel: int,
                                                  placement: tuple[tuple[int, ...], ...], tmp_path: Path) -> None:
    """Replicas of a pipeline of a Hugging Face GPT-2 whose embedding is tied to its head (so a tied weight's
    gradient is summed between its pipeline holders, on two ranks or two stages of one rank, and averaged over the
    replicas), each on the ranks the plan's placement says, ascending or not: the loss and every gradient, on every
    replica, equal one process's on the whole global batch; with one all-reduce bucket per stage, and with buckets
    of 4 KiB (many: a bucket closes at the first parameter that fills it)."""
    pytest.importorskip("transformers")
    spec = f"{MODELS}:hf_gpt2"
    one = plan_for(spec, balance, schedule, microbatches, tmp_path / "one.json", per_rank=per_rank)
    plan = _replicated(one, tmp_path / "plan.json", data_parallel, placement)
    world = plan.world_size
    g = torch.Generator().manual_seed(1)
    rows = plan.data_parallel * microbatches * 2
    inputs, target = (torch.randint(0, 256, (rows, 16), generator=g),), torch.randint(0, 256, (rows, 16), generator=g)
    torch.save((inputs, target), tmp_path / "batch.pt")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(world), str(ROOT / "tests" / "dp_grad_check.py"), str(tmp_path / "plan.json"), spec,
                             str(tmp_path), str(tmp_path / "batch.pt"), bucket_bytes],
                            cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    torch.manual_seed(0)
    bundle = load_model(spec)
    assert bundle.loss_fn is not None
    model = bundle.module.train()
    loss = bundle.loss_fn(call_model(model, list(inputs), bundle.input_names), target)  # the whole batch's mean
    loss.backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert [(r["replica"], r["pipeline_rank"]) for r in ranks] == [plan.position_of(r) for r in range(world)]
    for replica in range(data_parallel):
        mine = [r for r in ranks if r["replica"] == replica]
        got = {name: grad for r in mine for name, grad in r["grads"].items()}
        assert {id(model.get_parameter(n)) for n in got} == {id(p) for p in model.parameters()}
        for name, grad in got.items():
            want = model.get_parameter(name).grad
            assert want is not None
            torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * scale, msg=f"replica {replica}: {name}")
    last = [r for r in ranks if r["losses"]]
    assert len(last) == data_parallel and all(len(r["losses"]) == microbatches for r in last)
    for r in last:
        assert r["mean"] == pytest.approx(float(loss.detach()), rel=1e-5)
    if data_parallel == 2:
        assert last[0]["losses"] != last[1]["losses"]  # each replica ran its own rows
        masks = {r["replica"]: r["mask"] for r in ranks if r["pipeline_rank"] == 0}
        assert not torch.equal(masks[0], masks[1])  # dropout would draw other masks on the other replica's rows


@pytest.mark.slow
def test_gradients_some_replicas_lack_are_averaged_as_zeros_in_float32(tmp_path: Path) -> None:
    """3 gloo ranks as 3 replicas: a gradient only replica 0 has is averaged with zeros on the others and every
    replica ends with it; one no replica has stays None everywhere; bf16 gradients are summed in float32 (a bf16
    ring sum of 3 rounds twice: 11 to 24 of these 64 values differ, in whichever order); a float32 gradient larger
than a bucket ends in its own tensor (that it was not copied is not observable here: the old code copied back)."""
    from tests.dp_average_check import gradients

    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "3",
                             str(ROOT / "tests" / "dp_average_check.py"), str(tmp_path)],
                            cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    given = [gradients(r) for r in range(3)]
    for r in range(3):
        got = torch.load(tmp_path / f"rank{r}.pt")
        assert got["big_in_place"]
        grads = got["grads"]
        assert grads["c"] is None
        for name in ("a", "b", "big", "h"):
            parts = [g[name] for g in given]
            want = sum((torch.zeros(3) if x is None else x.float()) for x in parts) / 3
            assert grads[name].dtype == next(x for x in parts if x is not None).dtype, name
            if name in ("b", "h"):  # exact: g + 0 + 0, and bf16 values' float32 sums (in any order) are exact
                assert torch.equal(grads[name], want.to(grads[name].dtype)), (r, name)
            else:  # float32 sums, in the ring's order
                torch.testing.assert_close(grads[name], want, rtol=1e-6, atol=1e-7, msg=f"rank {r}: {name}")


def _assert_same_state(got: Any, want: Any, where: str) -> None:
    """An optimizer's state as another run of the same steps has it: each tensor within a thousandth of its largest
    value (sums in another order, by the all-reduce), everything else equal."""
    if isinstance(want, torch.Tensor):
        scale = float(want.abs().max()) if want.numel() else 0.0
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * scale, msg=where)
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), where
        for key, value in want.items():
            _assert_same_state(got[key], value, f"{where}[{key!r}]")
    elif isinstance(want, (list, tuple)):
        assert isinstance(got, type(want)) and len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_same_state(a, b, f"{where}[{i}]")
    else:
        assert got == want, (where, got, want)


def _losses(path: Path) -> list[float]:
    return [float(v) for v in json.loads(path.read_text())["losses"]]


@pytest.mark.slow
def test_train_two_replicas_on_one_launcher_and_two_nodes_and_resume(tmp_path: Path) -> None:
    """``autopart train`` of 2 replicas x 2 stages (gpt2-tiny, 2 micro-batches each) trains the losses of the same
    split as one pipeline of 4 micro-batches on the same global batch of 16: on one launcher (each replica's
    pipeline inside a node); on two torchrun agents as two nodes, each pipeline across the nodes; and resumed from
    a checkpoint the one-pipeline run wrote. The one-pipeline run's held-out loss every 2 steps (--eval-batches 2: the
    mean of the 2 batches' losses) is one process's with the weights of that step's checkpoint (this was
    tests/test_eval.py's own 2-rank run); the replicas' (each
    evaluates its share) is the one-pipeline run's. And back: the 2-replica run's checkpoint is the one-pipeline
    run's (the same stage files, values within float error), so the one-pipeline plan resumes from it as from its
    own. Checkpoints are written once per stage."""
    one, two = tmp_path / "one.json", tmp_path / "two.json"
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "4", "-o", str(one))
    assert made.returncode == 0, made.stderr
    made = run_cli_here("partition", TINY, "--nodes", "2", "--devices-per-node", "2x24GiB", "--stages", "2",
                        "--schedule", "1F1B", "--microbatches", "2", "--global-batch", "16", "-o", str(two))
    assert made.returncode == 0, made.stderr
    single, half = Plan.from_json(one), Plan.from_json(two)
    assert half.balance == single.balance and half.microbatch_size == single.microbatch_size == 4
    assert half.data_parallel == 2 and half.mesh() == [[0, 1], [2, 3]]  # free links: each pipeline inside a node
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(b"".join(f.read_bytes() for f in default_corpus_files()[:200])[:44_000])
    assert corpus.stat().st_size == 44_000  # 2,200 bytes held out: 33 windows of 65, 2 batches of 16 need 32
    common = ("--model", "gpt2-tiny", "--steps", "3", "--lr", "0.01", "--data", str(corpus), "--eval-every", "2",
              "--eval-batches", "2")

    reference = run_cli("train", str(one), *common, "--checkpoint", str(tmp_path / "ck1"), "--checkpoint-every", "2",
                        "--report", str(tmp_path / "r1.json"))
    assert reference.returncode == 0, reference.stderr[-3000:]
    expected = _losses(tmp_path / "r1.json")
    assert len(expected) == 3
    # the held-out loss, every 2 steps and after the last: one process's, with the weights of that step's checkpoint
    evals = json.loads((tmp_path / "r1.json").read_text())["eval_losses"]
    assert [e["step"] for e in evals] == [2, 3]
    said = [line for line in reference.stderr.splitlines() if line.startswith("eval after step")]
    assert said == [f"eval after step {e['step']}: loss {e['loss']:.4f} (2 batches of 16, held out)" for e in evals]
    bundle = build_model("gpt2-tiny", 0)
    assert bundle.loss_fn is not None
    held = training_data(bundle, str(corpus), 16, tuple(single.sample_shape[1:]), 0, 0, eval_batches=2).held_out
    assert held is not None and len(held) == 2
    model = bundle.module.eval()
    for e in evals:  # the mean over the 2 held-out batches (they differ: neither alone is the mean)
        model.load_state_dict(merge_checkpoint(tmp_path / "ck1" / f"step-{e['step']:06d}"))
        with torch.no_grad():
            each = [float(bundle.loss_fn(call_model(model, [x], bundle.input_names), y)) for x, y in held]
        assert abs(each[0] - each[1]) > 1e-3 and e["loss"] == pytest.approx(sum(each) / 2, abs=1e-5), (e, each)

    launched = run_cli("train", str(two), *common, "--checkpoint", str(tmp_path / "ck2"), "--checkpoint-every", "2",
                       "--report", str(tmp_path / "r2.json"), "--replan", str(tmp_path / "re.json"))
    assert launched.returncode == 0, launched.stderr[-3000:]
    again = Plan.from_json(tmp_path / "re.json")  # re-planned for the same 2 replicas on the same cluster
    assert (again.data_parallel, again.cluster, again.mesh(), again.num_ranks) == (2, half.cluster, half.mesh(), 2)
    assert "(all-reduce over 2 replicas: " in launched.stderr
    assert "2 stages on 2 ranks x 2 data-parallel replicas" in launched.stderr
    assert "(16 per step, 8 per replica)" in launched.stderr
    assert _losses(tmp_path / "r2.json") == pytest.approx(expected, rel=1e-5)
    report = json.loads((tmp_path / "r2.json").read_text())
    assert [e["step"] for e in report["eval_losses"]] == [2, 3]
    assert [e["loss"] for e in report["eval_losses"]] == pytest.approx([e["loss"] for e in evals], rel=1e-5)
    assert launched.stderr.count("eval after step 2:") == launched.stderr.count("eval after step 3:") == 1
    assert report["data_parallel"] == 2 and report["ranks"] == 2 and report["global_batch"] == 16
    assert [r["rank"] for r in report["ranks_detail"]] == [0, 1]
    assert sorted(p.name for p in (tmp_path / "ck2" / "step-000003").iterdir()) == ["COMPLETE", "stage-0.pt",
                                                                                      "stage-1.pt"]
    assert launched.stderr.count("step 3/3") == 1  # one line per step, from one rank
    assert "data parallel: 2 replicas of this pipeline; the rows are replica 0's ranks" in launched.stdout

    # resumed: the 2-replica plan from the 1-replica plan's checkpoint of step 2 goes on with its step 3
    shutil.copytree(tmp_path / "ck1", tmp_path / "ck3")
    shutil.rmtree(tmp_path / "ck3" / "step-000003")
    resumed = run_cli("train", str(two), *common, "--checkpoint", str(tmp_path / "ck3"), "--report",
                      str(tmp_path / "r3.json"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming after step 2" in resumed.stderr and "warning: the plan changed" not in resumed.stderr
    assert _losses(tmp_path / "r3.json") == pytest.approx(expected[2:], rel=1e-5)
    # and back: the 2-replica run's checkpoint of step 2 holds what the one-pipeline run's does, stage file by
    # stage file (weights, optimizer state, the stages its writer held), so the one-pipeline plan restores it as
    # its own checkpoint (a resume on the plan that wrote it is test_faults' killed-rank restart)
    mine, theirs = load_stages(tmp_path / "ck2" / "step-000002"), load_stages(tmp_path / "ck1" / "step-000002")
    assert [(f["step"], f["stage"], f["rank"], f["local_stages"]) for f in mine] == \
        [(f["step"], f["stage"], f["rank"], f["local_stages"]) for f in theirs] == [(2, 0, 0, [0]), (2, 1, 1, [1])]
    for ours, wanted in zip(mine, theirs):
        assert ours["model"].keys() == wanted["model"].keys() and ours["aliases"] == wanted["aliases"]
        for name, value in wanted["model"].items():  # two AdamW steps of 0.01: within 1% of a step
            torch.testing.assert_close(ours["model"][name], value, rtol=0, atol=1e-4, msg=name)
        _assert_same_state(ours["optimizer"], wanted["optimizer"], f"stage {wanted['stage']}'s optimizer")
    # what restore_pipeline (autopart/run/resume.py) asks of a checkpoint before it restores the optimizer state
    # instead of warning "the plan changed": per rank of the one-pipeline plan, the file of its first stage lists
    # the rank's own stages and holds optimizer state, and there is one file per stage of the plan
    assert len(mine) == single.num_stages
    for rank in range(single.num_ranks):
        ours_stages = single.stages_of(rank)
        assert mine[ours_stages[0]]["local_stages"] == ours_stages and mine[ours_stages[0]]["optimizer"] is not None

    # two nodes, each pipeline across them (each inside one node is the one-launcher run's mesh above)
    across = _replicated(half, tmp_path / "across.json", placement=((0, 2), (1, 3)))
    assert across.mesh() == [[0, 2], [1, 3]]
    results = run_two_agents(tmp_path, 2, "train", str(tmp_path / "across.json"), *common)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    reports = [tmp_path / f"node{n}.json" for n in range(2) if (tmp_path / f"node{n}.json").exists()]
    assert len(reports) == 1  # written once, by replica 0's last stage, on whichever node it ran
    assert _losses(reports[0]) == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_world_size_other_than_the_plans_replicas_is_refused(tmp_path: Path) -> None:
    """Under a user's torchrun, a 2 x 2 plan started on 2 processes: one line, the numbers, exit code 2 per rank."""
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(tmp_path / "one.json"))
    assert made.returncode == 0, made.stderr
    _replicated(Plan.from_json(tmp_path / "one.json"), tmp_path / "plan.json")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "autopart", "train", str(tmp_path / "plan.json"), "--model", "gpt2-tiny",
                             "--steps", "1"], cwd=tmp_path, env=_env(), text=True, capture_output=True, timeout=300)
    # torchrun's own exit code and failure summary (its traceback, not ours) follow autopart's one line
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("autopart train:")]
    assert ours == ["autopart train: error: the plan has 2 stages on 2 ranks (1 per rank) x 2 data-parallel replicas "
                    "= 4 ranks but 2 processes were started"], result.stderr
    assert "autopart/run" not in result.stderr and "autopart/cli" not in result.stderr  # no frames of ours


def test_global_batch_not_divisible_by_replicas_times_microbatches(tmp_path: Path) -> None:
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(tmp_path / "one.json"))
    assert made.returncode == 0, made.stderr
    _replicated(Plan.from_json(tmp_path / "one.json"), tmp_path / "plan.json")
    result = run_cli_here("train", str(tmp_path / "plan.json"), "--model", "gpt2-tiny", "--global-batch", "6")
    assert result.returncode == 2, result.stderr
    assert "global batch 6 is not divisible by the plan's 2 data-parallel replicas x 2 micro-batches = 4" in \
        result.stderr


def test_placement_that_is_not_a_permutation_is_refused(tmp_path: Path) -> None:
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(tmp_path / "one.json"))
    assert made.returncode == 0, made.stderr
    raw = json.loads((tmp_path / "one.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**raw, "data_parallel": 2, "placement": [[0, 1], [1, 3]],
                                                    "features": ["data_parallel"]}))
    result = run_cli_here("train", str(tmp_path / "plan.json"), "--model", "gpt2-tiny")
    assert result.returncode == 2, result.stderr
    assert "placement [[0, 1], [1, 3]] is not 2 replicas x 2 ranks numbering ranks 0..3 once each" in result.stderr


def test_the_replan_command_of_a_cluster_plan_makes_it_again_at_another_size(tmp_path: Path) -> None:
    """``partition_command`` (what ``train --global-batch`` tells to run) of a 2 x 2 plan on a cluster keeps the
    cluster, its links, the replicas and the depth, at the global batch of the new micro-batch size."""
    import shlex

    from autopart.run.microbatch import partition_command

    small = str(ROOT / "profiles" / "gpt2-small-cpu-mb1-2-4-8.json")
    made = run_cli_here("partition", small, "--nodes", "2", "--devices-per-node", "2x24GiB", "--link",
                        "450GB/s,50GB/s", "--stages", "2", "--schedule", "1F1B", "--microbatches", "2",
                        "--global-batch", "16", "-o", str(tmp_path / "p4.json"))
    assert made.returncode == 0, made.stderr
    at4 = Plan.from_json(tmp_path / "p4.json")
    assert at4.data_parallel == 2 and at4.microbatch_size == 4 and at4.cluster is not None
    command = partition_command(at4, 2, small)
    assert command.startswith(f"autopart partition {small} --nodes 2 --devices-per-node 2x24GiB --link "
                              "450GB/s,50GB/s --data-parallel 2 --stages 2 --schedule 1F1B --microbatches 2 "
                              "--global-batch 8"), command
    args = shlex.split(command)[1:]
    args[args.index("-o") + 1] = str(tmp_path / "p2.json")
    again = run_cli_here(*args)
    assert again.returncode == 0, again.stderr
    at2 = Plan.from_json(tmp_path / "p2.json")
    assert (at2.cluster, at2.data_parallel, at2.num_ranks, at2.schedule, at2.microbatches, at2.microbatch_size) == \
        (at4.cluster, 2, 2, "1F1B", 2, 2)


def test_replan_of_replicas_on_a_cluster_keeps_them_and_prices_the_allreduce(tmp_path: Path) -> None:
    """``train --replan`` of a 2 x 2 plan on a cluster with links: the joint planner with K, D and M pinned, on the
    plan's own placement (one the planner would not pick, too), the all-reduce in the predicted step; from the
    plan's own profile it predicts the plan's step. Without a cluster the replicas and placement are kept."""
    from autopart.formats.profile import Profile
    from autopart.run.replan import replan

    made = run_cli_here("partition", TINY, "--nodes", "2", "--devices-per-node", "2x24GiB", "--link",
                        "1GB/s,100MB/s", "--stages", "2", "--schedule", "1F1B", "--microbatches", "2",
                        "--global-batch", "16", "-o", str(tmp_path / "p.json"))
    assert made.returncode == 0, made.stderr
    plan, profile = Plan.from_json(tmp_path / "p.json"), Profile.from_json(TINY)
    assert plan.data_parallel == 2 and plan.predicted.allreduce_ms > 0
    again = replan(plan, profile, 4)
    assert (again.data_parallel, again.cluster, again.placement, again.num_ranks, again.microbatches) == \
        (2, plan.cluster, plan.placement, 2, 2)
    assert again.predicted.allreduce_ms == pytest.approx(plan.predicted.allreduce_ms)
    assert again.predicted.step_ms == pytest.approx(plan.predicted.step_ms)
    other = tuple(tuple(sorted(row)) for row in zip(*plan.mesh()))  # rows become columns: the other layout
    assert other != tuple(tuple(row) for row in plan.mesh())
    moved = replan(dataclasses.replace(plan, placement=other), profile, 4)
    assert moved.placement == other and moved.predicted.allreduce_ms != pytest.approx(plan.predicted.allreduce_ms)
    free = replan(dataclasses.replace(plan, cluster=None, placement=((1, 0), (3, 2))), profile, 4)
    assert free.data_parallel == 2 and free.placement == ((1, 0), (3, 2)) and free.cluster is None


@pytest.mark.parametrize("cluster, fragment", [
    ({"nodes": 2, "devices_per_node": 4}, "its cluster has 2 nodes x 4 devices = 8, but the plan runs on 2 replicas "
                                          "x 2 ranks = 4"),
    ({"nodes": 2, "devices_per_node": 2, "speed": 0}, "cluster speed must be > 0 (relative to the profiled device), "
                                                      "got 0"),
])
def test_a_cluster_that_disagrees_with_the_plan_is_refused(cluster: dict[str, int], fragment: str,
                                                           tmp_path: Path) -> None:
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(tmp_path / "one.json"))
    assert made.returncode == 0, made.stderr
    raw = json.loads((tmp_path / "one.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**raw, "data_parallel": 2, "cluster": cluster,
                                                    "features": ["data_parallel"]}))
    result = run_cli_here("train", str(tmp_path / "plan.json"), "--model", "gpt2-tiny")
    assert_one_line_error(result, fragment)
