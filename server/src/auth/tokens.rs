//! Auth tokens, as etcd's `--auth-token` names them.
//!
//! - `simple` (the default): a random token of 16 letters and a sequence number, known
//!   to the instance that issued it alone. It lives `--auth-token-ttl` after its last
//!   use (each request refreshes it, as etcd's TTL keeper does); deleting a user,
//!   changing its password or disabling auth forgets its tokens. A client that reaches
//!   another instance gets `invalid auth token` and authenticates again, as etcd's
//!   clients do by themselves. At most [`MAX_SIMPLE_TOKENS`] live at once; past that the
//!   one closest to expiry is dropped.
//! - `jwt,pub-key=F,priv-key=F,sign-method=M,ttl=D`: signed tokens carrying the user
//!   name, the auth revision and an expiry (etcd's claims: `username`, `revision`,
//!   `exp`), valid on every instance holding the key. A token of an older auth revision
//!   is refused with `revision of auth store is old`, so clients authenticate again
//!   after any auth change. With a public key alone an instance only verifies.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use parking_lot::Mutex;
use rand::Rng;
use serde::{Deserialize, Serialize};

/// etcd's default `--auth-token-ttl`, in seconds.
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;
/// etcd's default JWT `ttl`.
pub const DEFAULT_JWT_TTL: Duration = Duration::from_secs(300);
/// Simple tokens kept at most (each costs an Authenticate, a bcrypt check).
pub const MAX_SIMPLE_TOKENS: usize = 100_000;

/// What a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub user: String,
    /// The auth revision it was issued at (simple tokens: the current one).
    pub revision: u64,
}

/// Issues and checks tokens of one kind.
pub enum Tokens {
    Simple(SimpleTokens),
    Jwt(JwtTokens),
}

impl Tokens {
    /// The provider `--auth-token` describes, with `ttl` for simple tokens.
    pub fn parse(spec: &str, ttl: Duration) -> Result<Tokens, String> {
        let mut parts = spec.split(',');
        let kind = parts.next().unwrap_or_default();
        let mut opts = HashMap::new();
        for p in parts {
            let Some((k, v)) = p.split_once('=') else {
                return Err(format!(
                    "--auth-token {spec}: option {p:?} is not key=value"
                ));
            };
            if opts.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(format!("--auth-token {spec}: option {k} given twice"));
            }
        }
        match kind {
            "simple" => {
                if !opts.is_empty() {
                    return Err(format!(
                        "--auth-token {spec}: simple tokens take no options"
                    ));
                }
                Ok(Tokens::Simple(SimpleTokens::new(ttl)))
            }
            "jwt" => JwtTokens::new(&opts)
                .map(Tokens::Jwt)
                .map_err(|e| format!("--auth-token {spec}: {e}")),
            other => Err(format!(
                "--auth-token {spec}: unknown token type {other:?} (simple or jwt)"
            )),
        }
    }

    /// A new token for `user` at auth revision `revision`.
    pub fn assign(&self, user: &str, revision: u64) -> Result<String, String> {
        match self {
            Tokens::Simple(s) => Ok(s.assign(user)),
            Tokens::Jwt(j) => j.assign(user, revision),
        }
    }

    /// Who `token` stands for, at the current auth revision `revision`; None when it is
    /// unknown, expired or forged.
    pub fn info(&self, token: &str, revision: u64) -> Option<TokenInfo> {
        match self {
            Tokens::Simple(s) => s.info(token).map(|user| TokenInfo { user, revision }),
            Tokens::Jwt(j) => j.info(token),
        }
    }

    /// Forgets the tokens of `user` (simple tokens; JWTs expire alone).
    pub fn invalidate_user(&self, user: &str) {
        if let Tokens::Simple(s) = self {
            s.tokens.lock().retain(|_, (u, _)| u != user);
        }
    }

    /// Forgets every token (auth turned off).
    pub fn clear(&self) {
        if let Tokens::Simple(s) = self {
            s.tokens.lock().clear();
        }
    }

    /// Drops expired simple tokens.
    pub fn sweep(&self) {
        if let Tokens::Simple(s) = self {
            let now = Instant::now();
            s.tokens.lock().retain(|_, (_, until)| *until > now);
        }
    }

    /// Simple tokens held.
    pub fn simple_tokens_held(&self) -> usize {
        match self {
            Tokens::Simple(s) => s.tokens.lock().len(),
            Tokens::Jwt(_) => 0,
        }
    }
}

/// etcd's simple tokens.
pub struct SimpleTokens {
    ttl: Duration,
    next: AtomicU64,
    /// Token to user and expiry.
    tokens: Mutex<HashMap<String, (String, Instant)>>,
}

impl SimpleTokens {
    fn new(ttl: Duration) -> SimpleTokens {
        SimpleTokens {
            ttl,
            next: AtomicU64::new(1),
            tokens: Mutex::new(HashMap::new()),
        }
    }

    fn assign(&self, user: &str) -> String {
        let mut rng = rand::rng();
        let prefix: String = (0..16)
            .map(|_| {
                let c = rng.random_range(0..52u8);
                if c < 26 {
                    (b'a' + c) as char
                } else {
                    (b'A' + c - 26) as char
                }
            })
            .collect();
        let token = format!("{prefix}.{}", self.next.fetch_add(1, Ordering::Relaxed));
        let mut tokens = self.tokens.lock();
        if tokens.len() >= MAX_SIMPLE_TOKENS {
            let now = Instant::now();
            tokens.retain(|_, (_, until)| *until > now);
            if tokens.len() >= MAX_SIMPLE_TOKENS
                && let Some(oldest) = tokens
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(t, _)| t.clone())
            {
                tokens.remove(&oldest);
            }
        }
        tokens.insert(token.clone(), (user.to_owned(), Instant::now() + self.ttl));
        token
    }

    fn info(&self, token: &str) -> Option<String> {
        let mut tokens = self.tokens.lock();
        let (user, until) = tokens.get_mut(token)?;
        let now = Instant::now();
        if *until <= now {
            tokens.remove(token);
            return None;
        }
        *until = now + self.ttl;
        Some(user.clone())
    }
}

/// etcd's JWT claims.
#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    username: String,
    revision: u64,
    exp: i64,
}

/// etcd's JWT tokens.
pub struct JwtTokens {
    algorithm: Algorithm,
    ttl: Duration,
    sign: Option<EncodingKey>,
    verify: DecodingKey,
}

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(Path::new(path)).map_err(|e| format!("cannot read {path}: {e}"))
}

impl JwtTokens {
    fn new(opts: &HashMap<String, String>) -> Result<JwtTokens, String> {
        for k in opts.keys() {
            if !["pub-key", "priv-key", "sign-method", "ttl"].contains(&k.as_str()) {
                return Err(format!("unknown option {k}"));
            }
        }
        let method = opts
            .get("sign-method")
            .ok_or("sign-method is required")?
            .as_str();
        let algorithm = match method {
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "PS384" => Algorithm::PS384,
            "PS512" => Algorithm::PS512,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            "HS256" => Algorithm::HS256,
            "HS384" => Algorithm::HS384,
            "HS512" => Algorithm::HS512,
            other => return Err(format!("unsupported sign-method {other}")),
        };
        let ttl = match opts.get("ttl") {
            None => DEFAULT_JWT_TTL,
            Some(t) => {
                crate::duration::parse_go_duration(t).map_err(|e| format!("ttl {t}: {e}"))?
            }
        };
        let public = opts.get("pub-key").map(|p| read(p)).transpose()?;
        let private = opts.get("priv-key").map(|p| read(p)).transpose()?;
        let bad = |e: jsonwebtoken::errors::Error| format!("bad key for {method}: {e}");
        let (sign, verify) = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                let secret = private.ok_or("priv-key (the HMAC secret) is required")?;
                (
                    Some(EncodingKey::from_secret(&secret)),
                    DecodingKey::from_secret(&secret),
                )
            }
            Algorithm::ES256 | Algorithm::ES384 => {
                let public = public.ok_or("pub-key is required")?;
                (
                    private
                        .map(|p| EncodingKey::from_ec_pem(&p))
                        .transpose()
                        .map_err(bad)?,
                    DecodingKey::from_ec_pem(&public).map_err(bad)?,
                )
            }
            _ => {
                let public = public.ok_or("pub-key is required")?;
                (
                    private
                        .map(|p| EncodingKey::from_rsa_pem(&p))
                        .transpose()
                        .map_err(bad)?,
                    DecodingKey::from_rsa_pem(&public).map_err(bad)?,
                )
            }
        };
        let tokens = JwtTokens {
            algorithm,
            ttl,
            sign,
            verify,
        };
        // A key pair that does not match is refused at start, as etcd does.
        if tokens.sign.is_some() {
            let t = tokens.assign("pgetcd-key-check", 1)?;
            if tokens.info(&t).is_none() {
                return Err("public and private keys don't match".to_owned());
            }
        }
        Ok(tokens)
    }

    fn assign(&self, user: &str, revision: u64) -> Result<String, String> {
        let Some(key) = &self.sign else {
            return Err("auth: token signing attempted with verify-only key".to_owned());
        };
        let exp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64)
            + self.ttl.as_secs() as i64;
        let claims = Claims {
            username: user.to_owned(),
            revision,
            exp,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
            .map_err(|e| format!("cannot sign a token: {e}"))
    }

    fn info(&self, token: &str) -> Option<TokenInfo> {
        let mut v = Validation::new(self.algorithm);
        v.leeway = 0;
        v.validate_aud = false;
        let data = jsonwebtoken::decode::<Claims>(token, &self.verify, &v).ok()?;
        Some(TokenInfo {
            user: data.claims.username,
            revision: data.claims.revision,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn simple_tokens_expire_unless_used() {
        let t = Tokens::parse("simple", Duration::from_millis(200)).unwrap();
        let a = t.assign("alice", 1).unwrap();
        let b = t.assign("bob", 1).unwrap();
        assert_ne!(a, b);
        let (prefix, n) = a.split_once('.').unwrap();
        assert_eq!(prefix.len(), 16);
        assert!(n.parse::<u64>().is_ok());
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(80));
            assert_eq!(t.info(&a, 7).unwrap().user, "alice");
        }
        assert!(t.info(&b, 7).is_none());
        t.invalidate_user("alice");
        assert!(t.info(&a, 7).is_none());
        assert!(t.info("forged.1", 7).is_none());
    }

    #[test]
    fn jwt_tokens_round_trip_and_refuse_forgeries() {
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, b"0123456789abcdef0123456789abcdef").unwrap();
        let spec = format!("jwt,priv-key={},sign-method=HS256,ttl=1m", secret.display());
        let t = Tokens::parse(&spec, Duration::from_secs(1)).unwrap();
        let token = t.assign("alice", 5).unwrap();
        assert_eq!(
            t.info(&token, 9),
            Some(TokenInfo {
                user: "alice".into(),
                revision: 5
            })
        );
        let mut forged = token.clone();
        forged.pop();
        assert!(t.info(&forged, 9).is_none());
        assert!(Tokens::parse("jwt,sign-method=XX", Duration::from_secs(1)).is_err());
        assert!(Tokens::parse("bogus", Duration::from_secs(1)).is_err());
        assert!(Tokens::parse("simple,x=1", Duration::from_secs(1)).is_err());
    }
}
