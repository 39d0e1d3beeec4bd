"""Trials packed on GPUs, tested on a machine without one: a local Ray instance started with two logical GPUs
(`taalm ablate --num-gpus 2`), trials asking for half a GPU each. Ray places two trials on each GPU, four run at
once, every trial records the GPU it was given, and, with no CUDA in the process, runs on the CPU saying why."""

from collections import Counter
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # starts Ray / MLflow

ROOT = Path(__file__).resolve().parents[1]


def _trials(r):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(r["tracking_uri"])
    exp = c.get_experiment_by_name(r["experiment"])
    return c.search_runs([exp.experiment_id], "tags.`taalm.role` = 'trial'")


@pytest.fixture(scope="module")
def ray_with_two_gpus():
    import ray

    from orchestrator.local_ray import init_ray

    if ray.is_initialized():  # another module's instance: this test needs one with logical GPUs
        ray.shutdown()
    init_ray(None, num_cpus=2, num_gpus=2)
    yield
    ray.shutdown()


def test_half_gpu_trials_pack_two_per_gpu_and_fall_back_to_the_cpu(ray_with_two_gpus, tmp_path):
    import ray
    import torch

    from orchestrator.ablation import run_ablation

    assert ray.cluster_resources().get("GPU") == 2
    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml",
                     ["name=packed", "seeds=[0,1]", "overrides.train.epochs=3", "resources.cpus_per_worker=0.5",
                      "resources.gpus_per_worker=0.5", "resources.max_concurrent=4"], out_root=tmp_path)
    assert r["failed"] == 0 and r["trials"] == 4
    trials = _trials(r)
    assert len(trials) == 4 and all(t.info.status == "FINISHED" for t in trials)
    ids = [t.data.tags["taalm.gpu_ids"] for t in trials]
    assert Counter(ids) == Counter({"0": 2, "1": 2}), ids  # two half-GPU trials on each logical GPU
    assert all(t.data.tags["taalm.gpu_share"] == "0.5" for t in trials)
    first_end = min(t.info.end_time for t in trials)
    assert all(t.info.start_time < first_end for t in trials)  # all four ran at once
    for t in trials:
        if torch.cuda.is_available():  # a machine with CUDA: the GPU Ray assigned
            assert t.data.tags["taalm.device"] == "cuda"
        else:  # without: the CPU, saying why
            assert t.data.tags["taalm.device"] == "cpu"
            assert "no CUDA" in t.data.tags["taalm.device_note"]
            assert "Ray assigned GPU" in t.data.tags["taalm.device_note"]


def test_a_trial_that_asks_for_no_gpu_runs_on_the_cpu(ray_with_two_gpus, tmp_path):
    """Ray leaves a node's GPUs visible to processes that asked for none: `device: auto` must not take them."""
    from orchestrator.ablation import run_ablation

    r = run_ablation(ROOT / "ablations" / "smoke_tiny.yaml", ["name=nogpu", "axes={weighting.scheme: [uniform]}"],
                     out_root=tmp_path)
    (t,) = _trials(r)
    assert t.data.tags["taalm.device"] == "cpu" and "taalm.gpu_ids" not in t.data.tags
