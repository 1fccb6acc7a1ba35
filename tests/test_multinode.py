"""Two torchrun "nodes" on loopback (one process each) write the 1-process record byte for byte."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WORKER = str(ROOT / "tests" / "calibrate_worker.py")
# one config per algorithm, each granularity once: the exchange differs (histogram sums,
# gathered extremes) and so does what could go wrong across nodes
CONFIGS = [{"act_algo": "ifmr", "quant_granularity": 1}, {"act_algo": "hfmg", "quant_granularity": 0}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_loopback_write_the_one_process_record(tiny_dir, tmp_path):
    # gloo on the loopback interface only: nothing leaves the machine
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}
    args = [str(tiny_dir), str(tiny_dir / "corpus.txt")]
    one = subprocess.run([sys.executable, WORKER, *args, str(tmp_path / "one"), json.dumps(CONFIGS), "3",
                          "streaming"], env=env, timeout=120, capture_output=True, text=True, check=False)
    assert one.returncode == 0, one.stderr[-3000:]

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    port = str(_free_port())
    nodes = [subprocess.Popen([torchrun, "--nnodes", "2", "--node_rank", str(rank), "--nproc_per_node", "1",
                               "--master_addr", "127.0.0.1", "--master_port", port, WORKER, *args,
                               str(tmp_path / f"node{rank}_"), json.dumps(CONFIGS), "2", "streaming"],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]  # both started before either is waited on: they rendezvous
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=120))
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
                node.communicate()
    for rank, (node, (out, err)) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank}: {err[-3000:]}"
        assert f"rank={rank} world_size=2" in out, out
    for i, params in enumerate(CONFIGS):
        written = (tmp_path / f"node0_{i}.txt").read_bytes()
        assert written == (tmp_path / f"one{i}.txt").read_bytes(), params
        assert written.count(b"record {") == 4, params
        assert not (tmp_path / f"node1_{i}.txt").exists()  # only the main process writes
