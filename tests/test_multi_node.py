"""Pretraining on two nodes simulated on one machine: torchrun agents with ``--nnodes 2``, c10d rendezvous on
127.0.0.1, gloo on CPU. Three runs start together (one module fixture) and the tests read them:

- one node, 2 processes: the reference;
- two nodes of 1 process, prepared data on shared storage, one node's process killed mid-epoch and brought back by
  ``--max_restarts``: it must end where the reference ends, with the reference's losses;
- ``scripts/slurm_pretrain.sh`` with stand-ins for ``srun`` and ``scontrol``: two nodes of 2 processes under SLURM's
  environment, prepared data on node-local disks (one folder per node): each node's first process prepares its
  node's copy, once.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from pgl_bundle.data import make_synthetic_dataset, prepare, training_datalist
from tiny import TINY_PRETRAIN

# 8 volumes over 2 processes, batch 1: 4 iterations per epoch, 8 in all; checkpoints at iteration 5 and each epoch
RUN = {**TINY_PRETRAIN, "num_workers": 0, "batch_size": 1, "max_epochs": 2, "checkpoint_every_n_iterations": 5}
KILL_AFTER = 6  # mid-epoch 2, one iteration after the checkpoint of iteration 5
REPO_ROOT = Path(__file__).resolve().parents[1]
# one thread per process; pgl_bundle importable uninstalled; torchrun's workers on a rendezvous store of their own
# per restart (with the agent's shared store a restarted worker can read the addresses of the previous attempt)
ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
}
LOSS = re.compile(r"Epoch: (\d+)/\d+, Iter: (\d+)/\d+ -- train_loss: (\S+)")
# SLURM on one machine: srun runs its command once per node as a task of its own (SLURM_LOCALID 0), the string
# NODE_DISK in it naming that node's own disk (a folder per node, at the same path on a real cluster)
SRUN = """#!/bin/bash
for node in 0 1; do
    SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 \\
        "${@//NODE_DISK/$ROOT/node${node}_disk}" > "$ROOT/local$node.log" 2>&1 &
done
for node in 0 1; do wait -n || exit 1; done
"""
SCONTROL = "#!/bin/bash\necho 127.0.0.1\n"  # scontrol show hostnames: the job's nodes (the first: the rendezvous)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(**changes) -> list[str]:
    return [arg for k, v in {**RUN, **changes}.items() for arg in (f"--{k}", json.dumps(v))]


def start(log: Path, cmd: list[str], env: dict) -> subprocess.Popen:
    """``cmd`` in a process group of its own, output into ``log``."""
    with open(log, "w") as out:
        return subprocess.Popen(
            cmd, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def torchrun(torchrun_args: list[str], run_id: str, configs: list[str], **changes) -> list[str]:
    """A torchrun agent (one node) running ``monai.bundle run run_id`` in its processes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_args, "-m", "monai.bundle", "run", run_id]
    return cmd + ["--config_file", json.dumps(configs), "--logging_file", "configs/logging.conf", *overrides(**changes)]


def stop(agents: list[subprocess.Popen]) -> None:
    """SIGTERM to what still runs (torchrun's agents stop their processes then), SIGKILL after a minute."""
    for agent in agents:
        if agent.poll() is None:
            os.killpg(agent.pid, signal.SIGTERM)
    for agent in agents:
        try:
            agent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(agent.pid, signal.SIGKILL)
            agent.wait()


def tails(root: Path, prefix: str) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(root.glob(f"{prefix}*.log")))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multi_node")
    data = make_synthetic_dataset(str(root / "data"), 8, shape=(64, 64, 24))
    configs = ["configs/pretrain.json", "configs/multi_gpu_pretrain.json"]
    marker = root / "killed_pid"
    # test-only run id: after iteration KILL_AFTER, global rank 1 writes its pid and blocks (once: not after restart)
    pause = root / "pause.json"
    pause.write_text(
        json.dumps(
            {
                "pause_then_train": [
                    f"$@train#trainer.add_event_handler(ignite.engine.Events.ITERATION_COMPLETED(once={KILL_AFTER}), "
                    f"lambda engine: torch.distributed.get_rank() != 1 or os.path.exists('{marker}') or "
                    f"(open('{marker}', 'w').write(str(os.getpid())), os.read(os.pipe()[0], 1)))",
                    "@run",
                ]
            }
        )
    )
    bin_dir = root / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    slurm_env = {
        **{k: v for k, v in ENV.items() if k != "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"},  # the script sets it
        "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
        "ROOT": str(root),
        "SLURM_JOB_ID": "1",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "SLURM_JOB_NUM_NODES": "2",
        "NPROC_PER_NODE": "2",
        "RDZV_PORT": str(free_port()),
    }
    endpoint = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{free_port()}", "--rdzv_id", "two_nodes"]
    nodes = {
        "one_node": [
            start(
                root / "one_node.log",
                torchrun(
                    ["--standalone", "--nproc_per_node", "2"],
                    "training",
                    configs,
                    bundle_root=str(root / "one_node"),
                    dataset_dir=data,
                ),
                ENV,
            )
        ],
        "two_nodes": [  # node ranks: the rendezvous assigns them (torchrun ignores --node_rank with c10d)
            start(
                root / f"two_nodes{n}.log",
                torchrun(
                    ["--nnodes", "2", "--nproc_per_node", "1", "--max_restarts", "1", *endpoint],
                    "pause_then_train",
                    [*configs, str(pause)],
                    bundle_root=str(root / "two_nodes"),
                    dataset_dir=data,
                    prepared_dir=str(root / "shared_disk"),
                    resume_from="latest",
                ),
                ENV,
            )
            for n in range(2)
        ],
        "local": [  # the SLURM script's paper preset, made tiny
            start(
                root / "local.log",
                ["bash", "scripts/slurm_pretrain.sh"]
                + overrides(
                    bundle_root=str(root / "local"),
                    dataset_dir=data,
                    prepared_storage="local",
                    prepared_dir="NODE_DISK",
                    max_epochs=1,
                    warmup_epochs=0,
                ),
                slurm_env,
            )
        ],
    }
    agents = [agent for group in nodes.values() for agent in group]
    try:
        deadline = time.time() + 300
        while not (marker.exists() and marker.read_text()) and time.time() < deadline:
            if any(a.poll() is not None for a in nodes["two_nodes"]):
                pytest.fail(f"a two-node agent ended before the kill\n{tails(root, 'two_nodes')}")
            time.sleep(0.1)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        codes = {name: [a.wait(timeout=max(1, deadline - time.time())) for a in group] for name, group in nodes.items()}
    except (subprocess.TimeoutExpired, FileNotFoundError, ValueError) as e:
        pytest.fail(f"{e!r}: not done in time\n{tails(root, '')}")
    finally:
        stop(agents)
    for name, group in codes.items():
        assert group == [0] * len(group), f"{name}: exit codes {group}\n{tails(root, name)}"
    return root, {p.stem: p.read_text() for p in root.glob("*.log")}


def logged_losses(log: str) -> dict[tuple[int, int], set[str]]:
    """Rank 0's logged loss per (epoch, iteration of the epoch): one value each, even for iterations trained again."""
    losses: dict[tuple[int, int], set[str]] = {}
    for epoch, iteration, loss in LOSS.findall(log):
        losses.setdefault((int(epoch), int(iteration)), set()).add(loss)
    return losses


def final_state(bundle_root: Path) -> dict:
    path = bundle_root / "models" / "checkpoints" / "checkpoint_final.pt"
    return torch.load(path, map_location="cpu", weights_only=True)


def test_two_nodes_pretrain_as_one_node_does(runs):
    """Same global batch (2 processes of batch 1) and seed: the same losses and the same final weights, through a
    restart too. Tolerance: the 4 decimals of the logged losses; weights, optimizer and trainer state to 1e-6."""
    root, logs = runs
    reference = logged_losses(logs["one_node"])
    losses = logged_losses(logs["two_nodes0"] + logs["two_nodes1"])
    assert len(reference) == 8 and all(len(v) == 1 for v in reference.values())
    assert losses == reference
    one, two = final_state(root / "one_node"), final_state(root / "two_nodes")
    assert two["trainer"] == one["trainer"] and one["trainer"]["iteration"] == 8
    assert two["lr_scheduler"] == one["lr_scheduler"]
    torch.testing.assert_close(two["network"], one["network"], rtol=1e-6, atol=1e-6)
    assert any(k.startswith("target.") for k in one["network"])
    torch.testing.assert_close(two["optimizer"]["state"], one["optimizer"]["state"], rtol=1e-6, atol=1e-6)


def test_killed_node_comes_back_from_the_last_checkpoint(runs):
    root, logs = runs
    log = logs["two_nodes0"] + logs["two_nodes1"]
    checkpoint = root / "two_nodes" / "models" / "checkpoints" / "checkpoint_iteration=5.pt"
    assert log.count(f"Restored all variables from {checkpoint}") == 2  # both nodes' processes, once each
    assert "epoch 2: resuming after its first 1 batches" in log
    record = json.loads((checkpoint.parent / "run.json").read_text())
    assert [r["from"] for r in record["resumed"]] == [str(checkpoint)]
    assert f"failed (exitcode: -9) local_rank: 0 (pid: {(root / 'killed_pid').read_text()})" in log  # torchrun's
    assert logged_losses(log)[(2, KILL_AFTER - 4)], "the killed iteration was not trained again"


def test_shared_storage_is_prepared_once(runs):
    root, logs = runs
    log = logs["two_nodes0"] + logs["two_nodes1"]
    assert log.count(f"preparing 8 of 8 volumes into {root / 'shared_disk'}") == 1  # by rank 0, not after the restart
    assert len(list((root / "shared_disk").glob("*.zxy.npy"))) == 8


def test_node_local_storage_is_prepared_once_per_node(runs):
    root, logs = runs
    log = logs["local0"] + logs["local1"]
    folders = [root / "node0_disk", root / "node1_disk"]
    for folder in folders:  # by the first of the node's 2 processes; the second finds it prepared
        assert log.count(f"preparing 8 of 8 volumes into {folder}") == 1, folder
    arrays = [sorted(folder.glob("*.zxy.npy")) for folder in folders]
    assert [p.name for p in arrays[0]] == [p.name for p in arrays[1]] and len(arrays[0]) == 8
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(*arrays))
    assert final_state(root / "local")["trainer"]["iteration"] == 2  # 8 volumes over 4 processes, batch 1, 1 epoch


def test_a_prepared_folder_is_read_without_writing(tmp_path):
    """The processes that find the folder prepared (every rank after the one that prepared) write nothing into it."""
    data = make_synthetic_dataset(str(tmp_path / "data"), 2, shape=(40, 40, 20))
    settings = {"min_size": (32, 32, 16), "min_image_size": None}
    first = prepare(data, str(tmp_path / "prepared"), **settings)
    manifest = tmp_path / "prepared" / "manifest.json"
    written = manifest.stat()
    assert prepare(data, str(tmp_path / "prepared"), **settings) == first
    assert (manifest.stat().st_ino, manifest.stat().st_mtime_ns) == (written.st_ino, written.st_mtime_ns)


def test_prepared_storage_is_shared_or_local(tmp_path):
    with pytest.raises(ValueError, match="prepared_storage: 'shared' or 'local', not 'nfs'"):
        training_datalist("", str(tmp_path / "prepared"), "", str(tmp_path), storage="nfs")
