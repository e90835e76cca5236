//! The one way Keel writes a file that must be whole or absent: a temporary file in the same
//! directory, written and fsynced, given its mode, renamed over the target, and the directory
//! fsynced so the rename itself survives a power cut. Used for state on the node (provisioning
//! journal and stamp, keel-net's lease and status, container layouts) and outputs on the host.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A failed atomic write: which file, and which step failed. The target is untouched (an old
/// version, if any, is still there) unless the failure was the final directory sync.
#[derive(Debug, thiserror::Error)]
#[error("writing {path} ({step})")]
pub struct WriteError {
    pub path: PathBuf,
    pub step: &'static str,
    #[source]
    pub source: std::io::Error,
}

/// Writes `contents` to `path` with permission bits `mode`, whole or not at all. The parent
/// directory is created when missing.
pub fn write(path: &Path, contents: &[u8], mode: u32) -> Result<(), WriteError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |step: &'static str| {
        move |source| WriteError {
            path: path.to_path_buf(),
            step,
            source,
        }
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    // Directories made here are synced into their parents, so the new file's path survives a
    // power cut as well as the file.
    let mut missing = Vec::new();
    let mut d = dir;
    while !d.exists() {
        missing.push(d.to_path_buf());
        match d.parent() {
            Some(p) if !p.as_os_str().is_empty() => d = p,
            _ => break,
        }
    }
    std::fs::create_dir_all(dir).map_err(err("creating its directory"))?;
    for m in &missing {
        let parent = match m.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(err("syncing a directory it created"))?;
    }
    let mut tmp = tempfile::Builder::new()
        .prefix(".keel-")
        .suffix(".tmp")
        .tempfile_in(dir)
        .map_err(err("creating a temporary file"))?;
    tmp.write_all(contents).map_err(err("writing"))?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(err("setting its mode"))?;
    tmp.as_file().sync_all().map_err(err("syncing the file"))?;
    tmp.persist(path)
        .map_err(|e| err("renaming into place")(e.error))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(err("syncing its directory"))?;
    Ok(())
}

/// [`write`] of a value as pretty-printed JSON with a final newline.
pub fn write_json<T: serde::Serialize>(
    path: &Path,
    value: &T,
    mode: u32,
) -> Result<(), WriteError> {
    let mut bytes = serde_json::to_vec_pretty(value).map_err(|e| WriteError {
        path: path.to_path_buf(),
        step: "serialising",
        source: std::io::Error::other(e),
    })?;
    bytes.push(b'\n');
    write(path, &bytes, mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_whole_files_with_their_mode_and_leaves_no_temporary() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("sub/state.json");
        write(&p, b"one", 0o600).expect("first write");
        write(&p, b"two", 0o644).expect("second write");
        assert_eq!(std::fs::read(&p).expect("read"), b"two");
        let mode = std::fs::metadata(&p).expect("stat").permissions().mode() & 0o777;
        assert_eq!(mode, 0o644);
        let names: Vec<_> = std::fs::read_dir(d.path().join("sub"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    #[test]
    fn a_failed_write_names_the_file_and_step_and_keeps_the_old_content() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("state");
        write(&p, b"old", 0o644).expect("write");
        // A directory in the way of the rename: the write fails, the old file is kept.
        let blocked = d.path().join("dir");
        std::fs::create_dir(&blocked).expect("mkdir");
        std::fs::write(blocked.join("x"), b"x").expect("fill");
        let e = write(&blocked, b"new", 0o644).expect_err("rename over a directory fails");
        assert_eq!(e.step, "renaming into place");
        assert!(
            e.to_string().contains(&blocked.display().to_string()),
            "{e}"
        );
        assert!(
            !e.to_string().contains("Is a directory"),
            "source not repeated: {e}"
        );
        assert_eq!(std::fs::read(&p).expect("read"), b"old");
    }
}
