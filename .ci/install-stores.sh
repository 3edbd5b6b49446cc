#!/usr/bin/env bash
# Installs the real mailbox stores the delivery tests run against (Cyrus IMAP 3.6 and
# Dovecot 2.3, from Debian's packages) on a fresh machine, as root. Idempotent: about 40 s the
# first time, 2 s when everything is there. .ci/run calls it before the test suite and sets
# POSTERN_REQUIRE_STORES=1, so tests/delivery_stores.rs fails (instead of skipping) if a store
# is missing. Never `apt-get install cyrus-imapd`: it conflicts with dovecot-imapd; the script
# unpacks Cyrus's imapd instead (tests/stores/README.md).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
    echo "install-stores.sh: must run as root (CI runs as root)" >&2
    exit 1
fi
bash tests/stores/install.sh
