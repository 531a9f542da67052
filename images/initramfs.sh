#!/usr/bin/env bash
# Builds a vmcgi guest's initramfs: static busybox, init, the agent, and the site(s) at /www.
#
#   bash images/initramfs.sh [--arch aarch64|x86_64] [--site DIR]... [--out DIR]
#                            [--kernel-source linux-source-X.Y|TARBALL]
#
# Defaults: --arch aarch64, --site images/site, --out images/out/<arch>.
# Given more than once, --site lays each site over the ones before it: a
# file of a later site replaces the file of the same path.
#
# Output: $OUT/initramfs.cpio.gz and its .key, a hash of everything that goes
# in: busybox's version, this script, init, agent.c and reseed.h, the compiler of the
# agent, the kernel source (its usr/gen_init_cpio.c writes the archive) and
# every file of the sites with its mode. Unchanged inputs make a rerun a no-op.
set -Eeuo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

USAGE="[--arch aarch64|x86_64] [--site DIR]... [--out DIR] [--kernel-source linux-source-X.Y|TARBALL]"
SITES_ALLOWED=1
parse_args "$@"
[ ${#SITES[@]} -gt 0 ] || SITES=("$IMAGES_DIR/site")
# Applets the init script and the CGI scripts rely on; the build fails if
# the busybox binary does not provide one of them.
REQUIRED_APPLETS="sh mount ip arping httpd echo cat head sleep poweroff env sort printf tr od hexdump sed grep cut ls nc wget kill true test"

# ---------------------------------------------------------------- tools
step "checking initramfs tools"
choose_compiler
choose_kernel_source
BB_PKG="$(packages guest):$DEB_ARCH"
BB_DIR="$CACHE/busybox"
# The busybox-static .deb of the guest's architecture, once downloaded.
bb_deb() {
    [ -d "$BB_DIR" ] || return 0
    find "$BB_DIR" -maxdepth 1 -name "busybox-static_*_$DEB_ARCH.deb" | sort | tail -n 1
}
download=()
[ -n "$(bb_deb)" ] || download=(--download "$BB_PKG")
mapfile -t pkgs < <(packages initramfs)
ensure_packages "${download[@]}" "${pkgs[@]}" ${CC_PKG:+"$CC_PKG"}
describe_kernel_source
echo "    guest: $ARCH; kernel source: $KSRC_TARBALL; compiler: ${CROSS}gcc"
for site in "${SITES[@]}"; do
    [ -d "$site" ] || fail "site directory not found: $site"
done
[ -f "$IMAGES_DIR/init" ] || fail "missing $IMAGES_DIR/init"
lock_cache
mkdir -p "$BB_DIR"

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

# ---------------------------------------------------------------- sites
# SITE_ENTRY[path] is "type mode path [sha256|target]", SITE_FROM[path] the
# site it comes from; a later site's entry replaces an earlier one's.
declare -A SITE_ENTRY=() SITE_FROM=()
add_site() { # dir
    local p rel mode entry old
    while IFS= read -r p; do
        rel=${p#./}
        case "$rel" in
            *[[:space:]]*) fail "site path contains whitespace: $1/$rel" ;;
        esac
        mode=$(stat -c '%a' -- "$1/$rel")
        if [ -L "$1/$rel" ]; then
            entry="l $mode $rel $(readlink -- "$1/$rel")"
        elif [ -d "$1/$rel" ]; then
            entry="d $mode $rel"
        elif [ -f "$1/$rel" ]; then
            entry="f $mode $rel $(sha256sum -- "$1/$rel" | cut -d' ' -f1)"
        else
            fail "unsupported file type in site: $1/$rel"
        fi
        old=${SITE_ENTRY[$rel]-}
        if [ -n "$old" ] && [ "${old%% *}" != "${entry%% *}" ] &&
            { [ "${old%% *}" = d ] || [ "${entry%% *}" = d ]; }; then
            fail "$1/$rel is a directory in one site and not in the other"
        fi
        SITE_ENTRY[$rel]=$entry
        SITE_FROM[$rel]=$1
    done < <(cd "$1" && LC_ALL=C find . -mindepth 1 | LC_ALL=C sort)
}
step "reading the sites"
for site in "${SITES[@]}"; do
    add_site "$site"
done
# Sorted by path, so that a directory comes before what it holds.
SITE_MANIFEST=$(
    [ ${#SITE_ENTRY[@]} -eq 0 ] || printf '%s\n' "${SITE_ENTRY[@]}" | LC_ALL=C sort -k3,3
)

# ---------------------------------------------------------------- key
INITRAMFS_KEY=$(
    {
        echo "initramfs-key-v3"
        echo "busybox: $DEB_ARCH $BB_VERSION"
        echo "linux-source: $KSRC_VERSION"
        echo "gcc: ${CROSS}gcc $(gcc_version)"
        (cd "$IMAGES_DIR" && sha256sum initramfs.sh init agent.c reseed.h)
        echo "$SITE_MANIFEST"
    } | sha256sum | cut -d' ' -f1
)

if key_matches "$OUT/initramfs.cpio.gz" "$OUT/initramfs.cpio.gz.key" "$INITRAMFS_KEY"; then
    echo "==> initramfs: up to date"
    exit 0
fi

# ---------------------------------------------------------------- build
step "building initramfs"
# gen_init_cpio writes the archive from a list, with device nodes and owners
# that need no root, and no timestamps (-t 0): the same inputs give the same
# bytes.
GEN_INIT_CPIO="$CACHE/gen_init_cpio-$KSRC_VERSION"
if [ ! -x "$GEN_INIT_CPIO" ]; then
    ensure_kernel_source
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
    echo "# generated by images/initramfs.sh; input for gen_init_cpio"
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
            f) echo "file /www/$rel ${SITE_FROM[$rel]}/$rel $mode 0 0" ;;
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
echo "==> initramfs: $OUT/initramfs.cpio.gz"
