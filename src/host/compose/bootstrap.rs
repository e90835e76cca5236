//! Bootstrapping the Debian tree with mmdebstrap, with downloaded packages kept in the cache.

use crate::host::cache;
use crate::image::Definition;
use std::ffi::OsString;
use std::path::Path;

/// Bump when the bootstrap or usr-ification changes what a base tree contains.
const BOOTSTRAP_FORMAT: &str = "base-4";

/// The cache key of a bootstrapped base tree: everything mmdebstrap and the usr-ification see.
pub fn base_key(def: &Definition, epoch: u64) -> String {
    let mut packages = def.packages.clone();
    packages.sort();
    let mut parts: Vec<String> = vec![
        BOOTSTRAP_FORMAT.into(),
        def.suite.clone(),
        def.mirror.clone(),
        def.components.join(","),
        format!(
            "docs={} man={} locales={}",
            def.keep_docs, def.keep_man, def.keep_locales
        ),
        epoch.to_string(),
    ];
    parts.extend(packages);
    cache::key(parts)
}

/// The mmdebstrap command line (without the program) that bootstraps `def` into `target`,
/// reusing and refilling the package cache `debs`.
pub fn mmdebstrap_args(def: &Definition, target: &Path, debs: &Path) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec![
        "--variant=apt".into(),
        "--mode=root".into(),
        "--format=directory".into(),
        format!("--components={}", def.components.join(",")).into(),
        format!("--include={}", def.packages.join(",")).into(),
        "--skip=output/dev".into(),
        "--skip=essential/unlink".into(),
    ];
    let mut excludes: Vec<&str> = Vec::new();
    if !def.keep_docs {
        excludes.extend([
            "/usr/share/doc/*",
            "/usr/share/info/*",
            "/usr/share/lintian/*",
        ]);
    }
    if !def.keep_man {
        excludes.push("/usr/share/man/*");
    }
    if !def.keep_locales {
        excludes.push("/usr/share/locale/*");
    }
    for e in excludes {
        a.push(format!("--dpkgopt=path-exclude={e}").into());
    }
    if !def.keep_docs {
        // Licences stay: they must ship with the binaries.
        a.push("--dpkgopt=path-include=/usr/share/doc/*/copyright".into());
    }
    let debs = debs.display();
    a.push(format!("--setup-hook=mkdir -p \"$1\"/var/cache/apt/archives/ && find '{debs}' -maxdepth 1 -name '*.deb' -exec cp -t \"$1\"/var/cache/apt/archives/ {{}} +").into());
    a.push(format!("--customize-hook=find \"$1\"/var/cache/apt/archives/ -maxdepth 1 -name '*.deb' -exec cp -n -t '{debs}' {{}} +").into());
    a.push(def.suite.clone().into());
    a.push(target.into());
    a.push(def.mirror.clone().into());
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::compose::bootstrap_sample as sample;

    #[test]
    fn args_name_suite_target_mirror_last() {
        let a = mmdebstrap_args(&sample(), Path::new("/t"), Path::new("/c/debs"));
        let n = a.len();
        assert_eq!(a[n - 3], "trixie");
        assert_eq!(a[n - 2], "/t");
        assert_eq!(a[n - 1], "http://deb.debian.org/debian");
        assert!(a.contains(&OsString::from("--include=systemd,linux-image-amd64")));
        assert!(a.iter().any(|x| x
            .to_string_lossy()
            .contains("path-exclude=/usr/share/man/*")));
    }

    #[test]
    fn keeping_docs_drops_the_excludes() {
        let mut d = sample();
        d.keep_docs = true;
        d.keep_man = true;
        d.keep_locales = true;
        let a = mmdebstrap_args(&d, Path::new("/t"), Path::new("/c"));
        assert!(!a
            .iter()
            .any(|x| x.to_string_lossy().contains("path-exclude")));
    }

    #[test]
    fn key_ignores_package_order_but_not_content() {
        let a = sample();
        let mut b = sample();
        b.packages.reverse();
        assert_eq!(base_key(&a, 0), base_key(&b, 0));
        b.packages.push("etcd-server".into());
        assert_ne!(base_key(&a, 0), base_key(&b, 0));
        assert_ne!(base_key(&a, 0), base_key(&a, 1), "epoch is an input");
    }
}
