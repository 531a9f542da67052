#!/usr/bin/env bash
# Builds image-init, the PID 1 of a guest that runs a container image (images/image-init.c), as a static ELF.
#
#   bash images/image-init.sh [--arch aarch64|x86_64] [--out DIR]
#
# Defaults: --arch aarch64, --out images/out/<arch>. Output: $OUT/image-init
# and $OUT/image-init.key, a hash of everything that goes in: this script,
# image-init.c, reseed.h, the compiler with its version and the static C
# library it links. Unchanged inputs make a rerun a no-op.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="[--arch aarch64|x86_64] [--out DIR]"
parse_args "$@"

# ---------------------------------------------------------------- tools
step "checking image-init tools"
choose_compiler
# The static C library: packages.txt's image-init package for the native
# compiler; for a cross one, Debian's cross copy of it, named PKG-ARCH-cross
# (libc6-dev-arm64-cross). With $CROSS_COMPILE the toolchain brings its own.
LIBC_PKG=$(packages image-init)
[ -n "$LIBC_PKG" ] || fail "packages.txt has no image-init package"
case "$CC_PKG" in
    "") LIBC_PKG="" ;;
    gcc) ;;
    *) LIBC_PKG="$LIBC_PKG-$DEB_ARCH-cross" ;;
esac
# ensure_packages also sees to a kernel source, which this recipe does not
# need: no package to install, and a non-empty name so it looks for none.
KSRC_PKG="" KSRC_TARBALL="(none needed)"
ensure_packages ${CC_PKG:+"$CC_PKG"} ${LIBC_PKG:+"$LIBC_PKG"}
LIBC_A=$("${CROSS}gcc" -print-file-name=libc.a)
[ -f "$LIBC_A" ] || fail "${CROSS}gcc finds no static C library (libc.a)${LIBC_PKG:+; is $LIBC_PKG installed?}"
echo "    guest: $ARCH; compiler: ${CROSS}gcc; libc: $LIBC_A"
mkdir -p "$OUT"

# ---------------------------------------------------------------- key
IMAGE_INIT_KEY=$(
    {
        echo "image-init-key-v1"
        echo "arch: $ARCH"
        echo "gcc: ${CROSS}gcc $(gcc_version)"
        echo "libc: $(sha256sum <"$LIBC_A" | cut -d' ' -f1)"
        (cd "$IMAGES_DIR" && sha256sum image-init.sh image-init.c reseed.h)
    } | sha256sum | cut -d' ' -f1
)

if key_matches "$OUT/image-init" "$OUT/image-init.key" "$IMAGE_INIT_KEY"; then
    echo "==> image-init: up to date"
    exit 0
fi

# ---------------------------------------------------------------- build
step "building image-init"
# No lock: nothing is shared with other builds, and the temporary file is
# this run's own.
"${CROSS}gcc" -static -Os -Wall -Wextra -Werror -s \
    -o "$OUT/image-init.tmp.$$" "$IMAGES_DIR/image-init.c" || fail "compiling image-init.c"
mv -f "$OUT/image-init.tmp.$$" "$OUT/image-init"
echo "$IMAGE_INIT_KEY" >"$OUT/image-init.key"
echo "    image-init: $(stat -c %s "$OUT/image-init") bytes"
echo "==> image-init: $OUT/image-init"
