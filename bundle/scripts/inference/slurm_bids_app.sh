#!/usr/bin/env bash
# The BIDS App on a SLURM cluster: one participant per task of a job array, then the group level as a job that starts
# once every task has ended (afterany: the group names the participants whose task failed). From the bundle folder,
# on a login node, with the bundle's environment active:
#   bash scripts/inference/slurm_bids_app.sh BIDS OUT [the app's options, e.g. --qc_png true]
# APP is the app's command, by default this bundle's `python -m scripts.inference.bids_app`; the image under Apptainer:
#   APP="apptainer run --containall -B BIDS -B OUT vnet-hippocampus.sif" bash scripts/inference/slurm_bids_app.sh ...
# SBATCH_ARGS adds sbatch options (partition, account, time). A task takes 2 cores and at most 4 GB (a 0.5 mm head).
# Logs: OUT/logs/ (participant_<task>.log, group.log). Prints the two job ids.
set -euo pipefail
APP=${APP:-python -m scripts.inference.bids_app}

participants() {
    find "$1" -mindepth 1 -maxdepth 1 -type d -name 'sub-*' -printf '%f\n' | sed 's/^sub-//' | sort
}

case "${1:-}" in
--participant)  # one array task: the participant of its index
    shift
    mapfile -t labels < <(participants "$1")
    exec $APP "$1" "$2" participant --participant_label "${labels[$SLURM_ARRAY_TASK_ID]}" "${@:3}"
    ;;
--group)
    shift
    exec $APP "$1" "$2" group "${@:3}"
    ;;
esac

[ $# -ge 2 ] || { echo "usage: bash $0 BIDS OUT [options]" >&2; exit 2; }
bids=$(realpath "$1")
out=$(realpath -m "$2")
shift 2
[ -f "$bids/dataset_description.json" ] || { echo "error: $bids is not a BIDS dataset (no dataset_description.json)" >&2; exit 1; }
mapfile -t labels < <(participants "$bids")
[ ${#labels[@]} -gt 0 ] || { echo "error: no sub-* folder in $bids" >&2; exit 1; }
mkdir -p "$out/logs"
# shellcheck disable=SC2086  # SBATCH_ARGS holds several options
array=$(sbatch --parsable --job-name hippocampus --array "0-$((${#labels[@]} - 1))" --cpus-per-task 2 --mem 4G \
    --output "$out/logs/participant_%a.log" --export ALL ${SBATCH_ARGS:-} "$0" --participant "$bids" "$out" "$@")
# shellcheck disable=SC2086
group=$(sbatch --parsable --job-name hippocampus-group --dependency "afterany:$array" --cpus-per-task 2 --mem 4G \
    --output "$out/logs/group.log" --export ALL ${SBATCH_ARGS:-} "$0" --group "$bids" "$out" "$@")
echo "participant array $array (${#labels[@]} tasks), then group job $group; logs in $out/logs"
