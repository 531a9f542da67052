# What kernel.sh and initramfs.sh share (sourced, not run): arguments, architectures, errors, packages, kernel source, compiler.
# shellcheck shell=bash
#
# This file only decides values: the guest architecture, the compiler, the
# kernel source. The recipe that uses one hashes it (the compiler with its
# version, the source with its package version) into its key, so this file
# is in no key: nothing here may change what a build does in any other way.
# What goes into the kernel is kernel.sh's; what goes into the initramfs is
# initramfs.sh's.

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
CACHE="$IMAGES_DIR/out/cache"
PACKAGES="$IMAGES_DIR/packages.txt"
ARCH=aarch64
OUT=""
SITES=()
KERNEL_SOURCE=${KERNEL_SOURCE:-}

# What error messages start with; a script that sources this may set it first.
LOG_PREFIX=${LOG_PREFIX:-images}
STEP="starting"
step() {
    STEP="$1"
    echo "==> $1"
}
# In a subshell only the reason is printed; the main shell's ERR trap then
# names the step once.
fail() {
    echo "$LOG_PREFIX: $*" >&2
    if [ "$BASHPID" = "$$" ]; then
        echo "$LOG_PREFIX: step '$STEP' failed" >&2
    fi
    exit 1
}
on_err() {
    local rc=$?
    if [ "$BASHPID" = "$$" ]; then
        echo "$LOG_PREFIX: command exited with status $rc at ${BASH_SOURCE[1]##*/} line $1" >&2
        echo "$LOG_PREFIX: step '$STEP' failed" >&2
    fi
    exit "$rc"
}
trap 'on_err $LINENO' ERR

usage() {
    echo "usage: bash images/${0##*/} $USAGE" >&2
    exit 2
}

# Sets ARCH, OUT, KERNEL_SOURCE and SITES (every --site, in order) from the
# command line, then the architecture's names. The caller sets USAGE, and
# SITES_ALLOWED=1 when it takes --site.
parse_args() {
    local opt value
    while [ $# -gt 0 ]; do
        opt=$1
        case "$opt" in
            -h|--help) usage ;;
            --arch=*|--out=*|--kernel-source=*|--site=*) value=${opt#*=}; opt=${opt%%=*}; shift ;;
            --arch|--out|--kernel-source|--site) [ $# -ge 2 ] || usage; value=$2; shift 2 ;;
            *) echo "images: unknown argument: $1" >&2; usage ;;
        esac
        case "$opt" in
            --arch) ARCH=$value ;;
            --out) OUT=$value ;;
            --kernel-source) KERNEL_SOURCE=$value ;;
            --site)
                [ "${SITES_ALLOWED:-0}" = 1 ] || { echo "images: ${0##*/} takes no --site" >&2; usage; }
                SITES+=("$(realpath -m -- "$value")")
                ;;
        esac
    done
    # Debian's name for the architecture (busybox-static, dpkg) and the GNU
    # triplet (the cross compiler).
    case "$ARCH" in
        aarch64) DEB_ARCH=arm64 GNU_TYPE=aarch64-linux-gnu ;;
        x86_64) DEB_ARCH=amd64 GNU_TYPE=x86_64-linux-gnu ;;
        *) echo "images: unknown --arch '$ARCH' (aarch64 or x86_64)" >&2; usage ;;
    esac
    [ -n "$OUT" ] || OUT="$IMAGES_DIR/out/$ARCH"
    OUT=$(realpath -m -- "$OUT")
}

# The packages of the named groups of packages.txt, each once.
packages() {
    local IFS='|'
    awk -v re="^($*)\$" '$1 ~ re && !seen[$2]++ { print $2 }' "$PACKAGES"
}

is_root() { [ "$(id -u)" = 0 ]; }
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

# The compiler (CROSS is its prefix, CC_PKG its package): native when the
# guest has this machine's architecture, else the cross gcc of packages.txt's
# cross-ARCH group; $CROSS_COMPILE, when set, overrides the choice.
choose_compiler() {
    HOST_DEB_ARCH=$(dpkg --print-architecture)
    if [ "${CROSS_COMPILE+set}" = set ]; then
        CROSS=$CROSS_COMPILE CC_PKG=""
        command -v "${CROSS}gcc" >/dev/null 2>&1 || fail "CROSS_COMPILE=$CROSS but ${CROSS}gcc is not on PATH"
    elif [ "$HOST_DEB_ARCH" = "$DEB_ARCH" ]; then
        CROSS="" CC_PKG=gcc
    else
        CROSS="$GNU_TYPE-" CC_PKG=$(packages "cross-$ARCH")
        [ -n "$CC_PKG" ] || fail "packages.txt has no cross-$ARCH compiler"
    fi
}
gcc_version() {
    "${CROSS}gcc" -dumpfullversion 2>/dev/null || "${CROSS}gcc" -dumpversion
}

# The kernel source (KSRC_PKG, KSRC_TARBALL): a linux-source-X.Y package
# (its tarball in /usr/src) or any kernel tarball given by path; without
# --kernel-source the newest one installed, else the newest apt knows.
newest_installed_ksrc() {
    local f
    for f in /usr/src/linux-source-*.tar.xz; do
        [ -f "$f" ] || continue
        f=${f##*/}
        echo "${f%.tar.xz}"
    done | grep -xE 'linux-source-[0-9]+\.[0-9]+' | sort -V | tail -n 1 || true
}
newest_known_ksrc() {
    apt-cache pkgnames linux-source- 2>/dev/null |
        grep -xE 'linux-source-[0-9]+\.[0-9]+' | sort -V | tail -n 1 || true
}
choose_kernel_source() {
    KSRC_PKG="" KSRC_TARBALL=""
    case "$KERNEL_SOURCE" in
        "")
            KSRC_PKG=$(newest_installed_ksrc)
            [ -n "$KSRC_PKG" ] || KSRC_PKG=$(newest_known_ksrc)
            ;;
        linux-source-*) KSRC_PKG=$KERNEL_SOURCE ;;
        *)
            KSRC_TARBALL=$(realpath -m -- "$KERNEL_SOURCE")
            [ -f "$KSRC_TARBALL" ] || fail "--kernel-source: neither a linux-source-X.Y package name nor a file: $KERNEL_SOURCE"
            ;;
    esac
    [ -z "$KSRC_PKG" ] || KSRC_TARBALL="/usr/src/$KSRC_PKG.tar.xz"
}

# Installs the packages given that are missing, the kernel source when it is
# not there, and with --download PKG makes sure apt can download PKG (adding
# the guest's dpkg architecture). Not as root it installs nothing: it stops
# and names what is missing, with the command to run.
ensure_packages() {
    local download="" need_arch=0 need_lists=0 missing=() p msg
    if [ "${1-}" = --download ]; then
        download=$2
        shift 2
    fi
    if ! command -v dpkg-query >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1; then
        fail "this script needs a Debian-based system (dpkg, apt-get)"
    fi
    for p in "$@"; do
        pkg_installed "$p" || missing+=("$p")
    done
    if [ -n "$KSRC_PKG" ] && [ ! -f "$KSRC_TARBALL" ]; then
        missing+=("$KSRC_PKG")
    fi
    if [ -n "$download" ]; then
        if [ "$DEB_ARCH" != "$HOST_DEB_ARCH" ]; then
            grep -qx "$DEB_ARCH" <<<"$(dpkg --print-foreign-architectures)" || need_arch=1
        fi
        if [ "$need_arch" = 1 ] || ! apt-cache show "$download" >/dev/null 2>&1; then
            need_lists=1
        fi
    fi
    # No kernel source installed and none known to apt: apt's lists are missing.
    [ -n "$KSRC_TARBALL" ] || need_lists=1
    [ ${#missing[@]} -gt 0 ] || [ "$need_lists" = 1 ] || return 0

    if ! is_root; then
        msg="missing:"
        [ ${#missing[@]} -eq 0 ] || msg+=" Debian packages ${missing[*]};"
        [ -n "$KSRC_TARBALL" ] || msg+=" a kernel source (linux-source-X.Y, not known to apt);"
        if [ -n "$download" ] && ! apt-cache show "$download" >/dev/null 2>&1; then
            msg+=" $download (not known to apt);"
        fi
        msg+=" as root run:"
        [ "$need_arch" = 0 ] || msg+=" dpkg --add-architecture $DEB_ARCH &&"
        msg+=" apt-get update"
        [ ${#missing[@]} -eq 0 ] || msg+=" && apt-get install --no-install-recommends ${missing[*]}"
        [ -n "$KSRC_TARBALL" ] || msg+=" && apt-get install --no-install-recommends $(packages kernel-source)"
        fail "$msg"
    fi
    if [ "$need_arch" = 1 ]; then
        echo "    adding dpkg architecture $DEB_ARCH"
        dpkg --add-architecture "$DEB_ARCH"
    fi
    apt-get update -q
    if [ -z "$KSRC_TARBALL" ]; then
        KSRC_PKG=$(newest_known_ksrc)
        [ -n "$KSRC_PKG" ] || fail "apt knows no linux-source-X.Y package"
        KSRC_TARBALL="/usr/src/$KSRC_PKG.tar.xz"
        missing+=("$KSRC_PKG")
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "    installing: ${missing[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}"
    fi
    [ -z "$download" ] || apt-cache show "$download" >/dev/null 2>&1 || fail "apt cannot find $download"
}

# The kernel source's version (KSRC_VERSION, for the keys), and where it is
# extracted in the cache (KSRC_NAME, KSRC). Call after ensure_packages.
describe_kernel_source() {
    [ -f "$KSRC_TARBALL" ] || fail "kernel source tarball not found: $KSRC_TARBALL"
    KSRC_VERSION=""
    [ -z "$KSRC_PKG" ] || KSRC_VERSION=$(dpkg-query -W -f='${Version}' "$KSRC_PKG" 2>/dev/null || true)
    [ -n "$KSRC_VERSION" ] || KSRC_VERSION="tarball-${KSRC_TARBALL##*/}-$(stat -c '%s-%Y' "$KSRC_TARBALL")"
    if [ -n "$KSRC_PKG" ]; then
        KSRC_NAME="linux-${KSRC_PKG#linux-source-}"
    else
        KSRC_NAME="src-$(basename "$KSRC_TARBALL" | sed -E 's/\.tar(\.[a-z0-9]+)?$//')"
    fi
    KSRC="$CACHE/$KSRC_NAME"
}
ksrc_ready() { [ -f "$KSRC/.vmcgi-extracted" ] && [ "$(cat "$KSRC/.vmcgi-extracted")" = "$KSRC_VERSION" ]; }
# Extracted once into the cache, for the kernel build and usr/gen_init_cpio.c.
ensure_kernel_source() {
    if ksrc_ready; then
        return
    fi
    step "extracting kernel source"
    rm -rf "$KSRC" "$KSRC.tmp"
    mkdir -p "$KSRC.tmp"
    tar -xf "$KSRC_TARBALL" -C "$KSRC.tmp" --strip-components=1
    echo "$KSRC_VERSION" >"$KSRC.tmp/.vmcgi-extracted"
    mv "$KSRC.tmp" "$KSRC"
}

# One build at a time per cache: the kernel source, kernel trees and busybox
# are shared. Held until the script exits.
lock_cache() {
    mkdir -p "$CACHE" "$OUT"
    exec 9>"$CACHE/.lock"
    flock 9
}

key_matches() { # output keyfile key
    [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ]
}
install_file() { # src dst: hardlink when possible, else copy; atomic
    # Already the same file (a hard link made before): mv would refuse.
    [ "$1" -ef "$2" ] && return 0
    rm -f "$2.tmp"
    ln "$1" "$2.tmp" 2>/dev/null || cp "$1" "$2.tmp"
    mv -f "$2.tmp" "$2"
}
