#!/usr/bin/env bash
# Install bms-gateway as a system service, or remove it again. Run from a checkout, as root:
#
#   sudo scripts/install.sh [install] [--can] [--bitrate N] [--vcan] [--start]
#   sudo scripts/install.sh uninstall [--purge]
#
# install
#   - Debian packages it needs (python3-venv; can-utils with --can or --vcan) through apt-get;
#   - the package into a virtual environment, /opt/bms-gateway/venv, and `bms-gateway` on the PATH
#     (/usr/local/bin); the DBC files, profiles, examples and docs beside it in /opt/bms-gateway;
#   - /etc/bms-gateway/config.toml from config/gateway.example.toml, only if there is none yet;
#   - the hardened unit systemd/bms-gateway.service into /etc/systemd/system, enabled;
#   - with --can, systemd/can0.network into /etc/systemd/network (bit rate from --bitrate), so
#     systemd-networkd brings the bus up at boot; with --vcan, a virtual vcan0 for development.
#   Running it again upgrades the package and units and keeps the configuration.
# uninstall
#   - stops and disables the service, removes the unit, /opt/bms-gateway and the files this
#     script added; keeps the configuration, the store (records not yet delivered!) and the
#     credentials unless --purge.
#
# --root DIR installs into DIR as if it were / (an image being prepared, or a test): no apt-get,
# no running systemd touched; the unit is enabled inside DIR with `systemctl --root`.
# Where systemd is not PID 1 (a container, a chroot) the same applies: it says so and goes on.
#
# Other options: --python PY (the interpreter for the virtual environment, ≥ 3.11),
# --pip-option OPT (repeatable; passed to pip, e.g. --pip-option=--no-index
# --pip-option=--find-links=/media/usb/wheels on a gateway without Internet), --no-apt.
set -euo pipefail

PROG=$(basename "$0")
SRC=$(cd "$(dirname "$0")/.." && pwd)
UNIT=bms-gateway.service
say() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { say "$*"; exit 1; }

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed -e '/^set -euo/d' -e 's/^# \{0,1\}//' >&2
  exit 2
}

# -- options ---------------------------------------------------------------------------------
ACTION=install
case "${1:-}" in
  install|uninstall) ACTION=$1; shift ;;
esac
ROOT=/
CAN=0; VCAN=0; BITRATE=""; START=0; APT=1; PURGE=0; PYTHON=""
PIP_OPTIONS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT=${2:?--root needs a folder}; shift ;;
    --root=*) ROOT=${1#*=} ;;
    --can) CAN=1 ;;
    --vcan) VCAN=1 ;;
    --bitrate) BITRATE=${2:?--bitrate needs bit/s}; shift ;;
    --bitrate=*) BITRATE=${1#*=} ;;
    --start) START=1 ;;
    --no-apt) APT=0 ;;
    --purge) PURGE=1 ;;
    --python) PYTHON=${2:?--python needs an interpreter}; shift ;;
    --python=*) PYTHON=${1#*=} ;;
    --pip-option) PIP_OPTIONS+=("${2:?--pip-option needs a value}"); shift ;;
    --pip-option=*) PIP_OPTIONS+=("${1#*=}") ;;
    -h|--help) usage ;;
    *) say "unknown option: $1"; usage ;;
  esac
  shift
done
if [ -n "$BITRATE" ]; then
  [[ "$BITRATE" =~ ^[0-9]+$ ]] && [ "$BITRATE" -gt 0 ] || die "--bitrate must be bit/s, e.g. 500000"
  CAN=1
fi

mkdir -p "$ROOT"
ROOT=$(cd "$ROOT" && pwd)
# Paths as the installed system sees them, and where this script writes them.
OPT=/opt/bms-gateway
ETC=/etc/bms-gateway
at() { printf '%s%s' "${ROOT%/}" "$1"; }
MANIFEST=$(at "$OPT/installed-files")

LIVE=0  # 1: installing into this machine, whose systemd runs
if [ "$ROOT" = / ]; then
  [ "$(id -u)" = 0 ] || die "run as root (sudo $0 $ACTION ...), or use --root DIR"
  if [ -d /run/systemd/system ]; then
    LIVE=1
  else
    say "systemd is not running here (PID 1 is $(cat /proc/1/comm 2>/dev/null || echo unknown)):" \
        "units are enabled or disabled as files only, effective when systemd next boots"
  fi
fi

# -- helpers ---------------------------------------------------------------------------------
apt_install() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
      missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  command -v apt-get >/dev/null 2>&1 || die "please install: ${missing[*]} (no apt-get here)"
  say "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

find_python() {
  local py
  for py in ${PYTHON:-python3.13 python3.12 python3.11 python3}; do
    if command -v "$py" >/dev/null 2>&1 &&
       "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      command -v "$py"; return 0
    fi
  done
  die "Python 3.11 or newer is needed${PYTHON:+ (--python $PYTHON is not)}"
}

# enable/disable a unit: in the running systemd, or as symlinks inside ROOT
unit_ctl() {
  local verb=$1 unit=$2
  if [ "$LIVE" = 1 ]; then
    systemctl "$verb" "$unit"
  elif command -v systemctl >/dev/null 2>&1; then
    systemctl --root="$ROOT" "$verb" "$unit" 2>&1 | grep -v "non-existent unit" >&2 || true
  else
    say "no systemctl here: $verb $unit by hand on the target"
  fi
}

# install a file unless one is there already; note what we added, so uninstall removes only that
install_new() {
  local mode=$1 from=$2 to=$3
  if [ -e "$(at "$to")" ]; then
    say "kept the existing $to"
    return 0
  fi
  install -D -m "$mode" "$from" "$(at "$to")"
  printf '%s\n' "$to" >> "$MANIFEST"
  say "installed $to"
}

# -- install ---------------------------------------------------------------------------------
do_install() {
  [ -f "$SRC/pyproject.toml" ] && [ -d "$SRC/gateway" ] || die "$SRC is not a bms-gateway checkout"
  local py
  py=$(find_python)
  if [ "$ROOT" = / ] && [ "$APT" = 1 ]; then
    "$py" -c 'import ensurepip, venv' 2>/dev/null || apt_install python3-venv
    if [ "$CAN" = 1 ] || [ "$VCAN" = 1 ]; then apt_install can-utils; fi
  fi

  # the package, in its own virtual environment
  local venv
  venv=$(at "$OPT/venv")
  if [ ! -x "$venv/bin/python" ]; then
    say "creating the virtual environment $OPT/venv"
    "$py" -m venv "$venv"
  fi
  # pip builds in the folder it is given: build from a copy, never leaving files in the checkout
  STAGE=$(mktemp -d)
  trap 'rm -rf "$STAGE"' EXIT
  local stage=$STAGE
  cp -r "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/gateway" "$SRC/firmware_sim" "$stage/"
  find "$stage" -name __pycache__ -prune -exec rm -rf {} +
  say "installing bms-gateway and its packages into $OPT/venv (pip)"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade \
      ${PIP_OPTIONS[@]+"${PIP_OPTIONS[@]}"} "$stage"
  "$venv/bin/bms-gateway" --version >/dev/null || die "the installed bms-gateway does not run"
  mkdir -p "$(at /usr/local/bin)"
  ln -sfn "$OPT/venv/bin/bms-gateway" "$(at /usr/local/bin/bms-gateway)"

  # what the configuration refers to, and what an operator reads
  local part
  for part in dbc profiles config docs systemd; do
    rm -rf "$(at "$OPT/$part")"
    cp -r "$SRC/$part" "$(at "$OPT/$part")"
  done
  cp "$SRC/README.md" "$(at "$OPT/README.md")"
  touch "$MANIFEST"

  # configuration: made once from the example, never overwritten
  if [ -e "$(at "$ETC/config.toml")" ]; then
    say "kept the existing $ETC/config.toml"
  else
    local config
    config=$(mktemp)
    # the example names the profile relative to the checkout; installed, it lives under $OPT
    sed 's#^path = "\.\./profiles/#path = "'"$OPT"'/profiles/#' \
        "$SRC/config/gateway.example.toml" > "$config"
    grep -q "^path = \"$OPT/profiles/" "$config" ||
      die "config/gateway.example.toml no longer names ../profiles/: update $PROG"
    install -D -m 0644 "$config" "$(at "$ETC/config.toml")"
    rm -f "$config"
    say "created $ETC/config.toml from the example: set gateway.id and [mqtt] before starting"
  fi
  # secrets go to the credential store, read by systemd for the unit (LoadCredential=)
  install -d -m 0700 "$(at /etc/credstore)"

  # units
  install -D -m 0644 "$SRC/systemd/$UNIT" "$(at "/etc/systemd/system/$UNIT")"
  if [ "$CAN" = 1 ]; then
    [ -f "$SRC/systemd/can0.network" ] || die "systemd/can0.network is missing from $SRC"
    local network
    network=$(mktemp)
    if [ -n "$BITRATE" ]; then
      sed "s/^BitRate=.*/BitRate=$BITRATE/" "$SRC/systemd/can0.network" > "$network"
    else
      cp "$SRC/systemd/can0.network" "$network"
    fi
    install_new 0644 "$network" /etc/systemd/network/can0.network
    rm -f "$network"
  fi
  if [ "$VCAN" = 1 ]; then
    for part in vcan0.netdev vcan0.network; do
      [ -f "$SRC/systemd/$part" ] || die "systemd/$part is missing from $SRC"
      install_new 0644 "$SRC/systemd/$part" "/etc/systemd/network/$part"
    done
  fi
  sort -u -o "$MANIFEST" "$MANIFEST"

  [ "$LIVE" = 1 ] && systemctl daemon-reload
  unit_ctl enable "$UNIT"
  if [ "$CAN" = 1 ] || [ "$VCAN" = 1 ]; then
    if [ "$LIVE" = 1 ]; then
      systemctl enable systemd-networkd.service
      systemctl restart systemd-networkd.service
    elif [ -e "$(at /lib/systemd/system/systemd-networkd.service)" ] ||
         [ -e "$(at /usr/lib/systemd/system/systemd-networkd.service)" ]; then
      unit_ctl enable systemd-networkd.service
    else
      say "systemd-networkd is not installed in $ROOT: on the target, run" \
          "'systemctl enable --now systemd-networkd' to bring the CAN interface up"
    fi
  fi
  if [ "$START" = 1 ]; then
    if [ "$LIVE" = 1 ]; then
      systemctl restart "$UNIT"
      say "started; follow it with: journalctl -u bms-gateway -f"
    else
      say "not started: no running systemd for $ROOT"
    fi
  fi
  say "installed in $ROOT: check the configuration with" \
      "'bms-gateway check-config -c $ETC/config.toml', then 'systemctl start bms-gateway'"
}

# -- uninstall -------------------------------------------------------------------------------
do_uninstall() {
  if [ -e "$(at "/etc/systemd/system/$UNIT")" ]; then
    if [ "$LIVE" = 1 ]; then
      systemctl disable --now "$UNIT" || true
    else
      unit_ctl disable "$UNIT"
    fi
    rm -f "$(at "/etc/systemd/system/$UNIT")"
    [ "$LIVE" = 1 ] && systemctl daemon-reload
    say "removed the unit"
  fi
  local added
  if [ -f "$MANIFEST" ]; then
    while IFS= read -r added; do
      [ -n "$added" ] && rm -f "$(at "$added")" && say "removed $added"
    done < "$MANIFEST"
  fi
  if [ "$(readlink "$(at /usr/local/bin/bms-gateway)" 2>/dev/null)" = "$OPT/venv/bin/bms-gateway" ]
  then
    rm -f "$(at /usr/local/bin/bms-gateway)"
  fi
  rm -rf "$(at "$OPT")"
  say "removed $OPT"
  local kept=("$ETC" /var/lib/bms-gateway /var/lib/private/bms-gateway /var/cache/bms-gateway
              /var/cache/private/bms-gateway)
  if [ "$PURGE" = 1 ]; then
    for added in "${kept[@]}"; do rm -rf "$(at "$added")"; done
    rm -f "$(at /etc/credstore)"/bms-gateway.*
    say "purged the configuration, the store, the cache and the credentials"
  else
    for added in "${kept[@]}"; do
      [ -e "$(at "$added")" ] && say "kept $added (remove with: $PROG uninstall --purge)"
    done
  fi
  return 0
}

"do_$ACTION"
