"""Bad input as a new user meets it (issue #11, item 5): one line on stderr and exit code 2, before any rank
starts. No case trains: each fails in the checks a command runs first, so most run the command's ``main`` in
this process (``run_cli_here``); those whose failure used to reach past Python (C++ frames), or that need
another working folder, run a real process."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from autopart.run.checkpoint import mark_complete, save_stage
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here
from tests.helpers import bound_by_permissions

TINY = ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """gpt2-tiny on 2 ranks, 1F1B, 2 micro-batches."""
    out = tmp_path_factory.mktemp("bad") / "plan.json"
    made = run_cli("partition", str(TINY), "--stages", "2", "--microbatches", "2", "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


# --- train --checkpoint and --timeout ---------------------------------------------------------------------------

def test_checkpoint_at_a_file_or_under_one(plan: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--checkpoint", str(afile)),
                          f"--checkpoint '{afile}' is a file, not a folder")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--checkpoint", str(afile / "ckpt")),
                          f"--checkpoint '{afile / 'ckpt'}': cannot create the folder: Not a directory")


def test_checkpoint_in_a_folder_without_write_permission(plan: Path, tmp_path: Path) -> None:
    # root writes anywhere (and CI runs as root): there the command runs without root's override of permissions
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    result = bound_by_permissions(lambda: run_cli_here("train", str(plan), "--model", "gpt2-tiny",
                                                       "--checkpoint", str(locked / "ckpt")))
    assert_one_line_error(result, f"--checkpoint '{locked / 'ckpt'}': cannot create the folder: Permission denied")
    assert os.listdir(locked) == []


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf"])
def test_timeout_must_be_positive_and_finite(plan: Path, timeout: str) -> None:
    # a real process: the C++ frames c10d printed for --timeout 0 went to the process's stderr, past Python
    assert_one_line_error(run_cli("train", str(plan), "--model", "gpt2-tiny", "--timeout", timeout),
                          "--timeout must be > 0 seconds", f"got {float(timeout):g}")


# --- damaged checkpoints: merge-checkpoint and resuming name the file -------------------------------------------

def _truncate(file: Path) -> None:
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _garbage(file: Path) -> None:
    file.write_bytes(b"garbage\n" * 100)


def _wrong_content(file: Path) -> None:
    torch.save({"weights": torch.zeros(3)}, file)


def _other_stage(file: Path) -> None:
    file.write_bytes((file.parent / "stage-0.pt").read_bytes())


DAMAGE: list[tuple[Callable[[Path], None], str]] = [
    (_truncate, "is damaged: RuntimeError: PytorchStreamReader failed reading zip archive"),
    (_garbage, "is damaged: not a torch.save archive"),
    (_wrong_content, "is not a stage file autopart wrote: it lacks 'step', 'stage', 'model'"),
    (_other_stage, "is not a stage file autopart wrote: it holds stage 0, not 1"),
]


def _damaged_checkpoint(root: Path, damage: Callable[[Path], None]) -> Path:
    """A complete step 1 of two stages whose stage-1.pt ``damage`` spoiled; that file."""
    for stage in (0, 1):
        save_stage(root, 1, stage, {f"w{stage}": torch.ones(4)}, {"state": {}, "param_groups": []}, stage, [stage])
    mark_complete(root, 1, 2)
    file = root / "step-000001" / "stage-1.pt"
    damage(file)
    return file


@pytest.mark.parametrize("damage, fragment", DAMAGE, ids=[d.__name__.strip("_") for d, _ in DAMAGE])
def test_merge_names_the_damaged_stage_file(tmp_path: Path, damage: Callable[[Path], None], fragment: str) -> None:
    file = _damaged_checkpoint(tmp_path / "ckpt", damage)
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.pt")),
                          f"checkpoint file '{file}'", fragment)
    assert not (tmp_path / "m.pt").exists()


@pytest.mark.parametrize("damage, fragment", DAMAGE[:3], ids=[d.__name__.strip("_") for d, _ in DAMAGE[:3]])
def test_resuming_from_a_damaged_checkpoint_is_refused_before_the_ranks_start(
        plan: Path, tmp_path: Path, damage: Callable[[Path], None], fragment: str) -> None:
    file = _damaged_checkpoint(tmp_path / "ckpt", damage)
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--checkpoint", str(tmp_path / "ckpt")),
                          "autopart train: error: checkpoint file", f"'{file}'", fragment)


def test_a_damaged_complete_marker_is_named(tmp_path: Path) -> None:
    _damaged_checkpoint(tmp_path / "ckpt", lambda file: None)
    marker = tmp_path / "ckpt" / "step-000001" / "COMPLETE"
    marker.write_text('{"step": 1, "num_stages": "two"}')
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.pt")),
                          f"checkpoint marker '{marker}' is damaged: num_stages is 'two'")


# --- numbers no device can have ---------------------------------------------------------------------------------

def _edited(tmp_path: Path, source: Path, edit: Callable[[dict[str, Any]], None]) -> Path:
    data = json.loads(source.read_text())
    edit(data)
    out = tmp_path / f"edited-{source.name}"
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("field, value, fragment", [
    ("forward_ms", 1e308, "forward_ms 1e+308 is not a plausible time (> 1e9 ms = 11.6 days)"),
    ("backward_ms", 2e9, "backward_ms 2e+09 is not a plausible time"),
    ("optimizer_ms", 1e10, "optimizer_ms 1e+10 is not a plausible time"),
    ("param_bytes", 10**30, "param_bytes 1e+30 is not a plausible size (> 2**50 bytes = 1 PiB)"),
    ("activation_bytes", 2**51, "activation_bytes 2.2518e+15 is not a plausible size"),
    ("output_bytes", 10**20, "output_bytes 1e+20 is not a plausible size"),
])
@pytest.mark.parametrize("limit", [[], ["--memory-limit", "1GiB"]], ids=["no-limit", "limit"])
def test_a_profile_with_impossible_numbers_is_refused(tmp_path: Path, field: str, value: float, fragment: str,
                                                      limit: list[str]) -> None:
    profile = _edited(tmp_path, TINY, lambda d: d["layers"][4].update({field: value}))
    assert_one_line_error(run_cli_here("partition", str(profile), "--stages", "2", *limit),
                          f"profile '{profile}': layers[4] (block 'h.3'): {fragment}")


@pytest.mark.parametrize("field, value, fragment", [
    ("memory_bytes", 10**30, "stages[1]: memory_bytes 1e+30 is not a plausible size (> 2**60 bytes = 1 EiB)"),
    ("forward_ms", 1e300, "stages[1]: forward_ms 1e+300 is not a plausible time (> 1e12 ms = 31.7 years)"),
])
def test_a_plan_with_impossible_numbers_is_refused(plan: Path, tmp_path: Path, field: str, value: float,
                                                   fragment: str) -> None:
    edited = _edited(tmp_path, plan, lambda d: d["stages"][1].update({field: value}))
    assert_one_line_error(run_cli_here("simulate", str(edited)), f"plan '{edited}': {fragment}")


# --- profile: --microbatch-size, a folder as the model ----------------------------------------------------------

@pytest.mark.parametrize("sizes, fragment", [
    ("0", "--microbatch-size '0' is not a micro-batch size"),
    ("1,x", "--microbatch-size '1,x': 'x' is not a micro-batch size"),
    ("4,-2", "'-2' is not a micro-batch size"),
])
def test_microbatch_size_errors_name_the_flag(sizes: str, fragment: str) -> None:
    result = run_cli_here("profile", "gpt2-tiny", "--microbatch-size", sizes)
    assert_one_line_error(result, fragment, "integers >= 1 like 4 or 1,2,4,8")
    assert "input shape" not in result.stderr


@pytest.mark.slow
def test_a_model_spec_naming_a_folder(tmp_path: Path) -> None:
    (tmp_path / "some_dir").mkdir()
    for target in (str(tmp_path), "some_dir", "some_dir/"):
        assert_one_line_error(run_cli("profile", f"{target}:make", cwd=tmp_path),
                              f"model spec '{target}:make' names a folder, '{target}', not a .py file or a module")


# --- simulate --width ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("width", ["0", "-3", "9"])
def test_simulate_width_below_the_narrowest_timeline(plan: Path, width: str) -> None:
    assert_one_line_error(run_cli_here("simulate", str(plan), "--width", width),
                          f"--width must be >= 10 characters, got {width}")


# --- a factory that calls sys.exit --------------------------------------------------------------------------------

EXITS = '''
import sys

def code():
    sys.exit(3)

def plain():
    sys.exit()

def message():
    sys.exit("no GPU on this machine")
'''


@pytest.mark.parametrize("factory, called", [("code", "sys.exit(3)"), ("plain", "sys.exit()"),
                                             ("message", "sys.exit('no GPU on this machine')")])
def test_a_factory_that_calls_sys_exit(tmp_path: Path, factory: str, called: str) -> None:
    (tmp_path / "exits.py").write_text(EXITS)
    spec = f"{tmp_path / 'exits.py'}:{factory}"
    assert_one_line_error(run_cli_here("profile", spec), f"model factory '{spec}' called {called}")


def test_a_model_file_that_calls_sys_exit_on_import(plan: Path, tmp_path: Path) -> None:
    (tmp_path / "bye.py").write_text("import sys\nsys.exit(4)\n")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", f"{tmp_path / 'bye.py'}:make"),
                          f"importing '{tmp_path / 'bye.py'}' called sys.exit(4)")


# --- a plan whose schedule cannot run: train says what simulate says ----------------------------------------------

def test_train_checks_the_schedule_as_simulate_does(plan: Path, tmp_path: Path) -> None:
    one = _edited(tmp_path, plan, lambda d: d.update(microbatches=1))
    line = "1F1B needs at least as many micro-batches as ranks: 1 < 2"
    simulated = run_cli_here("simulate", str(one))
    trained = run_cli_here("train", str(one), "--model", "gpt2-tiny", "--steps", "1")
    assert_one_line_error(simulated, f"autopart simulate: error: {line}")
    assert_one_line_error(trained, f"autopart train: error: {line}")


# --- graph checks the input as profile does; models on the meta device; in-place ops (issue #16) --------------------

INPLACE = ROOT / "tests" / "inplace_models.py"


@pytest.mark.parametrize("flags, fragment", [
    (("--input-dtype", "float32"), "cannot run input of shape [4, 64]: RuntimeError: Expected tensor for argument #1 "
                                   "'indices' to have one of the following scalar types: Long, Int"),
    (("--input-shape", "4,64,3"), "cannot run input of shape [4, 64, 3]: RuntimeError: The size of tensor a (3)"),
    (("--input-shape", "2,5000"), "cannot run input of shape [2, 5000]: IndexError: index out of range"),  # > 64 positions
])
def test_graph_refuses_an_input_with_the_line_profile_gives(flags: tuple[str, ...], fragment: str,
                                                            tmp_path: Path) -> None:
    graphed = run_cli_here("graph", "gpt2-tiny", *flags)
    profiled = run_cli_here("profile", "gpt2-tiny", *flags, "--repeats", "1", "--warmup", "0",
                            "-o", str(tmp_path / "p.json"))
    assert_one_line_error(graphed, f"autopart graph: error: model 'gpt2-tiny' {fragment}")
    assert_one_line_error(profiled, f"autopart profile: error: model 'gpt2-tiny' {fragment}")
    assert graphed.stderr.split(" error: ", 1)[1] == profiled.stderr.split(" error: ", 1)[1]


def _meta_line(spec: str) -> str:
    return f"model factory '{spec}' returned a module on the meta device (no weights): build it on a real device"


@pytest.mark.parametrize("command", ["profile", "graph"])
def test_a_factory_that_builds_on_the_meta_device(command: str, tmp_path: Path) -> None:
    spec = f"{INPLACE}:on_meta"
    extra = ("-o", str(tmp_path / "p.json")) if command == "profile" else ()
    assert_one_line_error(run_cli_here(command, spec, *extra), f"autopart {command}: error: {_meta_line(spec)}")


@pytest.mark.slow
def test_train_refuses_a_factory_that_builds_on_the_meta_device(tmp_path: Path) -> None:
    """The plan is relu_chain's (the same blocks); the ranks build the model and say it has no weights."""
    profile, plan, spec = tmp_path / "p.json", tmp_path / "plan.json", f"{INPLACE}:on_meta"
    made = run_cli_here("profile", f"{INPLACE}:relu_chain", "--threads", "1", "--repeats", "1", "-o", str(profile))
    assert made.returncode == 0, made.stderr
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2",
                        "-o", str(plan)).returncode == 0
    result = run_cli("train", str(plan), "--model", spec, "--steps", "1")
    # both ranks find it; which rank's line the launcher shows first is a race between them
    rank = "1" if "error: rank 1: " in result.stderr else "0"
    assert_one_line_error(result, f"autopart train: error: rank {rank}: {_meta_line(spec)}")


@pytest.mark.parametrize("factory", ["relu_chain", "relu_first", "inplace_on_input"])
@pytest.mark.parametrize("command", ["profile", "graph"])
def test_inplace_ops_after_a_cut_and_on_the_input_are_no_error(command: str, factory: str, tmp_path: Path) -> None:
    extra = ("--repeats", "1", "--warmup", "0", "-o", str(tmp_path / "p.json")) if command == "profile" else ()
    result = run_cli_here(command, f"{INPLACE}:{factory}", *extra)
    assert result.returncode == 0, result.stderr

# --- file names: empty, or longer than a file system takes (issue #16, items 11 and 14) ---------------------------

LONG = "a" * 300  # one name of 300 bytes: ENAMETOOLONG on every Linux file system


@pytest.mark.parametrize("args, flag", [
    (["profile", "gpt2-tiny", "-o", LONG], "argument -o/--output"),
    (["partition", LONG, "--stages", "2"], "argument PROFILE"),
    (["partition", str(TINY), "--stages", "2", "-o", f"out/{LONG}/plan.json"], "argument -o/--output"),
    (["simulate", LONG], "argument PLAN"),
    (["simulate", "PLAN", "--svg", LONG], "argument --svg"),
    (["simulate", "PLAN", "--csv", LONG], "argument --csv"),
    (["simulate", "PLAN", "--trace", LONG], "argument --trace"),
    (["train", LONG, "--model", "gpt2-tiny"], "argument PLAN"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--data", LONG], "argument --data"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--checkpoint", f"{LONG}/ckpt"], "argument --checkpoint"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--report", LONG], "argument --report"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--trace", LONG], "argument --trace"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--svg", LONG], "argument --svg"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--replan", LONG], "argument --replan"),
    (["merge-checkpoint", LONG, "-o", "m.pt"], "argument DIR"),
    (["merge-checkpoint", "ckpt", "-o", LONG], "argument -o/--output"),
], ids=lambda v: "-".join(v[:1] + [a for a in v if a.startswith("-")]) if isinstance(v, list) else None)
def test_a_file_name_too_long_names_the_flag(plan: Path, args: list[str], flag: str) -> None:
    args = [str(plan) if a == "PLAN" else a for a in args]
    assert_one_line_error(run_cli_here(*args), f"{flag}: file name 'aaaaaaaaaaaaaaaaaaaa…aaaaaaaaaaaaaaaaaaaa' is "
                                               f"300 bytes, longer than the 255 a file system takes")


@pytest.mark.parametrize("args", [["profile", f"{LONG}.py:make"], ["partition", str(TINY), "--devices", f"{LONG}.json"],
                                  ["train", "PLAN", "--model", f"{LONG}.py:make"]], ids=["profile", "devices", "train"])
def test_a_file_name_too_long_inside_a_spec(plan: Path, args: list[str]) -> None:
    args = [str(plan) if a == "PLAN" else a for a in args]
    assert_one_line_error(run_cli_here(*args), "error: file name too long (30", "'aaaaaaaaaaaaaaaaaaaa…")


@pytest.mark.parametrize("args", [["profile", "gpt2-tiny", "-o", ""], ["partition", str(TINY), "-k", "2", "-o", ""],
                                  ["simulate", "PLAN", "--svg", ""], ["train", "PLAN", "--model", "gpt2-tiny",
                                                                      "--report", ""]],
                         ids=["profile", "partition", "simulate", "train"])
def test_an_empty_file_name_is_refused(plan: Path, tmp_path: Path, args: list[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    args = [str(plan) if a == "PLAN" else a for a in args]
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli_here(*args), "needs a file name, got ''")
    assert os.listdir(tmp_path) == []  # no default name written instead


# --- damaged JSON: nested too deep, required fields null (issue #16, items 11 and 14) ----------------------------

def test_json_nested_too_deep(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    assert_one_line_error(run_cli_here("partition", str(deep), "--stages", "2"),
                          f"profile file '{deep}' is not a valid profile: nesting too deep")
    assert_one_line_error(run_cli_here("simulate", str(deep)), f"plan file '{deep}' is not a valid plan: nesting too deep")
    assert_one_line_error(run_cli_here("partition", str(TINY), "--stages", "2", "--devices", str(deep)),
                          f"devices file '{deep}' is not a valid devices file: nesting too deep")


@pytest.mark.parametrize("field", ["model", "device", "microbatch_size", "layers"])
def test_a_required_profile_field_that_is_null(tmp_path: Path, field: str) -> None:
    profile = _edited(tmp_path, TINY, lambda d: d.update({field: None}))
    assert_one_line_error(run_cli_here("partition", str(profile), "--stages", "2"),
                          f"profile '{profile}': {field} is null; it is required")


def test_a_required_block_field_that_is_null(tmp_path: Path) -> None:
    profile = _edited(tmp_path, TINY, lambda d: d["layers"][2].update(forward_ms=None))
    assert_one_line_error(run_cli_here("partition", str(profile), "--stages", "2"),
                          f"profile '{profile}': layers[2].forward_ms is null; it is required")


# --- outputs onto devices and symlinks (issue #16, item 10) --------------------------------------------------------

def test_output_onto_a_device_or_a_symlink(tmp_path: Path) -> None:
    null = tmp_path / "null"
    null.symlink_to(os.devnull)  # were it replaced, it is our link that goes, not the real /dev/null
    result = run_cli_here("partition", str(TINY), "--stages", "2", "-o", str(null), "--format", "balance")
    assert result.returncode == 0, result.stderr
    assert null.is_symlink() and os.stat(os.devnull).st_rdev == os.makedev(1, 3)
    real = tmp_path / "real.json"
    real.write_text("old")
    link = tmp_path / "plan.json"
    link.symlink_to(real)
    result = run_cli_here("partition", str(TINY), "--stages", "2", "-o", str(link), "--format", "balance")
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and json.loads(real.read_text())["balance"] == json.loads(result.stdout)


# --- a reader that closes stdout early: exit 0, nothing on stderr (issue #16, item 11) --------------------------

@pytest.mark.slow
@pytest.mark.parametrize("args", [["partition", str(TINY), "--stages", "2", "--format", "json"],
                                  ["partition", str(TINY), "--stages", "2"],
                                  ["simulate", "PLAN", "--json"], ["simulate", "PLAN"]],
                         ids=["partition-json", "partition-table", "simulate-json", "simulate-table"])
def test_stdout_closed_by_its_reader(plan: Path, args: list[str]) -> None:
    import subprocess
    import sys

    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first write: every write to stdout fails with EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "autopart", *[str(plan) if a == "PLAN" else a for a in args]],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              env=dict(os.environ, PYTHONPATH=str(ROOT)))
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (0, "")


# --- smaller: a factory beside its modules, loss_fn without data, --lr, singulars (issue #16, item 7) ------------

def test_a_factory_file_imports_the_module_beside_it(tmp_path: Path) -> None:
    (tmp_path / "sibling_blocks_16.py").write_text(
        "import torch\n\ndef blocks():\n    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))\n")
    (tmp_path / "model.py").write_text(
        "import torch\nfrom sibling_blocks_16 import blocks\n\ndef make():\n    return blocks(), torch.randn(3, 4)\n")
    out = tmp_path / "p.json"
    result = run_cli_here("profile", f"{tmp_path / 'model.py'}:make", "--repeats", "1", "--warmup", "0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert [layer["name"] for layer in json.loads(out.read_text())["layers"]] == ["0", "1"]


LOSS_NO_DATA = '''
import torch

def make():
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 3))
    return {"module": module, "example": torch.randn(2, 4), "loss_fn": torch.nn.functional.cross_entropy}
'''


def test_a_loss_without_data_is_said(plan: Path, tmp_path: Path) -> None:
    (tmp_path / "lossy.py").write_text(LOSS_NO_DATA)
    spec = f"{tmp_path / 'lossy.py'}:make"
    result = run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(tmp_path / "p.json"))
    assert result.returncode == 0, result.stderr
    note = f"note: model '{spec}' gives loss_fn but no data, so its loss is not used: train runs synthetic inputs " \
           f"with MSE to a fixed random target"
    assert note in result.stderr
    # train says it once the model is built, before any rank starts: here a plan made for gpt2-tiny stops it next
    result = run_cli_here("train", str(plan), "--model", spec, "--steps", "1")
    assert result.returncode == 2 and result.stderr.startswith(note), result.stderr
    assert "the plan's blocks do not match" in result.stderr.splitlines()[1]


@pytest.mark.parametrize("lr", ["-1", "nan", "inf", "-inf"])
def test_lr_must_be_finite_and_not_negative(plan: Path, lr: str) -> None:
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", f"--lr={lr}"),
                          f"--lr must be a finite number >= 0, got {float(lr):g}")


def test_lr_zero_is_a_check_run(plan: Path, tmp_path: Path) -> None:
    # --lr 0 passes the flag checks: the run stops at the next check, the report's missing folder
    result = run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--lr", "0", "--report", str(tmp_path / "no" / "r"))
    assert_one_line_error(result, "folder", "does not exist")
    assert "--lr" not in result.stderr


def test_one_of_a_kind_is_singular(tmp_path: Path) -> None:
    out = tmp_path / "one.json"
    made = run_cli_here("partition", str(TINY), "--stages", "1", "--microbatches", "1", "--schedule", "gpipe",
                        "-o", str(out))
    assert made.returncode == 0, made.stderr
    assert made.stdout.splitlines()[0].rstrip() == "gpt2-tiny: exact, 1 stage on 1 rank"
    assert "schedule GPipe, 1 micro-batch of 4:" in made.stdout
    simulated = run_cli_here("simulate", str(out))
    assert "gpt2-tiny: GPipe, 1 stage on 1 rank, 1 micro-batch\n" in simulated.stdout
    assert_one_line_error(run_cli_here("partition", str(TINY), "--stages", "7"), "7 stages > 6 blocks")
    one_block = _edited(tmp_path, TINY, lambda d: d.update(layers=d["layers"][:1]))
    assert_one_line_error(run_cli_here("partition", str(one_block), "--stages", "2"), "2 stages > 1 block in")


# --- unbounded or silent: micro-batches, a 0-row example (issue #16, item 14) ------------------------------------

@pytest.mark.parametrize("args, fragment", [
    (["partition", str(TINY), "--stages", "2", "--microbatches", "1000000"],
     "1000000 micro-batches per step > 4096, the most autopart plans, simulates or trains"),
    (["simulate", "PLAN", "--microbatches", "1000000"], "1000000 micro-batches per step > 4096"),
    (["partition", str(TINY), "--stages", "2", "--microbatches", "8", "--global-batch", "4"],
     "8 micro-batches > global batch 4: each needs at least one sample"),
    (["train", "PLAN", "--model", "gpt2-tiny", "--global-batch", "1"],
     "global batch 1 < the plan's 2 micro-batches: each needs at least one sample"),
], ids=["partition", "simulate", "partition-global-batch", "train-global-batch"])
def test_microbatches_are_bounded(plan: Path, args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli_here(*[str(plan) if a == "PLAN" else a for a in args]), fragment)


def test_a_plan_with_a_million_microbatches(plan: Path, tmp_path: Path) -> None:
    edited = _edited(tmp_path, plan, lambda d: d.update(microbatches=1_000_000))
    assert_one_line_error(run_cli_here("simulate", str(edited)), "1000000 micro-batches per step > 4096")
    assert_one_line_error(run_cli_here("train", str(edited), "--model", "gpt2-tiny"),
                          "1000000 micro-batches per step > 4096")


def test_an_example_with_no_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.py").write_text("import torch\n\ndef make():\n    return torch.nn.Sequential(torch.nn.Linear(4, 2)), "
                                       "torch.zeros(0, 4)\n")
    spec = f"{tmp_path / 'empty.py'}:make"
    assert_one_line_error(run_cli_here("profile", spec, "-o", str(tmp_path / "p.json")),
                          f"model '{spec}': the example input has 0 rows (shape [0, 4])")
    assert not (tmp_path / "p.json").exists()
