#!/bin/bash
# One node's share of a multi-node run: `accelerate launch` with this node's rank. Run by slurm/distbench.sbatch
# through srun (SLURM_NNODES, SLURM_NODEID set by SLURM; MAIN_ADDR, MAIN_PORT by the sbatch script). Runs
# outside SLURM too, given those variables (tests/test_slurm.py starts two "nodes" on 127.0.0.1).
set -euo pipefail
: "${SLURM_NNODES:?}" "${SLURM_NODEID:?}" "${MAIN_ADDR:?}" "${MAIN_PORT:?}"
SETUP="${SETUP:-accelerate_configs/gpu_2_ddp.yaml}"
if [ -z "${PROCS_PER_NODE:-}" ]; then
  PROCS_PER_NODE=$( (nvidia-smi -L 2>/dev/null || true) | wc -l)
  [ "$PROCS_PER_NODE" -gt 0 ] || { echo "launch_node.sh: no GPU on $(hostname); set PROCS_PER_NODE" >&2; exit 2; }
fi
ACCELERATE="${ACCELERATE:-accelerate}"
exec "$ACCELERATE" launch --config_file "$SETUP" \
  --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
  --num_processes $((SLURM_NNODES * PROCS_PER_NODE)) \
  --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
  --rdzv_backend static --same_network \
  "$@"
