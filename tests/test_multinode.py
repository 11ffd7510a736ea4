"""Several nodes for real: two network namespaces joined by a veth pair, one dsrun "node" in each through
`torchrun --nnodes 2`, Gloo over the hardware option's socket interface; and a plain loopback 2-node run.
Both must give the single-process losses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.conftest import REPO, dsrun, read_metrics
from tests.test_strategies import PARITY

STEPS = 6
JOB = [*PARITY, f"train.max_steps={STEPS}"]


def torchrun(node_rank: int, master: str, port: int, run_dir: Path, extra: list[str],
             netns: str | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
           "--node_rank", str(node_rank), "--master_addr", master, "--master_port", str(port),
           "-m", "dsrun", *JOB, "hardware.num_nodes=2", "parallel=ddp", "train.micro_batch=2", *extra,
           f"hydra.run.dir={run_dir}"]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> list[float]:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    proc = dsrun(*JOB, "train.micro_batch=4", run_dir=run_dir)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [row["loss"] for row in read_metrics(run_dir)]


def run_two_nodes(run_dir: Path, master: str, port: int, extra: list[str], namespaces=(None, None)) -> None:
    nodes = [torchrun(rank, master, port, run_dir, extra, ns) for rank, ns in enumerate(namespaces)]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for node, output in zip(nodes, outputs):
        assert node.returncode == 0, output[-3000:]


def test_two_nodes_over_loopback(single, tmp_path):
    run_dir = tmp_path / "run"
    run_two_nodes(run_dir, "127.0.0.1", 29611, [])
    assert [row["loss"] for row in read_metrics(run_dir)] == pytest.approx(single, rel=1e-5)
    assert not (run_dir / "dsrun_rank1.log").exists() or (run_dir / ".hydra").is_dir()
    assert sorted(p.name for p in (run_dir / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]


@pytest.fixture
def veth_pair():
    """Two 'hosts': network namespaces dsrA (10.231.0.1) and dsrB (10.231.0.2), each with interface dsr0."""
    tag = uuid.uuid4().hex[:6]
    a, b = f"dsrA{tag}", f"dsrB{tag}"
    steps = [["ip", "netns", "add", a], ["ip", "netns", "add", b],
             ["ip", "link", "add", f"va{tag}", "type", "veth", "peer", "name", f"vb{tag}"],
             ["ip", "link", "set", f"va{tag}", "netns", a], ["ip", "link", "set", f"vb{tag}", "netns", b],
             ["ip", "-n", a, "link", "set", f"va{tag}", "name", "dsr0"],
             ["ip", "-n", b, "link", "set", f"vb{tag}", "name", "dsr0"],
             ["ip", "-n", a, "addr", "add", "10.231.0.1/24", "dev", "dsr0"],
             ["ip", "-n", b, "addr", "add", "10.231.0.2/24", "dev", "dsr0"],
             ["ip", "-n", a, "link", "set", "dsr0", "up"], ["ip", "-n", b, "link", "set", "dsr0", "up"],
             ["ip", "-n", a, "link", "set", "lo", "up"], ["ip", "-n", b, "link", "set", "lo", "up"]]
    for step in steps:
        made = subprocess.run(step, capture_output=True, text=True)
        if made.returncode != 0:
            subprocess.run(["ip", "netns", "del", a], capture_output=True)
            subprocess.run(["ip", "netns", "del", b], capture_output=True)
            pytest.skip(f"cannot build network namespaces here ({' '.join(step)}: {made.stderr.strip()}); "
                        "the two-host test needs root and iproute2")
    yield a, b
    subprocess.run(["ip", "netns", "del", a], capture_output=True)
    subprocess.run(["ip", "netns", "del", b], capture_output=True)


def test_two_hosts_in_network_namespaces_over_a_veth_link(single, veth_pair, tmp_path):
    run_dir = tmp_path / "run"
    extra = ["+hardware.env.GLOO_SOCKET_IFNAME=dsr0", "hardware.network=ethernet"]
    run_two_nodes(run_dir, "10.231.0.1", 29612, extra, namespaces=veth_pair)
    assert [row["loss"] for row in read_metrics(run_dir)] == pytest.approx(single, rel=1e-5)
    env = json.loads((run_dir / "env.json").read_text())["env"]
    assert env["GLOO_SOCKET_IFNAME"] == "dsr0", "the hardware option's interface applied and recorded"
    assert env["WORLD_SIZE"] == "2"
