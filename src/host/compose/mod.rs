//! Composing the image's /usr tree: bootstrap Debian packages, move everything under /usr, add
//! keel's own content.

pub mod bootstrap;
pub mod dpkg;
pub mod overlay;
pub mod usrify;

#[cfg(test)]
use crate::image::{ByteSize, Definition, OutputFormat};
#[cfg(test)]
use std::path::PathBuf;

/// A small valid definition for unit tests.
#[cfg(test)]
pub(crate) fn bootstrap_sample() -> Definition {
    Definition {
        path: PathBuf::from("/p/images/x.toml"),
        project_dir: PathBuf::from("/p"),
        sources: vec![],
        name: "x".into(),
        version: "1".into(),
        description: String::new(),
        suite: "trixie".into(),
        mirror: "http://deb.debian.org/debian".into(),
        components: vec!["main".into()],
        packages: vec!["systemd".into(), "linux-image-amd64".into()],
        units: vec![],
        enable: vec![],
        disable: vec![],
        binaries: vec![],
        kernel_cmdline: vec![],
        usr_size: ByteSize(1 << 30),
        esp_size: ByteSize(256 << 20),
        formats: vec![OutputFormat::Raw],
        initrd_modules: vec![],
        keep_docs: false,
        keep_man: false,
        keep_locales: false,
        files: vec![],
        trust: None,
        containers: None,
        update: None,
        mask: vec![],
    }
}
