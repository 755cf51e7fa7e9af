#!/bin/bash
# Body shared by slurm/train_*.sbatch (run inside the batch step): run directory, resume point,
# wandb id, rendezvous, then `exec srun` of one training process per task.
#
# Environment knobs: RUN_DIR (default runs/<job name>-<job id> under the submit dir), PYTHON,
# WANDB_RUN_ID (default <cluster>-<job id>), MASTER_PORT (default Lightning's 15000 + job id digits).
set -euo pipefail

usage="usage: sbatch slurm/train_single_node.sbatch CONFIG [--trainer.max_steps N ...]"
config=${1:?$usage}
shift
# The run works in its own directory: every --config (the first and any among the overrides) absolute.
absolute_config() {
    if [ ! -f "$1" ]; then
        echo "config '$1' not found; $usage" >&2
        exit 2
    fi
    readlink -f "$1"
}
config=$(absolute_config "$config")
# A --ckpt_path given here starts the first attempt only: a requeued one resumes its own checkpoints (below).
start=last
absolute_ckpt() {
    if [ -f "$1" ]; then readlink -f "$1"; else echo "$1"; fi  # or Lightning's name: hpc, best, registry:...
}
overrides=()
while [ $# -gt 0 ]; do
    case $1 in
        --config) overrides+=(--config "$(absolute_config "${2:?--config needs a path}")"); shift 2 ;;
        --config=*) overrides+=(--config "$(absolute_config "${1#--config=}")"); shift ;;
        --ckpt_path) start=$(absolute_ckpt "${2:?--ckpt_path needs a path}"); shift 2 ;;
        --ckpt_path=*) start=$(absolute_ckpt "${1#--ckpt_path=}"); shift ;;
        *) overrides+=("$1"); shift ;;
    esac
done
: "${SLURM_JOB_ID:?not inside a SLURM job: submit with sbatch}"
: "${SLURM_NTASKS_PER_NODE:?set --ntasks-per-node (one task per GPU), not --ntasks}"

# Same directory for every attempt of the job, so a requeued attempt finds its checkpoints.
run_dir=${RUN_DIR:-$SLURM_SUBMIT_DIR/runs/$SLURM_JOB_NAME-$SLURM_JOB_ID}
mkdir -p "$run_dir"
cd "$run_dir"

# The same wandb run continues across attempts (wandb.init reads WANDB_RUN_ID; Lightning passes resume="allow").
export WANDB_RUN_ID=${WANDB_RUN_ID:-${SLURM_CLUSTER_NAME:-slurm}-$SLURM_JOB_ID}
# Rank 0's host; Lightning's SLURMEnvironment would parse SLURM_NODELIST itself, scontrol is exact.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_ADDR
# Since Slurm 22.05 srun no longer inherits sbatch's --cpus-per-task: data workers need the cores.
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

# Resume from the newest checkpoint of any kind (step saves, last*.ckpt, the pre-timeout hpc_ckpt_*.ckpt):
# Lightning's ckpt_path="last" ignores the hpc save, and a kill can land between a step save and
# last.ckpt. Writes are atomic (temp file + rename), so every *.ckpt present is complete.
resume=$(find "$run_dir" -name '*.ckpt' -type f -printf '%T@ %p\n' | sort -n | tail -n 1 | cut -d' ' -f2-)

ckpt=${resume:-$start}
echo "=== clip_hvt attempt $((${SLURM_RESTART_COUNT:-0} + 1)) of job $SLURM_JOB_ID on $SLURM_JOB_NODELIST" \
    "at $(date -Is): run dir $run_dir, resume from $([ "$ckpt" = last ] && echo scratch || echo "$ckpt")," \
    "wandb id $WANDB_RUN_ID"

# --kill-on-bad-exit: one rank failing ends every rank at once instead of leaving them in a collective.
exec srun --kill-on-bad-exit=1 "${PYTHON:-python}" -m clip_hvt.train --config "$config" \
    --trainer.devices "$SLURM_NTASKS_PER_NODE" --trainer.num_nodes "$SLURM_JOB_NUM_NODES" \
    --ckpt_path "$ckpt" "${overrides[@]}"
