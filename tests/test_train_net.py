"""train_net.py end to end on the tiny shapes set: 1 process, --eval-only, 2 CPU processes."""
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from retina_focal.utils.testing import matched_results_share
from tests.conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end: `make test` runs it, `make test-fast` does not

CONFIG = os.path.join(REPO, "configs", "Shapes-Detection", "retina_focal_R_18_FPN_demo.yaml")
TINY = [
    "DATASETS.TRAIN", '("retina_focal_shapes_tiny_train",)',
    "DATASETS.TEST", '("retina_focal_shapes_tiny_val",)',
    "SOLVER.IMS_PER_BATCH", "4",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.CHECKPOINT_PERIOD", "1000",
    "DATALOADER.NUM_WORKERS", "0",
]


def train(args, script="train_net.py", timeout=300, env=None):
    """Run ``script`` (train_net.py or tests/engine/fault_train.py) on CONFIG; return the process."""
    return subprocess.run(
        [sys.executable, os.path.join(REPO, script), "--config-file", CONFIG] + args,
        cwd=REPO, capture_output=True, text=True, timeout=timeout, env=dict(os.environ, **(env or {})),
    )


def _run(args, timeout=300, env=None):
    proc = train(args, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _losses(out_dir):
    return [row["total_loss"] for row in losses_by_iteration(out_dir).values()]


def losses_by_iteration(out_dir):
    """{iteration: metrics row} from metrics.json; a resumed run's rows replace earlier ones."""
    with open(os.path.join(out_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f]
    return {r["iteration"]: r for r in rows if "total_loss" in r}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("train"))
    log = _run(["--num-gpus", "1", "OUTPUT_DIR", out, "SOLVER.MAX_ITER", "6", "SEED", "1"] + TINY)
    return out, log


def test_single_process_training_writes_checkpoint_and_evaluates(trained):
    out, log = trained
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    losses = _losses(out)
    assert losses and all(math.isfinite(v) for v in losses)


def test_eval_only_loads_weights_and_runs_coco_evaluator(trained, tmp_path):
    out, _ = trained
    log = _run(["--eval-only", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", os.path.join(out, "model_final.pth")] + TINY)
    # after 6 iterations a model may detect nothing (then AP is NaN and RetinaFocalCOCOEvaluator
    # says so); either way the evaluator ran and reported the COCO metrics
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log
    assert os.path.exists(os.path.join(str(tmp_path), "inference", "retina_focal_shapes_tiny_val", "coco_instances_results.json"))


def _coco_results(out_dir):
    with open(os.path.join(out_dir, "inference", "retina_focal_shapes_tiny_val", "coco_instances_results.json")) as f:
        return sorted(json.load(f), key=lambda r: (r["image_id"], -r["score"]))


def test_eval_only_with_a_backend_gives_the_eager_detections(trained, tmp_path):
    """--backend onnxruntime (TEST.BACKEND.NAME): the detections COCOEvaluator scores are the
    eager model's, scores within 1e-4 and boxes within 1e-3 px (threshold 0: 100 per image, so
    there is something to compare)."""
    out, _ = trained
    args = ["--eval-only", "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"), "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0"] + TINY
    _run(args + ["OUTPUT_DIR", str(tmp_path / "eager")])
    log = _run(["--backend", "onnxruntime"] + args + ["OUTPUT_DIR", str(tmp_path / "ort")])
    assert "onnxruntime backend (float32)" in log
    eager, ort = _coco_results(str(tmp_path / "eager")), _coco_results(str(tmp_path / "ort"))
    assert len(ort) == len(eager) == 16 * 100
    # every detection of one is the other's (a near tie at the 100th may swap one pair)
    assert matched_results_share(ort, eager, "image_id", 1e-4, 1e-3) >= 0.99
    assert matched_results_share(eager, ort, "image_id", 1e-4, 1e-3) >= 0.99


ITERS_LOGGED = ["SOLVER.MAX_ITER", "3", "SOLVER.LOG_PERIOD", "1", "SEED", "3"]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("two_processes"))
    log = _run(["--num-gpus", "2", "--dist-url", "auto", "OUTPUT_DIR", out] + TINY + ITERS_LOGGED)
    return out, log


def test_two_cpu_processes_train_with_gloo(two_processes):
    out, log = two_processes
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in log  # distributed evaluation
    assert os.path.exists(os.path.join(out, "log.txt.rank1"))  # a second rank ran
    assert os.path.exists(os.path.join(out, "model_final.pth"))
    assert sorted(losses_by_iteration(out)) == [0, 1, 2]  # SOLVER.LOG_PERIOD 1: every iteration


def test_two_machines_on_localhost_give_the_same_losses_as_two_processes(two_processes, tmp_path):
    url = f"tcp://127.0.0.1:{free_port()}"
    machines = [
        subprocess.Popen(
            [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", CONFIG, "--num-machines", "2",
             "--machine-rank", str(rank), "--num-gpus", "1", "--dist-url", url, "OUTPUT_DIR", str(tmp_path / str(rank))]
            + TINY + ITERS_LOGGED,
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(os.environ, OMP_NUM_THREADS="1"),  # as each of the 2 processes above
        )
        for rank in (0, 1)
    ]
    logs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    one_machine = losses_by_iteration(two_processes[0])
    two_machines = losses_by_iteration(str(tmp_path / "0"))
    for it in (0, 1, 2):
        for term in ("loss_cls", "loss_box_reg"):
            assert two_machines[it][term] == pytest.approx(one_machine[it][term], rel=1e-6, abs=0), (it, term)


AMP_ITERS = ITERS_LOGGED + ["SOLVER.CHECKPOINT_PERIOD", "2"]  # model_0000001.pth after iteration 1


@pytest.fixture(scope="module")
def float32_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("float32"))
    _run(["OUTPUT_DIR", out] + TINY + AMP_ITERS)
    return out


@pytest.fixture(scope="module")
def amp_runs(tmp_path_factory):
    """{precision: (output dir, log)} of SOLVER.AMP.ENABLED runs in bfloat16 and float16."""
    runs = {}
    for precision in ("bfloat16", "float16"):
        out = str(tmp_path_factory.mktemp(f"amp_{precision}"))
        log = _run(["OUTPUT_DIR", out, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", precision] + TINY + AMP_ITERS)
        runs[precision] = out, log
    return runs


@pytest.mark.parametrize("precision", ["bfloat16", "float16"])
def test_amp_trains_on_a_cpu_writes_checkpoints_and_tracks_float32(amp_runs, float32_run, precision):
    """SOLVER.AMP.ENABLED on a CPU (detectron2's AMPTrainer asserts CUDA): autocast in the
    asked dtype, a checkpoint, and per-iteration losses within 5 % of a float32 run's."""
    out, log = amp_runs[precision]
    assert f"training under torch.autocast('cpu', torch.{precision})" in log
    checkpoint = torch.load(os.path.join(out, "model_final.pth"), weights_only=False)
    scaler = checkpoint["trainer"]["_trainer"].get("grad_scaler")
    assert bool(scaler) == (precision == "float16")  # bfloat16 needs no loss scaling
    ours, reference = losses_by_iteration(out), losses_by_iteration(float32_run)
    assert sorted(ours) == [0, 1, 2]
    for it in (0, 1, 2):
        for term in ("loss_cls", "loss_box_reg"):
            assert math.isfinite(ours[it][term])
            print(f"{precision} iteration {it} {term}: {ours[it][term]:.5f} vs float32 {reference[it][term]:.5f}")
            assert ours[it][term] == pytest.approx(reference[it][term], rel=0.05), (precision, it, term)
    if precision == "float16":
        assert {"amp/grad_scale", "amp/skipped_steps"} <= set(ours[2])


def test_resume_of_a_float16_run_restores_the_grad_scaler(amp_runs, tmp_path):
    """--resume from model_0000001.pth whose GradScaler state was changed: the first resumed
    iteration runs at the saved scale (a fresh scaler would start at 65536)."""
    out, _ = amp_runs["float16"]
    run_dir = str(tmp_path / "resumed")
    os.makedirs(run_dir)
    checkpoint = torch.load(os.path.join(out, "model_0000001.pth"), weights_only=False)
    checkpoint["trainer"]["_trainer"]["grad_scaler"].update(scale=1234.0, _growth_tracker=7)
    torch.save(checkpoint, os.path.join(run_dir, "model_0000001.pth"))
    with open(os.path.join(run_dir, "last_checkpoint"), "w") as f:
        f.write("model_0000001.pth")
    _run(["--resume", "OUTPUT_DIR", run_dir, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "float16"] + TINY + AMP_ITERS)
    rows = losses_by_iteration(run_dir)
    assert sorted(rows) == [2]
    assert rows[2]["amp/grad_scale"] == 1234.0


@pytest.mark.parametrize("weights", ["", "foreign"])
def test_eval_only_refuses_no_weights_and_weights_that_fit_nothing(tmp_path, weights):
    """Used to evaluate a random network (AP nan) after "Initializing model from scratch" or
    fvcore's warning that every key is missing."""
    from tests.test_predict import foreign_weights

    if weights == "foreign":
        weights = foreign_weights(tmp_path / "resnet18.pth")
    proc = train(["--eval-only", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", weights] + TINY)
    assert proc.returncode != 0
    expected = "does not fit the model" if weights else "MODEL.WEIGHTS is empty: inference needs trained weights"
    assert expected in proc.stderr, proc.stderr[-3000:]
    assert "copypaste: AP" not in proc.stdout + proc.stderr


def test_eval_only_with_test_time_augmentation_evaluates_both(trained, tmp_path):
    out, _ = trained
    log = _run(["--eval-only", "OUTPUT_DIR", str(tmp_path), "MODEL.WEIGHTS", os.path.join(out, "model_final.pth"),
                "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(112, 144)", "TEST.AUG.MAX_SIZE", "200"] + TINY)
    assert log.count("copypaste: AP,AP50,AP75,APs,APm,APl") == 2  # plain, then with TTA
    assert os.path.isfile(os.path.join(str(tmp_path), "inference_TTA", "retina_focal_shapes_tiny_val", "coco_instances_results.json"))
