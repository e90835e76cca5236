//! Making and signing images on the operator's machine: an OCI layout from a directory tree
//! (one layer, reproducible: sorted entries, zero times, root ownership), the payload cosign
//! signs, and signatures (keel's own or cosign's) stored in the layout.

use super::oci::{self, Layout, Manifest, MEDIA_CONFIG, MEDIA_LAYER_GZIP, MEDIA_MANIFEST};
use super::signature;
use anyhow::{bail, Context, Result};
use openssl::pkey::{PKey, Private};
use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

/// Builds an image layout at `out` whose one layer is `tree`, running `entrypoint` with `env`.
pub fn from_tree(tree: &Path, out: &Path, entrypoint: &[String], env: &[String]) -> Result<String> {
    if !tree.is_dir() {
        bail!("{}: not a directory", tree.display());
    }
    if out.exists() {
        bail!(
            "{}: already exists; choose a new output path",
            out.display()
        );
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".keel-image-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a staging directory in {}", parent.display()))?;
    let layout = Layout::create(staging.path())?;

    // The layer: a tar of the tree (sorted, times zero, owner root), gzip-compressed.
    let mut tar_bytes = Vec::new();
    let mut diff = sha2::Sha256::default();
    {
        let mut b = tar::Builder::new(&mut tar_bytes);
        b.mode(tar::HeaderMode::Deterministic);
        b.follow_symlinks(false);
        let mut entries: Vec<_> = walkdir::WalkDir::new(tree)
            .min_depth(1)
            .sort_by_file_name()
            .into_iter()
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", tree.display()))?;
        entries.sort_by(|a, b| a.path().cmp(b.path()));
        for e in entries {
            let rel = e
                .path()
                .strip_prefix(tree)
                .context("path inside the tree")?;
            b.append_path_with_name(e.path(), rel)
                .with_context(|| format!("adding {} to the layer", e.path().display()))?;
        }
        b.finish().context("finishing the layer")?;
    }
    sha2::Digest::update(&mut diff, &tar_bytes);
    let diff_id = format!("sha256:{}", hex::encode(sha2::Digest::finalize(diff)));
    let mut gz = flate2::GzBuilder::new()
        .mtime(0)
        .write(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar_bytes).context("compressing the layer")?;
    let layer_bytes = gz.finish().context("compressing the layer")?;
    let layer = layout.put_blob(MEDIA_LAYER_GZIP, &layer_bytes)?;

    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": { "Entrypoint": entrypoint, "Env": env },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let config = layout.put_blob(MEDIA_CONFIG, &serde_json::to_vec(&config)?)?;
    let manifest = Manifest {
        schema_version: 2,
        media_type: Some(MEDIA_MANIFEST.into()),
        config,
        layers: vec![layer],
    };
    let mut desc = layout.put_blob(MEDIA_MANIFEST, &serde_json::to_vec(&manifest)?)?;
    desc.annotations = BTreeMap::from([(oci::ANNOTATION_REF.to_string(), "latest".to_string())]);
    let mut index = layout.index()?;
    index.manifests.push(desc.clone());
    layout.write_index(&index)?;
    let staged = staging.keep();
    fs::rename(&staged, out).with_context(|| format!("moving the image to {}", out.display()))?;
    Ok(desc.digest)
}

/// Opens a layout directory, or extracts an oci-archive into `scratch`.
pub fn open(image: &Path, scratch: &Path) -> Result<Layout> {
    if image.is_file() {
        Ok(oci::extract_archive(image, scratch, 16 << 30)?)
    } else {
        Ok(Layout::open(image)?)
    }
}

/// The simple-signing payload for the image at `layout`, naming `reference`.
pub fn payload(layout: &Layout, reference: &str) -> Result<Vec<u8>> {
    let d = layout.image_descriptor()?;
    Ok(signature::payload(reference, &d.digest)?)
}

/// Signs the image in the layout directory `image` with `key` and stores the signature in it.
pub fn sign(image: &Path, key: &PKey<Private>, reference: &str) -> Result<String> {
    let layout = Layout::open(image)?;
    let d = layout.image_descriptor()?;
    let p = payload(&layout, reference)?;
    let sig = signature::sign(&p, key).context("signing the payload")?;
    layout.attach_signature(&d.digest, &p, &sig)?;
    Ok(d.digest)
}

/// Stores a signature made elsewhere (`cosign sign-blob --key` over `payload`) in the layout,
/// after checking that the payload names this image.
pub fn attach(image: &Path, payload: &[u8], sig: &str) -> Result<String> {
    let layout = Layout::open(image)?;
    let d = layout.image_descriptor()?;
    let v: serde_json::Value =
        serde_json::from_slice(payload).context("the payload is not JSON")?;
    let named = v["critical"]["image"]["docker-manifest-digest"]
        .as_str()
        .unwrap_or("");
    if named != d.digest {
        bail!(
            "the payload names {named:?}, but this image's manifest is {}",
            d.digest
        );
    }
    layout.attach_signature(&d.digest, payload, sig)?;
    Ok(d.digest)
}
