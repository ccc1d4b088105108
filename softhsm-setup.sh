#!/usr/bin/env bash
# Set up a local SoftHSM token for dcvv-gateway, create the demo keys in it, and optionally
# run the gateway. Idempotent: a second run creates nothing and says so.
#
# Everything it creates lives in .softhsm/ next to this script (git-ignored): the token files,
# the rendered softhsm2.conf, the random user and SO PINs (mode 600, never printed) and an env
# file to source. Keys are created by the gateway's own `keys generate` command, inside the
# token; no key material ever passes through this script.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./softhsm-setup.sh [--deps-only | --run] [--help]

Sets up a SoftHSM development token for dcvv-gateway:
  1. installs SoftHSM v2 if it is missing (apt-get on Debian/Ubuntu);
  2. creates .softhsm/ (git-ignored): token directory, softhsm2.conf, random user and SO
     PINs (mode 600), and .softhsm/env (exports SOFTHSM2_CONF);
  3. initializes the token labelled "dcvv-dev" if no token has that label;
  4. builds the gateway (cargo build --release --locked);
  5. generates the demo keys inside the token, each only if its label is not present;
  6. runs `dcvv-gateway hsm check`.
Running it again changes nothing and says so.

Options:
  --deps-only  install the dependencies (step 1) and stop
  --run        after setup, run the gateway (`serve`) in the foreground
  --help       print this help
EOF
}

mode=setup
while [ $# -gt 0 ]; do
    case "$1" in
        --deps-only) mode=deps ;;
        --run) mode=run ;;
        -h | --help) usage; exit 0 ;;
        *) printf 'softhsm-setup.sh: unknown option: %s\n\n' "$1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

say() { printf '==> %s\n' "$*"; }
die() { printf 'softhsm-setup.sh: error: %s\n' "$*" >&2; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
cd "$repo"

token_label=dcvv-dev
module_candidates=(
    /usr/lib/softhsm/libsofthsm2.so
    /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so
    /usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so
    /usr/local/lib/softhsm/libsofthsm2.so
    /opt/homebrew/lib/softhsm/libsofthsm2.so
)

find_module() {
    local m
    for m in "${module_candidates[@]}"; do
        if [ -f "$m" ]; then
            printf '%s\n' "$m"
            return 0
        fi
    done
    return 1
}

# ---- 1. dependencies --------------------------------------------------------------------

install_softhsm() {
    if [ -r /etc/debian_version ] && command -v apt-get >/dev/null 2>&1; then
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null 2>&1 || die "softhsm2 is missing and sudo is not available: run 'apt-get install softhsm2' as root"
            sudo=(sudo)
        fi
        say "Installing softhsm2 with apt-get"
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >/dev/null
    else
        cat >&2 <<'EOF'
softhsm-setup.sh: SoftHSM v2 is not installed (softhsm2-util or libsofthsm2.so is missing).
Install it with your package manager, then run this script again:
  macOS (Homebrew):   brew install softhsm
  Fedora / RHEL:      sudo dnf install softhsm
  Debian / Ubuntu:    sudo apt-get install softhsm2
EOF
        exit 1
    fi
}

if ! command -v softhsm2-util >/dev/null 2>&1 || ! find_module >/dev/null; then
    install_softhsm
fi
command -v softhsm2-util >/dev/null 2>&1 || die "softhsm2-util is still missing after installing softhsm2"
module=$(find_module) || die "libsofthsm2.so not found in any of: ${module_candidates[*]}"

if [ "$mode" = deps ]; then
    say "Dependencies present: softhsm2-util, $module"
    command -v cargo >/dev/null 2>&1 || say "Note: cargo is not installed (https://rustup.rs); it is needed to build and test the gateway"
    exit 0
fi

command -v cargo >/dev/null 2>&1 || die "cargo is not installed: install Rust from https://rustup.rs and run this script again"

# ---- 2. repo-local state: .softhsm/ -----------------------------------------------------

created=()   # what this run created, for the summary
present=()   # what was already there

state="$repo/.softhsm"
tokens="$state/tokens"
conf="$state/softhsm2.conf"
user_pin_file="$state/user.pin"
so_pin_file="$state/so.pin"
env_file="$state/env"

mkdir -p "$tokens"
chmod 700 "$state" "$tokens"

# Write $2 to file $1 only if its content differs, so a re-run leaves files untouched.
write_if_changed() {
    local file=$1 content=$2 what=$3
    if [ -f "$file" ] && [ "$(cat "$file")" = "$content" ]; then
        present+=("$what")
    else
        printf '%s\n' "$content" >"$file"
        created+=("$what")
    fi
}

template="$repo/hsm-config/softhsm2.conf.template"
config="$repo/hsm-config/gateway.toml"
[ -f "$template" ] || die "missing $template"
[ -f "$config" ] || die "missing $config"

# The first string value of KEY in the gateway config (a plain "key = \"value\"" line).
config_value() {
    local values
    values=$(sed -n "s/^[[:space:]]*$1[[:space:]]*=[[:space:]]*\"\([^\"]*\)\".*/\1/p" "$config")
    printf '%s' "${values%%$'\n'*}"
}

grep -q '@TOKENDIR@' "$template" || die "$template has no @TOKENDIR@ placeholder"
tokens_sed=$(printf '%s' "$tokens" | sed 's/[\\|&]/\\&/g')
write_if_changed "$conf" "$(sed "s|@TOKENDIR@|$tokens_sed|g" "$template")" "softhsm2.conf"

# The committed gateway.toml names the Debian module path. Where SoftHSM lives elsewhere, the
# env file also overrides hsm.module through the gateway's environment layer
# (DCVV_GATEWAY__SECTION__KEY), so the one committed config works everywhere.
env_content="export SOFTHSM2_CONF=$conf"
config_module=$(config_value module)
if [ "$config_module" != "$module" ] && [ ! -f "$config_module" ]; then
    env_content+=$'\n'"export DCVV_GATEWAY__HSM__MODULE=$module"
fi
write_if_changed "$env_file" "$env_content" ".softhsm/env"
# shellcheck source=/dev/null
. "$env_file"

# 32 hex characters (128 bits) from the kernel's CSPRNG. No pipeline that can SIGPIPE.
random_pin() {
    local hex
    hex=$(od -An -N16 -tx1 /dev/urandom)
    printf '%s' "${hex//[^0-9a-f]/}"
}

# A PIN file is created only if it is missing. If the token already exists, a new PIN could
# never open it: refuse rather than leave a token nobody can log in to.
token_files_exist() { [ -n "$(ls -A "$tokens")" ]; }
for pin_file in "$user_pin_file" "$so_pin_file"; do
    name=".softhsm/$(basename "$pin_file")"
    if [ -s "$pin_file" ]; then
        chmod 600 "$pin_file"
        present+=("$name")
    elif token_files_exist; then
        die "$name is missing but $tokens already holds a token; its PIN is lost. Remove .softhsm/ to start over (this destroys the development keys)."
    else
        (umask 077 && random_pin >"$pin_file")
        chmod 600 "$pin_file"
        created+=("$name")
    fi
done

# ---- 3. the token, by label -------------------------------------------------------------

# softhsm2-util pads labels to 32 characters with spaces; match the whole field.
token_exists() {
    local slots
    slots=$(softhsm2-util --show-slots)
    grep -Eq "^[[:space:]]*Label:[[:space:]]+${token_label}[[:space:]]*\$" <<<"$slots"
}

if token_exists; then
    present+=("token $token_label")
else
    say "Initializing SoftHSM token '$token_label'"
    # The PINs are passed as arguments because softhsm2-util has no other non-interactive
    # input (they are visible in the process list for this instant, which is acceptable for
    # a development token); the command is never echoed and the PINs are never printed.
    softhsm2-util --init-token --free --label "$token_label" \
        --pin "$(cat "$user_pin_file")" --so-pin "$(cat "$so_pin_file")" >/dev/null
    token_exists || die "softhsm2-util did not create a token labelled '$token_label'"
    created+=("token $token_label")
fi

# ---- 4. the gateway ---------------------------------------------------------------------

say "Building dcvv-gateway (cargo build --release --locked; the first build takes a few minutes)"
cargo build --release --locked --quiet
bin="${CARGO_TARGET_DIR:-$repo/target}/release/dcvv-gateway"
[ -x "$bin" ] || die "cargo build did not produce $bin"

gw() { "$bin" --config "$config" "$@"; }

# ---- 5. demo keys, each only if its label is absent -------------------------------------

demo_keys=(
    "cvk cvk-demo-v1"
    "imk-dcvv imk-dcvv-demo-v1"
    "imk-tdcvv2 imk-tdcvv2-demo-v1"
    "pan-index pan-index-v1"
    "audit-seal audit-seal-v1"
)

# `keys list --json` prints a compact JSON array, one object per key object; the closing quote
# keeps a CVK's second object (LABEL:ka) from matching LABEL.
key_listed() {
    local label_re=${2//./\\.}
    grep -Eq "\"label\"[[:space:]]*:[[:space:]]*\"${label_re}\"" <<<"$1"
}

listing=$(gw keys list --json)
for entry in "${demo_keys[@]}"; do
    kind=${entry%% *}
    label=${entry#* }
    if key_listed "$listing" "$label"; then
        present+=("key $label")
    else
        say "Generating $kind key '$label' in the token"
        gw keys generate --kind "$kind" --label "$label"
        created+=("key $label")
    fi
done

listing=$(gw keys list --json)
for entry in "${demo_keys[@]}"; do
    label=${entry#* }
    key_listed "$listing" "$label" || die "key '$label' is not in 'keys list --json' after generation"
done

# ---- 6. check and summary ---------------------------------------------------------------

say "Checking the token and key attributes (hsm check)"
gw hsm check

join() { local IFS=',' s; s="$*"; printf '%s' "${s//,/, }"; }
echo
if [ ${#created[@]} -eq 0 ]; then
    echo "Summary: nothing created; everything was already present."
else
    echo "Summary: created ${#created[@]}: $(join "${created[@]}")."
    [ ${#present[@]} -eq 0 ] || echo "Already present: $(join "${present[@]}")."
fi

cat <<EOF

Token '$token_label' is ready (module $module).
The PINs are in .softhsm/user.pin and .softhsm/so.pin (mode 600); keep them out of logs.

Key commands by hand:
  source .softhsm/env
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys list
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys generate --kind cvk --label cvk-demo-v2
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys import --help   # dual-control import
  target/release/dcvv-gateway --config hsm-config/gateway.toml hsm check
Run the service: ./softhsm-setup.sh --run
EOF

if [ "$mode" = run ]; then
    listen=$(config_value listen)
    echo
    say "Starting dcvv-gateway on ${listen:-the configured address} (Ctrl-C to stop)"
    exec "$bin" --config "$config" serve
fi
