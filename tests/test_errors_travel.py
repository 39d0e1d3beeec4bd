"""Every exception class the project raises keeps its message across processes (issue 33): copy.copy, pickle and
Ray's transport rebuild it as what it was. The classes are found by walking trainables/ and orchestrator/, so a
new class without a sample here fails the first test instead of slipping by."""

import copy
import importlib
import inspect
import pickle
import pkgutil
from pathlib import Path

import pytest

# qualified name -> the arguments of a sample instance (a new exception class needs a line here)
SAMPLES = {
    "trainables.errors.InputError": ("grid.yaml:3 (train.lr)", "must be > 0"),
    "trainables.configio.ConfigKeyError": (("resources", "gpus_per_worker"), "1.5 GPUs: whole GPUs above one"),
    "trainables.checkpoint.StorageError": ("cannot write /x/checkpoint: No space left on device (1 GB free on /x)",),
    "trainables.step.StepOutOfMemoryError": ("epoch 1, step 3: a micro-batch of 8 documents did not fit",),
    "orchestrator.faults.StudyStopped": ("cannot write /x/mlflow.db", Path("/x"), 2),
    "orchestrator.faults.TrialProcessLost": ("NodeDiedError: the node running the trial was lost",),
    # internal to the reader (turned into an InputError naming the row before it leaves trainables/twread.py)
    "trainables.twread._Invalid": ("a batch whose column is missing, null or not text",),
}


def project_exceptions() -> dict[str, type]:
    found = {}
    for pkg in ("trainables", "orchestrator"):
        mod = importlib.import_module(pkg)
        for info in pkgutil.iter_modules(mod.__path__):
            m = importlib.import_module(f"{pkg}.{info.name}")
            for name, obj in vars(m).items():
                if inspect.isclass(obj) and issubclass(obj, BaseException) and obj.__module__ == m.__name__:
                    found[f"{m.__name__}.{name}"] = obj
    return found


def _same(a, b) -> None:
    assert type(a) is type(b) and str(a) == str(b)
    assert {k: v for k, v in vars(a).items()} == {k: v for k, v in vars(b).items()}


def test_every_exception_class_has_a_sample():
    assert set(project_exceptions()) == set(SAMPLES)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_an_exception_survives_copy_and_pickle_with_its_message(name):
    cls = project_exceptions()[name]
    e = cls(*SAMPLES[name])
    assert str(e)
    _same(copy.copy(e), e)
    _same(pickle.loads(pickle.dumps(e)), e)


@pytest.mark.integration
def test_an_exception_raised_in_a_ray_task_reaches_the_driver_with_its_message(ray_local):
    import ray

    def raise_it(name, args):
        import importlib

        module, _, cls = name.rpartition(".")
        raise getattr(importlib.import_module(module), cls)(*args)

    task = ray.remote(num_cpus=0, max_retries=0)(raise_it)
    for name, args in sorted(SAMPLES.items()):
        cls = project_exceptions()[name]
        with pytest.raises(Exception) as got:
            ray.get(task.remote(name, args))
        assert str(cls(*args)) in str(got.value), (name, str(got.value)[-500:])
        cause = got.value.as_instanceof_cause() if hasattr(got.value, "as_instanceof_cause") else got.value
        assert isinstance(cause, cls), (name, type(cause).__mro__)


def test_first_line_of_an_empty_message_is_empty():
    """The one helper that shortens an error to its first line (storage, cluster, faults, the step's OOM retry):
    an exception without a message gives '' instead of an IndexError inside the error path."""
    from trainables.errors import first_line

    assert first_line(ValueError()) == "" and first_line(OSError("a\nb")) == "a" and first_line("x" * 9, 4) == "xxxx"
