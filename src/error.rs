//! Showing an error with its causes. Keel's errors name what failed and where, never repeating
//! their source in their own message; whoever shows an error to a person shows the whole chain
//! once, as anyhow's `{:#}` does.

/// `error: cause: cause`, each message once.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("reading /x")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn each_message_once() {
        let e = Outer(std::io::Error::from_raw_os_error(2));
        let s = super::chain(&e);
        assert_eq!(s.matches("No such file").count(), 1, "{s}");
        assert!(s.starts_with("reading /x: "), "{s}");
    }
}
