#!/usr/bin/env bash
# polyhub's test command: everything CI checks, in the order a failure is cheapest to find.
#
#   bash scripts/test.sh
#
# Runs on a clean Debian 12 machine with Rust, as root and without a terminal (CI runs it
# through .ci/run). Missing third-party peers are installed first: Mosquitto and its clients
# and OpenSSL from Debian, paho-mqtt 1.x, pytest and sgframework from PyPI. Then: formatting,
# clippy, the Rust tests, and the interop tests (tests/interop, tests/sgframework) against the
# freshly built binary and the SDK's sgframework peer.
# The first failing step stops the run and is named at the end.

set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Mosquitto lives in /usr/sbin, which a non-login shell may not have on its PATH.
export PATH="$PATH:/usr/sbin:/sbin"
export RUST_BACKTRACE=1

current_step="starting"
summary=()
step_started=$SECONDS

step() {
    current_step=$1
    step_started=$SECONDS
    printf '\n==> %s\n' "$current_step"
}

step_done() {
    summary+=("ok    ${current_step} ($((SECONDS - step_started))s)${1:+: $1}")
}

report() {
    local status=$?
    printf '\n==> summary\n'
    if ((${#summary[@]})); then
        printf '  %s\n' "${summary[@]}"
    fi
    if ((status != 0)); then
        printf '  FAILED %s (exit code %d)\n' "$current_step" "$status"
        printf '\nscripts/test.sh: FAILED at step "%s"\n' "$current_step" >&2
    else
        printf '\nscripts/test.sh: all checks passed\n'
    fi
}
trap report EXIT

as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        echo "need root (or sudo) to run: $*" >&2
        return 1
    fi
}

python_peers_present() {
    python3 - <<'EOF' 2>/dev/null
import sys
import paho.mqtt
import pytest  # noqa: F401
import sgframework  # noqa: F401
import slixmpp  # noqa: F401

# The interop tests use paho-mqtt's 1.x API, the one sgframework is written against.
sys.exit(0 if paho.mqtt.__version__.startswith("1.") else 1)
EOF
}

# ---------------------------------------------------------------------------------------------
step "install third-party peers"
debian_packages=()
command -v mosquitto >/dev/null || debian_packages+=(mosquitto)
{ command -v mosquitto_pub && command -v mosquitto_sub; } >/dev/null || debian_packages+=(mosquitto-clients)
command -v openssl >/dev/null || debian_packages+=(openssl)
command -v prosody >/dev/null || debian_packages+=(prosody)
command -v python3 >/dev/null || debian_packages+=(python3)
{ command -v python3 >/dev/null && python3 -m pip --version; } >/dev/null 2>&1 || debian_packages+=(python3-pip)
if ((${#debian_packages[@]})); then
    echo "installing from Debian: ${debian_packages[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y -qq --no-install-recommends "${debian_packages[@]}"
fi
if ! python_peers_present; then
    echo "installing from PyPI: paho-mqtt<2 pytest sgframework slixmpp"
    # PIP_BREAK_SYSTEM_PACKAGES: Debian's own python3 refuses pip installs without it; this
    # script's job is precisely to put these two packages where python3 finds them.
    PIP_BREAK_SYSTEM_PACKAGES=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1 \
        python3 -m pip install --quiet "paho-mqtt<2" pytest sgframework slixmpp
    python_peers_present || { echo "paho-mqtt 1.x, pytest, sgframework or slixmpp still not importable" >&2; false; }
fi
peers="$(mosquitto -h 2>/dev/null | head -n1 || true)"
peers+="; paho-mqtt $(python3 -c 'import paho.mqtt; print(paho.mqtt.__version__)')"
peers+="; pytest $(python3 -c 'import pytest; print(pytest.__version__)')"
peers+="; slixmpp $(python3 -c 'import slixmpp; print(slixmpp.__version__)' 2>/dev/null)"
peers+="; $(dpkg-query -W -f 'prosody ${Version}' prosody 2>/dev/null || echo prosody)"
echo "$peers"
step_done "$peers"

# ---------------------------------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check
step_done

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
step_done

if command -v cargo-nextest >/dev/null; then
    # nextest does not run documentation examples; they go first so that the last summary
    # line printed is the one of the real test run.
    step "cargo test --doc"
    timeout 15m cargo test --workspace --doc
    step_done
    step "cargo nextest run"
    timeout 45m cargo nextest run --workspace --no-fail-fast
    step_done
else
    step "cargo test"
    timeout 45m cargo test --workspace --no-fail-fast
    step_done
fi

step "build the binary and the SDK's interop peer"
cargo build -p polyhub -p polyhub-sdk --bins --examples
target_dir=${CARGO_TARGET_DIR:-target}
[[ $target_dir == /* ]] || target_dir="$PWD/$target_dir"
polyhub_bin="$target_dir/debug/polyhub"
sdk_peer="$target_dir/debug/examples/sgframework_peer"
[[ -x $polyhub_bin ]] || { echo "no binary at $polyhub_bin" >&2; false; }
[[ -x $sdk_peer ]] || { echo "no sgframework peer at $sdk_peer" >&2; false; }
step_done

# ---------------------------------------------------------------------------------------------
step "interop and end-to-end tests (pytest tests/interop tests/sgframework tests/hub)"
# One pytest run, so its closing line counts every interop test.
POLYHUB_BIN="$polyhub_bin" POLYHUB_SDK_PEER="$sdk_peer" \
    timeout 30m python3 -m pytest -q tests/interop tests/sgframework tests/hub
step_done
