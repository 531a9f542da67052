#!/usr/bin/env bash
# Builds a vmcgi guest: a small Linux kernel (Image) and a busybox initramfs
# that serves a site directory with busybox httpd.
#
#   bash images/build.sh [--arch aarch64|x86_64] [--site DIR] [--out DIR]
#                        [--kernel-source linux-source-X.Y|TARBALL]
#
# Defaults: --arch aarch64, --site images/site, --out images/out/<arch>.
# Relative paths are taken relative to the current directory.
#
# Outputs: $OUT/Image (for x86_64 a bzImage, under the same name) and
# $OUT/initramfs.cpio.gz, each with a .key file holding the hash of its
# inputs. Unchanged inputs make a rerun a no-op. Kernel builds are cached in
# images/out/cache and shared by every --out directory.
#
# The kernel source is Debian's linux-source-X.Y tarball: the one named by
# --kernel-source (or $KERNEL_SOURCE), else the newest one installed under
# /usr/src, else the newest one apt knows. The compiler is the native gcc
# when the guest has the build host's architecture, a cross gcc otherwise;
# $CROSS_COMPILE, when set, overrides that choice.
set -Eeuo pipefail

IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
ARCH=aarch64
SITE="$IMAGES_DIR/site"
OUT=""
CACHE="$IMAGES_DIR/out/cache"
KERNEL_SOURCE=${KERNEL_SOURCE:-}
KERNEL_ONLY=0
# Applets the init script and the CGI scripts rely on; the build fails if
# the busybox binary does not provide one of them.
REQUIRED_APPLETS="sh mount ip httpd echo cat head sleep poweroff env sort printf tr od hexdump sed grep cut ls nc wget kill true test"

STEP="starting"
step() {
    STEP="$1"
    echo "==> $1"
}
# In a subshell only the reason is printed; the main shell's ERR trap then
# names the step once.
fail() {
    echo "images: $*" >&2
    if [ "$BASHPID" = "$$" ]; then
        echo "images: step '$STEP' failed" >&2
    fi
    exit 1
}
on_err() {
    local rc=$?
    if [ "$BASHPID" = "$$" ]; then
        echo "images: command exited with status $rc at build.sh line $1" >&2
        echo "images: step '$STEP' failed" >&2
    fi
    exit "$rc"
}
trap 'on_err $LINENO' ERR

usage() {
    echo "usage: bash images/build.sh [--arch aarch64|x86_64] [--site DIR] [--out DIR] [--kernel-source linux-source-X.Y|TARBALL] [--kernel-only]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --arch) [ $# -ge 2 ] || usage; ARCH="$2"; shift 2 ;;
        --arch=*) ARCH="${1#--arch=}"; shift ;;
        --kernel-source) [ $# -ge 2 ] || usage; KERNEL_SOURCE="$2"; shift 2 ;;
        --kernel-source=*) KERNEL_SOURCE="${1#--kernel-source=}"; shift ;;
        --site) [ $# -ge 2 ] || usage; SITE="$2"; shift 2 ;;
        --site=*) SITE="${1#--site=}"; shift ;;
        --out) [ $# -ge 2 ] || usage; OUT="$2"; shift 2 ;;
        --out=*) OUT="${1#--out=}"; shift ;;
        --kernel-only) KERNEL_ONLY=1; shift ;;
        -h|--help) usage ;;
        *) echo "images: unknown argument: $1" >&2; usage ;;
    esac
done

# What differs between the guest architectures: the kernel's ARCH, Debian's
# name for the architecture (busybox-static, cross compiler), the fragment
# merged onto tinyconfig, and the kernel image that QEMU's -kernel takes.
case "$ARCH" in
    aarch64)
        KARCH=arm64 DEB_ARCH=arm64 GNU_TYPE=aarch64-linux-gnu
        FRAGMENT="$IMAGES_DIR/kernel.config"
        KTARGET=Image KIMAGE=arch/arm64/boot/Image
        ;;
    x86_64)
        KARCH=x86_64 DEB_ARCH=amd64 GNU_TYPE=x86_64-linux-gnu
        FRAGMENT="$IMAGES_DIR/kernel-x86_64.config"
        KTARGET=bzImage KIMAGE=arch/x86/boot/bzImage
        ;;
    *) echo "images: unknown --arch '$ARCH' (aarch64 or x86_64)" >&2; usage ;;
esac
[ -n "$OUT" ] || OUT="$IMAGES_DIR/out/$ARCH"
SITE=$(realpath -m -- "$SITE")
OUT=$(realpath -m -- "$OUT")

# ---------------------------------------------------------------- tools
step "checking tools"

is_root() { [ "$(id -u)" = 0 ]; }
pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 ||
    fail "this script needs a Debian-based system (dpkg, apt-get)"

# The compiler: native when the guest has this machine's architecture.
HOST_DEB_ARCH=$(dpkg --print-architecture)
if [ "${CROSS_COMPILE+set}" = set ]; then
    CROSS=$CROSS_COMPILE
elif [ "$HOST_DEB_ARCH" = "$DEB_ARCH" ]; then
    CROSS=""
else
    CROSS="$GNU_TYPE-"
fi
case "$CROSS" in
    "") CC_PKG=gcc ;;
    "$GNU_TYPE-") CC_PKG="gcc-${GNU_TYPE//_/-}" ;;
    *) CC_PKG="" ;;
esac

# The kernel source: a linux-source-X.Y package (its tarball in /usr/src) or
# any kernel tarball given by path.
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

missing=()
need_cmd() { # command package
    command -v "$1" >/dev/null 2>&1 || missing+=("$2")
}
if [ -n "$CC_PKG" ]; then
    need_cmd "${CROSS}gcc" "$CC_PKG"
else
    command -v "${CROSS}gcc" >/dev/null 2>&1 || fail "CROSS_COMPILE=$CROSS but ${CROSS}gcc is not on PATH"
fi
need_cmd gcc gcc
need_cmd make make
need_cmd bc bc
need_cmd flex flex
need_cmd bison bison
need_cmd cpio cpio
need_cmd gzip gzip
need_cmd xz xz-utils
need_cmd flock util-linux
need_cmd perl perl
# The x86_64 bzImage is lz4-compressed (see kernel-x86_64.config).
[ "$ARCH" != x86_64 ] || need_cmd lz4 lz4
if [ -n "$KSRC_PKG" ] && [ ! -f "$KSRC_TARBALL" ]; then
    missing+=("$KSRC_PKG")
fi
for p in libc6-dev libssl-dev libelf-dev; do
    pkg_installed "$p" || missing+=("$p")
done

# busybox-static for the guest's architecture must be cached already or
# downloadable with apt (for a foreign architecture, dpkg must know it).
BB_PKG="busybox-static:$DEB_ARCH"
BB_DIR="$CACHE/busybox"
bb_deb() {
    [ -d "$BB_DIR" ] || return 0
    find "$BB_DIR" -maxdepth 1 -name "busybox-static_*_$DEB_ARCH.deb" | sort | tail -n 1
}
need_arch=0 need_lists=0
if [ -z "$(bb_deb)" ]; then
    if [ "$DEB_ARCH" != "$HOST_DEB_ARCH" ]; then
        grep -qx "$DEB_ARCH" <<<"$(dpkg --print-foreign-architectures)" || need_arch=1
    fi
    if [ "$need_arch" = 1 ] || ! apt-cache show "$BB_PKG" >/dev/null 2>&1; then
        need_lists=1
    fi
fi
# No kernel source installed and none known to apt: apt's lists are missing.
[ -n "$KSRC_TARBALL" ] || need_lists=1

if [ ${#missing[@]} -gt 0 ] || [ "$need_lists" = 1 ]; then
    if ! is_root; then
        msg="missing:"
        [ ${#missing[@]} -eq 0 ] || msg+=" Debian packages ${missing[*]};"
        [ -n "$KSRC_TARBALL" ] || msg+=" a kernel source (linux-source-X.Y, not known to apt);"
        if [ -z "$(bb_deb)" ] && ! apt-cache show "$BB_PKG" >/dev/null 2>&1; then
            msg+=" $BB_PKG (not known to apt);"
        fi
        msg+=" as root run:"
        [ "$need_arch" = 0 ] || msg+=" dpkg --add-architecture $DEB_ARCH &&"
        msg+=" apt-get update"
        [ ${#missing[@]} -eq 0 ] || msg+=" && apt-get install --no-install-recommends ${missing[*]}"
        [ -n "$KSRC_TARBALL" ] || msg+=" && apt-get install --no-install-recommends linux-source"
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
    [ -n "$(bb_deb)" ] || apt-cache show "$BB_PKG" >/dev/null 2>&1 ||
        fail "apt cannot find $BB_PKG"
fi
[ -f "$KSRC_TARBALL" ] || fail "kernel source tarball not found: $KSRC_TARBALL"
echo "    guest: $ARCH; kernel source: $KSRC_TARBALL; compiler: ${CROSS}gcc"

mkdir -p "$CACHE" "$OUT" "$BB_DIR"
# One build at a time per cache: the kernel tree and busybox are shared.
exec 9>"$CACHE/.lock"
flock 9

# ---------------------------------------------------------------- busybox
step "fetching busybox"
if [ -z "$(bb_deb)" ]; then
    # As root, apt would otherwise warn that its _apt user cannot write here.
    sandbox=()
    is_root && sandbox=(-o APT::Sandbox::User=root)
    (cd "$BB_DIR" && apt-get download -q "${sandbox[@]}" "$BB_PKG")
else
    echo "    cached: $(basename "$(bb_deb)")"
fi
BB_DEB=$(bb_deb)
[ -n "$BB_DEB" ] || fail "$BB_PKG download produced no .deb"
BB_VERSION=$(dpkg-deb -f "$BB_DEB" Version)
BB_ROOT="$BB_DIR/root-$DEB_ARCH-${BB_VERSION//[^A-Za-z0-9.+~-]/_}"
# Debian 12 ships it as /bin/busybox, Debian 13 (merged /usr) as /usr/bin/busybox.
bb_binary() {
    local p
    for p in bin/busybox usr/bin/busybox; do
        [ -x "$BB_ROOT/$p" ] && { echo "$BB_ROOT/$p"; return; }
    done
    return 0
}
if [ -z "$(bb_binary)" ]; then
    rm -rf "$BB_ROOT" "$BB_ROOT.tmp"
    dpkg -x "$BB_DEB" "$BB_ROOT.tmp"
    mv "$BB_ROOT.tmp" "$BB_ROOT"
fi
BUSYBOX=$(bb_binary)
[ -n "$BUSYBOX" ] || fail "$BB_DEB has no bin/busybox or usr/bin/busybox"

# ---------------------------------------------------------------- keys
KSRC_VERSION=""
[ -z "$KSRC_PKG" ] || KSRC_VERSION=$(dpkg-query -W -f='${Version}' "$KSRC_PKG" 2>/dev/null || true)
[ -n "$KSRC_VERSION" ] || KSRC_VERSION="tarball-${KSRC_TARBALL##*/}-$(stat -c '%s-%Y' "$KSRC_TARBALL")"
GCC_VERSION=$("${CROSS}gcc" -dumpfullversion 2>/dev/null || "${CROSS}gcc" -dumpversion)

KERNEL_KEY=$(
    {
        echo "kernel-key-v2"
        echo "arch: $ARCH"
        echo "linux-source: $KSRC_VERSION"
        echo "gcc: ${CROSS}gcc $GCC_VERSION"
        sha256sum "$IMAGES_DIR/build.sh" | cut -d' ' -f1
        sha256sum "$FRAGMENT" | cut -d' ' -f1
    } | sha256sum | cut -d' ' -f1
)

if [ "$KERNEL_ONLY" = 0 ]; then
    [ -d "$SITE" ] || fail "site directory not found: $SITE"
    [ -f "$IMAGES_DIR/init" ] || fail "missing $IMAGES_DIR/init"
fi

# Lists the site as "type mode path [sha256|target]" lines, sorted.
site_manifest() {
    (
        cd "$SITE"
        LC_ALL=C find . -mindepth 1 | LC_ALL=C sort | while IFS= read -r p; do
            rel=${p#./}
            case "$rel" in
                *[[:space:]]*) fail "site path contains whitespace: $rel" ;;
            esac
            mode=$(stat -c '%a' -- "$p")
            if [ -L "$p" ]; then
                echo "l $mode $rel $(readlink -- "$p")"
            elif [ -d "$p" ]; then
                echo "d $mode $rel"
            elif [ -f "$p" ]; then
                echo "f $mode $rel $(sha256sum -- "$p" | cut -d' ' -f1)"
            else
                fail "unsupported file type in site: $rel"
            fi
        done
    )
}
key_matches() { # output keyfile key
    [ -f "$1" ] && [ -f "$2" ] && [ "$(cat "$2")" = "$3" ]
}

# ---------------------------------------------------------------- kernel source
# Extracted once into the cache; also needed for usr/gen_init_cpio.c.
if [ -n "$KSRC_PKG" ]; then
    KSRC_NAME="linux-${KSRC_PKG#linux-source-}"
else
    KSRC_NAME="src-$(basename "$KSRC_TARBALL" | sed -E 's/\.tar(\.[a-z0-9]+)?$//')"
fi
KSRC="$CACHE/$KSRC_NAME"
ksrc_ready() { [ -f "$KSRC/.vmcgi-extracted" ] && [ "$(cat "$KSRC/.vmcgi-extracted")" = "$KSRC_VERSION" ]; }
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

install_file() { # src dst: hardlink when possible, else copy; atomic
    rm -f "$2.tmp"
    ln "$1" "$2.tmp" 2>/dev/null || cp "$1" "$2.tmp"
    mv -f "$2.tmp" "$2"
}

# ---------------------------------------------------------------- kernel
KCACHE="$CACHE/kernel-$KERNEL_KEY"
if key_matches "$OUT/Image" "$OUT/Image.key" "$KERNEL_KEY"; then
    echo "==> kernel: up to date"
elif [ -f "$KCACHE/Image" ]; then
    echo "==> kernel: reusing cached build $KCACHE/Image"
    install_file "$KCACHE/Image" "$OUT/Image"
    echo "$KERNEL_KEY" >"$OUT/Image.key"
else
    ensure_kernel_source
    KBUILD="$CACHE/kbuild-$ARCH-$KSRC_NAME"
    KLOG="$KBUILD/build.log"
    mkdir -p "$KBUILD"
    kmake() { make -C "$KSRC" O="$KBUILD" ARCH="$KARCH" CROSS_COMPILE="$CROSS" "$@"; }

    step "configuring kernel"
    : >"$KLOG"
    if ! { kmake tinyconfig &&
        "$KSRC/scripts/kconfig/merge_config.sh" -m -O "$KBUILD" "$KBUILD/.config" "$FRAGMENT" &&
        kmake olddefconfig; } >>"$KLOG" 2>&1; then
        tail -n 30 "$KLOG" >&2
        fail "kernel configuration failed (log: $KLOG)"
    fi
    # Every option the fragment asks for must have survived olddefconfig.
    bad=()
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*)
                grep -qxF -- "$line" "$KBUILD/.config" || bad+=("$line")
                ;;
            "# CONFIG_"*" is not set")
                opt=${line#\# }; opt=${opt%% *}
                grep -q "^$opt=" "$KBUILD/.config" && bad+=("$line")
                ;;
        esac
    done <"$FRAGMENT"
    if [ ${#bad[@]} -gt 0 ]; then
        for b in "${bad[@]}"; do
            opt=${b#\# }; opt=${opt%%[= ]*}
            echo "images: ${FRAGMENT##*/} wants '$b' but .config has: $(grep -E "^(# )?$opt[= ]" "$KBUILD/.config" || echo "(not present: unmet dependency?)")" >&2
        done
        fail "kernel option(s) missing after olddefconfig: ${bad[*]}"
    fi

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
fi

# ---------------------------------------------------------------- initramfs
if [ "$KERNEL_ONLY" = 1 ]; then
    echo "==> done: $OUT/Image"
    exit 0
fi

SITE_MANIFEST=$(site_manifest)

INITRAMFS_KEY=$(
    {
        echo "initramfs-key-v2"
        echo "busybox: $DEB_ARCH $BB_VERSION"
        echo "linux-source: $KSRC_VERSION"
        sha256sum "$IMAGES_DIR/build.sh" | cut -d' ' -f1
        sha256sum "$IMAGES_DIR/init" | cut -d' ' -f1
        sha256sum "$IMAGES_DIR/agent.c" | cut -d' ' -f1
        echo "gcc: ${CROSS}gcc $GCC_VERSION"
        echo "$SITE_MANIFEST"
    } | sha256sum | cut -d' ' -f1
)

if key_matches "$OUT/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz.key" "$INITRAMFS_KEY"; then
    echo "==> initramfs: up to date"
    exit 0
fi

ensure_kernel_source
step "building initramfs"
GEN_INIT_CPIO="$CACHE/gen_init_cpio-$KSRC_VERSION"
if [ ! -x "$GEN_INIT_CPIO" ]; then
    gcc -O2 -o "$GEN_INIT_CPIO.tmp" "$KSRC/usr/gen_init_cpio.c"
    mv "$GEN_INIT_CPIO.tmp" "$GEN_INIT_CPIO"
fi

# busybox --list need not run on the build host, so read the applet names
# from the binary: busybox keeps them as one sorted, NUL-separated table that
# starts with "[" and "[[". (In 1.37 the byte before "[" is not a NUL.)
# (awk reads to the end so that tr never gets SIGPIPE.)
APPLETS=$(tr '\0' '\n' <"$BUSYBOX" | awk '
    state == 0 && prev ~ /\[$/ && $0 == "[[" { state = 1; print "["; print "[["; next }
    state == 1 {
        if ($0 == "" || $0 !~ /^[a-z0-9_.-]+$/) state = 2
        else print
    }
    { prev = $0 }')
n_applets=$(grep -c . <<<"$APPLETS")
[ "$n_applets" -ge 50 ] || fail "could not read the applet list from $BUSYBOX (found $n_applets)"
for a in $REQUIRED_APPLETS; do
    grep -qxF -- "$a" <<<"$APPLETS" || fail "busybox $BB_VERSION lacks the '$a' applet"
done

# /etc/passwd and /etc/group so that id(1) and httpd see a root user.
WORK="$OUT/initramfs-build"
ETC="$WORK/etc"
mkdir -p "$ETC"
echo "root:x:0:0:root:/root:/bin/sh" >"$ETC/passwd"
echo "root:x:0:" >"$ETC/group"

# The guest's agent, PID 1 after init (see agent.c): freestanding, no C library.
AGENT="$WORK/vmcgi-agent"
"${CROSS}gcc" -nostdlib -static -ffreestanding -fno-stack-protector -fno-builtin -Os -s \
    -o "$AGENT" "$IMAGES_DIR/agent.c" || fail "compiling agent.c"

LIST="$WORK/initramfs.list"
{
    echo "# generated by images/build.sh; input for gen_init_cpio"
    for d in /bin /dev /etc /proc /root /sys /usr /www; do
        echo "dir $d 0755 0 0"
    done
    echo "dir /tmp 1777 0 0"
    echo "nod /dev/console 0600 0 0 c 5 1"
    echo "nod /dev/null 0666 0 0 c 1 3"
    echo "slink /sbin bin 0777 0 0"
    echo "slink /usr/bin ../bin 0777 0 0"
    echo "slink /usr/sbin ../bin 0777 0 0"
    echo "file /bin/busybox $BUSYBOX 0755 0 0"
    while IFS= read -r a; do
        [ "$a" = busybox ] || echo "slink /bin/$a busybox 0777 0 0"
    done <<<"$APPLETS"
    echo "file /init $IMAGES_DIR/init 0755 0 0"
    echo "file /bin/vmcgi-agent $AGENT 0755 0 0"
    echo "file /etc/passwd $ETC/passwd 0644 0 0"
    echo "file /etc/group $ETC/group 0644 0 0"
    while read -r type mode rel extra; do
        [ -n "$type" ] || continue
        case "$type" in
            d) echo "dir /www/$rel $mode 0 0" ;;
            f) echo "file /www/$rel $SITE/$rel $mode 0 0" ;;
            l) echo "slink /www/$rel $extra $mode 0 0" ;;
        esac
    done <<<"$SITE_MANIFEST"
} >"$LIST"

"$GEN_INIT_CPIO" -t 0 "$LIST" >"$OUT/initramfs.cpio.tmp"
gzip -n -9 -c "$OUT/initramfs.cpio.tmp" >"$OUT/initramfs.cpio.gz.tmp"
rm -f "$OUT/initramfs.cpio.tmp"
mv -f "$OUT/initramfs.cpio.gz.tmp" "$OUT/initramfs.cpio.gz"
echo "$INITRAMFS_KEY" >"$OUT/initramfs.cpio.gz.key"
echo "    initramfs: $n_applets applets, $(stat -c %s "$OUT/initramfs.cpio.gz") bytes"
echo "==> done: $OUT/Image $OUT/initramfs.cpio.gz"
