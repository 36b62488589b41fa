//! Tokens: join tokens (bootstrap a node's identity) and API tokens (an
//! operator's role). Only a SHA-256 of the secret is kept; the token string
//! is shown once, when created.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use nodekeeper_proto::token;
use serde::{Deserialize, Serialize};
use sha2::Digest;

/// Operator roles, each including the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// get, list, watch.
    Viewer,
    /// + apply and delete resources, rollout and remedy actions, the audit log.
    Operator,
    /// + tokens, node delete and revoke.
    Admin,
}

impl Role {
    pub fn parse(s: &str) -> Result<Role, String> {
        match s {
            "viewer" => Ok(Role::Viewer),
            "operator" => Ok(Role::Operator),
            "admin" => Ok(Role::Admin),
            _ => Err(format!("role {s:?}: one of viewer, operator, admin")),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }
}

/// What a token is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenType {
    Join,
    Api,
}

/// A stored token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Token {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: TokenType,
    /// Hex SHA-256 of the secret.
    pub secret_sha256: String,
    /// API tokens: who uses it (the audit log's actor).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    /// Join tokens: labels given to the nodes that join with it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// RFC 3339; empty: never.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub expires: String,
    /// Join tokens: how many joins it allows (0: any number until it expires).
    #[serde(default)]
    pub max_uses: u64,
    #[serde(default)]
    pub uses: u64,
    pub created: String,
    pub created_by: String,
}

/// What may be wrong with a presented token; the messages never carry the
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Malformed(String),
    #[error("token {0} is not known (deleted, or never created by this hub)")]
    Unknown(String),
    #[error("token {0}: the secret does not match")]
    Forged(String),
    #[error("token {0} expired at {1}; create a new one")]
    Expired(String, String),
    #[error("token {0} was used {1} times, its limit; create a new one")]
    UsedUp(String, u64),
    #[error("token {0} is a {1} token, not a {2} token")]
    WrongType(String, &'static str, &'static str),
}

pub fn hash(secret: &str) -> String {
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

fn random_chars(n: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..n)
        .map(|_| token::ALPHABET[rng.random_range(0..token::ALPHABET.len())] as char)
        .collect()
}

/// A new token string (`<id>.<secret>`) and its stored form.
pub fn generate(kind: TokenType, ttl: Option<Duration>, created_by: &str) -> (String, Token) {
    let (id, secret) = (random_chars(token::ID_LEN), random_chars(token::SECRET_LEN));
    let now = SystemTime::now();
    let t = Token {
        id: id.clone(),
        kind,
        secret_sha256: hash(&secret),
        name: String::new(),
        role: None,
        description: String::new(),
        labels: BTreeMap::new(),
        expires: ttl
            .map(|d| nodekeeper_proto::time::rfc3339(now + d))
            .unwrap_or_default(),
        max_uses: 0,
        uses: 0,
        created: nodekeeper_proto::time::rfc3339(now),
        created_by: created_by.into(),
    };
    (format!("{id}.{secret}"), t)
}

impl Token {
    /// Whether `presented` is this token and usable now for `want`.
    pub fn check(&self, secret: &str, want: TokenType, now: SystemTime) -> Result<(), TokenError> {
        // Compared as hashes: equal length, and the stored value is a hash.
        if !constant_eq(hash(secret).as_bytes(), self.secret_sha256.as_bytes()) {
            return Err(TokenError::Forged(self.id.clone()));
        }
        if self.kind != want {
            let name = |k| if k == TokenType::Join { "join" } else { "api" };
            return Err(TokenError::WrongType(self.id.clone(), name(self.kind), name(want)));
        }
        if !self.expires.is_empty() && nodekeeper_proto::time::parse_rfc3339(&self.expires).is_none_or(|t| t <= now) {
            return Err(TokenError::Expired(self.id.clone(), self.expires.clone()));
        }
        if self.max_uses > 0 && self.uses >= self.max_uses {
            return Err(TokenError::UsedUp(self.id.clone(), self.uses));
        }
        Ok(())
    }

    /// The token as lists show it (without the secret's hash).
    pub fn view(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("secretSha256");
        }
        v
    }
}

fn constant_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Splits a presented token.
pub fn split(presented: &str) -> Result<(&str, &str), TokenError> {
    token::parse(presented).map_err(TokenError::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_is_refused_when_forged_expired_used_up_or_of_the_other_type() {
        let (s, mut t) = generate(TokenType::Join, Some(Duration::from_secs(60)), "test");
        let (_, secret) = split(&s).expect("form");
        let now = SystemTime::now();
        assert_eq!(t.check(secret, TokenType::Join, now), Ok(()));
        assert!(matches!(
            t.check("0000000000000000", TokenType::Join, now),
            Err(TokenError::Forged(_))
        ));
        assert!(matches!(
            t.check(secret, TokenType::Api, now),
            Err(TokenError::WrongType(..))
        ));
        assert!(matches!(
            t.check(secret, TokenType::Join, now + Duration::from_secs(61)),
            Err(TokenError::Expired(..))
        ));
        t.max_uses = 2;
        t.uses = 2;
        assert!(matches!(
            t.check(secret, TokenType::Join, now),
            Err(TokenError::UsedUp(_, 2))
        ));
        assert!(t.view().get("secretSha256").is_none());
    }
}
