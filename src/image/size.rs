//! Human-readable byte sizes in image definitions (`"1G"`, `"512M"`, `"4096"`).

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;

/// A size in bytes, written in definitions with an optional binary suffix (K, M, G, T).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub const MIB: u64 = 1024 * 1024;

    pub fn bytes(self) -> u64 {
        self.0
    }

    /// Parses `"1G"`, `"512M"`, `"64K"`, `"1024"` (suffixes are powers of 1024).
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (digits, mult) = match t.chars().last() {
            Some(c) if c.is_ascii_alphabetic() => {
                let mult: u64 = match c.to_ascii_uppercase() {
                    'K' => 1 << 10,
                    'M' => 1 << 20,
                    'G' => 1 << 30,
                    'T' => 1 << 40,
                    _ => {
                        return Err(format!(
                            "unknown size suffix `{c}` in `{text}` (use K, M, G or T)"
                        ))
                    }
                };
                (&t[..t.len() - 1], mult)
            }
            _ => (t, 1),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a size (expected e.g. \"512M\" or \"1G\")"))?;
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| format!("size `{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        for (unit, shift) in [("T", 40), ("G", 30), ("M", 20), ("K", 10)] {
            if b >= (1 << shift) && b % (1 << shift) == 0 {
                return write!(f, "{}{}", b >> shift, unit);
            }
        }
        write!(f, "{b}")
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(ByteSize(n)),
            Raw::Text(s) => ByteSize::parse(&s).map_err(de::Error::custom),
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_table() {
        let cases: &[(&str, &str, Option<u64>)] = &[
            ("plain bytes", "4096", Some(4096)),
            ("mebibytes", "512M", Some(512 << 20)),
            ("gibibytes lower", "1g", Some(1 << 30)),
            ("kibibytes", "64K", Some(64 << 10)),
            ("bad suffix", "10X", None),
            ("not a number", "lots", None),
            ("overflow", "99999999999T", None),
        ];
        for (name, text, want) in cases {
            assert_eq!(
                ByteSize::parse(text).ok().map(|b| b.0),
                *want,
                "case {name}"
            );
        }
    }

    #[test]
    fn display_round_trips() {
        for b in [1u64 << 30, 768 << 20, 4096, 1000] {
            let s = ByteSize(b).to_string();
            assert_eq!(ByteSize::parse(&s).ok(), Some(ByteSize(b)), "{s}");
        }
    }
}
