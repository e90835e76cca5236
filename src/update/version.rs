//! The one order of Keel versions, used by `keel publish`, `keel-update` and the eligibility
//! policy: dpkg's (deb-version(7)), since versions are written as Debian writes them. Digits
//! compare as numbers, letters before other characters, and `~` before anything, even the end
//! (`1.0~rc1` < `1.0` < `1.0a` < `1.0.1` < `1.0^1` < `1.1`).

use std::cmp::Ordering;

/// The weight of one non-digit character in dpkg's order.
fn weight(c: Option<u8>) -> i32 {
    match c {
        None => 0,
        Some(b'~') => -1,
        Some(c) if c.is_ascii_digit() => 0,
        Some(c) if c.is_ascii_alphabetic() => i32::from(c),
        Some(c) => i32::from(c) + 256,
    }
}

/// Compares two versions in dpkg's order.
/// The same version in dpkg's order (`0.03.0` is `0.3.0`): what "this version failed" and
/// "already published" compare with, so an alias is the same version.
pub fn same(a: &str, b: &str) -> bool {
    compare(a, b) == Ordering::Equal
}

pub fn compare(a: &str, b: &str) -> Ordering {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    let (mut i, mut j) = (0, 0);
    while i < a.len() || j < b.len() {
        // The non-digit run.
        while (i < a.len() && !a[i].is_ascii_digit()) || (j < b.len() && !b[j].is_ascii_digit()) {
            let (ca, cb) = (
                a.get(i).filter(|c| !c.is_ascii_digit()).copied(),
                b.get(j).filter(|c| !c.is_ascii_digit()).copied(),
            );
            let (wa, wb) = (weight(ca), weight(cb));
            if wa != wb {
                return wa.cmp(&wb);
            }
            if ca.is_some() {
                i += 1;
            }
            if cb.is_some() {
                j += 1;
            }
        }
        // The digit run, as a number (leading zeros skipped, then by length, then by digits).
        while i < a.len() && a[i] == b'0' {
            i += 1;
        }
        while j < b.len() && b[j] == b'0' {
            j += 1;
        }
        let (si, sj) = (i, j);
        while i < a.len() && a[i].is_ascii_digit() {
            i += 1;
        }
        while j < b.len() && b[j].is_ascii_digit() {
            j += 1;
        }
        let (na, nb) = (&a[si..i], &b[sj..j]);
        match na.len().cmp(&nb.len()).then_with(|| na.cmp(nb)) {
            Ordering::Equal => {}
            other => return other,
        }
    }
    Ordering::Equal
}

/// Whether `a` is newer than `b`.
pub fn newer(a: &str, b: &str) -> bool {
    compare(a, b) == Ordering::Greater
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dpkg_order() {
        // Each is older than the next (examples of deb-version(7) and dpkg's own tests).
        let ordered = [
            "0.1.0~rc1",
            "0.1.0~rc2",
            "0.1.0",
            "0.1.0a",
            "0.1.0.1",
            "0.1.0^post1",
            "0.1.1",
            "0.1.9",
            "0.1.10",
            "0.2",
            "0.10",
            "1",
            "1.0",
        ];
        for w in ordered.windows(2) {
            assert_eq!(compare(w[0], w[1]), Ordering::Less, "{} < {}", w[0], w[1]);
            assert_eq!(
                compare(w[1], w[0]),
                Ordering::Greater,
                "{} > {}",
                w[1],
                w[0]
            );
        }
        assert_eq!(compare("0.01", "0.1"), Ordering::Equal);
        assert_eq!(compare("0.1.0", "0.1.0"), Ordering::Equal);
        assert!(newer("0.1.0.1", "0.1.0"));
        assert!(!newer("0.1.0~1", "0.1.0"));
    }

    #[test]
    fn long_numbers_do_not_overflow() {
        assert_eq!(
            compare(
                "1.99999999999999999999999999",
                "1.100000000000000000000000000"
            ),
            Ordering::Less
        );
    }
}
