"""slurm/distbench.sbatch as SLURM would run it, for two "nodes" on 127.0.0.1: `scontrol` and `srun` are
stand-ins (srun starts one task per node with its SLURM_NODEID, side by side), everything else is the script's
own `accelerate launch` line, with the CPU multi-machine setup."""

import shutil
import subprocess

import pytest

from tests.conftest import BIN, REPO, child_env, free_port, records, require_dataset

pytestmark = pytest.mark.slow

SRUN = """#!/bin/bash
# stand-in for srun: one task per node on this host, SLURM_NODEID 0..N-1, all at once
while [[ "$1" == --* ]]; do shift; done
pids=(); for i in $(seq 0 $((SLURM_NNODES - 1))); do SLURM_NODEID=$i "$@" & pids+=($!); done
rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc
"""
SCONTROL = """#!/bin/bash
# stand-in for `scontrol show hostnames LIST`: every node is this host. The rest of the list comes after a pause,
# as from a long allocation, so a reader that stops at the first line closes the pipe before it is written.
echo 127.0.0.1; sleep 0.3; for i in $(seq 2 64); do echo 127.0.0.1; done
"""


def test_sbatch_script_runs_one_job_over_two_nodes(tmp_path):
    root = require_dataset("mnist")
    shims = tmp_path / "bin"
    shims.mkdir()
    for name, text in (("srun", SRUN), ("scontrol", SCONTROL)):
        (shims / name).write_text(text)
        (shims / name).chmod(0o755)
    env = child_env(
        PATH=f"{shims}:{BIN}:{child_env()['PATH']}",
        SLURM_JOB_NODELIST="node[1-2]",
        SLURM_NNODES="2",
        SLURM_SUBMIT_DIR=str(REPO),
        SETUP="accelerate_configs/multinode_2machines.yaml",  # CPU, one process per "node"
        PROCS_PER_NODE="1",
        MAIN_PORT=str(free_port()),
    )
    args = ["scripts/mlp.py", "--data_dir", str(root), "--runs_dir", str(tmp_path / "runs"),
            "--limit_train", "640", "--limit_eval", "100", "--max_steps", "3"]  # fmt: skip
    proc = subprocess.run(["bash", "slurm/distbench.sbatch", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (rec,) = records(tmp_path / "runs")
    s = rec["setup"]
    assert rec["status"] == "finished" and s["num_machines"] == 2 and s["num_processes"] == 2
    assert s["strategy"] == "ddp" and len(set(s["params_sha256_per_rank"])) == 1


def test_a_node_without_gpus_or_processes_count_is_one_line(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine has GPUs: the script would count them")
    env = child_env(SLURM_NNODES="2", SLURM_NODEID="0", MAIN_ADDR="127.0.0.1", MAIN_PORT="29599",
                    PATH=f"{tmp_path}:/usr/bin:/bin")  # fmt: skip
    proc = subprocess.run(["bash", "slurm/launch_node.sh", "scripts/mlp.py"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "set PROCS_PER_NODE" in lines[0], proc.stderr


def test_a_node_list_scontrol_cannot_expand_is_one_line(tmp_path):
    (tmp_path / "scontrol").write_text("#!/bin/bash\nexit 0\n")  # lists no host
    (tmp_path / "scontrol").chmod(0o755)
    env = child_env(SLURM_JOB_NODELIST="bogus[", PATH=f"{tmp_path}:/usr/bin:/bin")
    proc = subprocess.run(["bash", "slurm/distbench.sbatch", "scripts/mlp.py"], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=60)  # fmt: skip
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "lists no host" in lines[0], proc.stderr
