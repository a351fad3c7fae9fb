//! What makes two requests "the same": the key's validity, the record's tuple
//! (scope, method, path, key) and the request's fingerprint (query string and body).
//!
//! Only digests leave this module: no raw key and no `Authorization` value is ever stored.
//!
//! The scope and the tuple are SHA-256: they keep organisations and records apart, against
//! anyone. The fingerprint is XXH3-128, a non-cryptographic hash many times faster over a body:
//! it is only ever compared with the fingerprint of a record under the same tuple (the same
//! organisation, method, path and key), so a crafted collision can only make a client's own
//! other request replay that client's own earlier answer.

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::Xxh3;

pub type Digest32 = [u8; 32];
pub type Fingerprint = [u8; 16];

/// Why a key is refused, in words for the problem's `detail`.
#[derive(Debug, PartialEq, Eq)]
pub struct InvalidKey(pub &'static str);

/// Finds the key among the request headers. The header must appear once, with 1 to 255
/// characters of visible ASCII or space once the whitespace around it is trimmed.
pub fn key_of<'a>(
    headers: &'a [(String, Vec<u8>)],
    name: &str,
) -> Result<Option<&'a [u8]>, InvalidKey> {
    let mut values = headers.iter().filter(|(n, _)| n.eq_ignore_ascii_case(name));
    let Some((_, value)) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(InvalidKey("the header appears more than once"));
    }
    validate_key(trim_ows(value)).map(Some)
}

/// Strips the optional whitespace (space, tab) around a header value. HTTP/1.1 parsers do it
/// before the filter sees the value and HTTP/2 does not, so without this one key sent over both
/// would be two records.
pub fn trim_ows(value: &[u8]) -> &[u8] {
    let is_ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !is_ows(b)).unwrap_or(value.len());
    let end = value
        .iter()
        .rposition(|b| !is_ows(b))
        .map_or(start, |at| at + 1);
    &value[start..end]
}

/// The organisation named by the scope header's value, if it names one: a value that is empty
/// or only whitespace (`Authorization:` with no credential) is no organisation, or every such
/// client would share one key space.
pub fn scope_of_header(value: &[u8]) -> Option<Digest32> {
    let value = trim_ows(value);
    (!value.is_empty()).then(|| scope_of(value))
}

pub fn validate_key(value: &[u8]) -> Result<&[u8], InvalidKey> {
    if value.is_empty() {
        return Err(InvalidKey("the key is empty"));
    }
    if value.len() > 255 {
        return Err(InvalidKey("the key is longer than 255 characters"));
    }
    if !value.iter().all(|b| (0x20..=0x7e).contains(b)) {
        return Err(InvalidKey(
            "the key may hold only visible ASCII characters and spaces",
        ));
    }
    Ok(value)
}

/// Splits `:path` into the path that identifies the record and the query that is fingerprinted.
pub fn split_path(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().position(|b| *b == b'?') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => (path, b""),
    }
}

/// Hashes length-prefixed parts, so that no two different part lists share an input.
fn digest_of(parts: &[&[u8]]) -> Digest32 {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hasher.finalize().into()
}

/// The organisation: a digest of the scope header's value.
pub fn scope_of(value: &[u8]) -> Digest32 {
    digest_of(&[b"scope", value])
}

/// A 16-bit tag of the organisation, which the store keeps its share under. Only ever used to
/// count: two organisations with one tag share one share, and never each other's records.
pub fn org_tag(scope: &Digest32) -> u16 {
    u16::from_le_bytes([scope[0], scope[1]])
}

/// The record's identity: (scope, method, path, key).
pub fn tuple_of(scope: &Digest32, method: &str, path: &[u8], key: &[u8]) -> Digest32 {
    digest_of(&[b"tuple", scope, method.as_bytes(), path, key])
}

/// "The same request": query string and body, hashed as the body arrives, each byte once.
#[derive(Clone)]
pub struct Fingerprinter {
    hasher: Box<Xxh3>,
    body_len: u64,
}

impl Fingerprinter {
    pub fn new(query: &[u8]) -> Fingerprinter {
        let mut hasher = Box::new(Xxh3::new());
        hasher.update(b"fingerprint");
        hasher.update(&(query.len() as u64).to_le_bytes());
        hasher.update(query);
        Fingerprinter {
            hasher,
            body_len: 0,
        }
    }

    /// The next bytes of the body.
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.body_len += chunk.len() as u64;
    }

    pub fn body_len(&self) -> u64 {
        self.body_len
    }

    /// The body's length goes last, so that no query and body share an input with another.
    pub fn finish(mut self) -> Fingerprint {
        self.hasher.update(&self.body_len.to_le_bytes());
        self.hasher.digest128().to_le_bytes()
    }
}

impl std::fmt::Debug for Fingerprinter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Fingerprinter({} body bytes)", self.body_len)
    }
}

/// The fingerprint of a whole body at once.
#[cfg(test)]
pub fn fingerprint_of(query: &[u8], body: &[u8]) -> Fingerprint {
    let mut fingerprinter = Fingerprinter::new(query);
    fingerprinter.update(body);
    fingerprinter.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &[u8])]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_vec()))
            .collect()
    }

    #[test]
    fn keys_of_1_to_255_visible_characters_are_valid() {
        assert!(validate_key(b"a").is_ok());
        assert!(validate_key(b"7f9a1c2d-0b1e 4c7f~!").is_ok());
        assert!(validate_key(&[b'k'; 255]).is_ok());
    }

    #[test]
    fn empty_long_control_and_non_ascii_keys_are_invalid() {
        for bad in [
            b"".to_vec(),
            vec![b'k'; 256],
            b"tab\there".to_vec(),
            b"nul\0".to_vec(),
            b"del\x7f".to_vec(),
            "caf\u{e9}".as_bytes().to_vec(),
        ] {
            assert!(matches!(validate_key(&bad), Err(InvalidKey(_))), "{bad:?}");
        }
    }

    #[test]
    fn a_repeated_header_is_invalid_and_an_absent_one_is_none() {
        let twice = headers(&[("idempotency-key", b"a"), ("Idempotency-Key", b"b")]);
        assert!(matches!(
            key_of(&twice, "idempotency-key"),
            Err(InvalidKey(_))
        ));
        let none = headers(&[("content-type", b"text/plain")]);
        assert_eq!(key_of(&none, "idempotency-key"), Ok(None));
        let once = headers(&[("Idempotency-Key", b"abc")]);
        assert_eq!(
            key_of(&once, "idempotency-key"),
            Ok(Some(b"abc".as_slice()))
        );
    }

    #[test]
    fn whitespace_around_a_key_is_not_part_of_it() {
        let padded = headers(&[("idempotency-key", b"  k-1 \t")]);
        assert_eq!(
            key_of(&padded, "idempotency-key"),
            Ok(Some(b"k-1".as_slice()))
        );
        let inner = headers(&[("idempotency-key", b" a b ")]);
        assert_eq!(
            key_of(&inner, "idempotency-key"),
            Ok(Some(b"a b".as_slice()))
        );
        for blank in [b"".as_slice(), b"   ", b"\t \t"] {
            let blank = headers(&[("idempotency-key", blank)]);
            assert!(matches!(
                key_of(&blank, "idempotency-key"),
                Err(InvalidKey(_))
            ));
        }
    }

    #[test]
    fn a_blank_scope_is_no_organisation_and_padding_does_not_change_one() {
        assert_eq!(scope_of_header(b""), None);
        assert_eq!(scope_of_header(b" \t "), None);
        assert_eq!(scope_of_header(b"  Bearer a "), Some(scope_of(b"Bearer a")));
    }

    #[test]
    fn the_query_string_is_not_part_of_the_path() {
        assert_eq!(
            split_path(b"/v1/customers?x=1&y=2"),
            (b"/v1/customers".as_slice(), b"x=1&y=2".as_slice())
        );
        assert_eq!(split_path(b"/v1"), (b"/v1".as_slice(), b"".as_slice()));
    }

    #[test]
    fn each_part_of_the_tuple_separates_records() {
        let org_a = scope_of(b"Bearer a");
        let org_b = scope_of(b"Bearer b");
        let base = tuple_of(&org_a, "POST", b"/v1/customers", b"k");
        assert_ne!(base, tuple_of(&org_b, "POST", b"/v1/customers", b"k"));
        assert_ne!(base, tuple_of(&org_a, "PATCH", b"/v1/customers", b"k"));
        assert_ne!(base, tuple_of(&org_a, "POST", b"/v1/customers/abc", b"k"));
        assert_ne!(base, tuple_of(&org_a, "POST", b"/v1/customers", b"k2"));
        assert_eq!(base, tuple_of(&org_a, "POST", b"/v1/customers", b"k"));
    }

    #[test]
    fn parts_cannot_bleed_into_each_other() {
        let scope = scope_of(b"x");
        assert_ne!(
            tuple_of(&scope, "POST", b"/a", b"bc"),
            tuple_of(&scope, "POST", b"/ab", b"c")
        );
        assert_ne!(fingerprint_of(b"a", b"bc"), fingerprint_of(b"ab", b"c"));
    }

    #[test]
    fn any_garbage_header_value_is_a_key_exactly_when_the_rules_say_so() {
        use crate::core::garbage;
        garbage::run("keys", |g| {
            let value: Vec<u8> = match g.below(2) {
                0 => g.bytes(300),
                _ => {
                    let len = g.below(300);
                    let alphabet = b" \tabcXYZ09-_~\x7f";
                    (0..len)
                        .map(|_| alphabet[g.below(alphabet.len())])
                        .collect()
                }
            };
            let trimmed = trim_ows(&value);
            let valid = !trimmed.is_empty()
                && trimmed.len() <= 255
                && trimmed.iter().all(|b| (0x20..=0x7e).contains(b));
            let headers = vec![("idempotency-key".to_string(), value.clone())];
            assert_eq!(
                key_of(&headers, "idempotency-key").is_ok(),
                valid,
                "{value:?}"
            );
            assert_eq!(scope_of_header(&value).is_some(), !trimmed.is_empty());
        });
    }

    #[test]
    fn a_body_fingerprinted_in_chunks_is_the_body_fingerprinted_at_once() {
        let body: Vec<u8> = (0..70_000u32).map(|n| (n % 251) as u8).collect();
        let mut chunks = Fingerprinter::new(b"x=1");
        for chunk in body.chunks(16_384) {
            chunks.update(chunk);
        }
        assert_eq!(chunks.finish(), fingerprint_of(b"x=1", &body));
    }

    #[test]
    fn fingerprint_covers_query_and_body() {
        let base = fingerprint_of(b"x=1", b"{}");
        assert_ne!(base, fingerprint_of(b"x=2", b"{}"));
        assert_ne!(base, fingerprint_of(b"x=1", b"{ }"));
        assert_eq!(base, fingerprint_of(b"x=1", b"{}"));
    }
}
