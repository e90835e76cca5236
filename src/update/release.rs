//! The release index: the one TUF target (`releases.json`) that says which releases a repository
//! holds and which targets make each of them. Sizes and hashes of the targets are TUF's
//! (`targets.json`); the index only names them, with what the node checks beyond bytes: the
//! dm-verity root hash of /usr and the key the UKI's PCR policy is signed with.

use serde::{Deserialize, Serialize};

/// The index's target name in every repository.
pub const INDEX_TARGET: &str = "releases.json";
/// The one schema this code reads and writes.
pub const SCHEMA: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ReleaseIndex {
    pub schema: u32,
    /// The image name (`name` of the definition); a node follows only its own image.
    pub image: String,
    pub releases: Vec<Release>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Release {
    pub version: String,
    /// The dm-verity root hash of /usr (the UKI's `usrhash=`; the slot's partition UUIDs).
    pub root_hash: String,
    /// Target names: the /usr file system (uncompressed, so later downloads can read ranges of
    /// it), its dm-verity hash tree, the signed UKI, and the build's manifest.json.
    pub usr: String,
    pub verity: String,
    pub uki: String,
    pub manifest: String,
    /// sha256 of the public key (DER) that signs the UKI's `enter-initrd` PCR policy: the key a
    /// node's root must be sealed to for this release to unlock it.
    pub pcr_initrd_key: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IndexError {
    #[error("{INDEX_TARGET}: schema {0} is not the one this keel reads ({SCHEMA}); update keel or republish")]
    Schema(u32),
    #[error("{INDEX_TARGET}: release {version}: field `{field}`: {message}")]
    Field {
        version: String,
        field: &'static str,
        message: String,
    },
    #[error("{INDEX_TARGET}: version {0} is listed twice")]
    Duplicate(String),
    #[error("{INDEX_TARGET} is not valid JSON of the release index: {0}")]
    Parse(String),
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A target name Keel writes: one path component of safe characters.
pub fn valid_target_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && !s.starts_with('.')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'~' | b'^'))
}

/// A version as image definitions allow it.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.as_bytes()[0].is_ascii_digit()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'~' | b'^'))
}

impl Release {
    fn check(&self) -> Result<(), IndexError> {
        let bad = |field, message: &str| IndexError::Field {
            version: self.version.clone(),
            field,
            message: message.to_string(),
        };
        if !valid_version(&self.version) {
            return Err(bad("version", "not a Keel version"));
        }
        if !is_hex(&self.root_hash, 64) {
            return Err(bad("root-hash", "not 64 hex digits"));
        }
        if !is_hex(&self.pcr_initrd_key, 64) {
            return Err(bad("pcr-initrd-key", "not 64 hex digits"));
        }
        for (field, name) in [
            ("usr", &self.usr),
            ("verity", &self.verity),
            ("uki", &self.uki),
            ("manifest", &self.manifest),
        ] {
            if !valid_target_name(name) {
                return Err(bad(field, "not a plain target name"));
            }
        }
        Ok(())
    }
}

impl ReleaseIndex {
    pub fn new(image: &str) -> ReleaseIndex {
        ReleaseIndex {
            schema: SCHEMA,
            image: image.to_string(),
            releases: Vec::new(),
        }
    }

    /// Parses and checks an index (as read from a verified target).
    pub fn parse(bytes: &[u8]) -> Result<ReleaseIndex, IndexError> {
        let index: ReleaseIndex =
            serde_json::from_slice(bytes).map_err(|e| IndexError::Parse(e.to_string()))?;
        index.check()?;
        Ok(index)
    }

    pub fn check(&self) -> Result<(), IndexError> {
        if self.schema != SCHEMA {
            return Err(IndexError::Schema(self.schema));
        }
        for (i, r) in self.releases.iter().enumerate() {
            r.check()?;
            // `0.3.0` and `0.03.0` are one version in dpkg's order.
            if self.releases[..i]
                .iter()
                .any(|o| crate::update::version::same(&o.version, &r.version))
            {
                return Err(IndexError::Duplicate(r.version.clone()));
            }
        }
        Ok(())
    }

    pub fn find(&self, version: &str) -> Option<&Release> {
        self.releases
            .iter()
            .find(|r| crate::update::version::same(&r.version, version))
    }

    /// Adds or replaces a release; the list stays ordered oldest first.
    pub fn insert(&mut self, release: Release) {
        self.releases.retain(|r| r.version != release.version);
        self.releases.push(release);
        self.releases
            .sort_by(|a, b| super::version::compare(&a.version, &b.version));
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn release(version: &str) -> Release {
        Release {
            version: version.into(),
            root_hash: "a".repeat(64),
            usr: format!("img_{version}.usr"),
            verity: format!("img_{version}.verity"),
            uki: format!("img_{version}.efi"),
            manifest: format!("img_{version}.manifest.json"),
            pcr_initrd_key: "b".repeat(64),
        }
    }

    #[test]
    fn round_trip_and_order() {
        let mut i = ReleaseIndex::new("img");
        i.insert(release("0.2.0"));
        i.insert(release("0.1.0"));
        i.insert(release("0.10.0"));
        let parsed = ReleaseIndex::parse(&i.to_json()).expect("parses");
        let versions: Vec<_> = parsed.releases.iter().map(|r| r.version.as_str()).collect();
        assert_eq!(versions, ["0.1.0", "0.2.0", "0.10.0"]);
    }

    #[test]
    fn unknown_fields_and_bad_values_are_named() {
        let mut i = ReleaseIndex::new("img");
        i.insert(release("0.1.0"));
        let mut v: serde_json::Value = serde_json::from_slice(&i.to_json()).expect("json");
        v["releases"][0]["extra"] = serde_json::json!(1);
        let e = ReleaseIndex::parse(v.to_string().as_bytes()).expect_err("unknown field");
        assert!(e.to_string().contains("extra"), "{e}");

        let mut bad = i.clone();
        bad.releases[0].usr = "../etc/passwd".into();
        assert_eq!(
            bad.check(),
            Err(IndexError::Field {
                version: "0.1.0".into(),
                field: "usr",
                message: "not a plain target name".into()
            })
        );
        let mut bad = i.clone();
        bad.releases[0].root_hash = "zz".into();
        assert!(bad
            .check()
            .expect_err("root hash")
            .to_string()
            .contains("root-hash"));
        let mut bad = i.clone();
        bad.schema = 2;
        assert_eq!(bad.check(), Err(IndexError::Schema(2)));
        let mut bad = i;
        bad.releases.push(release("0.1.0"));
        assert_eq!(bad.check(), Err(IndexError::Duplicate("0.1.0".into())));
    }
}
