//! OCI image layouts (a directory, or an oci-archive tar of one) and their cosign signatures.
//!
//! An image travels as one layout: the image's manifest, and beside it in `index.json` the
//! signature manifest cosign uses (tag `sha256-<hex>.sig`, one layer per signature whose blob is
//! the simple-signing payload and whose annotation `dev.cosignproject.cosign/signature` is the
//! base64 signature) — the shape `cosign save` writes. [`verify`] checks, in this order: a
//! signature by a trusted key over a payload naming the image's manifest digest, the manifest's
//! own digest, then the config and every layer digest and size. Nothing else of the image is
//! read before the signature holds.

use super::signature::{self, SignatureError, TrustedKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

pub const MEDIA_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const MEDIA_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";
pub const MEDIA_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// The layer media type of cosign's signature manifests.
pub const MEDIA_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
/// The annotation holding a signature (base64) on a simple-signing layer.
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
pub const ANNOTATION_REF: &str = "org.opencontainers.image.ref.name";

/// Largest manifest, config or index read into memory.
const MAX_JSON: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("{path}: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("the image is not signed: no cosign signature for {digest} in the layout (sign it with `keel container sign` or attach a cosign signature with `keel container attach`)")]
    Unsigned { digest: String },
    #[error("no signature in the layout is valid for {digest}: {}", reasons.join("; "))]
    BadSignatures {
        digest: String,
        reasons: Vec<String>,
    },
    #[error("blob {digest} ({what}): {reason}")]
    Blob {
        digest: String,
        what: String,
        reason: String,
    },
    #[error("{0}")]
    Unsupported(String),
    #[error("{context}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> OciError {
    let context = context.into();
    move |source| OciError::Io { context, source }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
}

/// The parts of an image config keel uses to run it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default)]
    pub config: RunConfig,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RunConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// `sha256:<64 lowercase hex>`; returns the hex.
pub fn digest_hex(digest: &str) -> Option<&str> {
    digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The tag cosign gives the signatures of `digest`.
pub fn signature_tag(digest: &str) -> String {
    format!("{}.sig", digest.replacen(':', "-", 1))
}

/// Layer compression, from the media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// Opens a layout directory (checks `oci-layout`).
    pub fn open(root: &Path) -> Result<Layout, OciError> {
        let marker = root.join("oci-layout");
        let text = fs::read_to_string(&marker).map_err(|e| OciError::Layout {
            path: marker.clone(),
            reason: format!("not an OCI image layout ({e})"),
        })?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| OciError::Layout {
            path: marker.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        if v.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
            return Err(OciError::Layout {
                path: marker,
                reason: "imageLayoutVersion is not \"1.0.0\"".into(),
            });
        }
        Ok(Layout {
            root: root.to_path_buf(),
        })
    }

    /// Creates an empty layout directory.
    pub fn create(root: &Path) -> Result<Layout, OciError> {
        fs::create_dir_all(root.join("blobs/sha256"))
            .map_err(io(format!("creating {}", root.display())))?;
        fs::write(
            root.join("oci-layout"),
            br#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .map_err(io("writing oci-layout"))?;
        let l = Layout {
            root: root.to_path_buf(),
        };
        l.write_index(&Index {
            schema_version: 2,
            media_type: Some(MEDIA_INDEX.into()),
            manifests: vec![],
        })?;
        Ok(l)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index(&self) -> Result<Index, OciError> {
        let p = self.root.join("index.json");
        let bytes = read_limited(&p, MAX_JSON)?;
        serde_json::from_slice(&bytes).map_err(|e| OciError::Layout {
            path: p,
            reason: format!("not an OCI image index: {e}"),
        })
    }

    pub fn write_index(&self, index: &Index) -> Result<(), OciError> {
        let bytes = serde_json::to_vec(index).map_err(|e| OciError::Layout {
            path: self.root.join("index.json"),
            reason: e.to_string(),
        })?;
        atomic_write(&self.root.join("index.json"), &bytes)
    }

    /// Where the blob of `digest` lives (the digest must be well formed).
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, OciError> {
        let hex = digest_hex(digest).ok_or_else(|| OciError::Blob {
            digest: digest.into(),
            what: "descriptor".into(),
            reason: "digest is not sha256:<64 lowercase hex digits>".into(),
        })?;
        Ok(self.root.join("blobs/sha256").join(hex))
    }

    /// Reads a small blob, checking its size and digest against the descriptor.
    pub fn read_blob(&self, d: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
        if d.size > MAX_JSON {
            return Err(blob_err(
                d,
                what,
                format!("{} bytes is more than the {MAX_JSON} allowed", d.size),
            ));
        }
        let p = self.blob_path(&d.digest)?;
        let bytes = read_limited(&p, MAX_JSON).map_err(|e| blob_err(d, what, e.to_string()))?;
        if bytes.len() as u64 != d.size {
            return Err(blob_err(
                d,
                what,
                format!("{} bytes, the descriptor says {}", bytes.len(), d.size),
            ));
        }
        let got = sha256_digest(&bytes);
        if got != d.digest {
            return Err(blob_err(d, what, format!("content has digest {got}")));
        }
        Ok(bytes)
    }

    /// Hashes a blob file of any size, checking size and digest against the descriptor.
    pub fn check_blob_file(&self, d: &Descriptor, what: &str) -> Result<PathBuf, OciError> {
        let p = self.blob_path(&d.digest)?;
        let mut f = fs::File::open(&p)
            .map_err(|e| blob_err(d, what, format!("missing from the layout ({e})")))?;
        let mut h = Sha256::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut n: u64 = 0;
        loop {
            let k = f
                .read(&mut buf)
                .map_err(|e| blob_err(d, what, e.to_string()))?;
            if k == 0 {
                break;
            }
            n += k as u64;
            if n > d.size {
                return Err(blob_err(
                    d,
                    what,
                    format!("longer than the {} bytes the descriptor says", d.size),
                ));
            }
            h.update(&buf[..k]);
        }
        if n != d.size {
            return Err(blob_err(
                d,
                what,
                format!("{n} bytes, the descriptor says {}", d.size),
            ));
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != d.digest {
            return Err(blob_err(
                d,
                what,
                format!("content has digest {got} (changed after signing?)"),
            ));
        }
        Ok(p)
    }

    /// Stores bytes as a blob; returns its descriptor.
    pub fn put_blob(&self, media_type: &str, bytes: &[u8]) -> Result<Descriptor, OciError> {
        let digest = sha256_digest(bytes);
        let p = self.blob_path(&digest)?;
        if !p.exists() {
            atomic_write(&p, bytes)?;
        }
        Ok(Descriptor {
            media_type: media_type.into(),
            digest,
            size: bytes.len() as u64,
            annotations: BTreeMap::new(),
        })
    }

    /// The one image manifest of the layout that is not a signature.
    pub fn image_descriptor(&self) -> Result<Descriptor, OciError> {
        let index = self.index()?;
        let images: Vec<&Descriptor> = index
            .manifests
            .iter()
            .filter(|d| !is_signature_ref(d))
            .collect();
        match images.as_slice() {
            [one] => {
                if one.media_type != MEDIA_MANIFEST && one.media_type != DOCKER_MANIFEST {
                    return Err(OciError::Unsupported(format!(
                        "the layout's image is a `{}`; keel runs single-platform images (an OCI image manifest), not indexes",
                        one.media_type
                    )));
                }
                Ok((*one).clone())
            }
            [] => Err(OciError::Layout {
                path: self.root.join("index.json"),
                reason: "holds no image manifest".into(),
            }),
            many => Err(OciError::Layout {
                path: self.root.join("index.json"),
                reason: format!(
                    "holds {} images; keel runs a layout with exactly one (plus its signatures)",
                    many.len()
                ),
            }),
        }
    }

    /// The simple-signing (payload, signature) pairs stored for `digest`.
    pub fn signatures(&self, digest: &str) -> Result<Vec<(Vec<u8>, String)>, OciError> {
        let tag = signature_tag(digest);
        let index = self.index()?;
        let mut out = Vec::new();
        for d in index
            .manifests
            .iter()
            .filter(|d| d.annotations.get(ANNOTATION_REF) == Some(&tag))
        {
            let m: Manifest = serde_json::from_slice(&self.read_blob(d, "signature manifest")?)
                .map_err(|e| blob_err(d, "signature manifest", e.to_string()))?;
            for l in m
                .layers
                .iter()
                .filter(|l| l.media_type == MEDIA_SIMPLESIGNING)
            {
                let payload = self.read_blob(l, "signature payload")?;
                if let Some(sig) = l.annotations.get(ANNOTATION_SIGNATURE) {
                    out.push((payload, sig.clone()));
                }
            }
        }
        Ok(out)
    }

    /// Adds a signature (payload + base64 signature) for `digest` to the layout, next to any
    /// signatures already there, the way cosign stores them.
    pub fn attach_signature(
        &self,
        digest: &str,
        payload: &[u8],
        signature: &str,
    ) -> Result<(), OciError> {
        let tag = signature_tag(digest);
        let mut index = self.index()?;
        let mut layers = Vec::new();
        if let Some(old) = index
            .manifests
            .iter()
            .find(|d| d.annotations.get(ANNOTATION_REF) == Some(&tag))
        {
            let m: Manifest = serde_json::from_slice(&self.read_blob(old, "signature manifest")?)
                .map_err(|e| blob_err(old, "signature manifest", e.to_string()))?;
            layers = m.layers;
        }
        let mut layer = self.put_blob(MEDIA_SIMPLESIGNING, payload)?;
        layer
            .annotations
            .insert(ANNOTATION_SIGNATURE.into(), signature.trim().to_string());
        layers.retain(|l| l != &layer);
        layers.push(layer);
        let config = self.put_blob(MEDIA_CONFIG, b"{}")?;
        let manifest = Manifest {
            schema_version: 2,
            media_type: Some(MEDIA_MANIFEST.into()),
            config,
            layers,
        };
        let bytes =
            serde_json::to_vec(&manifest).map_err(|e| OciError::Unsupported(e.to_string()))?;
        let mut desc = self.put_blob(MEDIA_MANIFEST, &bytes)?;
        desc.annotations.insert(ANNOTATION_REF.into(), tag.clone());
        index
            .manifests
            .retain(|d| d.annotations.get(ANNOTATION_REF) != Some(&tag));
        index.manifests.push(desc);
        self.write_index(&index)
    }
}

fn is_signature_ref(d: &Descriptor) -> bool {
    d.annotations.get(ANNOTATION_REF).is_some_and(|r| {
        r.strip_suffix(".sig")
            .and_then(|s| s.strip_prefix("sha256-"))
            .is_some_and(|h| h.len() == 64)
    })
}

fn blob_err(d: &Descriptor, what: &str, reason: String) -> OciError {
    OciError::Blob {
        digest: d.digest.clone(),
        what: what.into(),
        reason,
    }
}

fn read_limited(p: &Path, max: u64) -> Result<Vec<u8>, OciError> {
    let f = fs::File::open(p).map_err(io(format!("reading {}", p.display())))?;
    let mut bytes = Vec::new();
    f.take(max + 1)
        .read_to_end(&mut bytes)
        .map_err(io(format!("reading {}", p.display())))?;
    if bytes.len() as u64 > max {
        return Err(OciError::Layout {
            path: p.into(),
            reason: format!("larger than {max} bytes"),
        });
    }
    Ok(bytes)
}

/// Writes a file whole or not at all (see [`crate::atomic`]).
pub fn atomic_write(p: &Path, bytes: &[u8]) -> Result<(), OciError> {
    crate::atomic::write(p, bytes, 0o644).map_err(|e| OciError::Io {
        context: format!("writing {} ({})", p.display(), e.step),
        source: e.source,
    })
}

/// An image whose signature, manifest, config and layers all checked out.
#[derive(Debug, Clone)]
pub struct VerifiedImage {
    pub manifest_digest: String,
    /// Name of the trusted key that signed it.
    pub signed_by: String,
    /// The reference the signer named.
    pub reference: String,
    pub config: ImageConfig,
    /// Layer blobs, bottom first, with their compression and descriptor.
    pub layers: Vec<(PathBuf, Compression, Descriptor)>,
}

/// Verifies an image layout against the trusted keys; see the module documentation for the order.
pub fn verify(layout: &Layout, keys: &[TrustedKey]) -> Result<VerifiedImage, OciError> {
    let image = layout.image_descriptor()?;
    let sigs = layout.signatures(&image.digest)?;
    if sigs.is_empty() {
        return Err(OciError::Unsigned {
            digest: image.digest,
        });
    }
    let mut reasons = Vec::new();
    let mut verified = None;
    for (payload, sig) in &sigs {
        match signature::verify(payload, sig, keys) {
            Ok(v) if v.manifest_digest == image.digest => {
                verified = Some(v);
                break;
            }
            Ok(v) => reasons.push(
                SignatureError::DigestMismatch {
                    signed: v.manifest_digest,
                    actual: image.digest.clone(),
                }
                .to_string(),
            ),
            Err(e) => reasons.push(e.to_string()),
        }
    }
    let Some(v) = verified else {
        return Err(OciError::BadSignatures {
            digest: image.digest,
            reasons,
        });
    };
    let manifest_bytes = layout.read_blob(&image, "image manifest")?;
    let manifest: Manifest = serde_json::from_slice(&manifest_bytes).map_err(|e| {
        blob_err(
            &image,
            "image manifest",
            format!("not an OCI image manifest: {e}"),
        )
    })?;
    let config_bytes = layout.read_blob(&manifest.config, "image config")?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes).map_err(|e| {
        blob_err(
            &manifest.config,
            "image config",
            format!("not an OCI image config: {e}"),
        )
    })?;
    if !config.os.is_empty() && config.os != "linux" {
        return Err(OciError::Unsupported(format!(
            "the image is for os `{}`, not linux",
            config.os
        )));
    }
    if !config.architecture.is_empty() && config.architecture != "amd64" {
        return Err(OciError::Unsupported(format!(
            "the image is for architecture `{}`; this node is amd64",
            config.architecture
        )));
    }
    let mut layers = Vec::new();
    for (i, l) in manifest.layers.iter().enumerate() {
        let what = format!("layer {}", i + 1);
        let compression = match l.media_type.as_str() {
            MEDIA_LAYER_TAR => Compression::None,
            MEDIA_LAYER_GZIP | DOCKER_LAYER_GZIP => Compression::Gzip,
            other => {
                return Err(blob_err(
                    l,
                    &what,
                    format!("media type `{other}` is not one keel unpacks (tar, tar+gzip)"),
                ))
            }
        };
        let p = layout.check_blob_file(l, &what)?;
        layers.push((p, compression, l.clone()));
    }
    Ok(VerifiedImage {
        manifest_digest: image.digest,
        signed_by: v.key,
        reference: v.reference,
        config,
        layers,
    })
}

/// Extracts an oci-archive (a tar of a layout) into `dest`, taking only `oci-layout`,
/// `index.json` and `blobs/sha256/<hex>` regular files, at most `max_bytes` in all.
pub fn extract_archive(archive: &Path, dest: &Path, max_bytes: u64) -> Result<Layout, OciError> {
    let f = fs::File::open(archive).map_err(io(format!("opening {}", archive.display())))?;
    fs::create_dir_all(dest.join("blobs/sha256"))
        .map_err(io(format!("creating {}", dest.display())))?;
    let mut tar = tar::Archive::new(f);
    let mut total: u64 = 0;
    let bad = |reason: String| OciError::Layout {
        path: archive.into(),
        reason,
    };
    for entry in tar
        .entries()
        .map_err(|e| bad(format!("not a tar archive: {e}")))?
    {
        let mut entry = entry.map_err(|e| bad(format!("reading the archive: {e}")))?;
        let path = entry
            .path()
            .map_err(|e| bad(format!("entry name: {e}")))?
            .into_owned();
        let name = path.to_string_lossy().trim_start_matches("./").to_string();
        let kind = entry.header().entry_type();
        if kind.is_dir() || name.is_empty() {
            continue;
        }
        let target = match name.as_str() {
            "oci-layout" | "index.json" => dest.join(&name),
            _ => match name.strip_prefix("blobs/sha256/") {
                Some(hex) if digest_hex(&format!("sha256:{hex}")).is_some() => dest.join("blobs/sha256").join(hex),
                _ => return Err(bad(format!("unexpected entry `{name}` (an oci-archive holds oci-layout, index.json and blobs/sha256/*)"))),
            },
        };
        if !kind.is_file() {
            return Err(bad(format!("entry `{name}` is not a regular file")));
        }
        total = total.saturating_add(entry.header().size().unwrap_or(u64::MAX));
        if total > max_bytes {
            return Err(bad(format!("larger than the {max_bytes} bytes allowed")));
        }
        let mut out =
            fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
        std::io::copy(&mut (&mut entry).take(max_bytes), &mut out)
            .map_err(io(format!("extracting {name}")))?;
    }
    Layout::open(dest)
}

/// Copies a layout directory into `dest` (a private directory), taking only `oci-layout`,
/// `index.json` and `blobs/sha256/<hex>` regular files (links are not followed), at most
/// `max_bytes` in all. What is verified and unpacked afterwards is this copy: a writer of the
/// source directory can no longer swap a blob between the check of its digest and its use.
pub fn copy_layout(src: &Path, dest: &Path, max_bytes: u64) -> Result<Layout, OciError> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::create_dir_all(dest.join("blobs/sha256"))
        .map_err(io(format!("creating {}", dest.display())))?;
    let bad = |reason: String| OciError::Layout {
        path: src.into(),
        reason,
    };
    let mut names = vec!["oci-layout".to_string(), "index.json".to_string()];
    for e in fs::read_dir(src.join("blobs/sha256"))
        .map_err(io(format!("listing {}/blobs/sha256", src.display())))?
    {
        let e = e.map_err(io(format!("listing {}/blobs/sha256", src.display())))?;
        let hex = e.file_name().to_string_lossy().into_owned();
        if digest_hex(&format!("sha256:{hex}")).is_some() {
            names.push(format!("blobs/sha256/{hex}"));
        }
    }
    let mut total: u64 = 0;
    for name in names {
        let from = src.join(&name);
        let f = match fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&from)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && name == "oci-layout" => continue,
            Err(e) => {
                return Err(bad(format!(
                    "`{name}` cannot be opened as a plain file: {e}"
                )))
            }
        };
        let meta = f
            .metadata()
            .map_err(io(format!("reading {}", from.display())))?;
        if !meta.is_file() {
            return Err(bad(format!("`{name}` is not a regular file")));
        }
        total = total.saturating_add(meta.len());
        if total > max_bytes {
            return Err(bad(format!("larger than the {max_bytes} bytes allowed")));
        }
        let target = dest.join(&name);
        let mut out =
            fs::File::create(&target).map_err(io(format!("creating {}", target.display())))?;
        std::io::copy(&mut f.take(meta.len()), &mut out).map_err(io(format!("copying {name}")))?;
    }
    Layout::open(dest)
}

/// Writes a layout directory as an oci-archive tar (entries in a stable order).
pub fn write_archive(layout: &Layout, archive: &Path) -> Result<(), OciError> {
    let dir = archive.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::NamedTempFile::new_in(dir)
        .map_err(io(format!("creating a file in {}", dir.display())))?;
    {
        let mut b = tar::Builder::new(tmp.as_file());
        b.mode(tar::HeaderMode::Deterministic);
        let mut names = vec!["oci-layout".to_string(), "index.json".to_string()];
        let mut blobs: Vec<String> = fs::read_dir(layout.root.join("blobs/sha256"))
            .map_err(io("listing blobs"))?
            .filter_map(|e| e.ok())
            .map(|e| format!("blobs/sha256/{}", e.file_name().to_string_lossy()))
            .collect();
        blobs.sort();
        names.extend(blobs);
        for n in names {
            b.append_path_with_name(layout.root.join(&n), &n)
                .map_err(io(format!("adding {n} to the archive")))?;
        }
        b.finish().map_err(io("finishing the archive"))?;
    }
    tmp.persist(archive).map_err(|e| OciError::Io {
        context: format!("renaming into {}", archive.display()),
        source: e.error,
    })?;
    Ok(())
}
