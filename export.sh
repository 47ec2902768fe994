#!/usr/bin/env bash
# Write the two archives that Grand Challenge takes:
#   <name>-YYYYMMDD.tar.gz          the image (`docker save | gzip`), uploaded as the algorithm container
#   <name>-weights-YYYYMMDD.tar.gz  the contents of the weights folder, uploaded as the model; Grand
#                                   Challenge unpacks it into /opt/ml/model, where process.py looks
#                                   for manifest.json before it falls back to the bundled weights
#
#   ./build.sh && ./test.sh && ./export.sh
#
# Environment:
#   DOCKER       container command, may carry global flags (default: docker)
#   IMAGE        image to save (default: midog25-atypical); <name> is its last path part, without tag
#   WEIGHTS_DIR  weights folder to pack (default: weights/ beside this script)
#   EXPORT_DIR   folder for the archives (default: the folder of this script)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
read -r -a docker <<< "${DOCKER:-docker}"
image="${IMAGE:-midog25-atypical}"
weights="${WEIGHTS_DIR:-$root/weights}"
if [[ ! -f "$weights/manifest.json" ]]; then
    echo "error: $weights/manifest.json not found; export weights first (python -m model.train) or set WEIGHTS_DIR" >&2
    exit 1
fi

mkdir -p "${EXPORT_DIR:-$root}"
export_dir="$(cd "${EXPORT_DIR:-$root}" && pwd)"

name="${image##*/}"
name="${name%%:*}"
stamp="$(date +%Y%m%d)"
image_archive="$export_dir/$name-$stamp.tar.gz"
weights_archive="$export_dir/$name-weights-$stamp.tar.gz"

# Write to temporary names and rename at the end, so that a failed save leaves no archive that
# looks complete.
partial_image="$image_archive.partial"
partial_weights="$weights_archive.partial"
trap 'rm -f "$partial_image" "$partial_weights"' EXIT

echo "saving $image to $image_archive" >&2
"${docker[@]}" save "$image" | gzip > "$partial_image"

# Files at the top level of the archive (no leading folder), so that manifest.json lands directly
# in /opt/ml/model. Hidden files such as .gitkeep are left out.
echo "packing $weights to $weights_archive" >&2
(
    cd "$weights"
    shopt -s nullglob
    files=(*)
    tar --create --gzip --file "$partial_weights" --owner=0 --group=0 --numeric-owner -- "${files[@]}"
)

mv "$partial_image" "$image_archive"
mv "$partial_weights" "$weights_archive"
ls -l "$image_archive" "$weights_archive"
