//! `keel inspect`: what is in an image — partitions, the UKI's sections and command line, the /usr
//! root hash and whether the verity partitions are where the initrd will look for them. Reads
//! the GPT, the FAT ESP and the PE file directly; runs no tool for raw images.

use crate::disk::esp::{Esp, UKI_DIR};
use crate::disk::gpt::{self, Partition};
use crate::disk::uki::{self, UkiView};
use crate::disk::{layout, PartitionType};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::path::Path;

#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    pub image: String,
    pub disk_guid: Option<String>,
    pub partitions: Vec<Partition>,
    pub ukis: Vec<UkiView>,
    pub usr_root_hash: Option<String>,
    /// Slot A's data and hash partitions carry the UUIDs derived from the root hash.
    pub verity_partitions_found: Option<bool>,
}

/// `keel inspect`'s arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectArgs {
    /// A .raw image, a UKI (.efi) or a build output directory.
    pub image: std::path::PathBuf,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `keel inspect`.
pub fn command(a: &InspectArgs) -> Result<()> {
    let i = inspect(&a.image)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&i)?);
    } else {
        print!("{}", render_text(&i));
    }
    Ok(())
}

/// Inspects a raw disk image, a UKI (`.efi`), or a build directory (its raw image).
pub fn inspect(path: &Path) -> Result<Inspection> {
    let path = if path.is_dir() {
        let m = crate::manifest::Manifest::find(path)?;
        let raw = path.join(format!("{}.raw", m.name));
        if !raw.exists() {
            bail!("{} has no {}.raw to inspect", path.display(), m.name);
        }
        raw
    } else {
        path.to_path_buf()
    };
    if path.extension().is_some_and(|e| e == "efi") {
        let data = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        let uki = uki::read(&path.display().to_string(), &data)?;
        return Ok(Inspection {
            image: path.display().to_string(),
            disk_guid: None,
            partitions: vec![],
            usr_root_hash: uki::usrhash(&uki.cmdline),
            ukis: vec![uki],
            verity_partitions_found: None,
        });
    }
    if path.extension().is_some_and(|e| e == "qcow2") {
        bail!("{} is qcow2: inspect the .raw image next to it (or convert with qemu-img convert -O raw)", path.display());
    }
    inspect_raw(&path)
}

fn inspect_raw(path: &Path) -> Result<Inspection> {
    let (disk_guid, parts) = gpt::read(path)?;
    let mut ukis = Vec::new();
    if parts.iter().any(|p| p.is(PartitionType::Esp)) {
        let esp = Esp::open(path, false)?;
        for n in esp.ukis()? {
            let file = format!("{UKI_DIR}/{n}");
            ukis.push(uki::read(&file, &esp.read(&file)?)?);
        }
    }
    let root_hash = ukis.first().and_then(|u| uki::usrhash(&u.cmdline));
    let found = root_hash.as_deref().map(|h| {
        layout::verity_uuids(h).is_ok_and(|(d, v)| {
            parts
                .iter()
                .any(|p| p.is(PartitionType::Usr) && p.uuid == d)
                && parts
                    .iter()
                    .any(|p| p.is(PartitionType::UsrVerity) && p.uuid == v)
        })
    });
    Ok(Inspection {
        image: path.display().to_string(),
        disk_guid: Some(disk_guid),
        partitions: parts,
        ukis,
        usr_root_hash: root_hash,
        verity_partitions_found: found,
    })
}

/// Human-readable rendering of an inspection.
pub fn render_text(i: &Inspection) -> String {
    let mut s = format!("image: {}\n", i.image);
    if let Some(g) = &i.disk_guid {
        s.push_str(&format!("disk GUID: {g}\n"));
    }
    if !i.partitions.is_empty() {
        s.push_str("partitions:\n");
        for p in &i.partitions {
            s.push_str(&format!(
                "  {:>2}  {:<18} {:<16} {:>10} MiB  {}\n",
                p.number,
                p.type_,
                p.label,
                p.size >> 20,
                p.uuid
            ));
        }
    }
    for u in &i.ukis {
        s.push_str(&format!(
            "UKI {}:\n  uname: {}\n  cmdline: {}\n  sections:",
            u.path, u.uname, u.cmdline
        ));
        for sec in &u.sections {
            s.push_str(&format!(" {}({})", sec.name, sec.size));
        }
        s.push('\n');
    }
    if let Some(h) = &i.usr_root_hash {
        s.push_str(&format!("usr root hash: {h}\n"));
    }
    if let Some(f) = i.verity_partitions_found {
        s.push_str(&format!(
            "verity partitions for that hash: {}\n",
            if f {
                "found (slot A)"
            } else {
                "NOT FOUND: the initrd will not find /usr"
            }
        ));
    }
    s
}
