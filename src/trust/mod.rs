//! Trusted boot: the operator's keys, PCR 11 prediction and `.pcrsig` signing at build time, and
//! the boot-state checks node programs make against them.

pub mod escrow;
pub mod eventlog;
pub mod keys;
pub mod measure;
pub mod secureboot;

use crate::image::TrustSettings;
use anyhow::{Context, Result};
pub use keys::Keys;

/// Loads the key directory an image definition names. When it is missing and the definition
/// allows it (`generate-keys = true`, development images), creates it first.
pub fn ensure_keys(settings: &TrustSettings, image: &str) -> Result<Keys> {
    if !settings.keys.exists() && settings.generate_keys {
        tracing::warn!(
            dir = %settings.keys.display(),
            "creating development signing keys (trust.generate-keys = true); production images name a key directory made with `keel keys init`"
        );
        keys::init(&settings.keys, &format!("Keel development ({image})"))
            .with_context(|| format!("creating keys in {}", settings.keys.display()))?;
    }
    if settings.generate_keys && keys::ensure_recovery_key(&settings.keys)? {
        tracing::warn!(dir = %settings.keys.display(), "added a development recovery escrow key");
    }
    Ok(Keys::load(&settings.keys)?)
}
