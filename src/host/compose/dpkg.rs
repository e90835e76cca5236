//! Reading the installed package list from a dpkg status file (for the manifest and `keel diff`).

use serde::Serialize;

pub use crate::manifest::Package;

/// Installed packages, sorted by name. Stanzas not in state "install ok installed" are skipped.
pub fn parse_status(text: &str) -> Vec<Package> {
    let mut out = Vec::new();
    for stanza in text.split("\n\n") {
        let (mut name, mut version, mut installed) = (None, None, false);
        for line in stanza.lines() {
            if let Some(v) = line.strip_prefix("Package: ") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("Version: ") {
                version = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("Status: ") {
                installed = v.trim() == "install ok installed";
            }
        }
        if let (Some(name), Some(version), true) = (name, version, installed) {
            out.push(Package { name, version });
        }
    }
    out.sort();
    out
}

/// Packages added, removed and changed between two lists.
#[derive(Debug, Default, PartialEq, Eq, Serialize)]
pub struct PackageDiff {
    pub added: Vec<Package>,
    pub removed: Vec<Package>,
    /// (name, old version, new version)
    pub changed: Vec<(String, String, String)>,
}

pub fn diff(old: &[Package], new: &[Package]) -> PackageDiff {
    use std::collections::BTreeMap;
    let a: BTreeMap<&str, &str> = old
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let b: BTreeMap<&str, &str> = new
        .iter()
        .map(|p| (p.name.as_str(), p.version.as_str()))
        .collect();
    let mut d = PackageDiff::default();
    for (n, v) in &b {
        match a.get(n) {
            None => d.added.push(Package {
                name: n.to_string(),
                version: v.to_string(),
            }),
            Some(old_v) if old_v != v => {
                d.changed
                    .push((n.to_string(), old_v.to_string(), v.to_string()))
            }
            _ => {}
        }
    }
    for (n, v) in &a {
        if !b.contains_key(n) {
            d.removed.push(Package {
                name: n.to_string(),
                version: v.to_string(),
            });
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATUS: &str = "Package: systemd\nStatus: install ok installed\nVersion: 257.9-1\nDepends: x\n\nPackage: gone\nStatus: deinstall ok config-files\nVersion: 1\n\nPackage: etcd-server\nStatus: install ok installed\nArchitecture: amd64\nVersion: 3.5.16-4\n";

    #[test]
    fn parses_installed_packages_sorted() {
        let p = parse_status(STATUS);
        assert_eq!(
            p,
            vec![
                Package {
                    name: "etcd-server".into(),
                    version: "3.5.16-4".into()
                },
                Package {
                    name: "systemd".into(),
                    version: "257.9-1".into()
                },
            ]
        );
    }

    #[test]
    fn diff_reports_added_removed_changed() {
        let old = parse_status(STATUS);
        let mut new = old.clone();
        new[1].version = "258-1".into();
        new.remove(0);
        new.push(Package {
            name: "crun".into(),
            version: "1.21".into(),
        });
        let d = diff(&old, &new);
        assert_eq!(d.added.len(), 1);
        assert_eq!(d.removed[0].name, "etcd-server");
        assert_eq!(
            d.changed,
            vec![("systemd".into(), "257.9-1".into(), "258-1".into())]
        );
    }
}
