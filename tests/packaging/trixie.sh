#!/usr/bin/env bash
# Debian 13 (trixie) chroots for building and installing the policyd package, cached
# under a work folder (build/trixie by default) between runs.  Needs root and debootstrap.
#
#   trixie.sh base WORK        WORK/base.tar: a minbase trixie with apt lists (cached)
#   trixie.sh builder WORK     WORK/builder/: base + the package's Build-Depends and lintian
#                              (cached; remade when debian/control's Build-Depends change)
#   trixie.sh deb WORK SDIST OUT
#                              build the .deb from the sdist SDIST (plus debian/ from it)
#                              in the builder, run lintian, copy both into OUT
#   trixie.sh fresh WORK DIR   a new chroot DIR from base.tar, /proc mounted, with
#                              WORK/apt-archives as its package cache
#   trixie.sh umount DIR       unmount what `fresh` or `deb` mounted under DIR
#
# Debian's registry is the only source: MIRROR (default http://deb.debian.org/debian).
set -euo pipefail

MIRROR=${MIRROR:-http://deb.debian.org/debian}
SUITE=trixie
here=$(cd "$(dirname "$0")" && pwd)
top=$(cd "$here/../.." && pwd)

say() { echo "trixie.sh: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then say "needs root (debootstrap, chroot, mount)"; exit 77; fi
    command -v debootstrap >/dev/null || { say "debootstrap is not installed"; exit 77; }
}

mount_in() {  # DIR WORK
    local dir=$1 work=$2
    mountpoint -q "$dir/proc" || mount -t proc proc "$dir/proc"
    mkdir -p "$work/apt-archives/partial" "$dir/var/cache/apt/archives"
    mountpoint -q "$dir/var/cache/apt/archives" || mount --bind "$work/apt-archives" "$dir/var/cache/apt/archives"
    cp -L /etc/resolv.conf "$dir/etc/resolv.conf" 2>/dev/null || true
}

umount_in() {  # DIR
    local dir=$1 m
    for m in var/cache/apt/archives proc; do
        if mountpoint -q "$dir/$m" 2>/dev/null; then umount "$dir/$m" || umount -l "$dir/$m"; fi
    done
}

in_chroot() {  # DIR command...
    local dir=$1; shift
    chroot "$dir" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LC_ALL=C.UTF-8 \
        DEBIAN_FRONTEND=noninteractive "$@"
}

base() {  # WORK
    local work=$1
    need_root
    mkdir -p "$work"
    if [ -f "$work/base.tar" ]; then return; fi
    local tmp="$work/base.tmp"
    rm -rf "$tmp"
    say "debootstrap --variant=minbase $SUITE from $MIRROR (once; cached as $work/base.tar)"
    debootstrap --variant=minbase "$SUITE" "$tmp" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
        || { tail -20 "$work/debootstrap.log" >&2; exit 1; }
    # No daemons started by maintainer scripts inside the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$tmp/usr/sbin/policy-rc.d"
    chmod 0755 "$tmp/usr/sbin/policy-rc.d"
    # Keep downloaded packages (the cache is a folder of WORK, shared between runs).
    echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' >"$tmp/etc/apt/apt.conf.d/01keep"
    echo 'APT::Install-Recommends "false";' >"$tmp/etc/apt/apt.conf.d/02norecommends"
    mount_in "$tmp" "$work"
    trap 'umount_in "$tmp"' EXIT
    in_chroot "$tmp" apt-get -q update >/dev/null
    umount_in "$tmp"
    trap - EXIT
    tar -C "$tmp" -cf "$work/base.tar.part" .
    mv "$work/base.tar.part" "$work/base.tar"
    rm -rf "$tmp"
}

build_depends() {  # the Build-Depends of debian/control, for apt-get satisfy
    sed -n '/^Build-Depends:/,/^[^ ]/p' "$top/debian/control" | sed '1s/^Build-Depends://;/^[^ ]/d' \
        | tr '\n' ' ' | sed 's/  */ /g;s/^ //;s/[ ,]*$//'
}

builder() {  # WORK
    local work=$1 dir=$1/builder deps stamp
    base "$work"
    deps="$(build_depends), lintian, fakeroot"
    stamp=$(echo "$deps" | sha256sum | cut -c1-16)
    if [ -f "$dir/.policyd-builder" ] && [ "$(cat "$dir/.policyd-builder")" = "$stamp" ]; then
        return
    fi
    umount_in "$dir" 2>/dev/null || true
    rm -rf "$dir"
    mkdir -p "$dir"
    tar -C "$dir" -xf "$work/base.tar"
    mount_in "$dir" "$work"
    trap 'umount_in "$dir"' EXIT
    say "installing the build dependencies in $dir: $deps"
    in_chroot "$dir" apt-get -q update >/dev/null
    in_chroot "$dir" apt-get -q -y satisfy "$deps" >"$work/builder.log" 2>&1 \
        || { tail -30 "$work/builder.log" >&2; exit 1; }
    umount_in "$dir"
    trap - EXIT
    echo "$stamp" >"$dir/.policyd-builder"
}

deb() {  # WORK SDIST OUT
    local work=$1 sdist=$2 out=$3 dir=$1/builder name
    builder "$work"
    mkdir -p "$out"
    mount_in "$dir" "$work"
    trap 'umount_in "$dir"' EXIT
    rm -rf "$dir/build"
    mkdir -p "$dir/build"
    tar -C "$dir/build" -xzf "$sdist"
    name=$(basename "$sdist" .tar.gz)
    [ -d "$dir/build/$name/debian" ] || { say "$sdist has no debian/ (MANIFEST.in)"; exit 1; }
    say "dpkg-buildpackage in the trixie builder (from $(basename "$sdist"))"
    in_chroot "$dir" sh -c "cd /build/$name && dpkg-buildpackage -us -uc -b -d -rfakeroot" \
        >"$out/build.log" 2>&1 || { tail -40 "$out/build.log" >&2; exit 1; }
    rm -f "$out"/policyd_*.deb "$out"/policyd_*.buildinfo "$out"/policyd_*.changes
    cp "$dir"/build/policyd_*_all.deb "$dir"/build/policyd_*.buildinfo "$dir"/build/policyd_*.changes "$out/"
    # (-d: the Build-Depends were installed with apt-get satisfy above; build-essential,
    # which an arch:all Python package does not use, is not.)
    # lintian as Debian's archive runs it (plus pedantic/info tags, for the record).
    in_chroot "$dir" sh -c "cd /build && lintian --info --display-info --pedantic policyd_*.changes" \
        >"$out/lintian.txt" 2>&1 || true
    umount_in "$dir"
    trap - EXIT
    say "built $(cd "$out" && ls policyd_*_all.deb); lintian: $out/lintian.txt"
}

fresh() {  # WORK DIR
    local work=$1 dir=$2
    base "$work"
    umount_in "$dir" 2>/dev/null || true
    rm -rf "$dir"
    mkdir -p "$dir"
    tar -C "$dir" -xf "$work/base.tar"
    mount_in "$dir" "$work"
}

cmd=${1:-}; shift || true
case "$cmd" in
    base) base "$1" ;;
    builder) builder "$1" ;;
    deb) deb "$@" ;;
    fresh) fresh "$@" ;;
    umount) umount_in "$1" ;;
    build-depends) build_depends ;;
    *) sed -n '2,17p' "$0" >&2; exit 2 ;;
esac
