//! Callback signatures, as pure functions: the HopX header and the Standard
//! Webhooks header, both HMAC-SHA256 over the exact bytes sent.

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().to_vec()
}

/// `X-HopX-Signature`: `sha256=<hex HMAC-SHA256(secret, body)>`, keyed with
/// the secret's UTF-8 bytes as given.
pub fn hopx_signature(secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac(secret.as_bytes(), &[body])))
}

/// Whether `secret` is one the Standard Webhooks convention can key with:
/// a `whsec_` secret must be a non-empty key in base64 after the prefix.
pub fn is_valid_secret(secret: &str) -> bool {
    secret
        .strip_prefix("whsec_")
        .is_none_or(|b64| BASE64.decode(b64).is_ok_and(|key| !key.is_empty()))
}

/// The Standard Webhooks key: a `whsec_` secret is base64 after the prefix;
/// any other secret (or a `whsec_` one that is not valid base64, stored
/// before submissions were checked for it) is its UTF-8 bytes.
fn standard_key(secret: &str) -> Vec<u8> {
    secret
        .strip_prefix("whsec_")
        .and_then(|b64| BASE64.decode(b64).ok())
        .unwrap_or_else(|| secret.as_bytes().to_vec())
}

/// `webhook-signature`: `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`.
pub fn standard_signature(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> String {
    let timestamp = timestamp.to_string();
    let mac = hmac(
        &standard_key(secret),
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    );
    format!("v1,{}", BASE64.encode(mac))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hopx_signature_is_hex_hmac_of_the_body() {
        // echo -n '{"a":1}' | openssl dgst -sha256 -hmac secret
        assert_eq!(
            hopx_signature("secret", br#"{"a":1}"#),
            "sha256=aa9e2e3575f5d7098b6caccd790888c36d5fdb63342a73bada2d6a51747a8494"
        );
    }

    #[test]
    fn the_standard_webhooks_test_vector_verifies() {
        // From the Standard Webhooks specification's reference test.
        let signature = standard_signature(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        );
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn a_secret_without_the_prefix_is_used_as_its_bytes() {
        let plain = standard_signature("plain-secret", "msg_1", 1, b"{}");
        let mut mac = HmacSha256::new_from_slice(b"plain-secret").unwrap();
        mac.update(b"msg_1.1.{}");
        assert_eq!(
            plain,
            format!("v1,{}", BASE64.encode(mac.finalize().into_bytes()))
        );
    }
}
