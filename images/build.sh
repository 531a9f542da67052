#!/usr/bin/env bash
# Builds a vmcgi guest: its kernel (kernel.sh), then its initramfs (initramfs.sh).
#
#   bash images/build.sh [--arch aarch64|x86_64] [--site DIR]... [--out DIR]
#                        [--kernel-source linux-source-X.Y|TARBALL] [--kernel-only]
#                        [--builtin-initramfs ARCHIVE]
#
# Defaults: --arch aarch64, --site images/site, --out images/out/<arch>.
# --site given more than once lays each site over the ones before it.
# --kernel-only builds $OUT/Image alone. --builtin-initramfs ARCHIVE builds
# $OUT/Image alone too, with ARCHIVE (an initramfs.cpio.gz, say) built in: a
# guest that boots from the one file, with no initrd. Each of the two recipes
# has its own key and cache: see kernel.sh and initramfs.sh.
#
#   bash images/build.sh --from-image SOURCE --out DIR [options]
#
# builds a guest from a container image instead (src/image/build.ts; `--help`
# lists its options).
set -Eeuo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
for arg in "$@"; do
    case "$arg" in
        --from-image|--from-image=*)
            main="$IMAGES_DIR/../dist/image/main.js"
            if [ ! -f "$main" ] || [ -n "$(find "$IMAGES_DIR/../src/image" -newer "$main" -print -quit)" ]; then
                (cd "$IMAGES_DIR/.." && npx tsc -p tsconfig.build.json)
            fi
            exec node "$main" "$@"
            ;;
    esac
done
usage() {
    echo "usage: bash images/build.sh [--arch aarch64|x86_64] [--site DIR]... [--out DIR] [--kernel-source linux-source-X.Y|TARBALL] [--kernel-only] [--builtin-initramfs ARCHIVE]" >&2
    exit 2
}

# Both recipes take --arch, --out and --kernel-source; only the initramfs
# takes --site, only the kernel --builtin-initramfs.
common=() sites=() builtin=() kernel_only=0
while [ $# -gt 0 ]; do
    case "$1" in
        --kernel-only) kernel_only=1; shift ;;
        --builtin-initramfs=*) builtin=("$1"); kernel_only=1; shift ;;
        --builtin-initramfs) [ $# -ge 2 ] || usage; builtin=("$1" "$2"); kernel_only=1; shift 2 ;;
        --site=*) sites+=("$1"); shift ;;
        --site) [ $# -ge 2 ] || usage; sites+=("$1" "$2"); shift 2 ;;
        --arch=*|--out=*|--kernel-source=*) common+=("$1"); shift ;;
        --arch|--out|--kernel-source) [ $# -ge 2 ] || usage; common+=("$1" "$2"); shift 2 ;;
        -h|--help) usage ;;
        *) echo "images: unknown argument: $1" >&2; usage ;;
    esac
done

bash "$IMAGES_DIR/kernel.sh" "${common[@]}" "${builtin[@]}"
[ "$kernel_only" = 1 ] || bash "$IMAGES_DIR/initramfs.sh" "${common[@]}" "${sites[@]}"
