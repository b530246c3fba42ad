#!/usr/bin/env bash
# The one test command. On a fresh Debian 12 machine, as root:   ./test.sh
# Extra arguments go to pytest, e.g.   ./test.sh -k explain -x
#
# 1. installs what is missing (apt: openssl, python3-venv, a C compiler)
# 2. creates/refreshes .venv from tests/requirements.txt
# 3. cargo fmt --check, cargo clippy -D warnings, cargo test, cargo build (debug)
# 4. runs the end-to-end tests against target/debug/moat
set -euo pipefail

cd "$(dirname "$(readlink -f "$0")")"

step() { printf '\n==> %s\n' "$*" >&2; }

# ---------------------------------------------------------------- system packages
missing=()
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# curl: test_api.py runs the README's curl examples against the API.
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
if command -v python3 >/dev/null 2>&1; then
  # venv needs ensurepip, which Debian ships separately in python3-venv.
  if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
  fi
else
  missing+=(python3-venv)
fi
# Fleet store (SPEC 7): a real etcd for the tests, and protoc (with the
# well-known .proto files) for the etcd-client crate's build script.
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)
command -v etcdctl >/dev/null 2>&1 || missing+=(etcd-client)
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  step "installing: ${missing[*]}"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -q
  "${sudo[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo not found: install Rust (https://rustup.rs), then re-run ./test.sh" >&2
  exit 1
fi
for component in rustfmt clippy; do
  sub=${component/rustfmt/fmt}
  if ! cargo "$sub" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      step "rustup component add $component"
      rustup component add "$component"
    else
      echo "cargo $sub is missing (install the $component component)" >&2
      exit 1
    fi
  fi
done

# ---------------------------------------------------------------- packaging tools
# promtool (Debian's prometheus package) for deploy/prometheus, and cargo-deb
# for the Debian package test (tests/e2e/test_deploy_files.py, test_deb_package.py).
if ! command -v promtool >/dev/null 2>&1; then
  step "installing: prometheus (for promtool)"
  sudo=()
  [ "$(id -u)" -eq 0 ] || sudo=(sudo)
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus \
    || { "${sudo[@]}" apt-get update -q && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q --no-install-recommends prometheus; }
  # only promtool is wanted: do not leave a Prometheus server running
  "${sudo[@]}" systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
if ! command -v cargo-deb >/dev/null 2>&1 && ! cargo deb --version >/dev/null 2>&1; then
  step "cargo install cargo-deb"
  cargo install --locked cargo-deb
fi

# ---------------------------------------------------------------- python venv
req=tests/requirements.txt
want=$( { python3 --version 2>&1; sha256sum "$req"; } | sha256sum | cut -d' ' -f1)
stamp=.venv/.requirements.sha256
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import sys' >/dev/null 2>&1; then
  step "creating .venv"
  rm -rf .venv
  python3 -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
  step "installing $req into .venv"
  .venv/bin/python -m pip install -q --disable-pip-version-check -r "$req"
  .venv/bin/python -c 'import pytest, pytest_timeout, pymongo, mockupdb, cryptography, schemathesis'
  echo "$want" >"$stamp"
fi

# Git does not keep file modes: the dev keys must not be world-readable.
chmod 600 config/certs/*-key.pem 2>/dev/null || true

# ---------------------------------------------------------------- rust
step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy"
cargo clippy --all-targets -- -D warnings
step "cargo clippy --no-default-features (the build without the EC2 resolver)"
cargo clippy --no-default-features --all-targets -- -D warnings
step "cargo test"
cargo test --all-targets
step "cargo build"
cargo build

# ---------------------------------------------------------------- end to end
step "pytest tests/e2e"
MOAT_BIN=target/debug/moat .venv/bin/pytest -q tests/e2e "$@"
