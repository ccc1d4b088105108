#!/usr/bin/env bash
# Set up a local SoftHSM token for dcvv-gateway, create the demo keys in it, and optionally
# run the gateway. Idempotent: a second run creates nothing and says so.
#
# Everything it creates lives in .softhsm/ next to this script (git-ignored): the token files,
# the rendered softhsm2.conf, the random user and SO PINs (mode 600, never printed), an env
# file to source, a development TLS CA and a localhost server certificate signed by it
# (.softhsm/tls/, private keys mode 600), and the demo API client's random secret
# (.softhsm/clients/cms-demo.secret, mode 600, never printed). Card keys are created by the
# gateway's own `keys generate` command, inside the token; no card key material ever passes
# through this script. The gateway creates its SQLite store (.softhsm/gateway.db) itself.
set -euo pipefail

usage() {
    cat <<'EOF'
Usage: ./softhsm-setup.sh [--deps-only | --run] [--help]

Sets up a SoftHSM development token for dcvv-gateway:
  1. installs SoftHSM v2 and OpenSSL if they are missing, and the PostgreSQL server
     binaries the tests start throwaway clusters from (apt-get on Debian/Ubuntu);
  2. creates .softhsm/ (git-ignored): token directory, softhsm2.conf, random user and SO
     PINs (mode 600), and .softhsm/env (exports SOFTHSM2_CONF);
  3. initializes the token labelled "dcvv-dev" if no token has that label;
  4. creates a development TLS CA (.softhsm/tls/ca.pem) and a certificate for localhost,
     127.0.0.1 and ::1 signed by it (.softhsm/tls/server.pem), private keys mode 600;
  5. creates the demo API client's random secret (.softhsm/clients/cms-demo.secret, 600);
  6. builds the gateway and its tools (cargo build --release --locked: dcvv-gateway, and
     dcvv-tools with the signed client `call` and `bench http`);
  7. generates the demo keys inside the token, each only if its label is not present;
  8. runs `dcvv-gateway hsm check`.
Each step creates only what is missing; running it again changes nothing and says so.
Secrets, PINs and private keys are never printed.

Options:
  --deps-only  install the dependencies (step 1) and stop (what the tests need)
  --run        after setup, run the gateway (`serve`, HTTPS on 127.0.0.1:8443) in the
               foreground and print how to call it from a second terminal
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

# Installs the given Debian packages (softhsm2, openssl) with apt-get, or says how to get
# them elsewhere.
install_packages() {
    if [ -r /etc/debian_version ] && command -v apt-get >/dev/null 2>&1; then
        local sudo=()
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null 2>&1 || die "$* missing and sudo is not available: run 'apt-get install $*' as root"
            sudo=(sudo)
        fi
        say "Installing $* with apt-get"
        "${sudo[@]}" apt-get update -qq
        "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
    else
        local pkg
        for pkg in "$@"; do
            case "$pkg" in
                softhsm2) cat >&2 <<'EOF'
softhsm-setup.sh: SoftHSM v2 is not installed (softhsm2-util or libsofthsm2.so is missing).
Install it with your package manager, then run this script again:
  macOS (Homebrew):   brew install softhsm
  Fedora / RHEL:      sudo dnf install softhsm
  Debian / Ubuntu:    sudo apt-get install softhsm2
EOF
                    ;;
                postgresql) cat >&2 <<'EOF'
softhsm-setup.sh: the PostgreSQL server binaries (initdb, pg_ctl) are not installed. The
tests start throwaway PostgreSQL clusters from them (they look in /usr/lib/postgresql/*/bin,
the Debian layout). Install them, then run this script again:
  Debian / Ubuntu:    sudo apt-get install postgresql
EOF
                    ;;
                openssl) cat >&2 <<'EOF'
softhsm-setup.sh: the openssl command is not installed (it makes the development TLS
certificates and the demo client secret). Install it with your package manager, then run
this script again:
  macOS (Homebrew):   brew install openssl
  Fedora / RHEL:      sudo dnf install openssl
  Debian / Ubuntu:    sudo apt-get install openssl
EOF
                    ;;
            esac
        done
        exit 1
    fi
}

missing_packages=()
if ! command -v softhsm2-util >/dev/null 2>&1 || ! find_module >/dev/null; then
    missing_packages+=(softhsm2)
fi
command -v openssl >/dev/null 2>&1 || missing_packages+=(openssl)
# PostgreSQL server binaries, for the tests' throwaway clusters (tests/it/support/postgres.rs
# looks where Debian puts them). Debian's package also creates and starts a cluster of its
# own on port 5432; the tests do not use it.
find_pg_bin() {
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            printf '%s\n' "$dir"
            return 0
        fi
    done
    return 1
}
find_pg_bin >/dev/null || missing_packages+=(postgresql)
[ ${#missing_packages[@]} -eq 0 ] || install_packages "${missing_packages[@]}"
command -v softhsm2-util >/dev/null 2>&1 || die "softhsm2-util is still missing after installing softhsm2"
module=$(find_module) || die "libsofthsm2.so not found in any of: ${module_candidates[*]}"
command -v openssl >/dev/null 2>&1 || die "openssl is still missing after installing openssl"
pg_bin=$(find_pg_bin) || die "initdb and pg_ctl not found in /usr/lib/postgresql/*/bin after installing postgresql"

if [ "$mode" = deps ]; then
    say "Dependencies present: softhsm2-util, $module, $(command -v openssl), PostgreSQL server in $pg_bin"
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
tls_dir="$state/tls"
ca_cert="$tls_dir/ca.pem"
ca_key="$tls_dir/ca.key"
server_cert="$tls_dir/server.pem"
server_key="$tls_dir/server.key"
clients_dir="$state/clients"
# The demo client of hsm-config/gateway.toml ([[clients]] apikey "cms-demo", secrets from
# ../.softhsm/clients/cms-demo.secret).
demo_client=cms-demo
demo_secret_file="$clients_dir/$demo_client.secret"

mkdir -p "$tokens" "$tls_dir" "$clients_dir"
chmod 700 "$state" "$tokens" "$tls_dir" "$clients_dir"

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
env_content="export SOFTHSM2_CONF=$(printf '%q' "$conf")"
config_module=$(config_value module)
if [ "$config_module" != "$module" ] && [ ! -f "$config_module" ]; then
    env_content+=$'\n'"export DCVV_GATEWAY__HSM__MODULE=$(printf '%q' "$module")"
fi
# Where the demo client's secret is, never the secret itself.
secret_hint=$(cat <<'EOF'
# The demo API client's (cms-demo) secret file; the secret itself is never in this file.
# For `dcvv-tools call`: export DCVV_CLIENT_SECRET="$(cat "$DCVV_CLIENT_SECRET_FILE")"
EOF
)
env_content+=$'\n'"$secret_hint"
env_content+=$'\n'"export DCVV_CLIENT_SECRET_FILE=$(printf '%q' "$demo_secret_file")"
write_if_changed "$env_file" "$env_content" ".softhsm/env"
# shellcheck source=/dev/null
. "$env_file"

# 32 hex characters (128 bits) from the kernel's CSPRNG. No pipeline that can SIGPIPE.
random_hex() {
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
        (umask 077 && random_hex >"$pin_file")
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

# ---- 4. development TLS: a CA and a server certificate signed by it --------------------
#
# Two levels, because rustls/webpki refuses a CA certificate as a server's end-entity
# certificate. Clients trust ca.pem (curl --cacert, dcvv-tools call --cacert); the gateway
# serves server.pem with server.key (hsm-config/gateway.toml, [server]). Each pair is made
# again only when it is missing, does not match its key, expires within 30 days, or (the
# server's) no longer verifies under the CA. Files are written under temporary names and
# renamed, so an interrupted run leaves no half-written pair.

ca_days=730          # about 2 years
server_days=397      # the longest validity browsers accept for a server certificate
renew_seconds=$((30 * 86400))

# openssl, quiet on success; on failure its messages (which never hold a private key: every
# key goes to a file with -out) and a one-line error.
ossl() {
    local out
    if ! out=$(openssl "$@" 2>&1); then
        printf '%s\n' "$out" >&2
        die "openssl $1 failed"
    fi
}

# Compares public keys only.
cert_matches_key() {
    local from_cert from_key
    from_cert=$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null) || return 1
    from_key=$(openssl pkey -in "$2" -pubout 2>/dev/null) || return 1
    [ -n "$from_cert" ] && [ "$from_cert" = "$from_key" ]
}

cert_valid_for() { openssl x509 -in "$1" -noout -checkend "$2" >/dev/null 2>&1; }

pair_usable() {
    [ -s "$1" ] && [ -s "$2" ] && cert_matches_key "$1" "$2" && cert_valid_for "$1" "$renew_seconds"
}

new_p256_key() {
    rm -f "$1"
    (umask 077 && ossl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1")
    chmod 600 "$1"
}

ca_config() {
    cat <<'EOF'
[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = dcvv-gateway development CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
EOF
}

server_req_config() {
    cat <<'EOF'
[req]
distinguished_name = dn
prompt = no
[dn]
CN = localhost
EOF
}

server_extensions() {
    cat <<'EOF'
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
EOF
}

make_ca() {
    new_p256_key "$ca_key.tmp"
    ossl req -new -x509 -config <(ca_config) -key "$ca_key.tmp" -sha256 -days "$ca_days" \
        -out "$ca_cert.tmp"
    chmod 644 "$ca_cert.tmp"
    mv -f "$ca_key.tmp" "$ca_key"
    mv -f "$ca_cert.tmp" "$ca_cert"
}

make_server_cert() {
    new_p256_key "$server_key.tmp"
    ossl req -new -config <(server_req_config) -key "$server_key.tmp" -sha256 \
        -out "$server_cert.csr"
    ossl x509 -req -in "$server_cert.csr" -CA "$ca_cert" -CAkey "$ca_key" \
        -set_serial "0x$(random_hex)" -days "$server_days" -sha256 \
        -extfile <(server_extensions) -extensions v3_server -out "$server_cert.tmp"
    rm -f "$server_cert.csr"
    chmod 644 "$server_cert.tmp"
    mv -f "$server_key.tmp" "$server_key"
    mv -f "$server_cert.tmp" "$server_cert"
}

rm -f "$ca_key.tmp" "$ca_cert.tmp" "$server_key.tmp" "$server_cert.tmp" "$server_cert.csr"

new_ca=false
if pair_usable "$ca_cert" "$ca_key"; then
    chmod 600 "$ca_key"
    present+=("TLS CA .softhsm/tls/ca.pem")
else
    say "Creating the development TLS CA (.softhsm/tls/ca.pem, ca.key)"
    make_ca
    new_ca=true
    created+=("TLS CA .softhsm/tls/ca.pem")
fi

if [ "$new_ca" = false ] && pair_usable "$server_cert" "$server_key" \
    && openssl verify -CAfile "$ca_cert" "$server_cert" >/dev/null 2>&1; then
    chmod 600 "$server_key"
    present+=("TLS certificate .softhsm/tls/server.pem")
else
    say "Creating the TLS certificate for localhost, 127.0.0.1 and ::1 (.softhsm/tls/server.pem, server.key)"
    make_server_cert
    openssl verify -CAfile "$ca_cert" "$server_cert" >/dev/null 2>&1 \
        || die ".softhsm/tls/server.pem does not verify under .softhsm/tls/ca.pem"
    created+=("TLS certificate .softhsm/tls/server.pem")
fi

# ---- 5. the demo API client's secret ----------------------------------------------------
#
# 32 random bytes, URL-safe Base64 without padding: 43 characters (the gateway wants 32 to
# 256 printable ASCII characters). Never printed; a secret already there is kept.

# One line of 32 to 256 printable ASCII characters without spaces (a final newline is
# allowed, as the gateway drops it). Reads the file without printing it.
secret_file_valid() {
    [ "$(wc -l <"$1")" -le 1 ] && LC_ALL=C grep -Eqx '[!-~]{32,256}' "$1"
}

secret_name=".softhsm/clients/$demo_client.secret"
rm -f "$demo_secret_file.tmp"
if [ -s "$demo_secret_file" ]; then
    secret_file_valid "$demo_secret_file" \
        || die "$secret_name is not a valid client secret (32 to 256 printable ASCII characters, no spaces); delete it and run this script again to get a new one"
    chmod 600 "$demo_secret_file"
    present+=("client secret $secret_name")
else
    (umask 077 && openssl rand -base64 32 | tr '+/' '-_' | tr -d '=\n' >"$demo_secret_file.tmp")
    chmod 600 "$demo_secret_file.tmp"
    if [ "$(wc -c <"$demo_secret_file.tmp")" -ne 43 ] || ! secret_file_valid "$demo_secret_file.tmp"; then
        die "could not make a client secret with openssl rand"
    fi
    mv -f "$demo_secret_file.tmp" "$demo_secret_file"
    created+=("client secret $secret_name")
fi

# ---- 6. the gateway ---------------------------------------------------------------------

say "Building dcvv-gateway and dcvv-tools (cargo build --release --locked; the first build takes a few minutes)"
cargo build --release --locked --quiet
bin="${CARGO_TARGET_DIR:-$repo/target}/release/dcvv-gateway"
[ -x "$bin" ] || die "cargo build did not produce $bin"
tools_bin="${CARGO_TARGET_DIR:-$repo/target}/release/dcvv-tools"
[ -x "$tools_bin" ] || die "cargo build did not produce $tools_bin"

gw() { "$bin" --config "$config" "$@"; }

# ---- 7. demo keys, each only if its label is absent -------------------------------------

demo_keys=(
    "cvk cvk-demo-v1"
    "imk-dcvv imk-dcvv-demo-v1"
    "imk-tdcvv2 imk-tdcvv2-demo-v1"
    "imk-ac imk-ac-demo-v1"
    "imk-cvc3 imk-cvc3-demo-v1"
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

# ---- 8. check and summary ---------------------------------------------------------------

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
TLS: .softhsm/tls/ca.pem is the development CA (give it to clients: --cacert); the gateway
serves .softhsm/tls/server.pem. The demo client's secret is in $secret_name (mode 600).

Key commands by hand:
  source .softhsm/env
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys list
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys generate --kind cvk --label cvk-demo-v2
  target/release/dcvv-gateway --config hsm-config/gateway.toml keys import --help   # dual-control import
  target/release/dcvv-gateway --config hsm-config/gateway.toml hsm check
Run the service: ./softhsm-setup.sh --run
EOF

if [ "$mode" = run ]; then
    # The address clients use: the configured one (or its environment override), with a
    # wildcard address replaced by loopback, which the development certificate covers.
    listen=${DCVV_GATEWAY__SERVER__LISTEN:-$(config_value listen)}
    listen=${listen:-127.0.0.1:8443}
    case "$listen" in
        0.0.0.0:*) listen="127.0.0.1:${listen#0.0.0.0:}" ;;
        '[::]:'*) listen="[::1]:${listen#\[::\]:}" ;;
    esac
    url="https://$listen"
    cat >&2 <<EOF

==> Next steps: in a second terminal, call the gateway
  cd $(printf '%q' "$repo")
  export DCVV_CLIENT_SECRET="\$(cat $secret_name)"
  curl --cacert .softhsm/tls/ca.pem $url/readyz

  # three dynamic CVV2 values for the demo card (enrols it)
  target/release/dcvv-tools call --url $url --apikey $demo_client --secret-env DCVV_CLIENT_SECRET --cacert .softhsm/tls/ca.pem \\
    POST /cards/pin/dynamic-values --data '{"cardNumber":"4123450000000001","expiryDate":"3012","numberOfValues":3}'

  # verify the first one (the "dcvv2" field): approved / match, then declined / code_already_used
  target/release/dcvv-tools call --url $url --apikey $demo_client --secret-env DCVV_CLIENT_SECRET --cacert .softhsm/tls/ca.pem \\
    POST /cards/cvv2/verification --data '{"cardNumber":"4123450000000001","expiryDate":"3012","cvv2":"<the dcvv2 from above>"}'

  More (enrolment, static CVV2): README.md, "Quick start"; the API and signing your own
  requests: docs/api.md.
  Ctrl-C or SIGTERM stops the gateway after in-flight requests finish.

EOF
    say "Starting dcvv-gateway on $url (Ctrl-C to stop)" >&2
    exec "$bin" --config "$config" serve
fi
