#!/usr/bin/env bash
# Remove bms-gateway installed by scripts/install.sh: sudo scripts/uninstall.sh [--purge] [--root DIR]
# The configuration, the store (records not yet delivered) and the credentials stay unless --purge.
exec "$(dirname "$0")/install.sh" uninstall "$@"
