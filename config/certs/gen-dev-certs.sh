#!/usr/bin/env bash
# Generates the DEVELOPMENT-ONLY certificates kept beside this script:
#   ca.pem / ca-key.pem              a dev CA ("moat development CA")
#   server.pem / server-key.pem      server chain (leaf + CA) for localhost, 127.0.0.1, ::1
#   client.pem / client-key.pem      client certificate, CN=dev-client, for mTLS (client_ca = ca.pem)
#   client-cert-and-key.pem          client.pem + client-key.pem in one file (mongosh's tlsCertificateKeyFile)
# All keys are ECDSA P-256 in PKCS#8, mode 600; everything is valid for 10 years.
# Never use these anywhere but a developer's machine or a test: the private keys are public.
#
# Usage: config/certs/gen-dev-certs.sh [OUTPUT_DIR]   (default: this script's directory)
set -euo pipefail

out=${1:-$(cd "$(dirname "$0")" && pwd)}
mkdir -p "$out"
cd "$out"
days=3650
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

newkey() { # newkey FILE: ECDSA P-256 private key, PKCS#8 PEM
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1"
  chmod 600 "$1"
}

# --- CA -------------------------------------------------------------------
newkey ca-key.pem
cat >"$work/ca.ext" <<'EXT'
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EXT
openssl req -new -key ca-key.pem -subj "/O=moat development/CN=moat development CA (DO NOT TRUST)" -out "$work/ca.csr"
openssl x509 -req -in "$work/ca.csr" -signkey ca-key.pem -days "$days" -sha256 \
  -extfile "$work/ca.ext" -out ca.pem

# --- server -----------------------------------------------------------------
newkey server-key.pem
cat >"$work/server.ext" <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
openssl req -new -key server-key.pem -subj "/O=moat development/CN=localhost" -out "$work/server.csr"
openssl x509 -req -in "$work/server.csr" -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
  -CAserial "$work/ca.srl" -days "$days" -sha256 -extfile "$work/server.ext" -out "$work/server-leaf.pem"
cat "$work/server-leaf.pem" ca.pem >server.pem

# --- client (mTLS) ------------------------------------------------------------
newkey client-key.pem
cat >"$work/client.ext" <<'EXT'
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EXT
openssl req -new -key client-key.pem -subj "/O=moat development/CN=dev-client" -out "$work/client.csr"
openssl x509 -req -in "$work/client.csr" -CA ca.pem -CAkey ca-key.pem \
  -CAserial "$work/ca.srl" -days "$days" -sha256 -extfile "$work/client.ext" -out client.pem

cat client.pem client-key.pem >client-cert-and-key.pem

chmod 644 ca.pem server.pem client.pem
chmod 600 ca-key.pem server-key.pem client-key.pem client-cert-and-key.pem

openssl verify -CAfile ca.pem "$work/server-leaf.pem" >/dev/null
openssl verify -CAfile ca.pem client.pem >/dev/null
echo "wrote development certificates to $out (valid $days days): ca.pem server.pem client.pem (+ keys)" >&2
