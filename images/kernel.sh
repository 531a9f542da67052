#!/usr/bin/env bash
# Builds a vmcgi guest's kernel: tinyconfig plus kernel.config and kernel-ARCH.config, everything built in.
#
#   bash images/kernel.sh [--arch aarch64|x86_64] [--out DIR]
#                         [--kernel-source linux-source-X.Y|TARBALL]
#
# Defaults: --arch aarch64, --out images/out/<arch>. Output: $OUT/Image (for
# x86_64 a bzImage, under the same name) and $OUT/Image.key. Builds are cached
# in images/out/cache/kernel-<key>/ and shared by every --out directory.
#
# The key covers what goes into the kernel, and nothing else: the
# architecture, this script, the two fragments, the kernel source's version
# and the compiler's name and version. (lib.sh only chooses the source and
# the compiler; see there.) The initramfs recipe is not in it.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="[--arch aarch64|x86_64] [--out DIR] [--kernel-source linux-source-X.Y|TARBALL]"
parse_args "$@"

# What differs between the guest architectures' kernels: the kernel's ARCH,
# the fragment merged onto tinyconfig after the common one, and the kernel
# image that QEMU's -kernel takes.
case "$ARCH" in
    aarch64) KARCH=arm64 KTARGET=Image KIMAGE=arch/arm64/boot/Image ;;
    x86_64) KARCH=x86_64 KTARGET=bzImage KIMAGE=arch/x86/boot/bzImage ;;
esac
FRAGMENTS=("$IMAGES_DIR/kernel.config" "$IMAGES_DIR/kernel-$ARCH.config")

# ---------------------------------------------------------------- tools
step "checking kernel tools"
choose_compiler
choose_kernel_source
mapfile -t pkgs < <(packages kernel "kernel-$ARCH")
ensure_packages "${pkgs[@]}" ${CC_PKG:+"$CC_PKG"}
describe_kernel_source
echo "    guest: $ARCH; kernel source: $KSRC_TARBALL; compiler: ${CROSS}gcc"
lock_cache

# ---------------------------------------------------------------- key
KERNEL_KEY=$(
    {
        echo "kernel-key-v3"
        echo "arch: $ARCH"
        echo "linux-source: $KSRC_VERSION"
        echo "gcc: ${CROSS}gcc $(gcc_version)"
        (cd "$IMAGES_DIR" && sha256sum kernel.sh "${FRAGMENTS[@]##*/}")
    } | sha256sum | cut -d' ' -f1
)
KCACHE="$CACHE/kernel-$KERNEL_KEY"

if key_matches "$OUT/Image" "$OUT/Image.key" "$KERNEL_KEY"; then
    echo "==> kernel: up to date"
    exit 0
fi
if [ -f "$KCACHE/Image" ]; then
    echo "==> kernel: reusing cached build $KCACHE/Image"
    install_file "$KCACHE/Image" "$OUT/Image"
    echo "$KERNEL_KEY" >"$OUT/Image.key"
    exit 0
fi

# ---------------------------------------------------------------- configure
ensure_kernel_source
KBUILD="$CACHE/kbuild-$ARCH-$KSRC_NAME"
KLOG="$KBUILD/build.log"
mkdir -p "$KBUILD"
kmake() { make -C "$KSRC" O="$KBUILD" ARCH="$KARCH" CROSS_COMPILE="$CROSS" "$@"; }

step "configuring kernel"
# An option is set in one fragment only: merge_config.sh would let the second
# override the first, and the check after olddefconfig would then fail.
dups=$(cat "${FRAGMENTS[@]}" | sed -nE 's/^(# )?(CONFIG_[A-Za-z0-9_]+)[= ].*/\2/p' | sort | uniq -d)
[ -z "$dups" ] || fail "option(s) set in more than one fragment: $dups"
: >"$KLOG"
if ! { kmake tinyconfig &&
    "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" "$KBUILD/.config" "${FRAGMENTS[@]}" &&
    kmake olddefconfig; } >>"$KLOG" 2>&1; then
    tail -n 30 "$KLOG" >&2
    fail "kernel configuration failed (log: $KLOG)"
fi
# Every option the fragments ask for must have survived olddefconfig.
bad=()
for fragment in "${FRAGMENTS[@]}"; do
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF -- "$line" "$KBUILD/.config" || bad+=("${fragment##*/}: $line")
                ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                grep -q "^$opt=" "$KBUILD/.config" && bad+=("${fragment##*/}: $line")
                ;;
        esac
    done <"$fragment"
done
if [ ${#bad[@]} -gt 0 ]; then
    for b in "${bad[@]}"; do
        opt=${b#*: }; opt=${opt#\# }; opt=${opt%%[= ]*}
        echo "images: ${b%%: *} wants '${b#*: }' but .config has: $(grep -E "^(# )?${opt}[= ]" "$KBUILD/.config" || echo "(not present: unmet dependency?)")" >&2
    done
    fail "kernel option(s) missing after olddefconfig: ${bad[*]}"
fi

# ---------------------------------------------------------------- build
step "building $ARCH kernel from $KSRC_NAME (takes ~3 min; log: $KLOG)"
start=$(date +%s)
if ! kmake -j"$(nproc)" "$KTARGET" >>"$KLOG" 2>&1; then
    tail -n 30 "$KLOG" >&2
    fail "kernel build failed (log: $KLOG)"
fi
echo "    kernel built in $(($(date +%s) - start)) s"
rm -rf "$KCACHE.tmp"
mkdir -p "$KCACHE.tmp"
cp "$KBUILD/$KIMAGE" "$KCACHE.tmp/Image"
cp "$KBUILD/.config" "$KCACHE.tmp/config"
rm -rf "$KCACHE"
mv "$KCACHE.tmp" "$KCACHE"
install_file "$KCACHE/Image" "$OUT/Image"
echo "$KERNEL_KEY" >"$OUT/Image.key"
echo "==> kernel: $OUT/Image"
