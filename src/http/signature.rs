//! Request and response signatures (DESIGN 5): the string to sign, HMAC-SHA256
//! under a client's secret, the four headers, and their parsing.
//!
//! This module is pure: no clock, no store, no client registry. The server's
//! middleware ([`super::auth`]) and the `dcvv-tools call` client (`tools/`) both
//! build on it, so the two sides cannot drift. Signatures are checked with `Mac::verify_slice`
//! (constant time); a secret never appears in `Debug` output or an error.

use axum::http::HeaderMap;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Header carrying the client id.
pub const APIKEY: &str = "apikey";
/// Header carrying Unix epoch milliseconds.
pub const TIMESTAMP: &str = "timestamp";
/// Header carrying the client's request id (echoed in the response).
pub const REQUEST_ID: &str = "x-client-request-id";
/// Header carrying the Base64 HMAC-SHA256.
pub const SIGNATURE: &str = "signature";

/// Shortest client secret the gateway accepts (DESIGN 5).
pub const MIN_SECRET_CHARS: usize = 32;
/// Longest client secret the gateway accepts.
pub const MAX_SECRET_CHARS: usize = 256;

/// A client's shared secret: the HMAC key is its UTF-8 bytes. Zeroized on drop;
/// `Debug` never shows it.
///
/// The HMAC is keyed once, when the secret is accepted: each signature or check
/// clones that keyed state (the two SHA-256 blocks of `K ^ ipad` and `K ^ opad`
/// already absorbed) instead of hashing the key again on every request. The
/// keyed state is as secret as the key; `hmac` 0.12 cannot zeroize it, so it
/// lives boxed (a move copies only the pointer) and is overwritten with the
/// state of an all-zero key when the secret is dropped.
#[derive(Clone)]
pub struct ClientSecret {
    text: Zeroizing<String>,
    keyed: Box<HmacSha256>,
}

impl Drop for ClientSecret {
    fn drop(&mut self) {
        *self.keyed = keyed(&[0u8; 32]);
        // Keep the overwrite of memory about to be freed from being elided.
        std::hint::black_box(&mut *self.keyed);
    }
}

/// HMAC-SHA256 keyed with `key`.
fn keyed(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    <HmacSha256 as Mac>::new_from_slice(key).unwrap_or_else(|_| unreachable_hmac())
}

impl std::fmt::Debug for ClientSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientSecret(***)")
    }
}

/// Why a secret was refused; never carries the secret.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SecretError {
    /// Too short or too long.
    #[error("a client secret must have {MIN_SECRET_CHARS} to {MAX_SECRET_CHARS} characters")]
    Length,
    /// Contains whitespace or control characters.
    #[error("a client secret must be printable ASCII without spaces")]
    Characters,
}

impl ClientSecret {
    /// Accepts a secret as issued; a trailing newline (from a file) is dropped.
    ///
    /// # Errors
    /// `Length` or `Characters`.
    pub fn new(secret: Zeroizing<String>) -> Result<ClientSecret, SecretError> {
        let trimmed = secret.trim_end_matches(['\n', '\r']);
        if !(MIN_SECRET_CHARS..=MAX_SECRET_CHARS).contains(&trimmed.chars().count()) {
            return Err(SecretError::Length);
        }
        if !trimmed.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(SecretError::Characters);
        }
        Ok(ClientSecret::keyed_with(Zeroizing::new(trimmed.to_owned())))
    }

    fn keyed_with(text: Zeroizing<String>) -> ClientSecret {
        ClientSecret {
            keyed: Box::new(keyed(text.as_bytes())),
            text,
        }
    }

    /// A new random secret: 32 bytes from the OS, URL-safe Base64 (43 characters).
    ///
    /// # Errors
    /// The OS random source failed.
    pub fn generate() -> Result<ClientSecret, getrandom::Error> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        getrandom::fill(&mut bytes[..])?;
        Ok(ClientSecret::keyed_with(Zeroizing::new(
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes[..]),
        )))
    }

    /// The secret itself, for the one place that must show it (the generate command).
    pub fn expose(&self) -> &str {
        &self.text
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::clone(&self.keyed)
    }

    /// Base64 HMAC-SHA256 of `message`.
    pub fn sign(&self, message: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(message);
        BASE64.encode(mac.finalize().into_bytes())
    }

    /// Whether `tag` is the HMAC-SHA256 of `message`, compared in constant time.
    pub fn verify(&self, message: &[u8], tag: &[u8; 32]) -> bool {
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(tag).is_ok()
    }
}

#[allow(clippy::panic)] // HMAC accepts every key length; this cannot be reached.
fn unreachable_hmac() -> HmacSha256 {
    panic!("HMAC-SHA256 refused a key length")
}

/// Lowercase hex SHA-256 of `bytes` (of the empty string for an empty body).
pub fn body_digest(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The request string to sign (DESIGN 5): six fields joined by `\n`.
#[derive(Debug, Clone, Copy)]
pub struct RequestToSign<'a> {
    /// Client id.
    pub apikey: &'a str,
    /// `X-Client-Request-Id`.
    pub request_id: &'a str,
    /// `Timestamp`, epoch milliseconds.
    pub timestamp_ms: u64,
    /// HTTP method, upper case.
    pub method: &'a str,
    /// Path with the query string exactly as sent.
    pub path_and_query: &'a str,
    /// Raw body bytes.
    pub body: &'a [u8],
}

impl RequestToSign<'_> {
    /// The bytes the HMAC covers.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "{}\n{}\n{}\n{}\n{}\n{}",
            self.apikey,
            self.request_id,
            self.timestamp_ms,
            self.method.to_ascii_uppercase(),
            self.path_and_query,
            body_digest(self.body)
        )
        .into_bytes()
    }
}

/// The response string to sign (DESIGN 5): five fields joined by `\n`.
#[derive(Debug, Clone, Copy)]
pub struct ResponseToSign<'a> {
    /// Client id of the request.
    pub apikey: &'a str,
    /// The request's `X-Client-Request-Id`, echoed.
    pub request_id: &'a str,
    /// The response's `Timestamp`, epoch milliseconds.
    pub timestamp_ms: u64,
    /// HTTP status code.
    pub status: u16,
    /// Raw response body bytes.
    pub body: &'a [u8],
}

impl ResponseToSign<'_> {
    /// The bytes the HMAC covers.
    pub fn message(&self) -> Vec<u8> {
        format!(
            "{}\n{}\n{}\n{}\n{}",
            self.apikey,
            self.request_id,
            self.timestamp_ms,
            self.status,
            body_digest(self.body)
        )
        .into_bytes()
    }
}

/// A client request id: 1–40 characters of `[A-Za-z0-9._-]` (DESIGN 5).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RequestId(String);

impl RequestId {
    /// Parses a request id.
    ///
    /// # Errors
    /// `None` when the text is empty, longer than 40 or has another character.
    pub fn parse(text: &str) -> Option<RequestId> {
        let ok = (1..=40).contains(&text.len())
            && text
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        ok.then(|| RequestId(text.to_owned()))
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Longest client id the gateway reads from the `apikey` header.
pub const MAX_APIKEY_CHARS: usize = 64;

/// Whether `apikey` is a client id: 1 to [`MAX_APIKEY_CHARS`] printable ASCII
/// characters (the header, the config and the CLI all hold it to this).
pub fn is_valid_apikey(apikey: &str) -> bool {
    !apikey.is_empty()
        && apikey.len() <= MAX_APIKEY_CHARS
        && apikey.bytes().all(|b| b.is_ascii_graphic())
}

/// The signature headers of a request, parsed but not yet verified.
#[derive(Debug, Clone)]
pub struct SignatureHeaders {
    /// Client id as sent (not yet known to exist).
    pub apikey: String,
    /// Request id.
    pub request_id: RequestId,
    /// Epoch milliseconds.
    pub timestamp_ms: u64,
    /// The 32-byte tag.
    pub signature: [u8; 32],
}

/// A signature header that is missing or cannot be parsed; names the header only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// The header is absent.
    #[error("missing header {0}")]
    Missing(&'static str),
    /// The header is present but malformed.
    #[error("malformed header {0}")]
    Malformed(&'static str),
}

/// The one value of header `name`. A second value, even an equal one, is
/// malformed: a proxy in front may read the other, so neither is trusted.
fn header<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, HeaderError> {
    let mut values = headers.get_all(name).iter();
    let value = values.next().ok_or(HeaderError::Missing(name))?;
    if values.next().is_some() {
        return Err(HeaderError::Malformed(name));
    }
    value.to_str().map_err(|_| HeaderError::Malformed(name))
}

impl SignatureHeaders {
    /// Reads the four headers.
    ///
    /// # Errors
    /// The first missing or malformed header, in the order apikey, Timestamp,
    /// X-Client-Request-Id, Signature.
    pub fn from_headers(headers: &HeaderMap) -> Result<SignatureHeaders, HeaderError> {
        let apikey = header(headers, APIKEY)?;
        if !is_valid_apikey(apikey) {
            return Err(HeaderError::Malformed(APIKEY));
        }
        let timestamp = header(headers, TIMESTAMP)?;
        let timestamp_ms = (!timestamp.is_empty()
            && timestamp.len() <= 15
            && timestamp.bytes().all(|b| b.is_ascii_digit()))
        .then(|| timestamp.parse::<u64>().ok())
        .flatten()
        .ok_or(HeaderError::Malformed(TIMESTAMP))?;
        let request_id = RequestId::parse(header(headers, REQUEST_ID)?)
            .ok_or(HeaderError::Malformed(REQUEST_ID))?;
        let signature = header(headers, SIGNATURE)?;
        let mut tag = [0u8; 32];
        match BASE64.decode(signature) {
            Ok(bytes) if bytes.len() == 32 => tag.copy_from_slice(&bytes),
            _ => return Err(HeaderError::Malformed(SIGNATURE)),
        }
        Ok(SignatureHeaders {
            apikey: apikey.to_owned(),
            request_id,
            timestamp_ms,
            signature: tag,
        })
    }
}

/// Whether `timestamp_ms` lies within `max_skew_ms` of `now_ms`, either side.
pub fn is_fresh(timestamp_ms: u64, now_ms: u64, max_skew_ms: u64) -> bool {
    timestamp_ms.abs_diff(now_ms) <= max_skew_ms
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn secret() -> ClientSecret {
        ClientSecret::new(Zeroizing::new("s".repeat(32) + "\n")).unwrap()
    }

    const REQUEST: RequestToSign<'static> = RequestToSign {
        apikey: "cms-demo",
        request_id: "req-1",
        timestamp_ms: 1_767_225_600_000,
        method: "post",
        path_and_query: "/cards/pin/dynamic-values",
        body: b"",
    };

    #[test]
    fn the_string_to_sign_is_the_six_fields_of_design_5() {
        let text = String::from_utf8(REQUEST.message()).unwrap();
        assert_eq!(
            text,
            "cms-demo\nreq-1\n1767225600000\nPOST\n/cards/pin/dynamic-values\n\
             e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        let response = ResponseToSign {
            apikey: "cms-demo",
            request_id: "req-1",
            timestamp_ms: 5,
            status: 200,
            body: b"{}",
        };
        assert_eq!(
            String::from_utf8(response.message()).unwrap(),
            format!("cms-demo\nreq-1\n5\n200\n{}", body_digest(b"{}"))
        );
    }

    #[test]
    fn a_known_signature() {
        // HMAC-SHA256(key = 32 × "s", message above), computed independently with
        // `printf ... | openssl dgst -sha256 -hmac ssss... -binary | base64`.
        let tag = secret().sign(&REQUEST.message());
        assert_eq!(tag, "LmBnXc7gNoyGLZJLFeqAe949hVDepuLsIBFbCBQ1Q6I=");
        let mut raw = [0u8; 32];
        raw.copy_from_slice(&BASE64.decode(&tag).unwrap());
        assert!(secret().verify(&REQUEST.message(), &raw));
    }

    #[test]
    fn the_keyed_state_is_reused_and_outlives_a_dropped_clone() {
        let message = REQUEST.message();
        let original = secret();
        let copy = original.clone();
        // Signing and verifying do not change the keyed state.
        assert_eq!(original.sign(&message), original.sign(&message));
        assert!(!original.verify(&message, &[0u8; 32]));
        drop(original);
        // The dropped secret's overwrite did not touch the clone's own state.
        assert_eq!(
            copy.sign(&message),
            "LmBnXc7gNoyGLZJLFeqAe949hVDepuLsIBFbCBQ1Q6I="
        );
    }

    #[test]
    fn secrets_are_checked_and_never_shown() {
        assert_eq!(
            ClientSecret::new(Zeroizing::new("short".into())).unwrap_err(),
            SecretError::Length
        );
        let spaced = format!("{} x", "a".repeat(32));
        assert_eq!(
            ClientSecret::new(Zeroizing::new(spaced)).unwrap_err(),
            SecretError::Characters
        );
        assert_eq!(format!("{:?}", secret()), "ClientSecret(***)");
        let generated = ClientSecret::generate().unwrap();
        assert_eq!(generated.expose().len(), 43);
        assert_ne!(
            generated.expose(),
            ClientSecret::generate().unwrap().expose()
        );
    }

    #[test]
    fn request_ids() {
        assert!(RequestId::parse("a.B_9-z").is_some());
        assert!(RequestId::parse(&"x".repeat(40)).is_some());
        for bad in ["", "a b", "ä", "a/b", &"x".repeat(41)] {
            assert!(RequestId::parse(bad).is_none(), "{bad:?}");
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (k, v) in pairs {
            map.insert(*k, v.parse().unwrap());
        }
        map
    }

    #[test]
    fn headers_parse_and_name_what_is_wrong() {
        let sig = secret().sign(b"x");
        let good = [
            (APIKEY, "cms-demo"),
            (TIMESTAMP, "1767225600000"),
            (REQUEST_ID, "req-1"),
            (SIGNATURE, sig.as_str()),
        ];
        let parsed = SignatureHeaders::from_headers(&headers(&good)).unwrap();
        assert_eq!(parsed.apikey, "cms-demo");
        assert_eq!(parsed.timestamp_ms, 1_767_225_600_000);
        for i in 0..good.len() {
            let mut fewer = good.to_vec();
            let (name, _) = fewer.remove(i);
            assert_eq!(
                SignatureHeaders::from_headers(&headers(&fewer)).unwrap_err(),
                HeaderError::Missing(name)
            );
        }
        for (name, bad) in [
            (TIMESTAMP, "-1"),
            (TIMESTAMP, "12e3"),
            (TIMESTAMP, "9999999999999999999999"),
            (REQUEST_ID, "has space"),
            (SIGNATURE, "not base64!"),
            (SIGNATURE, "AAAA"),
        ] {
            let mut set = good.to_vec();
            set.retain(|(n, _)| *n != name);
            set.push((name, bad));
            assert_eq!(
                SignatureHeaders::from_headers(&headers(&set)).unwrap_err(),
                HeaderError::Malformed(name),
                "{name}: {bad}"
            );
        }
    }

    #[test]
    fn a_repeated_signature_header_is_malformed_in_either_order() {
        let sig = secret().sign(b"x");
        let other = secret().sign(b"y");
        let good = [
            (APIKEY, "cms-demo"),
            (TIMESTAMP, "1767225600000"),
            (REQUEST_ID, "req-1"),
            (SIGNATURE, sig.as_str()),
        ];
        for (name, value) in good {
            let second = match name {
                APIKEY => "cms-other",
                TIMESTAMP => "1767225600001",
                REQUEST_ID => "req-2",
                _ => other.as_str(),
            };
            for (first, then) in [(value, second), (second, value), (value, value)] {
                let mut map = headers(&good);
                map.remove(name);
                map.append(name, first.parse().unwrap());
                map.append(name, then.parse().unwrap());
                assert_eq!(
                    SignatureHeaders::from_headers(&map).unwrap_err(),
                    HeaderError::Malformed(name),
                    "{name}: {first} then {then}"
                );
            }
        }
    }

    #[test]
    fn freshness_is_symmetric() {
        assert!(is_fresh(1_000, 301_000, 300_000));
        assert!(!is_fresh(1_000, 301_001, 300_000));
        assert!(is_fresh(301_000, 1_000, 300_000));
        assert!(!is_fresh(301_001, 1_000, 300_000));
    }

    proptest! {
        #[test]
        fn any_flipped_bit_of_message_or_tag_fails(
            body in proptest::collection::vec(any::<u8>(), 0..256),
            flip_message in any::<bool>(),
            index in any::<usize>(),
            bit in 0u8..8,
        ) {
            let request = RequestToSign { body: &body, ..REQUEST };
            let mut message = request.message();
            let mut tag = [0u8; 32];
            tag.copy_from_slice(&BASE64.decode(secret().sign(&message)).unwrap());
            prop_assert!(secret().verify(&message, &tag));
            if flip_message {
                let i = index % message.len();
                message[i] ^= 1 << bit;
            } else {
                tag[index % 32] ^= 1 << bit;
            }
            prop_assert!(!secret().verify(&message, &tag));
        }

        #[test]
        fn header_parsing_never_panics(
            apikey in ".{0,80}", timestamp in ".{0,30}", id in ".{0,50}", sig in ".{0,60}",
        ) {
            let mut map = HeaderMap::new();
            for (name, value) in [(APIKEY, apikey), (TIMESTAMP, timestamp), (REQUEST_ID, id), (SIGNATURE, sig)] {
                if let Ok(v) = value.parse() {
                    map.insert(name, v);
                }
            }
            let _ = SignatureHeaders::from_headers(&map);
        }
    }
}
