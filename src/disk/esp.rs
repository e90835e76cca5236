//! The ESP of a disk image, read and edited in place as a FAT file system (the `fatfs` crate on
//! a byte range of the image file): no loop device, no vfat driver, no mount.

use super::gpt;
use super::partition::PartitionType;
use anyhow::{bail, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Where UKIs live in the ESP (systemd-boot's Type #2 entries).
pub const UKI_DIR: &str = "EFI/Linux";

/// A partition of an image file as a byte range. Writes are refused unless `writable`.
pub struct Slice {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
    writable: bool,
}

impl Read for Slice {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let got = self.file.read(&mut buf[..n])?;
        self.pos += got as u64;
        Ok(got)
    }
}

impl Seek for Slice {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => p as i64,
            SeekFrom::End(d) => self.len as i64 + d,
            SeekFrom::Current(d) => self.pos as i64 + d,
        };
        if new < 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek before start",
            ));
        }
        self.pos = new as u64;
        Ok(self.pos)
    }
}

impl Write for Slice {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if !self.writable {
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "the ESP was opened read-only",
            ));
        }
        let left = self.len.saturating_sub(self.pos);
        let n = (buf.len() as u64).min(left) as usize;
        if n == 0 && !buf.is_empty() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "write past the end of the partition",
            ));
        }
        self.file.seek(SeekFrom::Start(self.start + self.pos))?;
        let put = self.file.write(&buf[..n])?;
        self.pos += put as u64;
        Ok(put)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        if self.writable {
            self.file.sync_data()?;
        }
        Ok(())
    }
}

/// Times written into FAT entries. Without a provider fatfs writes the date 0 (month 0, day 0),
/// which OVMF's FAT driver rejects when systemd-boot later renames the file for boot counting.
#[derive(Debug)]
struct FixedTime;

impl fatfs::TimeProvider for FixedTime {
    fn get_current_date(&self) -> fatfs::Date {
        fatfs::Date {
            year: 2025,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> fatfs::DateTime {
        fatfs::DateTime {
            date: self.get_current_date(),
            time: fatfs::Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

/// The ESP of a disk image, open as a FAT file system.
pub struct Esp {
    fs: fatfs::FileSystem<Slice>,
    image: String,
}

impl Esp {
    /// Opens the ESP of the raw image `raw`; `writable` for edits.
    pub fn open(raw: &Path, writable: bool) -> Result<Esp> {
        let (_, parts) = gpt::read(raw)?;
        let esp = parts
            .iter()
            .find(|p| p.is(PartitionType::Esp))
            .with_context(|| format!("{} has no ESP", raw.display()))?;
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(raw)
            .with_context(|| format!("opening {}", raw.display()))?;
        let slice = Slice {
            file,
            start: esp.offset,
            len: esp.size,
            pos: 0,
            writable,
        };
        let fs = fatfs::FileSystem::new(slice, fatfs::FsOptions::new().time_provider(&FIXED_TIME))
            .with_context(|| {
                format!(
                    "reading the ESP (partition {}) of {}",
                    esp.number,
                    raw.display()
                )
            })?;
        Ok(Esp {
            fs,
            image: raw.display().to_string(),
        })
    }

    /// The `.efi` files in `EFI/Linux`, sorted.
    pub fn ukis(&self) -> Result<Vec<String>> {
        let dir = self
            .fs
            .root_dir()
            .open_dir(UKI_DIR)
            .with_context(|| format!("the ESP of {} has no {UKI_DIR} directory", self.image))?;
        let mut names = Vec::new();
        for e in dir.iter() {
            let name = e
                .with_context(|| format!("reading {UKI_DIR} on the ESP of {}", self.image))?
                .file_name();
            if name.to_ascii_lowercase().ends_with(".efi") {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    /// The file name under `EFI/Linux` of the UKI of `version` (its boot counter suffix varies).
    pub fn find_uki(&self, version: &str) -> Result<String> {
        let prefix = format!("keel-{version}");
        let mut found: Vec<String> = self
            .ukis()?
            .into_iter()
            .filter(|name| {
                let rest = name.strip_prefix(&prefix).unwrap_or("x");
                rest.starts_with('+') || rest == ".efi"
            })
            .collect();
        match found.len() {
            1 => Ok(found.remove(0)),
            0 => bail!("no UKI of version {version} in {UKI_DIR} of {}", self.image),
            _ => bail!(
                "several UKIs of version {version} in {}: {found:?}",
                self.image
            ),
        }
    }

    /// The whole content of the file `path` (`dir/name`).
    pub fn read(&self, path: &str) -> Result<Vec<u8>> {
        let mut f = self
            .fs
            .root_dir()
            .open_file(path)
            .with_context(|| format!("opening {path} on the ESP of {}", self.image))?;
        let mut data = Vec::new();
        f.read_to_end(&mut data)
            .with_context(|| format!("reading {path} on the ESP of {}", self.image))?;
        Ok(data)
    }

    /// Writes (creates or replaces) the file `path` (`dir/name`, directories created).
    pub fn write(&self, path: &str, data: &[u8]) -> Result<()> {
        let mut dir = self.fs.root_dir();
        let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
        for d in dirs.split('/').filter(|d| !d.is_empty()) {
            dir = match dir.open_dir(d) {
                Ok(x) => x,
                Err(_) => dir
                    .create_dir(d)
                    .with_context(|| format!("creating {d} on the ESP of {}", self.image))?,
            };
        }
        let mut f = dir
            .create_file(name)
            .with_context(|| format!("creating {path} on the ESP of {}", self.image))?;
        f.truncate()
            .with_context(|| format!("truncating {path} on the ESP of {}", self.image))?;
        f.write_all(data)
            .with_context(|| format!("writing {path} on the ESP of {}", self.image))?;
        f.flush()
            .with_context(|| format!("flushing the ESP of {}", self.image))?;
        Ok(())
    }

    /// Removes the file `path` (`dir/name`); a missing file is not an error.
    pub fn remove(&self, path: &str) -> Result<()> {
        let mut dir = self.fs.root_dir();
        let (dirs, name) = path.rsplit_once('/').unwrap_or(("", path));
        for d in dirs.split('/').filter(|d| !d.is_empty()) {
            dir = match dir.open_dir(d) {
                Ok(x) => x,
                Err(_) => return Ok(()),
            };
        }
        match dir.remove(name) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(anyhow::anyhow!(
                "removing {path} on the ESP of {}: {e}",
                self.image
            )),
        }
    }

    /// Writes the file system's metadata back and closes it.
    pub fn close(self) -> Result<()> {
        let image = self.image;
        self.fs
            .unmount()
            .with_context(|| format!("closing the ESP of {image}"))
    }
}

/// Writes (creates or replaces) the file `path` in the ESP of the raw image `raw`.
pub fn write_file(raw: &Path, path: &str, data: &[u8]) -> Result<()> {
    let esp = Esp::open(raw, true)?;
    esp.write(path, data)?;
    esp.close()
}

/// Reads the file `path` from the ESP of the raw image `raw`.
pub fn read_file(raw: &Path, path: &str) -> Result<Vec<u8>> {
    Esp::open(raw, false)?.read(path)
}
