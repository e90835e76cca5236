//! The layer unpacker on arbitrary tar bytes: it may refuse, but it must never write outside
//! the root it was given (checked after every input) and never panic.
#![no_main]
use keel::container::oci::Compression;
use keel::container::unpack::{unpack, LayerFile, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(t) = tempfile::tempdir() else { return };
    let root = t.path().join("root");
    let layer = t.path().join("layer.tar");
    if std::fs::create_dir(&root).is_err() || std::fs::write(&layer, data).is_err() {
        return;
    }
    let limits = Limits { max_bytes: 1 << 20, max_entries: 1000 };
    // Two layers of the same bytes: whiteouts and links then act on the first one's content.
    let files = [
        LayerFile { path: &layer, compression: Compression::None },
        LayerFile { path: &layer, compression: Compression::None },
    ];
    let _ = unpack(&root, &files, limits);
    let mut outside: Vec<_> = std::fs::read_dir(t.path())
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    outside.sort();
    assert_eq!(outside, ["layer.tar", "root"], "the unpacker wrote outside its root");
});
