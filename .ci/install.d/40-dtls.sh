#!/usr/bin/env bash
# DTLS interop peers (issues 4, 13): OpenSSL's command line tool, GnuTLS's
# gnutls-cli/gnutls-serv (gnutls-bin) and Mbed TLS 3.6
# ssl_server2/ssl_client2 (the one RFC 9146 implementation available), built
# from Debian trixie's source package.  python-mbedtls comes with the test
# extras of setup.cfg.  Idempotent: the Mbed TLS build is cached outside the
# repository and reused.
set -euo pipefail

command -v openssl >/dev/null || apt-get install -y --no-install-recommends openssl
command -v gnutls-cli >/dev/null && command -v gnutls-serv >/dev/null \
    || apt-get install -y --no-install-recommends gnutls-bin

CACHE=${NETTESTER_MBEDTLS_CACHE:-/var/cache/nettester/mbedtls}
if [ -x "$CACHE/bin/ssl_server2" ] && [ -x "$CACHE/bin/ssl_client2" ]; then
    exit 0
fi
command -v make >/dev/null && command -v cc >/dev/null || apt-get install -y --no-install-recommends build-essential
apt-get install -y --no-install-recommends dpkg-dev >/dev/null  # apt-get source needs dpkg-source

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/sources.list.d" "$WORK/src"

# One deb-src entry derived from the machine's own Debian source: same URI and
# keyring, suite trixie (whose mbedtls is 3.6 with RFC 9146 on by default).
python3 - "$WORK/sources.list.d/trixie-src.sources" <<'PY'
import sys
stanza = open("/etc/apt/sources.list.d/debian.sources").read().split("\n\n")[0]
fields = {}
for line in stanza.splitlines():
    if line.strip() and not line.startswith("#") and ":" in line:
        key, value = line.split(":", 1)
        fields[key.strip()] = value.strip()
with open(sys.argv[1], "w") as out:
    out.write("Types: deb-src\nURIs: %s\nSuites: trixie\nComponents: main\nSigned-By: %s\n"
              % (fields["URIs"].split()[0], fields.get("Signed-By", "/usr/share/keyrings/debian-archive-keyring.gpg")))
PY
APT_OPTS=(-o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache"
          -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$WORK/sources.list.d"
          -o "APT::Sandbox::User=root")  # a throw-away directory: no _apt sandbox needed
apt-get "${APT_OPTS[@]}" update -qq
(cd "$WORK/src" && apt-get "${APT_OPTS[@]}" source --download-only mbedtls)
ORIG=$(ls "$WORK"/src/mbedtls_*.orig.tar.* | head -n1)
tar -xf "$ORIG" -C "$WORK/src"
SRC=$(find "$WORK/src" -maxdepth 1 -mindepth 1 -type d -name 'mbedtls*' | head -n1)
make -C "$SRC/library" -j"$(nproc)" >/dev/null
make -C "$SRC/programs" -j"$(nproc)" ssl/ssl_server2 ssl/ssl_client2 >/dev/null
mkdir -p "$CACHE/bin"
install -m 0755 "$SRC/programs/ssl/ssl_server2" "$SRC/programs/ssl/ssl_client2" "$CACHE/bin/"
echo "40-dtls: Mbed TLS $(basename "$ORIG") built into $CACHE/bin"
