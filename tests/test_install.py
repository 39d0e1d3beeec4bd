"""The install is the tested one: every direct dependency of pyproject.toml is pinned in constraints.txt
(what `make install` installs with; `make constraints` rewrites it from the venv), the pin lies in
pyproject.toml's range, and the installed version is the pinned one. And the private Ray constant that
orchestrator/local_ray.py sets still exists and is still read where Ray picks a node's address."""

import importlib.metadata as md
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _direct() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


def _pins() -> dict[str, Version]:
    pins = {}
    for n, line in enumerate((ROOT / "constraints.txt").read_text().splitlines(), 1):
        line = line.split("#")[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)", line)
        assert m, f"constraints.txt:{n}: not a name==version pin: {line!r}"
        assert _norm(m[1]) not in pins, f"constraints.txt:{n}: {m[1]} pinned twice"
        pins[_norm(m[1])] = Version(m[2])
    return pins


def test_every_direct_dependency_is_pinned_within_its_range():
    pins = _pins()
    for req in _direct():
        pin = pins.get(_norm(req.name))
        assert pin is not None, f"{req.name} is not pinned in constraints.txt (make constraints)"
        assert req.specifier.contains(pin, prereleases=True), \
            f"constraints.txt pins {req.name}=={pin}, outside pyproject.toml's {req}"


@pytest.mark.parametrize("req", _direct(), ids=lambda r: r.name)
def test_installed_direct_dependency_is_the_pinned_version(req):
    pin = _pins()[_norm(req.name)]
    installed = Version(md.version(req.name))
    # a local build tag (torch 2.13.0+cpu) is the same release as the pin
    assert installed.public == pin.public, (
        f"{req.name} {installed} is installed, constraints.txt pins {pin}: `make install` installs the pins; "
        "after a tested upgrade, `make constraints` records the new versions")


def test_the_private_ray_switch_orchestrator_sets_still_exists():
    """orchestrator/local_ray.py `_keep_loopback` sets ray._private.ray_constants.ENABLE_RAY_CLUSTER = False so that
    Ray keeps 127.0.0.1 as a node's address. Assigning a renamed constant would silently do nothing."""
    import inspect

    from ray._private import ray_constants, services

    assert isinstance(getattr(ray_constants, "ENABLE_RAY_CLUSTER", None), bool), \
        "ray._private.ray_constants.ENABLE_RAY_CLUSTER is gone: update orchestrator/local_ray.py _keep_loopback"
    assert "ray_constants.ENABLE_RAY_CLUSTER" in inspect.getsource(services.get_node_ip_address), \
        "Ray no longer reads ENABLE_RAY_CLUSTER when it picks a node's address: update _keep_loopback"


def test_the_private_ray_call_that_turns_token_auth_on_still_exists():
    """Attaching to the `taalm ray start` head (orchestrator/local_ray.py `_token_auth_on`) turns token authentication
    on in the driver the way ray.init does it for a new local instance: the environment variable, then
    ray._raylet.Config.initialize("") (Ray reads the variable once). A Ray release that changes this would make
    the attach hang on authentication errors."""
    import inspect

    from ray import _raylet
    from ray._private.authentication import authentication_token_setup

    assert callable(getattr(getattr(_raylet, "Config", None), "initialize", None)), \
        "ray._raylet.Config.initialize is gone: update orchestrator/local_ray.py _token_auth_on"
    src = inspect.getsource(authentication_token_setup._enable_token_auth)
    assert "RAY_AUTH_MODE" in src or "AUTH_MODE_ENV_VAR" in src
    assert "Config.initialize(" in src, "Ray turns token authentication on another way now: update _token_auth_on"


def test_the_ray_internals_orchestrator_faults_patches_still_exist():
    """orchestrator/faults.py wraps Tune's actor manager's `_actor_task_failed` (which re-raises an actor task's
    OutOfMemoryError / NodeDiedError instead of failing the trial) and the driver's `print_to_stdstream` (which
    prints the raylet's error lines on stdout); orchestrator/tuning.py stops a study through the SIGUSR1 handler
    Tune installs. A Ray that renamed any of them would silently bypass the handling."""
    import inspect

    import ray._private.worker as worker
    from ray.air.execution._internal.actor_manager import RayActorManager
    from ray.tune import tune as tune_module

    src = inspect.getsource(RayActorManager._actor_task_failed.__wrapped__
                            if hasattr(RayActorManager._actor_task_failed, "__wrapped__")
                            else RayActorManager._actor_task_failed)
    assert "RayActorError" in src and "RayTaskError" in src, "Tune's _actor_task_failed changed: review faults.py"
    assert "print_to_stdstream(" in inspect.getsource(worker.listen_error_messages), \
        "Ray's driver no longer prints raylet errors through print_to_stdstream: review faults.py"
    setup = inspect.getsource(tune_module._setup_signal_catching)
    assert "SIGUSR1" in setup and "def signal_interrupt_tune_run" in setup, \
        "Tune's SIGUSR1 stop handler changed: review tuning.py StudyGuard._stop"


def test_the_private_ray_call_that_reads_the_autoscalers_node_types_still_exists():
    """orchestrator/cluster.py reads which node types Ray's autoscaler may add from the cluster config it publishes
    in the GCS (`ray._private.state.state.get_cluster_config()`, what Ray Data's autoscaler reads too): a trial no
    node fits is waited for only when a node type would fit it. A Ray that moved it would make every such trial
    refused (the fallback is "cannot grow"), not hang: this says so first."""
    import inspect

    from ray._private.state import state
    from ray.core.generated import autoscaler_pb2

    assert callable(getattr(state, "get_cluster_config", None)), \
        "ray._private.state.state.get_cluster_config is gone: update orchestrator/cluster.py autoscaler_node_types"
    fields = {f.name for f in autoscaler_pb2.ClusterConfig.DESCRIPTOR.fields}
    group = {f.name for f in autoscaler_pb2.NodeGroupConfig.DESCRIPTOR.fields}
    assert "node_group_configs" in fields and {"resources", "max_count"} <= group
    assert "GCS_AUTOSCALER_CLUSTER_CONFIG_KEY" in inspect.getsource(type(state).get_cluster_config)
