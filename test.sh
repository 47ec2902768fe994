#!/usr/bin/env bash
# Run the built image on test/input the way Grand Challenge runs it, and compare its output with
# test/expected_output.json (same page count and classes, confidences within 1e-3).
#
#   ./build.sh && ./test.sh
#
# The image must exist locally, because nothing is pulled. The container gets no network, a
# read-only root file system and /input, a writable /output, and a tmpfs at /tmp. It gets all GPUs
# when nvidia-smi works on this host or `docker info` lists an nvidia runtime. Exits non-zero when
# the container fails or its output differs; the differing pages are printed.
#
# NOTE: test/expected_output.json is made on the CPU in float32, while process.py runs float16 on a
# GPU. Whether a GPU run stays within 1e-3 has not been checked.
#
# Environment:
#   DOCKER           container command, may carry global flags (default: docker)
#   IMAGE            image to run (default: midog25-atypical)
#   INPUT_DIR        input folder (default: test/input)
#   EXPECTED         reference output (default: test/expected_output.json)
#   OUTPUT_DIR       keep the output here; it is made writable for the container's user
#                    (default: a temporary folder, removed on exit)
#   MODEL_DIR        folder mounted read-only at /opt/ml/model, as Grand Challenge mounts an
#                    uploaded model tarball; unset: the weights inside the image are used
#   GPUS             auto, all or none (default: auto)
#   DOCKER_RUN_ARGS  extra words for the run command, split on whitespace
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a docker <<< "${DOCKER:-docker}"
read -r -a extra_args <<< "${DOCKER_RUN_ARGS:-}"
image="${IMAGE:-midog25-atypical}"
input="$(cd "${INPUT_DIR:-$root/test/input}" && pwd)"
expected="${EXPECTED:-$root/test/expected_output.json}"
result_name="multiple-mitotic-figure-classification.json"

if [[ ! -f "$expected" ]]; then
    echo "error: $expected not found; make it with: python test/make_sample.py --weights weights" >&2
    exit 1
fi

if [[ -n "${OUTPUT_DIR:-}" ]]; then
    mkdir -p "$OUTPUT_DIR"
    output="$(cd "$OUTPUT_DIR" && pwd)"
    rm -f "$output/$result_name"
else
    output="$(mktemp -d)"
    trap 'rm -rf "$output"' EXIT
fi
# The image runs as a non-root user whose uid need not exist on this host.
chmod 777 "$output"

use_gpus() {
    case "${GPUS:-auto}" in
        all) return 0 ;;
        none) return 1 ;;
        auto)
            if nvidia-smi > /dev/null 2>&1; then
                return 0
            fi
            local info
            info="$("${docker[@]}" info 2> /dev/null || true)"
            [[ "${info,,}" == *nvidia* ]]
            ;;
        *)
            echo "error: GPUS must be auto, all or none, got '$GPUS'" >&2
            exit 2
            ;;
    esac
}

args=(run --rm
    --pull never
    --network none
    --read-only
    --tmpfs /tmp
    --shm-size 128m
    --volume "$input:/input:ro"
    --volume "$output:/output")
if [[ -n "${MODEL_DIR:-}" ]]; then
    args+=(--volume "$(cd "$MODEL_DIR" && pwd):/opt/ml/model:ro")
fi
if use_gpus; then
    args+=(--gpus all)
fi
args+=("${extra_args[@]}" "$image")

echo "running $image on $input" >&2
"${docker[@]}" "${args[@]}"

if [[ ! -f "$output/$result_name" ]]; then
    echo "error: the container exited 0 but wrote no $result_name to $output" >&2
    exit 1
fi
python3 "$root/test/compare_output.py" "$output/$result_name" "$expected"
