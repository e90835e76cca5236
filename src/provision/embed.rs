//! `keel embed-config`: put an Ignition config on a built image's ESP (`keel/config.ign`), for
//! machines that have no fw_cfg (bare metal, clouds without user data), like
//! `coreos-installer iso customize`. The config is checked first; in a build directory the
//! qcow2 is made again from the changed raw image and the manifest's checksums are updated.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::Read;
use std::path::Path;

pub fn embed(image: &Path, config: &Path) -> Result<()> {
    let bytes = fs::read(config).with_context(|| format!("reading {}", config.display()))?;
    let plan = super::config::parse(&bytes).with_context(|| config.display().to_string())?;
    let resolved = crate::boot::resolve_image(&image.display().to_string(), true)?;
    let raw = &resolved.disk;
    if raw.extension().is_some_and(|e| e != "raw") {
        anyhow::bail!(
            "{}: embed-config changes raw images (give the .raw or its build directory)",
            raw.display()
        );
    }
    crate::testing::esp::write_file(raw, super::source::ESP_PATH, &bytes)?;
    println!(
        "wrote {} on the ESP of {} (config sha256 {})",
        super::source::ESP_PATH,
        raw.display(),
        plan.sha256
    );
    let (Some(dir), Some(mut m)) = (resolved.dir, resolved.manifest) else {
        return Ok(());
    };
    let qcow2 = dir.join(format!("{}.qcow2", m.name));
    if qcow2.exists() {
        let cache = crate::cache::Cache::from_env()?;
        let tools =
            crate::tools::ToolsTree::ensure(&cache, crate::image::DEFAULT_MIRROR)?.bind(&dir);
        crate::render::disk::to_qcow2(&tools, raw, &qcow2)?;
        println!("made {} again", qcow2.display());
    }
    for a in &mut m.artifacts {
        let p = dir.join(&a.file);
        if let Ok(f) = fs::File::open(&p) {
            let mut h = Sha256::new();
            let mut r = std::io::BufReader::new(f);
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r.read(&mut buf)?;
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
            }
            a.sha256 = hex::encode(h.finalize());
            a.size = fs::metadata(&p)?.len();
        }
    }
    let mp = dir.join(crate::manifest::MANIFEST_FILE);
    fs::write(&mp, serde_json::to_vec_pretty(&m)?)
        .with_context(|| format!("writing {}", mp.display()))?;
    Ok(())
}
