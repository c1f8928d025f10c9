//! Bearer-token auth on every route but `/health`: a static token compared in
//! constant time, or HS256 JWTs with signature and `exp` checked.

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{ApiError, AppState};

/// How requests are authenticated. Holds secrets: no `Debug`.
#[derive(Clone)]
pub enum Auth {
    Token(String),
    Jwt(DecodingKey),
    /// `--no-auth`: every request passes.
    Disabled,
}

impl Auth {
    pub fn jwt(secret: &str) -> Auth {
        Auth::Jwt(DecodingKey::from_secret(secret.as_bytes()))
    }

    /// Whether `presented` is a valid bearer token.
    pub fn accepts(&self, presented: &str) -> bool {
        match self {
            // Digests of equal length: a compare of the tokens themselves
            // would end early on a length that differs, and tell it.
            Auth::Token(token) => Sha256::digest(presented.as_bytes())
                .ct_eq(&Sha256::digest(token.as_bytes()))
                .into(),
            Auth::Jwt(key) => {
                // HS256 only; `exp` required and checked, and `nbf` when
                // given, each with jsonwebtoken's 60 s of leeway for clocks
                // that differ. No audience is configured, so an `aud` the
                // issuer put in is not checked (jsonwebtoken refuses every
                // token that has one unless told which to expect).
                let mut validation = Validation::new(Algorithm::HS256);
                validation.validate_aud = false;
                validation.validate_nbf = true;
                jsonwebtoken::decode::<serde_json::Value>(presented, key, &validation).is_ok_and(
                    // jsonwebtoken checks a numeric `nbf` only: one of
                    // another type would let a token in before its time.
                    |token| {
                        token
                            .claims
                            .get("nbf")
                            .is_none_or(serde_json::Value::is_number)
                    },
                )
            }
            Auth::Disabled => true,
        }
    }
}

pub async fn require(State(state): State<AppState>, request: Request, next: Next) -> Response {
    if matches!(state.auth, Auth::Disabled) {
        return next.run(request).await;
    }
    let header = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let token = header.and_then(|h| {
        let (scheme, token) = h.trim().split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
    });
    let error = match token {
        None => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "AUTHENTICATION_REQUIRED",
            "this route needs an Authorization: Bearer <token> header",
        ),
        Some(token) if state.auth.accepts(token) => return next.run(request).await,
        Some(_) => ApiError::new(
            StatusCode::UNAUTHORIZED,
            "INVALID_TOKEN",
            "the bearer token is not valid",
        ),
    };
    let mut response = error.into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn jwt(secret: &str, exp: i64) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &json!({ "sub": "t", "exp": exp }),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_static_token_must_match_exactly() {
        let auth = Auth::Token("abc123".into());
        assert!(auth.accepts("abc123"));
        assert!(!auth.accepts("abc12"));
        assert!(!auth.accepts("abc1234"));
    }

    #[test]
    fn jwts_need_the_right_key_and_an_unexpired_exp() {
        let secret = "0123456789abcdef-secret";
        let auth = Auth::jwt(secret);
        let later = chrono::Utc::now().timestamp() + 600;
        assert!(auth.accepts(&jwt(secret, later)));
        assert!(!auth.accepts(&jwt("another-secret-of-16+", later)));
        assert!(!auth.accepts(&jwt(secret, chrono::Utc::now().timestamp() - 600)));
        assert!(!auth.accepts("not.a.jwt"));
    }

    #[test]
    fn a_jwt_whose_nbf_is_not_a_number_is_refused() {
        let secret = "0123456789abcdef-secret";
        let auth = Auth::jwt(secret);
        let now = chrono::Utc::now().timestamp();
        let with_nbf = |nbf: serde_json::Value| {
            encode(
                &Header::new(Algorithm::HS256),
                &json!({ "sub": "t", "exp": now + 600, "nbf": nbf }),
                &EncodingKey::from_secret(secret.as_bytes()),
            )
            .unwrap()
        };
        assert!(auth.accepts(&with_nbf(json!(now - 10))));
        assert!(!auth.accepts(&with_nbf(json!(now + 3600))));
        assert!(!auth.accepts(&with_nbf(json!((now + 3600).to_string()))));
        assert!(!auth.accepts(&with_nbf(json!((now - 10).to_string()))));
    }
}
