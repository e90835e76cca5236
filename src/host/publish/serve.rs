//! `keel publish serve`: a repository directory over HTTP — GET and HEAD of plain files, single
//! byte ranges (RFC 9110 `Range: bytes=A-B`), nothing else. What a mirror needs and no more: the
//! files are signed, the server is trusted with nothing.

use anyhow::{Context, Result};
use clap::Args;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use tiny_http::{Header, Method, Request, Response, Server, StatusCode};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The repository directory.
    pub dir: PathBuf,
    /// Address and port to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: String,
}

/// The file a request path names below `root`, or None for anything that is not a plain path
/// inside it (`..`, absolute parts, percent-encoded separators).
pub fn resolve(root: &Path, url: &str) -> Option<PathBuf> {
    let path = url.split(['?', '#']).next().unwrap_or("");
    if path.contains('%') || path.contains('\\') {
        return None;
    }
    let mut out = root.to_path_buf();
    for c in Path::new(path.trim_start_matches('/')).components() {
        match c {
            Component::Normal(p) => out.push(p),
            Component::CurDir => {}
            _ => return None,
        }
    }
    Some(out)
}

/// A single `bytes=` range of a file of `len` bytes, as (start, end inclusive).
pub fn parse_range(header: &str, len: u64) -> Option<(u64, u64)> {
    let spec = header.trim().strip_prefix("bytes=")?;
    if spec.contains(',') {
        return None;
    }
    let (a, b) = spec.split_once('-')?;
    let (start, end) = if a.is_empty() {
        let n: u64 = b.parse().ok()?;
        (len.checked_sub(n.min(len))?, len.checked_sub(1)?)
    } else {
        let s: u64 = a.parse().ok()?;
        let e = if b.is_empty() {
            len.checked_sub(1)?
        } else {
            b.parse::<u64>().ok()?.min(len.checked_sub(1)?)
        };
        (s, e)
    };
    (start <= end && end < len).then_some((start, end))
}

fn header(name: &str, value: &str) -> Option<Header> {
    Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(root: &Path, req: Request) -> std::io::Result<()> {
    let status = |code: u16| Response::empty(StatusCode(code));
    if !matches!(req.method(), Method::Get | Method::Head) {
        return req.respond(status(405));
    }
    let Some(path) = resolve(root, req.url()) else {
        return req.respond(status(400));
    };
    let Ok(mut file) = std::fs::File::open(&path) else {
        return req.respond(status(404));
    };
    let len = match file.metadata() {
        Ok(m) if m.is_file() => m.len(),
        _ => return req.respond(status(404)),
    };
    let range = req
        .headers()
        .iter()
        .find(|h| h.field.equiv("Range"))
        .map(|h| h.value.as_str().to_string());
    let head = *req.method() == Method::Head;
    let (code, start, count, extra) = match range {
        Some(r) => match parse_range(&r, len) {
            Some((s, e)) => (
                206,
                s,
                e - s + 1,
                header("Content-Range", &format!("bytes {s}-{e}/{len}")),
            ),
            None => {
                let mut resp = status(416);
                if let Some(h) = header("Content-Range", &format!("bytes */{len}")) {
                    resp.add_header(h);
                }
                return req.respond(resp);
            }
        },
        None => (200, 0, len, None),
    };
    file.seek(SeekFrom::Start(start))?;
    let body: Box<dyn Read + Send> = if head {
        Box::new(std::io::empty())
    } else {
        Box::new(file.take(count))
    };
    let mut headers: Vec<Header> = header("Accept-Ranges", "bytes").into_iter().collect();
    headers.extend(extra);
    let resp = Response::new(StatusCode(code), headers, body, Some(count as usize), None);
    req.respond(resp)
}

pub fn run(a: &ServeArgs) -> Result<()> {
    let root = a
        .dir
        .canonicalize()
        .with_context(|| format!("{}: no such repository directory", a.dir.display()))?;
    let server =
        Server::http(&a.addr).map_err(|e| anyhow::anyhow!("listening on {}: {e}", a.addr))?;
    eprintln!("serving {} on http://{}/", root.display(), a.addr);
    for req in server.incoming_requests() {
        let (method, url) = (req.method().clone(), req.url().to_string());
        if let Err(e) = respond(&root, req) {
            tracing::warn!("{method} {url}: {e}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_stay_inside() {
        let r = Path::new("/srv/repo");
        assert_eq!(
            resolve(r, "/metadata/timestamp.json"),
            Some(PathBuf::from("/srv/repo/metadata/timestamp.json"))
        );
        assert_eq!(resolve(r, "/a/../../etc/passwd"), None);
        assert_eq!(resolve(r, "/..%2f..%2fetc"), None);
        assert_eq!(resolve(r, "/./x?y=1"), Some(PathBuf::from("/srv/repo/x")));
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(parse_range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(parse_range("bytes=95-200", 100), Some((95, 99)));
        assert_eq!(parse_range("bytes=100-", 100), None);
        assert_eq!(parse_range("bytes=5-1", 100), None);
        assert_eq!(parse_range("bytes=0-1,5-6", 100), None);
        assert_eq!(parse_range("items=0-1", 100), None);
        assert_eq!(parse_range("bytes=0-0", 0), None);
    }
}
