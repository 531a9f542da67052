#!/usr/bin/env bash
# Builds a vmcgi guest's kernel: tinyconfig plus kernel.config and kernel-ARCH.config, everything built in.
#
#   bash images/kernel.sh [--arch aarch64|x86_64] [--out DIR]
#                         [--kernel-source linux-source-X.Y|TARBALL]
#                         [--builtin-initramfs ARCHIVE]
#
# Defaults: --arch aarch64, --out images/out/<arch>. Output: $OUT/Image (for
# x86_64 a bzImage, under the same name) and $OUT/Image.key. Builds are cached
# in images/out/cache/kernel-<key>/ and shared by every --out directory.
#
# The key covers what goes into the kernel, and nothing else: the
# architecture, this script, the two fragments, the kernel source's version
# and the compiler's name and version. (lib.sh only chooses the source and
# the compiler; see there.) The initramfs recipe is not in it.
#
# --builtin-initramfs ARCHIVE (a newc cpio archive, plain or gzipped, such as
# initramfs.sh's initramfs.cpio.gz) builds it into the kernel
# (CONFIG_INITRAMFS_SOURCE), for a guest booted from this one file with no
# initrd. Its key is the plain kernel's key and the archive's sha256; it is
# cached the same way. It is built in a copy of the plain kernel's build tree,
# which is left as it was: only usr/ is rebuilt and the kernel relinked, in
# 12-25 s on 2 cores once the plain kernel is built (see "built-in initramfs"
# below).
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="[--arch aarch64|x86_64] [--out DIR] [--kernel-source linux-source-X.Y|TARBALL] [--builtin-initramfs ARCHIVE]"
# --builtin-initramfs is this recipe's own; parse_args takes the rest.
BUILTIN_INITRAMFS="" args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --builtin-initramfs=*) BUILTIN_INITRAMFS=${1#*=}; shift ;;
        --builtin-initramfs) [ $# -ge 2 ] || usage; BUILTIN_INITRAMFS=$2; shift 2 ;;
        --arch|--out|--kernel-source|--site)
            args+=("$1"); shift
            if [ $# -gt 0 ]; then args+=("$1"); shift; fi
            ;;
        *) args+=("$1"); shift ;;
    esac
done
parse_args "${args[@]}"
if [ -n "$BUILTIN_INITRAMFS" ]; then
    BUILTIN_INITRAMFS=$(realpath -m -- "$BUILTIN_INITRAMFS")
    [ -f "$BUILTIN_INITRAMFS" ] || fail "--builtin-initramfs: no such file: $BUILTIN_INITRAMFS"
    # The kernel's build takes the archive by its name: .cpio is compressed
    # as the kernel's config chooses, .cpio.gz is built in as it is (and
    # unpacked with CONFIG_RD_GZIP, which kernel.config sets). The name is
    # read from the contents, so that any file name will do.
    magic=$(od -An -tx1 -N6 "$BUILTIN_INITRAMFS" | tr -d ' \n')
    case "$magic" in
        30373037303[12]) ARCHIVE_NAME=initramfs.cpio ;;
        1f8b*)
            # gzip is cut off by head's exit: only what head read counts.
            inner=$({ gzip -dc "$BUILTIN_INITRAMFS" 2>/dev/null || true; } | head -c 6)
            case "$inner" in
                07070[12]) ;;
                *) fail "--builtin-initramfs: $BUILTIN_INITRAMFS is gzip but not a newc cpio archive" ;;
            esac
            ARCHIVE_NAME=initramfs.cpio.gz
            ;;
        *) fail "--builtin-initramfs: $BUILTIN_INITRAMFS is neither a newc cpio archive nor a gzipped one" ;;
    esac
fi

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
PLAIN_KEY=$KERNEL_KEY PLAIN_KCACHE=$KCACHE
if [ -n "$BUILTIN_INITRAMFS" ]; then
    KERNEL_KEY=$(
        {
            echo "builtin-initramfs-key-v1"
            echo "kernel: $PLAIN_KEY"
            echo "initramfs: $(sha256sum <"$BUILTIN_INITRAMFS" | cut -d' ' -f1)"
        } | sha256sum | cut -d' ' -f1
    )
    KCACHE="$CACHE/kernel-$KERNEL_KEY"
fi

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
# With --builtin-initramfs the plain kernel's tree waits here while a copy of
# it takes its place (see below); a build cut off meanwhile left it here.
KPLAIN="$KBUILD.plain"
if [ -d "$KPLAIN" ]; then
    rm -rf "$KBUILD"
    mv "$KPLAIN" "$KBUILD"
fi
kmake() { make -C "$KSRC" O="$KBUILD" ARCH="$KARCH" CROSS_COMPILE="$CROSS" "$@"; }
# Fails with the log's end unless "$@" succeeds, its output in the log.
logged() { # what command...
    local what=$1
    shift
    if ! "$@" >>"$KLOG" 2>&1; then
        tail -n 30 "$KLOG" >&2
        fail "$what failed (log: $KLOG)"
    fi
}
# Every option given must be in the tree's .config after olddefconfig.
check_config() { # fragment...
    local fragment line opt b bad=()
    for fragment in "$@"; do
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
    [ ${#bad[@]} -gt 0 ] || return 0
    for b in "${bad[@]}"; do
        opt=${b#*: }; opt=${opt#\# }; opt=${opt%%[= ]*}
        echo "images: ${b%%: *} wants '${b#*: }' but .config has: $(grep -E "^(# )?${opt}[= ]" "$KBUILD/.config" || echo "(not present: unmet dependency?)")" >&2
    done
    fail "kernel option(s) missing after olddefconfig: ${bad[*]}"
}
# Caches the tree's kernel and its config in DIR, atomically.
cache_kernel() { # dir
    rm -rf "$1.tmp"
    mkdir -p "$1.tmp"
    cp "$KBUILD/$KIMAGE" "$1.tmp/Image"
    cp "$KBUILD/.config" "$1.tmp/config"
    rm -rf "$1"
    mv "$1.tmp" "$1"
}

# The plain kernel, configured and built in its tree.
build_plain() {
    mkdir -p "$KBUILD"
    step "configuring kernel"
    # An option is set in one fragment only: merge_config.sh would let the second
    # override the first, and the check after olddefconfig would then fail.
    dups=$(cat "${FRAGMENTS[@]}" | sed -nE 's/^(# )?(CONFIG_[A-Za-z0-9_]+)[= ].*/\2/p' | sort | uniq -d)
    [ -z "$dups" ] || fail "option(s) set in more than one fragment: $dups"
    : >"$KLOG"
    logged "kernel configuration" kmake tinyconfig
    logged "kernel configuration" "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" "$KBUILD/.config" "${FRAGMENTS[@]}"
    logged "kernel configuration" kmake olddefconfig
    check_config "${FRAGMENTS[@]}"

    step "building $ARCH kernel from $KSRC_NAME (takes ~3 min, less when only relinked; log: $KLOG)"
    start=$(date +%s)
    logged "kernel build" kmake -j"$(nproc)" "$KTARGET"
    echo "    kernel built in $(($(date +%s) - start)) s"
    [ -f "$PLAIN_KCACHE/Image" ] || cache_kernel "$PLAIN_KCACHE"
}

# ---------------------------------------------------------------- build
[ -n "$BUILTIN_INITRAMFS" ] || build_plain

# ---------------------------------------------------------------- built-in initramfs
# The archive is built into a copy of the plain kernel's tree (a copy, not
# links: make rewrites files in place), as CONFIG_INITRAMFS_SOURCE. No C file
# reads that option, so make redoes usr/ and the link alone. The copy must
# start from the plain kernel's .config: the tree has it when the plain kernel
# was the last one built there (scripts/setup.sh builds it just before), else
# the plain kernel is built first, as without the option. The copy is built
# where the tree was, the tree moved aside meanwhile: objtool's build (x86_64)
# records absolute paths, so that in a copy elsewhere objtool would be rebuilt,
# and every object after it. Then the tree is put back, as it was; after a
# failure the copy stays, with its log, until the next run puts it back.
if [ -n "$BUILTIN_INITRAMFS" ]; then
    if [ -f "$PLAIN_KCACHE/config" ] && cmp -s "$KBUILD/.config" "$PLAIN_KCACHE/config"; then
        echo "    the kernel's tree is configured as $PLAIN_KCACHE"
    else
        build_plain
    fi
    step "building the archive into a copy of the kernel's tree"
    start=$(date +%s)
    mv "$KBUILD" "$KPLAIN"
    cp -a "$KPLAIN" "$KBUILD"
    : >"$KLOG"
    cp "$BUILTIN_INITRAMFS" "$KBUILD/$ARCHIVE_NAME"
    # An absolute path: a relative one could be found in the source tree too.
    logged "kernel configuration" "$KSRC/scripts/config" --file "$KBUILD/.config" --set-str INITRAMFS_SOURCE "$KBUILD/$ARCHIVE_NAME"
    logged "kernel configuration" kmake olddefconfig
    printf 'CONFIG_INITRAMFS_SOURCE="%s"\n' "$KBUILD/$ARCHIVE_NAME" >"$KBUILD/initramfs.config"
    check_config "${FRAGMENTS[@]}" "$KBUILD/initramfs.config"
    logged "kernel build" kmake -j"$(nproc)" "$KTARGET"
    cache_kernel "$KCACHE"
    rm -rf "$KBUILD"
    mv "$KPLAIN" "$KBUILD"
    echo "    archive built in, kernel relinked in $(($(date +%s) - start)) s"
fi
install_file "$KCACHE/Image" "$OUT/Image"
echo "$KERNEL_KEY" >"$OUT/Image.key"
echo "==> kernel: $OUT/Image"
