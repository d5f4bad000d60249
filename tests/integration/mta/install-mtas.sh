#!/bin/bash
# Install the real MTAs the integration tests in this folder drive (Debian 12, as root):
#   - Postfix from Debian's package (apt), configured for nothing: no system MTA starts;
#   - Exim 4 from Debian's exim4-daemon-light package, unpacked with `dpkg -x` into
#     BUILD_DIR/exim-root (the two packages conflict; Exim is a single binary);
#   - Debian's exim4-config package, unpacked into BUILD_DIR/exim4-config (not installed).
#
#   bash tests/integration/mta/install-mtas.sh BUILD_DIR        (`make mta-deps` does this)
#
# Idempotent, and quick when everything is already there: apt is only asked to do
# something that is missing, and `apt-get update` only runs when apt cannot find a package.
# Prints one line per step it had to take, and the two binaries' paths at the end.
set -euo pipefail

BUILD_DIR=${1:?usage: install-mtas.sh BUILD_DIR}
if [ "$(id -u)" != 0 ]; then
    echo "install-mtas.sh: must run as root" >&2
    exit 2
fi
mkdir -p "$BUILD_DIR"
BUILD_DIR=$(cd "$BUILD_DIR" && pwd)
EXIM_ROOT=$BUILD_DIR/exim-root
EXIM_BIN=$EXIM_ROOT/usr/sbin/exim4

export DEBIAN_FRONTEND=noninteractive
APT=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o APT::Sandbox::User=root)
UPDATED=no
say() { echo "[install-mtas] $*" >&2; }

apt_update() {
    if [ "$UPDATED" = no ]; then
        say "apt-get update"
        "${APT[@]}" update >/dev/null
        UPDATED=yes
    fi
}

# Run an apt-get command; if it fails (typically "Unable to locate package" or a 404 on
# stale lists), update the package lists once and try again.
apt_run() {
    if ! "${APT[@]}" "$@" >/dev/null 2>"$BUILD_DIR/apt.err"; then
        [ "$UPDATED" = yes ] && { cat "$BUILD_DIR/apt.err" >&2; return 1; }
        apt_update
        "${APT[@]}" "$@" >/dev/null
    fi
}

installed() {  # installed PACKAGE -> status 0 when dpkg has it installed
    [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]
}

# A package's postinst must never start a system-wide MTA (port 25) on this machine.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    say "creating /usr/sbin/policy-rc.d (exit 101: no service starts from a postinst)"
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
fi

# --- Postfix -----------------------------------------------------------------------------
if ! installed postfix; then
    say "installing postfix"
    echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
    apt_run install --no-install-recommends postfix
fi

# --- systemd's tools (systemd-analyze, -sysusers, -tmpfiles, -socket-activate) for the
# contrib/systemd tests; nothing is started (no systemd runs as PID 1 here).
if ! command -v systemd-socket-activate >/dev/null || ! command -v systemd-analyze >/dev/null; then
    say "installing systemd (its tools only)"
    apt_run install --no-install-recommends systemd
fi

# --- Exim: the package's binary, unpacked --------------------------------------------------
if [ ! -x "$EXIM_BIN" ]; then
    say "downloading and unpacking exim4-daemon-light into $EXIM_ROOT"
    mkdir -p "$BUILD_DIR/debs"
    rm -f "$BUILD_DIR"/debs/exim4-daemon-light_*.deb
    (cd "$BUILD_DIR/debs" && apt_run download exim4-daemon-light)
    DEB=$(ls "$BUILD_DIR"/debs/exim4-daemon-light_*.deb)
    # The libraries it links against (its Depends: without exim4-base and friends).
    LIBS=()
    IFS=',' read -ra DEPS <<< "$(dpkg-deb -f "$DEB" Depends)"
    for dep in "${DEPS[@]}"; do
        pkg=$(echo "${dep%%|*}" | sed -e 's/(.*)//' -e 's/[[:space:]]//g' -e 's/:any$//')
        case $pkg in
            lib*) installed "$pkg" || LIBS+=("$pkg") ;;
        esac
    done
    if [ ${#LIBS[@]} -gt 0 ]; then
        say "installing missing libraries: ${LIBS[*]}"
        # --no-upgrade: never upgrade a library something else on the machine uses.
        apt_run install --no-install-recommends --no-upgrade "${LIBS[@]}"
    fi
    rm -rf "$EXIM_ROOT.tmp"
    dpkg -x "$DEB" "$EXIM_ROOT.tmp"          # keeps the setuid bit of usr/sbin/exim4
    rm -rf "$EXIM_ROOT"
    mv "$EXIM_ROOT.tmp" "$EXIM_ROOT"
fi

# Debian's own configuration (exim4.conf.template, conf.d/, update-exim4.conf), unpacked
# only: the tests check that contrib/exim/ plugs into it as its README says.
if [ ! -f "$BUILD_DIR/exim4-config/usr/sbin/update-exim4.conf" ]; then
    say "downloading and unpacking exim4-config into $BUILD_DIR/exim4-config"
    mkdir -p "$BUILD_DIR/debs"
    rm -f "$BUILD_DIR"/debs/exim4-config_*.deb
    (cd "$BUILD_DIR/debs" && apt_run download exim4-config)
    rm -rf "$BUILD_DIR/exim4-config.tmp"
    dpkg -x "$BUILD_DIR"/debs/exim4-config_*.deb "$BUILD_DIR/exim4-config.tmp"
    rm -rf "$BUILD_DIR/exim4-config"
    mv "$BUILD_DIR/exim4-config.tmp" "$BUILD_DIR/exim4-config"
fi

# Debian's binary has EXIM_USER=Debian-exim compiled in and exits without that user.
if ! getent passwd Debian-exim >/dev/null; then
    say "creating the Debian-exim system user"
    adduser --system --group --quiet --allow-bad-names --no-create-home \
        --home /var/spool/exim4 --disabled-login Debian-exim
fi

if ldd "$EXIM_BIN" | grep -q 'not found'; then
    say "$EXIM_BIN misses shared libraries:"
    ldd "$EXIM_BIN" | grep 'not found' >&2
    exit 1
fi

# Exim's compiled-in TRUSTED_CONFIG_LIST: each test session lists its own configuration
# there (in its run folder, which Debian-exim can reach) and takes it out at the end.
mkdir -p /etc/exim4
touch /etc/exim4/trusted_configs
chmod 0644 /etc/exim4/trusted_configs

# (-bV without a configuration still prints the version, then exits 1)
{ "$EXIM_BIN" -bV </dev/null 2>&1 || true; } | grep -m1 "^Exim version" >&2
postconf -d mail_version >&2
echo "EXIM_BIN=$EXIM_BIN"
echo "POSTFIX=$(command -v postfix)"
