//! Token format shared by the hub, agents and nkctl: `<id>.<secret>`, six
//! and sixteen characters of `[a-z0-9]` (kubeadm's bootstrap token form).
//! The id names the token in lists and the audit log; only a hash of the
//! secret is stored.

/// Characters of ids and secrets.
pub const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
pub const ID_LEN: usize = 6;
pub const SECRET_LEN: usize = 16;

/// Splits a token into (id, secret); `Err` says what is wrong with it
/// (never echoing the secret).
pub fn parse(token: &str) -> Result<(&str, &str), String> {
    let token = token.trim();
    let (id, secret) = token.split_once('.').ok_or_else(|| {
        "a token has the form <6 chars>.<16 chars> ([a-z0-9]), as `nkctl token create` prints".to_string()
    })?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
    if !ok(id, ID_LEN) || !ok(secret, SECRET_LEN) {
        return Err("a token has the form <6 chars>.<16 chars> ([a-z0-9]), as `nkctl token create` prints".into());
    }
    Ok((id, secret))
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_parse_only_in_their_form() {
        assert_eq!(
            super::parse("abcdef.0123456789abcdef"),
            Ok(("abcdef", "0123456789abcdef"))
        );
        for bad in [
            "",
            "abcdef",
            "abcde.0123456789abcdef",
            "ABCDEF.0123456789abcdef",
            "abcdef.0123456789abcde",
        ] {
            assert!(super::parse(bad).is_err(), "{bad}");
        }
    }
}
