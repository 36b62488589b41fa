//! Threshold values as operators write them: byte quantities the way
//! Kubernetes writes them (`100Mi`, `2G`, `1.5Gi`), percents (`10%`) and
//! plain numbers (PSI percent, load per CPU).

use serde::Deserialize;

/// A parsed threshold value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Quantity {
    /// An absolute amount (bytes, or a plain number).
    Amount(f64),
    /// A percent of a total.
    Percent(f64),
}

impl Quantity {
    /// Parses `100Mi`, `10%`, `4`, `0.5`, `1e3`.
    pub fn parse(s: &str) -> Result<Quantity, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let v: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a percent like 10%"))?;
            if !(0.0..=100.0).contains(&v) {
                return Err(format!("{s:?}: a percent is between 0% and 100%"));
            }
            return Ok(Quantity::Percent(v));
        }
        const SUFFIXES: &[(&str, f64)] = &[
            ("Ki", 1024.0),
            ("Mi", 1024.0 * 1024.0),
            ("Gi", 1024.0 * 1024.0 * 1024.0),
            ("Ti", 1024.0 * 1024.0 * 1024.0 * 1024.0),
            ("k", 1e3),
            ("K", 1e3),
            ("M", 1e6),
            ("G", 1e9),
            ("T", 1e12),
        ];
        let (num, mult) = SUFFIXES
            .iter()
            .find_map(|(suf, m)| t.strip_suffix(suf).map(|n| (n, *m)))
            .unwrap_or((t, 1.0));
        let v: f64 = num
            .trim()
            .parse()
            .map_err(|_| format!("{s:?} is not a quantity like 100Mi, 10% or 4"))?;
        if !v.is_finite() || v < 0.0 {
            return Err(format!("{s:?} must be a non-negative number"));
        }
        Ok(Quantity::Amount(v * mult))
    }

    /// The value against `total` (a percent of it, or the amount).
    pub fn of(self, total: f64) -> f64 {
        match self {
            Quantity::Amount(v) => v,
            Quantity::Percent(p) => total * p / 100.0,
        }
    }
}

/// Serde helper: a threshold written as a YAML number or a string.
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NumOrString {
        Int(u64),
        Float(f64),
        Str(String),
    }
    Ok(match NumOrString::deserialize(d)? {
        NumOrString::Int(n) => n.to_string(),
        NumOrString::Float(n) => n.to_string(),
        NumOrString::Str(s) => s,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_percents_and_numbers_parse() {
        assert_eq!(Quantity::parse("100Mi"), Ok(Quantity::Amount(104_857_600.0)));
        assert_eq!(Quantity::parse("2G"), Ok(Quantity::Amount(2e9)));
        assert_eq!(Quantity::parse("1.5Ki"), Ok(Quantity::Amount(1536.0)));
        assert_eq!(Quantity::parse("10%"), Ok(Quantity::Percent(10.0)));
        assert_eq!(Quantity::parse("4"), Ok(Quantity::Amount(4.0)));
        assert_eq!(Quantity::parse(" 0.5 "), Ok(Quantity::Amount(0.5)));
        assert!(Quantity::parse("101%").is_err());
        assert!(Quantity::parse("-1").is_err());
        assert!(Quantity::parse("lots").is_err());
        assert!(Quantity::parse("").is_err());
        assert_eq!(Quantity::Percent(10.0).of(200.0), 20.0);
        assert_eq!(Quantity::Amount(3.0).of(200.0), 3.0);
    }
}
