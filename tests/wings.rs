//! The wing check: node code (`src/node/`, the node binaries) never imports host code
//! (`src/host/`), and the shared modules at the top of `src/` import neither wing. It reads every
//! source file as tokens (comments and strings are not paths; macro arguments are), and catches
//! `use` lines, `use` groups, inline `crate::`/`keel::` paths and `super::` chains that climb
//! into a forbidden wing. `tests/fixtures/wings/` holds a tree that breaks the rule on purpose.

#![allow(clippy::expect_used)]

use proc_macro2::{Delimiter, Spacing, TokenStream, TokenTree};
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// The binaries that run on the node; every other binary is a host program.
const NODE_BINARIES: &[&str] = &["keel-agent.rs", "keel-net.rs"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wing {
    Node,
    Host,
    Shared,
}

impl Wing {
    /// Whether code of this wing may import the top-level module `top`. Besides module names,
    /// `top` is one of the ways around a path check: `*` (a glob of the crate root), `as` (the
    /// crate under another name), `include!` and `#[path]` (another file's code compiled here);
    /// only host code may use them.
    fn may_import(self, top: &str) -> bool {
        match (self, top) {
            (Wing::Host, _) => true,
            (_, "*" | "as" | "include!" | "#[path]") => false,
            (Wing::Node, "host") => false,
            (Wing::Shared, "host" | "node") => false,
            _ => true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Violation {
    file: PathBuf,
    line: usize,
    wing: Wing,
    target: String,
}

/// The wing and module path of a source file, from its path relative to `src/`.
fn classify(rel: &Path) -> (Wing, Vec<String>) {
    let parts: Vec<String> = rel
        .iter()
        .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_string())
        .collect();
    if parts.first().map(String::as_str) == Some("bin") {
        let file = rel.file_name().map(|f| f.to_string_lossy().to_string());
        let node = file.is_some_and(|f| NODE_BINARIES.contains(&f.as_str()));
        return (if node { Wing::Node } else { Wing::Host }, vec![]);
    }
    if parts == ["main"] {
        return (Wing::Host, vec![]);
    }
    let mut module = parts;
    if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
        module.pop();
    }
    let wing = match module.first().map(String::as_str) {
        Some("node") => Wing::Node,
        Some("host") => Wing::Host,
        _ => Wing::Shared,
    };
    (wing, module)
}

fn is_path_sep(tokens: &[TokenTree], i: usize) -> bool {
    matches!(
        (tokens.get(i), tokens.get(i + 1)),
        (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
            if a.as_char() == ':' && a.spacing() == Spacing::Joint && b.as_char() == ':'
    )
}

/// An identifier's name, raw identifiers (`r#host`) without their prefix.
fn ident(t: Option<&TokenTree>) -> Option<String> {
    match t {
        Some(TokenTree::Ident(i)) => Some(name(i)),
        _ => None,
    }
}

fn name(i: &proc_macro2::Ident) -> String {
    let s = i.to_string();
    s.strip_prefix("r#").map(str::to_string).unwrap_or(s)
}

fn is_punct(t: Option<&TokenTree>, c: char) -> bool {
    matches!(t, Some(TokenTree::Punct(p)) if p.as_char() == c)
}

/// The first segment of every path in a `use` group (`{a::b, c, d::{e}}` gives a, c, d).
fn group_heads(g: &TokenStream) -> Vec<(String, usize)> {
    let tokens: Vec<TokenTree> = g.clone().into_iter().collect();
    let mut out = Vec::new();
    let mut at_start = true;
    for t in &tokens {
        match t {
            TokenTree::Ident(i) if at_start => {
                out.push((name(i), i.span().start().line));
                at_start = false;
            }
            TokenTree::Punct(p) if p.as_char() == ',' => at_start = true,
            _ => {}
        }
    }
    out
}

/// Scans one token stream; `module` is the module the tokens are in (inline `mod x { }`
/// blocks extend it).
fn scan(stream: TokenStream, module: &[String], found: &mut Vec<(String, usize)>) {
    let tokens: Vec<TokenTree> = stream.into_iter().collect();
    let mut i = 0;
    while i < tokens.len() {
        match &tokens[i] {
            TokenTree::Ident(id) if id == "mod" => {
                if let (Some(name), Some(TokenTree::Group(g))) =
                    (ident(tokens.get(i + 1)), tokens.get(i + 2))
                {
                    if g.delimiter() == Delimiter::Brace {
                        let mut inner = module.to_vec();
                        inner.push(name);
                        scan(g.stream(), &inner, found);
                        i += 3;
                        continue;
                    }
                }
            }
            TokenTree::Ident(id)
                if (id == "crate" || id == "keel")
                    && (ident(tokens.get(i + 1)).as_deref() == Some("as")
                        || (ident(tokens.get(i + 1)).as_deref() == Some("self")
                            && ident(tokens.get(i + 2)).as_deref() == Some("as"))) =>
            {
                // `use crate as k;`, `extern crate self as k;`: the crate under another name.
                found.push(("as".into(), id.span().start().line));
            }
            TokenTree::Ident(id) if id == "include" && is_punct(tokens.get(i + 1), '!') => {
                found.push(("include!".into(), id.span().start().line));
            }
            TokenTree::Punct(p) if p.as_char() == '#' => {
                // `#[path = "..."]` on a module: another file's code compiled here.
                let at = if is_punct(tokens.get(i + 1), '!') {
                    i + 2
                } else {
                    i + 1
                };
                if let Some(TokenTree::Group(g)) = tokens.get(at) {
                    let inner: Vec<TokenTree> = g.stream().into_iter().collect();
                    if g.delimiter() == Delimiter::Bracket
                        && ident(inner.first()).as_deref() == Some("path")
                        && is_punct(inner.get(1), '=')
                    {
                        found.push(("#[path]".into(), p.span().start().line));
                    }
                }
            }
            TokenTree::Ident(id)
                if (id == "crate" || id == "keel") && is_path_sep(&tokens, i + 1) =>
            {
                // The first segment after `crate::`, each head of a `crate::{...}` group, or a
                // glob of the crate root.
                match tokens.get(i + 3) {
                    Some(TokenTree::Ident(next)) => {
                        found.push((name(next), next.span().start().line));
                    }
                    Some(TokenTree::Punct(star)) if star.as_char() == '*' => {
                        found.push(("*".into(), star.span().start().line));
                    }
                    Some(TokenTree::Group(g)) if g.delimiter() == Delimiter::Brace => {
                        found.extend(group_heads(&g.stream()));
                    }
                    _ => {}
                }
                i += 3;
                continue;
            }
            TokenTree::Ident(id) if id == "super" && is_path_sep(&tokens, i + 1) => {
                // Climb one module per `super`, then read the segment that follows.
                let line = id.span().start().line;
                let mut base = module.to_vec();
                let mut j = i;
                while ident(tokens.get(j)).as_deref() == Some("super")
                    && is_path_sep(&tokens, j + 1)
                {
                    base.pop();
                    j += 3;
                }
                if let Some(next) = ident(tokens.get(j)) {
                    let top = base.first().cloned().unwrap_or(next);
                    found.push((top, line));
                }
                i = j;
                continue;
            }
            TokenTree::Group(g) => scan(g.stream(), module, found),
            _ => {}
        }
        i += 1;
    }
}

/// Every import in the tree under `src` that leaves its wing.
fn check_tree(src: &Path) -> (usize, Vec<Violation>) {
    let mut files = 0;
    let mut violations = Vec::new();
    for entry in walk(src) {
        let rel = entry.strip_prefix(src).expect("under src").to_path_buf();
        let (wing, module) = classify(&rel);
        let text = std::fs::read_to_string(&entry).expect("readable source");
        let stream = TokenStream::from_str(&text)
            .unwrap_or_else(|e| panic!("{}: not Rust tokens: {e:?}", entry.display()));
        let mut found = Vec::new();
        scan(stream, &module, &mut found);
        files += 1;
        for (top, line) in found {
            if !wing.may_import(&top) {
                violations.push(Violation {
                    file: rel.clone(),
                    line,
                    wing,
                    target: top,
                });
            }
        }
    }
    (files, violations)
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readable directory") {
            let p = e.expect("directory entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn node_code_never_imports_host_code() {
    let src = manifest_dir().join("src");
    let (files, violations) = check_tree(&src);
    let node_files = walk(&src.join("node")).len();
    let host_files = walk(&src.join("host")).len();
    assert!(
        files > 60 && node_files > 15 && host_files > 30,
        "the check read too few files ({files}, node {node_files}, host {host_files}): has the layout moved?"
    );
    let listed: Vec<String> = violations
        .iter()
        .map(|v| {
            format!(
                "src/{}:{}: {:?} code imports `crate::{}`",
                v.file.display(),
                v.line,
                v.wing,
                v.target
            )
        })
        .collect();
    assert!(
        violations.is_empty(),
        "imports that cross the wings (node code must not use crate::host; shared modules must use neither wing; see docs/architecture.md):\n{}",
        listed.join("\n")
    );
}

/// The lines of a fixture file marked `VIOLATION`.
fn marked(file: &Path) -> Vec<usize> {
    std::fs::read_to_string(file)
        .expect("fixture")
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains("// VIOLATION"))
        .map(|(n, _)| n + 1)
        .collect()
}

#[test]
fn the_check_rejects_the_forbidden_imports_of_its_fixture() {
    let src = manifest_dir().join("tests/fixtures/wings/src");
    let (files, violations) = check_tree(&src);
    assert_eq!(files, 4, "fixture files read");
    for rel in [
        "node/agent/bad.rs",
        "bin/keel-agent.rs",
        "disk/bad.rs",
        "host/fine.rs",
    ] {
        let want = marked(&src.join(rel));
        let mut got: Vec<usize> = violations
            .iter()
            .filter(|v| v.file == Path::new(rel))
            .map(|v| v.line)
            .collect();
        got.dedup();
        assert_eq!(got, want, "{rel}: reported lines vs lines marked VIOLATION");
    }
    assert!(
        violations
            .iter()
            .any(|v| v.wing == Wing::Shared && v.target == "node"),
        "shared code importing node code is caught"
    );
}
