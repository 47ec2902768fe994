#!/usr/bin/env bash
# Check the container end to end with podman, on a Debian or Ubuntu machine without a Docker engine.
#
#   sudo nice -n 19 test/container-check.sh
#   sudo WEIGHTS=/tmp/cw nice -n 19 test/container-check.sh   # weights other than weights/
#
# Steps, each timed (a summary is printed at the end):
#   1. install podman, runc and debootstrap with apt-get when they are missing;
#   2. make a local Debian bookworm base image with debootstrap (python3, pip, venv, CA
#      certificates, useradd), or reuse it when it exists, so that no image registry is needed;
#   3. build the image with ./build.sh (DOCKER set to podman, BASE_IMAGE to that base);
#   4. run it with ./test.sh (no network, read-only /input, non-root user) and compare its output with
#      test/expected_output.json, then with a direct `python process.py` run on the same input;
#   5. write the archives with ./export.sh, unpack the weights archive and run the image with it
#      mounted at /opt/ml/model, as Grand Challenge does with an uploaded model;
#   6. load the image archive into an empty podman store and run ./test.sh on the loaded image.
#
# Environment:
#   WEIGHTS     weights folder that test/expected_output.json was made with (default: weights/).
#               Any other folder is used through /opt/ml/model only, because the image bundles weights/.
#   BASE_IMAGE  tag of the local base image (default: localhost/python-bookworm-base)
#   IMAGE       tag of the built image (default: midog25-atypical)
#   MIRROR      Debian mirror for debootstrap (default: debootstrap's own default mirror)
#   WORK_DIR    scratch folder for outputs, archives and the second store (default: a new temporary
#               folder, removed at the end unless KEEP_WORK=1)
#
# Podman here needs three settings, all passed through DOCKER, DOCKER_BUILD_ARGS and DOCKER_RUN_ARGS:
#   --cgroup-manager cgroupfs   there is no systemd to manage cgroups;
#   --runtime runc              the runtime installed above;
#   --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
#                               rootful podman requests open-file and process limits above the hard
#                               limits of a sandboxed host (here 20000 and 96368), and runc then fails
#                               with "error setting rlimit type 7: operation not permitted" (type 6
#                               for nproc).
# The build uses the host network (--network host) and the host's CA bundle, mounted over the
# image's one for the build only. Debian's pip reads /etc/ssl/certs/ca-certificates.crt, so a
# TLS-intercepting proxy that the host trusts is trusted by pip inside the build as well.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

base_image="${BASE_IMAGE:-localhost/python-bookworm-base}"
image="${IMAGE:-midog25-atypical}"
mirror=()
[[ -n "${MIRROR:-}" ]] && mirror=("$MIRROR")
weights="$(cd "${WEIGHTS:-$root/weights}" && pwd)"
result_name="multiple-mitotic-figure-classification.json"
ca_bundle=/etc/ssl/certs/ca-certificates.crt

if [[ "$(id -u)" != 0 ]]; then
    echo "error: debootstrap and rootful podman need root; run with sudo" >&2
    exit 1
fi
if [[ ! -f "$weights/manifest.json" ]]; then
    echo "error: $weights/manifest.json not found; set WEIGHTS to the folder test/expected_output.json was made with" >&2
    exit 1
fi
if [[ "$weights" == "$root/weights" ]]; then
    bundled_weights=1
else
    bundled_weights=0
fi

if [[ -n "${WORK_DIR:-}" ]]; then
    mkdir -p "$WORK_DIR"
    work="$(cd "$WORK_DIR" && pwd)"
else
    work="$(mktemp -d /tmp/container-check.XXXXXX)"
fi

podman_flags="--cgroup-manager cgroupfs --runtime runc"
ulimits="--ulimit nofile=1024:1024 --ulimit nproc=1024:1024"
run_args="$ulimits"
if [[ -n "${OMP_NUM_THREADS:-}" ]]; then
    run_args+=" --env OMP_NUM_THREADS=$OMP_NUM_THREADS"
fi

# podman and a second podman that keeps its images in an empty store under the work folder.
read -r -a podman <<< "podman $podman_flags"
loaded_store="--root $work/store --runroot $work/run"
read -r -a podman_loaded <<< "podman $podman_flags $loaded_store"

cleanup() {
    if [[ "${KEEP_WORK:-0}" == 1 ]]; then
        echo "kept $work" >&2
        return
    fi
    if [[ -d "$work/store" ]]; then
        "${podman_loaded[@]}" system reset --force > /dev/null 2>&1 || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

step_names=()
step_seconds=()
step_start=""

begin() {
    echo "== $1" >&2
    step_names+=("$1")
    step_start="$EPOCHREALTIME"
}

end() {
    step_seconds+=("$(awk -v start="$step_start" -v stop="$EPOCHREALTIME" 'BEGIN { printf "%.1f", stop - start }')")
}

compare() {
    python3 "$root/test/compare_output.py" "$@"
}

begin "install podman, runc, debootstrap"
missing=()
for tool in podman runc debootstrap; do
    if ! command -v "$tool" > /dev/null; then
        missing+=("$tool")
    fi
done
if (( ${#missing[@]} > 0 )); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install --yes "${missing[@]}"
else
    echo "already installed: $(podman --version), $(runc --version | head -n 1)" >&2
fi
end

begin "base image $base_image"
if "${podman[@]}" image exists "$base_image"; then
    echo "reusing $base_image" >&2
else
    rootfs="$work/rootfs"
    echo "debootstrap into $rootfs (log: $work/debootstrap.log)" >&2
    if ! debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,passwd \
            bookworm "$rootfs" "${mirror[@]}" > "$work/debootstrap.log" 2>&1; then
        tail -n 20 "$work/debootstrap.log" >&2
        echo "error: debootstrap failed; full log in $work/debootstrap.log" >&2
        KEEP_WORK=1
        exit 1
    fi

    # The Dockerfile installs with pip into the system Python, as in the official python images,
    # so Debian's PEP 668 marker has to go. The Dockerfile calls `python`, which Debian names python3.
    # Debian's python3-pip installs `pip` on bookworm, and the link covers releases that ship only pip3.
    rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
    ln -sf /usr/bin/python3 "$rootfs/usr/local/bin/python"
    if [[ ! -e "$rootfs/usr/bin/pip" ]]; then
        ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
    fi
    rm -rf "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*

    tar --create --directory "$rootfs" . | "${podman[@]}" import \
        --change "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        --change 'CMD ["python"]' - "$base_image"
    rm -rf "$rootfs"
fi
end

begin "build ($image)"
DOCKER="podman $podman_flags" IMAGE="$image" BASE_IMAGE="$base_image" \
    DOCKER_BUILD_ARGS="--network host --volume $ca_bundle:$ca_bundle:ro $ulimits" \
    ./build.sh
end

begin "non-root user"
user="$("${podman[@]}" run --rm --network none $ulimits --entrypoint id "$image" -u)"
if [[ "$user" == 0 ]]; then
    echo "error: the image runs as root" >&2
    exit 1
fi
echo "the image runs as uid $user" >&2
end

output="$work/container-output"
if (( bundled_weights )); then
    begin "test.sh, bundled weights"
    DOCKER="podman $podman_flags" IMAGE="$image" DOCKER_RUN_ARGS="$run_args" OUTPUT_DIR="$output" ./test.sh
    end
fi

begin "export.sh"
DOCKER="podman $podman_flags" IMAGE="$image" WEIGHTS_DIR="$weights" EXPORT_DIR="$work/export" ./export.sh
end
name="${image##*/}"
name="${name%%:*}"
image_archive="$(ls "$work/export/$name"-[0-9]*.tar.gz)"
weights_archive="$(ls "$work/export/$name"-weights-*.tar.gz)"

begin "test.sh, weights archive at /opt/ml/model"
mkdir -p "$work/model"
tar --extract --gzip --file "$weights_archive" --directory "$work/model"
DOCKER="podman $podman_flags" IMAGE="$image" DOCKER_RUN_ARGS="$run_args" MODEL_DIR="$work/model" \
    OUTPUT_DIR="$work/model-output" ./test.sh
if (( ! bundled_weights )); then
    output="$work/model-output"
fi
end

begin "process.py without container"
if [[ -x "$root/.venv/bin/python" ]]; then
    python="$root/.venv/bin/python"
else
    python=python3
fi
mkdir -p "$work/direct-output"
"$python" process.py --input test/input --output "$work/direct-output" --weights "$weights" --device cpu
compare "$output/$result_name" "$work/direct-output/$result_name"
end

begin "load the image archive into an empty store"
# podman 4.3 does not read gzip-compressed archives (docker load does), so decompress first.
gzip --decompress --stdout "$image_archive" | "${podman_loaded[@]}" load
end

begin "test.sh, loaded image"
loaded_model=()
if (( ! bundled_weights )); then
    loaded_model=(MODEL_DIR="$work/model")
fi
env DOCKER="podman $podman_flags $loaded_store" IMAGE="$image" DOCKER_RUN_ARGS="$run_args" \
    OUTPUT_DIR="$work/loaded-output" "${loaded_model[@]}" ./test.sh
end

image_bytes="$("${podman[@]}" image inspect --format '{{.Size}}' "$image")"
echo
echo "container check passed"
printf '%-48s %8s\n' step seconds
for index in "${!step_names[@]}"; do
    printf '%-48s %8s\n' "${step_names[$index]}" "${step_seconds[$index]}"
done
echo
awk -v bytes="$image_bytes" 'BEGIN { printf "image size (podman image inspect): %.2f GB (%s bytes)\n", bytes / 1e9, bytes }'
for archive in "$image_archive" "$weights_archive"; do
    awk -v bytes="$(stat --format %s "$archive")" -v name="${archive##*/}" \
        'BEGIN { printf "%s: %.2f GB (%s bytes)\n", name, bytes / 1e9, bytes }'
done
if (( ! bundled_weights )); then
    echo "note: WEIGHTS is not weights/, so the weights bundled in the image were not checked"
fi
