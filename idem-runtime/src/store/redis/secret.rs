//! Keeping the password of a Redis URL out of logs, errors and `Debug`
//! output. Every URL the store shows goes through [`redact_url`]; every
//! driver error goes through [`Secrets::scrub`].

/// Byte range of the password in `scheme://user:password@host…`, if any.
fn password_range(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..end].rfind('@')? + start;
    let colon = url[start..at].find(':')? + start;
    (colon + 1 < at).then_some((colon + 1, at))
}

/// `url` with its password replaced by `***`.
pub(super) fn redact_url(url: &str) -> String {
    match password_range(url) {
        Some((s, e)) => format!("{}***{}", &url[..s], &url[e..]),
        None => url.to_owned(),
    }
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = (b[i] == b'%' && i + 2 < b.len())
            .then(|| std::str::from_utf8(&b[i + 1..i + 3]).ok())
            .flatten()
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match hex {
            Some(v) => {
                out.push(v);
                i += 3;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The passwords of the URLs a store was given (as written and
/// percent-decoded), to cut out of any text before it is shown.
#[derive(Clone, Default)]
pub(super) struct Secrets(Vec<String>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

impl Secrets {
    pub(super) fn of<'a>(urls: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Vec::new();
        for url in urls {
            if let Some((s, e)) = password_range(url) {
                let raw = &url[s..e];
                let decoded = percent_decode(raw);
                if !decoded.is_empty() && decoded != raw {
                    out.push(decoded);
                }
                out.push(raw.to_owned());
            }
        }
        // Longest first, so a password containing another is cut whole.
        out.sort_by_key(|s| std::cmp::Reverse(s.len()));
        out.dedup();
        Secrets(out)
    }

    /// `text` with every password (and any `user:pass@` of a URL in it) cut.
    pub(super) fn scrub(&self, text: &str) -> String {
        let mut out = text.to_owned();
        for secret in &self.0 {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), "***");
            }
        }
        // A URL in a driver message whose password we were not told about.
        if out.contains("://") {
            out = out.split(' ').map(redact_url).collect::<Vec<_>>().join(" ");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password() {
        for (url, want) in [
            ("redis://:pw@h:1", "redis://:***@h:1"),
            ("redis://user:p%40ss@h:1/2", "redis://user:***@h:1/2"),
            ("rediss://u@h", "rediss://u@h"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            ("redis://h/0?x=a:b@c", "redis://h/0?x=a:b@c"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(redact_url(url), want, "{url}");
        }
    }

    #[test]
    fn texts_lose_every_form_of_the_password() {
        let s = Secrets::of(["redis://u:p%40ss%25w0rd@h:1", "redis://h:2"]);
        assert_eq!(
            s.scrub("auth p@ss%w0rd and p%40ss%25w0rd failed"),
            "auth *** and *** failed"
        );
        assert_eq!(
            s.scrub("cannot reach redis://x:other@h:1 now"),
            "cannot reach redis://x:***@h:1 now"
        );
        assert!(!format!("{s:?}").contains("p@ss"));
        // A percent sign at the very end is kept as is.
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("%41"), "A");
    }
}
