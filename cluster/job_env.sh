# Shared start of every cluster/*.slurm script (sourced, bash): find the repository, activate the
# Python environment, load the NCCL settings. Variables (all optional):
#   REPO_DIR   repository checkout on shared storage (default: the job's working directory, i.e. where
#              sbatch was run, or --chdir)
#   ENV_SETUP  a bash file sourced first: `module load ...`, `conda activate ...`, container set-up
#   VENV       a virtualenv directory whose bin/activate is sourced
#   PYTHON     interpreter to run (default: python from the activated environment)
#   SRUN_ARGS  extra srun options for every step, e.g. a pyxis container:
#              SRUN_ARGS="--container-image=/shared/dit.sqsh --container-mounts=/shared:/shared"
set -eo pipefail
REPO_DIR="${REPO_DIR:-$PWD}"
if [ ! -f "$REPO_DIR/cluster/launch.py" ]; then
  echo "error: REPO_DIR=$REPO_DIR is not the repository (no cluster/launch.py); run sbatch from the checkout or set REPO_DIR" >&2
  exit 4
fi
cd "$REPO_DIR"
export REPO_DIR
if [ -n "${ENV_SETUP:-}" ]; then
  # shellcheck disable=SC1090
  source "$ENV_SETUP" || { echo "error: ENV_SETUP=$ENV_SETUP failed" >&2; exit 4; }
fi
if [ -n "${VENV:-}" ]; then
  # shellcheck disable=SC1091
  source "$VENV/bin/activate" || { echo "error: cannot activate VENV=$VENV" >&2; exit 4; }
fi
# shellcheck source=cluster/nccl.env
source "$REPO_DIR/cluster/nccl.env"
PYTHON="${PYTHON:-python}"
export PYTHON PYTHONUNBUFFERED=1
command -v "$PYTHON" >/dev/null || { echo "error: PYTHON=$PYTHON not found on PATH (set VENV or ENV_SETUP)" >&2; exit 4; }
echo "[job] $(date -Is) job ${SLURM_JOB_ID:-?}${SLURM_ARRAY_TASK_ID:+ array task $SLURM_ARRAY_TASK_ID} restart ${SLURM_RESTART_COUNT:-0} on $(hostname) in $REPO_DIR with $(command -v "$PYTHON")" >&2
