"""A Ray cluster on this machine whose nodes share neither a network address nor a disk (issues 27 and 33).

Each node is a network namespace with its own address on a private bridge (inside a "switch" namespace this
module makes; the machine's own interfaces are never touched, and nothing here sends a packet to the nodes from
the machine itself: everything that talks to them runs on a node). Every command run on a node gets its own mount
namespace (``ip netns exec`` makes one) in which the paths in ``hide`` are fresh, empty tmpfs mounts, and the
directories in ``share`` are bind-mounted back at their own path (inside a hidden path too): so a worker node has
its own /tmp and TAALM_CACHE, and sees the driver's study directory only where a test shares it (the "NFS" case).

Needs root, iproute2 and util-linux's ``mount`` (CI runs as root). :func:`unavailable` says why not where it
cannot work; tests call :func:`require`, which fails under ``CI=true`` and skips elsewhere.
"""

from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence


VENV_BIN = Path(sys.executable).parent
NET = "10.232.0"  # a /24 inside this lab's own bridge: not routed anywhere (the switch has no uplink)

# inside `ip netns exec NS` (its own mount namespace): stage the shared directories, hide the private paths under
# tmpfs, put the shared ones back at their own path, then run the command
_ON_NODE = r"""
set -e
stage=$1; shift
nshare=$1; shift
shares=()
for ((i = 0; i < nshare; i++)); do shares+=("$1"); shift; done
nhide=$1; shift
hides=()
for ((i = 0; i < nhide; i++)); do hides+=("$1"); shift; done
mount --make-rprivate /
for i in "${!shares[@]}"; do mkdir -p "$stage/$i"; mount --bind "${shares[$i]}" "$stage/$i"; done
for d in "${hides[@]}"; do mkdir -p "$d"; mount -t tmpfs -o size=4g nslab "$d"; done
for i in "${!shares[@]}"; do mkdir -p "${shares[$i]}"; mount --move "$stage/$i" "${shares[$i]}"; done
exec "$@"
"""


def unavailable() -> Optional[str]:
    """Why a namespace cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network and mount namespaces)"
    for tool in ("ip", "mount"):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            return f"needs {tool}"
    probe = f"tkprobe{os.getpid()}"
    p = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if p.returncode != 0:
        return f"cannot create a network namespace here: {p.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def require() -> None:
    """Skip where namespaces cannot be made; under CI=true that is a failure naming what is missing."""
    why = unavailable()
    if why is None:
        return
    from needs import missing

    missing(f"the namespace cluster cannot be made here: {why}")


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


class NodeLab:
    """Nodes n1..nN as network namespaces ``<prefix>n<i>`` on one bridge; :meth:`down` ends every process in
    them and removes them (also what a test's teardown calls when it fails)."""

    def __init__(self, n: int, prefix: Optional[str] = None, net: str = NET):
        self.n, self.net = n, net
        self.prefix = prefix or f"tk{os.getpid() % 100000}"
        self.switch = f"{self.prefix}sw"
        self.stage = Path(tempfile.mkdtemp(prefix="taalm-nslab-stage-", dir="/var/tmp"))
        self.token = secrets.token_hex(32)  # Ray's token authentication, the same on every node

    def ns(self, node: int) -> str:
        return f"{self.prefix}n{node}"

    def ip(self, node: int) -> str:
        return f"{self.net}.{node}"

    def up(self) -> "NodeLab":
        try:
            _ip("netns", "add", self.switch)
            _ip("-n", self.switch, "link", "set", "lo", "up")
            _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.switch, "link", "set", "br0", "up")
            for i in range(1, self.n + 1):
                self.add_node(i)
        except BaseException:
            self.down()
            raise
        return self

    def add_node(self, i: int) -> None:
        ns = self.ns(i)
        _ip("netns", "add", ns)
        _ip("link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", f"p{i}", "netns", self.switch)
        _ip("-n", self.switch, "link", "set", f"p{i}", "master", "br0", "up")
        _ip("-n", ns, "addr", "add", f"{self.ip(i)}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        _ip("-n", ns, "link", "set", "lo", "up")

    def env(self, **extra: str) -> dict:
        """The environment of a process on a node: this one's, with Ray's token and ``extra``."""
        env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        env.update({k: str(v) for k, v in extra.items()})
        return env

    def argv(self, node: int, cmd: Sequence[str], hide: Sequence[str] = (), share: Sequence[str] = ()) -> list[str]:
        shares = [str(Path(s).resolve()) for s in share]
        hides = [str(h) for h in hide]
        return ["ip", "netns", "exec", self.ns(node), "bash", "-c", _ON_NODE, "nslab", str(self.stage),
                str(len(shares)), *shares, str(len(hides)), *hides, *map(str, cmd)]

    def popen(self, node: int, cmd: Sequence[str], env: Optional[dict] = None, hide: Sequence[str] = (),
              share: Sequence[str] = (), **kw) -> subprocess.Popen:
        return subprocess.Popen(self.argv(node, cmd, hide, share), env=env or self.env(), **kw)

    def run(self, node: int, cmd: Sequence[str], env: Optional[dict] = None, hide: Sequence[str] = (),
            share: Sequence[str] = (), timeout: float = 120, check: bool = True,
            cwd: Optional[str] = None) -> subprocess.CompletedProcess:
        p = subprocess.run(self.argv(node, cmd, hide, share), env=env or self.env(), capture_output=True,
                           text=True, timeout=timeout, cwd=cwd)
        if check and p.returncode != 0:
            raise RuntimeError(f"on n{node}: {shlex.join(map(str, cmd))} exited {p.returncode}:\n"
                               f"{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
        return p

    def pids(self, node: int) -> list[int]:
        p = _ip("netns", "pids", self.ns(node), check=False)
        return [int(x) for x in p.stdout.split()]

    def kill_node(self, node: int) -> list[int]:
        """Every process of a node SIGKILLed at once (a machine lost whole); returns their pids."""
        pids = self.pids(node)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def down(self) -> None:
        for i in range(1, self.n + 1):
            self.kill_node(i)
        deadline = time.monotonic() + 10
        while any(self.pids(i) for i in range(1, self.n + 1)) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ns in [self.ns(i) for i in range(1, self.n + 1)] + [self.switch]:
            _ip("netns", "del", ns, check=False)
        try:
            for d in self.stage.iterdir():
                d.rmdir()
            self.stage.rmdir()
        except OSError:
            pass


HIDDEN = "/tmp"  # what a worker node does not share with the machine: its own /tmp (Ray's session dir, TAALM_CACHE)


def installed_under(hidden: str) -> list[str]:
    """What a node's processes must read from this machine's disk and that lies under ``hidden`` (a clone and its
    virtualenv under /tmp, as a CI machine may make them): the repository, the virtualenv, the project it installs
    (editable: its source) and HOME. These are bound back into the worker's namespace, read as they are here."""
    import orchestrator

    wanted = {Path(__file__).resolve().parents[1], Path(sys.prefix).resolve(),
              Path(orchestrator.__file__).resolve().parents[1], Path.home().resolve()}
    return sorted(str(p) for p in wanted if p.is_dir() and p.is_relative_to(hidden))


class RayLab:
    """A Ray cluster on a :class:`NodeLab`: the head on n1 (no CPUs for trials, this machine's disk: where the
    driver runs), worker nodes n2.. each with its own /tmp (so its own Ray session directory and TAALM_CACHE) and
    ``worker_cpus`` CPUs, sharing only ``share`` (the "NFS" directory) and, when asked, an S3-compatible server
    (moto's, on the head's address). Every node has the same AWS variables (any value: moto checks none)."""

    AWS = {"AWS_ACCESS_KEY_ID": "taalm-test", "AWS_SECRET_ACCESS_KEY": "taalm-test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}

    def __init__(self, workers: int, worker_cpus: float, head_cache: Path, share: Sequence[str] = (),
                 s3: bool = False):
        self.lab = NodeLab(workers + 1)
        self.worker_cpus, self.head_cache, self.share, self.s3 = worker_cpus, Path(head_cache), list(share), s3
        self.moto: Optional[subprocess.Popen] = None
        self.address = f"{self.lab.ip(1)}:6379"

    def env(self, node: int, **extra) -> dict:
        cache = str(self.head_cache) if node == 1 else "/tmp/taalm-cache"
        return self.lab.env(TAALM_CACHE=cache, **self.AWS, **extra)

    def start(self) -> "RayLab":
        self.lab.up()
        try:
            if self.s3:
                self.moto = self.lab.popen(1, [str(VENV_BIN / "moto_server"), "-H", self.lab.ip(1), "-p", "9000"],
                                           env=self.env(1), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.lab.run(1, [str(VENV_BIN / "ray"), "start", "--head", f"--node-ip-address={self.lab.ip(1)}",
                             "--port=6379", "--num-cpus=0", "--include-dashboard=false"], env=self.env(1))
            for i in range(2, self.lab.n + 1):
                self.start_worker(i)
            if self.s3:
                self.make_bucket("taalm")
        except BaseException:
            self.stop()
            raise
        return self

    def start_worker(self, i: int) -> None:
        self.lab.run(i, [str(VENV_BIN / "ray"), "start", f"--address={self.address}",
                         f"--node-ip-address={self.lab.ip(i)}", f"--num-cpus={self.worker_cpus:g}"],
                     env=self.env(i), hide=[HIDDEN], share=self.share + installed_under(HIDDEN))

    def s3_uri(self, prefix: str) -> str:
        return (f"s3://taalm/{prefix}?endpoint_override={self.lab.ip(1)}:9000&scheme=http&region=us-east-1")

    def make_bucket(self, bucket: str) -> None:
        code = ("import time\nfrom pyarrow import fs\n"
                f"s3 = fs.S3FileSystem(endpoint_override='{self.lab.ip(1)}:9000', scheme='http', region='us-east-1', "
                "allow_bucket_creation=True)\n"
                "for _ in range(100):\n"
                "    try:\n"
                f"        s3.create_dir('{bucket}'); break\n"
                "    except OSError:\n"
                "        time.sleep(0.2)\n"
                "else:\n    raise SystemExit('the S3 server did not answer')\n")
        self.lab.run(1, [sys.executable, "-c", code], env=self.env(1), timeout=60)

    def driver(self, args: Sequence[str], cwd: str, background: bool = False, timeout: float = 900, **env):
        """``taalm ARGS`` on the head node (the driver's machine), attached to the cluster."""
        cmd = [str(VENV_BIN / "taalm"), *args]
        if background:
            return self.lab.popen(1, cmd, env=self.env(1, **env), cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        return self.lab.run(1, cmd, env=self.env(1, **env), cwd=cwd, timeout=timeout, check=False)

    def stop(self) -> None:
        self.lab.down()
