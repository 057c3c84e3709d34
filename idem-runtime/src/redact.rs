//! Keeping secrets out of logs: connection URLs carry passwords
//! (`redis://:secret@host`, `postgres://user:secret@host/db`,
//! `amqp://guest:guest@host`), and driver errors sometimes repeat them.
//! Every store and source prints URLs and driver errors through these.

use std::fmt;

/// Displays a URL with its password replaced by `***`.
///
/// ```
/// use idem_runtime::redact::RedactedUrl;
/// let url = "redis://user:s3cret@127.0.0.1:6379/0";
/// assert_eq!(RedactedUrl(url).to_string(), "redis://user:***@127.0.0.1:6379/0");
/// assert_eq!(RedactedUrl("nats://127.0.0.1:4222").to_string(), "nats://127.0.0.1:4222");
/// ```
#[derive(Clone, Copy)]
pub struct RedactedUrl<'a>(pub &'a str);

impl fmt::Display for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match password_range(self.0) {
            Some((start, end)) => {
                write!(f, "{}***{}", &self.0[..start], &self.0[end..])
            }
            None => f.write_str(self.0),
        }
    }
}

impl fmt::Debug for RedactedUrl<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// `text` (a driver's error message, say) with every occurrence of `url`'s
/// password, raw and percent-decoded, replaced by `***`, and the password
/// of any other URL in it too.
///
/// ```
/// use idem_runtime::redact::redact_text;
/// let url = "postgres://app:hunter2@db/orders";
/// assert_eq!(
///     redact_text("auth failed for app:hunter2", url),
///     "auth failed for app:***"
/// );
/// ```
pub fn redact_text(text: &str, url: &str) -> String {
    Secrets::of([url]).scrub(text)
}

/// `url` with its password replaced by `***` (see [`RedactedUrl`]).
pub fn redact_url(url: &str) -> String {
    RedactedUrl(url).to_string()
}

/// The passwords of the URLs a store or source was given (as written and
/// percent-decoded), to cut out of any text before it is shown. Its `Debug`
/// shows only how many there are.
///
/// ```
/// use idem_runtime::redact::Secrets;
/// let s = Secrets::of(["redis://u:p%40ss@h:1", "redis://h:2"]);
/// assert_eq!(s.scrub("auth p@ss and p%40ss failed"), "auth *** and *** failed");
/// assert_eq!(s.scrub("at redis://x:other@h:1"), "at redis://x:***@h:1");
/// ```
#[derive(Clone, Default)]
pub struct Secrets(Vec<String>);

impl fmt::Debug for Secrets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Secrets({} redacted)", self.0.len())
    }
}

impl Secrets {
    /// The passwords of `urls`.
    pub fn of<'a>(urls: impl IntoIterator<Item = &'a str>) -> Self {
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

    /// `text` with every known password, and the password of any URL in
    /// it, replaced by `***`.
    pub fn scrub(&self, text: &str) -> String {
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

/// Byte range of the password in `scheme://user:password@host…`, if any.
fn password_range(url: &str) -> Option<(usize, usize)> {
    let after_scheme = url.find("://")? + 3;
    let authority_end = url[after_scheme..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| after_scheme + i);
    let at = url[after_scheme..authority_end].rfind('@')? + after_scheme;
    let colon = url[after_scheme..at].find(':')? + after_scheme;
    (colon + 1 < at).then_some((colon + 1, at))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = std::str::from_utf8(&bytes[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_hidden() {
        for (url, want) in [
            ("redis://:pw@h:1", "redis://:***@h:1"),
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("postgres://u:p%40ss@h/db?x=@", "postgres://u:***@h/db?x=@"),
            ("postgres://u@h/db", "postgres://u@h/db"),
            ("not a url", "not a url"),
        ] {
            assert_eq!(RedactedUrl(url).to_string(), want, "{url}");
        }
        assert_eq!(
            redact_text("x p@ss y p%40ss", "postgres://u:p%40ss@h/db"),
            "x *** y ***"
        );
        // A percent sign at the very end is kept as is.
        assert_eq!(percent_decode("a%"), "a%");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(percent_decode("%41"), "A");
        assert!(!format!("{:?}", Secrets::of(["redis://:p@h"])).contains('p'));
    }
}
