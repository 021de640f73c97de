"""
Distributed training and evaluation on CPU (gloo), as users run them on GPUs (NCCL):

- 2 processes x 1 image train the same weights as 1 process x 2 images, for the parity model
  and every variant family, with Detectron2's DDP settings (find_unused_parameters=False: a
  parameter without a gradient in a step would fail the next one);
- evaluation with 2 processes sees every image once and gives 1 process's AP;
- train_net.py on two simulated machines (--num-machines 2 over 127.0.0.1): rank 0 alone
  writes; a killed worker ends both machines' jobs with an error instead of a hang; --resume
  continues from the last checkpoint;
- train_net.py under torchrun;
- the launch shim hands over to Detectron2 where it can and reports a failed worker in one
  line; the DDP helpers' checks.

The multi-process parts run in subprocesses (tests/engine/distributed_jobs.py, train_net.py)
with one thread per process; the rest are in-process unit tests.
"""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from detectron2.utils import comm
from torch import nn

import fpn_plugin.engine.ddp as ddp
import fpn_plugin.engine.launch as fl
from fpn_plugin.data.shapes import ensure_shapes_dataset

from demo_testutils import DEMO_CONFIG, TINY_SHAPES_OPTS
from demo_testutils import TINY_OPTS as DEMO_TINY_OPTS

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JOBS = os.path.join(ROOT, "tests", "engine", "distributed_jobs.py")
TRAIN_NET = os.path.join(ROOT, "projects", "fpn_mask_rcnn", "train_net.py")
FAMILIES = ["parity", "panet_path", "weighted_fusion", "unshared_rpn_per_level_anchors",
            "gn_rpn_per_level_topk", "panet_mask_head", "sync_bn"]

# Tolerances of "same weights". Both set-ups compute the same function (see base_cfg in
# distributed_jobs.py); what differs is float32 rounding: a convolution over a batch of 1 or
# of 2, the losses summed over ROIs in another order (each process's RNG orders the sampled
# candidates), NaiveSyncBatchNorm's statistics from all-gathered per-process means against
# BatchNorm's own kernel. Measured after 3 steps: parameters differ by at most 1.5e-8
# (3.7e-7 with naiveSyncBN: 4% of RTOL/ATOL), BN running means by 4.1e-6 (29% of their
# looser tolerance), and the difference of the two updates is 3.5e-7..5.2e-7 of
# the update's norm (6.5e-6 with naiveSyncBN). A real discrepancy (gradients summed instead
# of averaged, a process left out of a reduction, statistics not synchronized) changes the
# update by tens of percent: summing instead of averaging gave 105-128%.
RTOL, ATOL = 1e-4, 1e-5
STATS_RTOL, STATS_ATOL = 1e-3, 1e-4  # running statistics: two different formulas
REL_UPDATE_TOL = 1e-4
# The updates must be far above those tolerances for the comparison to mean something.
MIN_MAX_UPDATE = 100 * ATOL


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two cores shared by the processes of a job
    env.pop("PYTHONPATH", None)
    return env


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path, n=4000):
    try:
        with open(path) as f:
            return f.read()[-n:]
    except OSError:
        return f"(no {path})"


def _start(args, stdout=subprocess.PIPE):
    """Starts ``python args...`` in its own process group (its workers included)."""
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=_env(), text=True,
                            stdout=stdout, stderr=subprocess.PIPE,
                            start_new_session=True)


def _finish(procs, timeout):
    """(returncode, stdout, stderr) of each process. A process still running after
    ``timeout`` seconds is a hang: its whole process group is killed and the test fails."""
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail("a distributed job did not end within its timeout (hang)")
    finally:
        _kill_groups(procs)
    return results


def _kill_groups(procs):
    for p in procs:
        if p.poll() is None:  # still running, so its group id is still ours
            os.killpg(p.pid, signal.SIGKILL)  # the launcher and its workers
            p.wait()


# ---------------------------------------------------------------------------------------------
# 2 x 1 against 1 x 2: training and evaluation
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Runs distributed_jobs.py with 1 process and with 2; returns their output folders."""
    base = tmp_path_factory.mktemp("distributed")
    data = base / "shapes"
    # Two training images with one object each, five held-out images for evaluation.
    ensure_shapes_dataset(str(data), num_train=2, num_val=5, image_size=64, seed=3,
                          max_instances=1)
    with open(data / "train.json") as f:
        train = json.load(f)
    assert sorted(a["image_id"] for a in train["annotations"]) == [1, 2]
    outs = {}
    for num_procs in (1, 2):
        out = base / f"procs{num_procs}"
        [(rc, _, err)] = _finish([_start([JOBS, "--num-procs", str(num_procs), "--data",
                                          str(data), "--out", str(out)])], timeout=600)
        assert rc == 0, err[-3000:] + _tail(out / "log.txt")
        outs[num_procs] = out
    return outs


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_two_processes_train_the_weights_of_one_process_with_both_images(jobs, family):
    one, two = jobs[1] / family, jobs[2] / family
    initial = _state(one / "initial.pth")
    ref = _state(one / "final_rank0.pth")
    rank0, rank1 = _state(two / "final_rank0.pth"), _state(two / "final_rank1.pth")
    # DDP keeps the replicas identical: same averaged gradients, same optimizer steps.
    assert rank0.keys() == rank1.keys() == ref.keys()
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), f"replicas differ in {k}"
    # Both runs started from the same weights (DDP broadcasts rank 0's at construction).
    assert _state(two / "initial.pth").keys() == initial.keys()
    for k, v in _state(two / "initial.pth").items():
        assert torch.equal(v, initial[k]), f"initial weights differ in {k}"

    diff_sq = update_sq = max_update = 0.0
    compared = 0
    for k, v in ref.items():
        if not v.is_floating_point():
            continue
        if family == "sync_bn" and k.endswith("running_var"):
            # NaiveSyncBatchNorm tracks the biased variance, BatchNorm the unbiased one.
            continue
        stats = "running_" in k
        torch.testing.assert_close(rank0[k], v, rtol=STATS_RTOL if stats else RTOL,
                                   atol=STATS_ATOL if stats else ATOL,
                                   msg=lambda m: f"{k}: {m}")
        diff_sq += (rank0[k].double() - v.double()).pow(2).sum().item()
        update = v.double() - initial[k].double()
        update_sq += update.pow(2).sum().item()
        max_update = max(max_update, update.abs().max().item())
        compared += 1
    assert compared > 20
    assert max_update > MIN_MAX_UPDATE, "training did not move the weights: nothing compared"
    assert math.sqrt(diff_sq / update_sq) < REL_UPDATE_TOL

    # The losses Detectron2 logged (averaged over processes) agree at every iteration too.
    with open(one / "losses.json") as f:
        losses_one = json.load(f)
    with open(two / "losses.json") as f:
        losses_two = json.load(f)
    assert len(losses_one) == len(losses_two) == 3
    for it, (a, b) in enumerate(zip(losses_one, losses_two)):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (it, k)


def _predictions_by_image(path):
    preds = torch.load(path, map_location="cpu", weights_only=True)
    ids = [p["image_id"] for p in preds]
    return ids, {p["image_id"]: p["instances"] for p in preds}


def test_two_process_evaluation_covers_every_image_once_with_the_same_ap(jobs):
    res = {}
    for n in (1, 2):
        with open(jobs[n] / "eval" / "results.json") as f:
            res[n] = json.load(f)
    with open(jobs[1] / "eval" / "self_gt.json") as f:
        image_ids = sorted(im["id"] for im in json.load(f)["images"])
    assert len(image_ids) == 5
    for key in ("predictions", "self_gt_predictions"):
        ids_one, by_image_one = _predictions_by_image(res[1][key])
        ids_two, by_image_two = _predictions_by_image(res[2][key])
        # Rank 0 gathered every image exactly once (InferenceSampler splits 5 as 3 + 2).
        assert sorted(ids_two) == sorted(ids_one) == image_ids
        for image_id, dets in by_image_one.items():
            other = by_image_two[image_id]
            assert len(other) == len(dets) > 0
            for a, b in zip(dets, other):
                assert a["category_id"] == b["category_id"]
                assert a["score"] == pytest.approx(b["score"], rel=1e-5)
                assert a["bbox"] == pytest.approx(b["bbox"], rel=1e-5, abs=1e-4)
    # The same ground truth built from each run's predictions, and the same AP.
    gt_one, gt_two = ((jobs[n] / "eval" / "self_gt.json").read_text() for n in (1, 2))
    gt_one, gt_two = json.loads(gt_one)["annotations"], json.loads(gt_two)["annotations"]
    assert [a["segmentation"] for a in gt_one] == [a["segmentation"] for a in gt_two]
    for task in ("bbox", "segm"):
        one, two = res[1]["self_gt"][task], res[2]["self_gt"][task]
        assert one.keys() == two.keys()
        for metric, value in one.items():
            if math.isnan(value):
                assert math.isnan(two[metric]), (task, metric)
            else:
                assert two[metric] == pytest.approx(value, abs=1e-6), (task, metric)
        # Far from 0 and 100, so a lost or duplicated image would change it.
        assert 5 < one["AP"] < 95, (task, one["AP"])


# ---------------------------------------------------------------------------------------------
# train_net.py: two machines, a killed worker, --resume; torchrun
# ---------------------------------------------------------------------------------------------
# The demo model at 64 px with narrow heads, on the shapes dataset at that size.
TINY_OPTS = TINY_SHAPES_OPTS + DEMO_TINY_OPTS
PERIOD = 2


def _train_net_args(shapes, out, max_iter, *extra):
    return ["--config-file", DEMO_CONFIG, *extra, *TINY_OPTS,
            "DATASETS.SHAPES.ROOT", str(shapes), "OUTPUT_DIR", str(out),
            "SOLVER.MAX_ITER", str(max_iter), "SOLVER.CHECKPOINT_PERIOD", str(PERIOD)]


def _machines(shapes, outs, max_iter, *extra):
    """Starts train_net.py as machine 0 and machine 1 (one process each) over 127.0.0.1."""
    url = f"tcp://127.0.0.1:{_free_port()}"
    # Rank 0's stdout (the whole log) goes nowhere: the test polls the output folder while the
    # job runs, and a pipe nobody reads blocks the writer once ~64 KiB are buffered.
    return [_start([TRAIN_NET, "--num-gpus", "1", "--num-machines", "2", "--machine-rank",
                    str(rank), "--dist-url", url, *_train_net_args(shapes, out, max_iter, *extra)],
                   stdout=subprocess.DEVNULL)
            for rank, out in enumerate(outs)]


def _last_checkpoint_iter(out):
    try:
        name = (out / "last_checkpoint").read_text().strip()
    except OSError:
        return None
    return int(name[len("model_"):-len(".pth")]) if name.startswith("model_0") else None


def _spawned_worker(parent_pid):
    """The pid of the worker process torch.multiprocessing spawned under ``parent_pid``."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent_pid and b"spawn_main" in cmdline:
            return int(pid)
    return None


@pytest.mark.timeout(600)
def test_two_machines_rank0_writes_a_killed_worker_stops_both_and_resume_continues(tmp_path):
    shapes, out0, out1 = tmp_path / "shapes", tmp_path / "machine0", tmp_path / "machine1"
    # Fresh run; machine 1 gets its own OUTPUT_DIR so that anything it wrote would show.
    procs = _machines(shapes, [out0, out1], max_iter=10000)
    try:
        # Wait for the event (a second periodic checkpoint), however long a loaded machine
        # takes; the test's timeout bounds it.
        while all(p.poll() is None for p in procs):
            it = _last_checkpoint_iter(out0)
            if it is not None and it >= 2 * PERIOD - 1:  # a second periodic checkpoint
                break
            time.sleep(0.2)
        assert all(p.poll() is None for p in procs), _finish(procs, 60)
        worker = _spawned_worker(procs[1].pid)
        assert worker is not None, "machine 1's worker process not found"
        os.kill(worker, signal.SIGKILL)
        (rc0, _, err0), (rc1, _, err1) = _finish(procs, timeout=120)
    finally:
        _kill_groups(procs)
    # Both machines end with an error naming what happened.
    assert rc0 != 0 and rc1 != 0
    assert "Distributed job stopped: process 0 raised" in err0  # its peer's connection closed
    assert "Distributed job stopped: process 0 terminated with signal SIGKILL" in err1
    assert not (out0 / "model_final.pth").exists()
    # Rank 0 alone wrote: machine 1's folder holds only its own log.
    assert sorted(os.listdir(out1)) == ["log.txt.rank1"]
    killed_at = _last_checkpoint_iter(out0)
    assert killed_at is not None and killed_at >= 2 * PERIOD - 1

    # --resume on both machines, sharing machine 0's OUTPUT_DIR as a cluster shares storage.
    max_iter = killed_at + 1 + 2 * PERIOD
    results = _finish(_machines(shapes, [out0, out0], max_iter, "--resume"), timeout=300)
    for rank, (rc, _, err) in enumerate(results):
        assert rc == 0, f"machine {rank}: {err[-3000:]}"
    for log in ("log.txt", "log.txt.rank1"):
        assert f"Starting training from iteration {killed_at + 1}" in (out0 / log).read_text()
    final = torch.load(out0 / "model_final.pth", map_location="cpu", weights_only=False)
    assert final["iteration"] == max_iter - 1
    assert (out0 / "last_checkpoint").read_text().strip() == "model_final.pth"


@pytest.mark.timeout(600)
def test_train_net_under_torchrun_trains_two_processes_and_evaluates(tmp_path):
    out = tmp_path / "out"
    [(rc, _, err)] = _finish([_start(
        ["-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), TRAIN_NET,
         *_train_net_args(tmp_path / "shapes", out, 3), "TEST.EVAL_PERIOD", "3",
         "DATALOADER.NUM_WORKERS", "1"])], timeout=300)  # a loader worker inside each rank
    assert rc == 0, err[-3000:]
    log = (out / "log.txt").read_text()
    assert "World size: 2" in log
    assert torch.load(out / "model_final.pth", map_location="cpu",
                      weights_only=False)["iteration"] == 2
    # Evaluation at the end gathered both processes' predictions on rank 0.
    assert "copypaste: Task: segm" in log
    preds = torch.load(out / "inference" / "shapes_val" / "instances_predictions.pth",
                       map_location="cpu", weights_only=True)
    assert sorted(p["image_id"] for p in preds) == [1, 2]


# ---------------------------------------------------------------------------------------------
# The launch shim and the DDP helpers, in-process
# ---------------------------------------------------------------------------------------------
def test_launch_hands_over_to_detectron2_where_it_supports_the_machine(monkeypatch):
    calls = []
    monkeypatch.setattr(fl._D2_LAUNCH, "launch", lambda *a, **k: calls.append((a, k)))
    monkeypatch.setattr(fl, "detectron2_launch_supports_this_machine", lambda: True)
    fl.launch(print, 4, num_machines=2, machine_rank=1, dist_url="tcp://h:1", args=(1,))
    assert calls == [((print, 4), dict(num_machines=2, machine_rank=1, dist_url="tcp://h:1",
                                       args=(1,), timeout=fl.DEFAULT_TIMEOUT))]
    # One process: Detectron2's launch runs main_func here, on any machine.
    calls.clear()
    monkeypatch.setattr(fl, "detectron2_launch_supports_this_machine", lambda: False)
    fl.launch(print, 1)
    assert len(calls) == 1


def test_launch_reraises_a_worker_failure_after_a_one_line_summary(monkeypatch, caplog):
    traceback = ("\n\n-- Process 1 terminated with the following error:\nTraceback (most "
                 "recent call last):\n  File \"x.py\", line 1\nRuntimeError: peer closed\n")
    error = fl.mp.ProcessRaisedException(traceback, 1, 1234)

    def failing(*args, **kwargs):
        raise error

    monkeypatch.setattr(fl._D2_LAUNCH, "launch", failing)
    monkeypatch.setattr(fl, "detectron2_launch_supports_this_machine", lambda: True)
    with pytest.raises(fl.mp.ProcessRaisedException) as raised:
        fl.launch(print, 2, dist_url="auto")
    assert raised.value is error  # Detectron2's exception, unchanged
    assert "Distributed job stopped: process 1 raised RuntimeError: peer closed. " in caplog.text
    assert "--resume" in caplog.text


def test_launch_gloo_path_checks_its_url_before_starting_processes(monkeypatch):
    monkeypatch.setattr(fl, "detectron2_launch_supports_this_machine", lambda: False)
    monkeypatch.setattr(fl.mp, "start_processes", lambda *a, **k: pytest.fail("started"))
    with pytest.raises(ValueError, match="one machine only"):
        fl.launch(print, 1, num_machines=2, dist_url="auto")
    with pytest.raises(ValueError, match="dist_url is required"):
        fl.launch(print, 2, dist_url=None)


def test_detectron2_launch_support_follows_its_version():
    # v0.6 (no create_local_process_group) asserts CUDA in its worker; main falls back to gloo.
    expected = torch.cuda.is_available() or hasattr(comm, "create_local_process_group")
    assert fl.detectron2_launch_supports_this_machine() is expected


def test_launch_from_env_needs_torchrun_variables(monkeypatch):
    for name in fl._TORCHRUN_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not fl.started_by_torchrun()
    with pytest.raises(ValueError, match="torchrun variables"):
        fl.launch_from_env(print)
    env = dict(RANK="0", WORLD_SIZE="3", LOCAL_RANK="0", LOCAL_WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert fl.started_by_torchrun()
    with pytest.raises(ValueError, match="same number of processes"):
        fl.launch_from_env(print)
    # One process in all: no process group, main_func runs here.
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert fl.launch_from_env(lambda x: x + 1, args=(41,)) == 42


def test_create_ddp_model_passes_no_device_ids_for_a_cpu_model(monkeypatch):
    seen = {}
    monkeypatch.setattr(ddp, "_D2_CREATE_DDP_MODEL", lambda m, **k: seen.update(k) or m)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    # One process: Detectron2's function is called as it is (it returns the model).
    assert ddp.create_ddp_model(model, broadcast_buffers=False) is model
    assert seen == {"broadcast_buffers": False}
    seen.clear()
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    ddp.create_ddp_model(model, broadcast_buffers=False)
    assert seen == {"broadcast_buffers": False, "device_ids": None}
    seen.clear()
    ddp.create_ddp_model(model, device_ids=[3])  # an explicit choice is kept
    assert seen == {"device_ids": [3]}


def test_create_ddp_model_refuses_cuda_only_sync_bn_on_cpu(monkeypatch):
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(ddp, "_D2_CREATE_DDP_MODEL", lambda m, **k: pytest.fail("wrapped"))
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4))
    with pytest.raises(ValueError, match="'1' is torch.nn.SyncBatchNorm.*naiveSyncBN"):
        ddp.create_ddp_model(model)


def test_check_resumed_alike_names_output_dir_when_ranks_disagree(monkeypatch):
    class _Trainer:
        start_iter = 0

        class cfg:  # noqa: N801
            OUTPUT_DIR = "/shared/out"

    ddp.check_resumed_alike(_Trainer())  # one process: nothing to compare
    monkeypatch.setattr(comm, "get_world_size", lambda: 2)
    monkeypatch.setattr(comm, "all_gather", lambda x: [8, 8])
    ddp.check_resumed_alike(_Trainer())
    monkeypatch.setattr(comm, "all_gather", lambda x: [8, 0])
    with pytest.raises(RuntimeError, match=r"\[8, 0\].*'/shared/out'.*every machine sees"):
        ddp.check_resumed_alike(_Trainer())
