#!/usr/bin/env bash
# Build the algorithm image from the Dockerfile beside this script.
#
#   ./build.sh
#   BASE_IMAGE=localhost/python-bookworm-base IMAGE=midog25-atypical:dev ./build.sh
#
# Environment:
#   DOCKER             container command, may carry global flags (default: docker),
#                      e.g. "podman --cgroup-manager cgroupfs --runtime runc"
#   IMAGE              tag of the built image (default: midog25-atypical)
#   BASE_IMAGE         base image; forwarded as --build-arg only when set, else the Dockerfile's default
#   DOCKER_BUILD_ARGS  extra words for the build command, split on whitespace
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")"

read -r -a docker <<< "${DOCKER:-docker}"
read -r -a extra_args <<< "${DOCKER_BUILD_ARGS:-}"
image="${IMAGE:-midog25-atypical}"

args=(build --tag "$image")
if [[ -n "${BASE_IMAGE:-}" ]]; then
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
fi
args+=("${extra_args[@]}")

"${docker[@]}" "${args[@]}" .
echo "built $image" >&2
