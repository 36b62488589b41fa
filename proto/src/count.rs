//! Counts or percents of nodes (`3`, `"10%"`), as Kubernetes' IntOrString:
//! how rollouts and budgets say "how many" so one spec fits any fleet size.

use serde::Deserialize;

/// A parsed count or percent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Count {
    Nodes(u64),
    Percent(u32),
}

impl Count {
    /// Parses `3` or `10%` (0..=100). `field` names it in the error.
    pub fn parse(s: &str) -> Result<Count, String> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let n: u32 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a count or a percent (`3`, `10%`)"))?;
            if n > 100 {
                return Err(format!("{s:?}: a percent is at most 100%"));
            }
            return Ok(Count::Percent(n));
        }
        s.parse::<u64>()
            .map(Count::Nodes)
            .map_err(|_| format!("{s:?} is not a count or a percent (`3`, `10%`)"))
    }

    /// The count out of `total` nodes; percents round up (10% of 5 is 1),
    /// as Kubernetes does for maxUnavailable, and a count is capped at `total`.
    pub fn of(self, total: u64) -> u64 {
        match self {
            Count::Nodes(n) => n.min(total),
            Count::Percent(p) => (u128::from(total) * u128::from(p)).div_ceil(100) as u64,
        }
    }

    /// `s` resolved against `total`, or `default` when `s` is empty.
    /// Unparsable values (refused at apply) count as `default`.
    pub fn resolve(s: &str, total: u64, default: u64) -> u64 {
        if s.trim().is_empty() {
            return default.min(total);
        }
        Count::parse(s).map_or(default.min(total), |c| c.of(total))
    }
}

/// Checks an optional count-or-percent field.
pub fn check(field: &str, s: &str) -> Result<(), crate::ResourceError> {
    if s.trim().is_empty() {
        return Ok(());
    }
    Count::parse(s)
        .map(|_| ())
        .map_err(|e| crate::ResourceError::new(field, e))
}

/// Serde: a YAML/JSON integer or string into the string field.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum IntOrString {
        Int(u64),
        Str(String),
    }
    Ok(match IntOrString::deserialize(d)? {
        IntOrString::Int(n) => n.to_string(),
        IntOrString::Str(s) => s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_percents_resolve_rounding_up() {
        assert_eq!(Count::parse("3"), Ok(Count::Nodes(3)));
        assert_eq!(Count::parse("10%"), Ok(Count::Percent(10)));
        assert!(Count::parse("101%").is_err());
        assert!(Count::parse("-1").is_err());
        assert!(Count::parse("ten").is_err());
        assert_eq!(Count::Percent(10).of(5), 1);
        assert_eq!(Count::Percent(10).of(1000), 100);
        assert_eq!(Count::Percent(0).of(1000), 0);
        assert_eq!(Count::Nodes(7).of(3), 3);
        assert_eq!(Count::resolve("", 10, 1), 1);
        assert_eq!(Count::resolve("25%", 10, 1), 3);
    }
}
