//! How a request's body counts toward "the same request", and where its key may be.
//!
//! With `fingerprint: "bytes"` the body's bytes are the fingerprint, hashed as they arrive.
//! With `fingerprint: "json"` a JSON or form body is held until it is whole and fingerprinted
//! by its canonical form, so that a client that re-serialises its retry (another key order,
//! other whitespace or escapes) replays, while values, types and array order still count. A
//! body that has no canonical form (not valid, ambiguous, too deep) is fingerprinted by its
//! bytes: the upstream decides what a bad body is, never the filter.

pub mod form;
pub mod json;
mod number;
pub mod pointer;

#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;

use crate::core::identity::{Fingerprint, Fingerprinter};
pub use json::Found;
pub use pointer::Pointer;

/// A canonical form is at most this many times its body, plus a little: JSON numbers like
/// `1e20` and form bytes sent unencoded grow. A body whose form would be larger is
/// fingerprinted by its bytes.
pub const GROWTH: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fingerprinting {
    Bytes,
    Json,
}

/// What the request's content type says its body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `application/json`, or any `*/*+json`.
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
    Other,
}

impl Kind {
    pub fn of(content_type: Option<&[u8]>) -> Kind {
        let Some(value) = content_type else {
            return Kind::Other;
        };
        let media = value.split(|b| *b == b';').next().unwrap_or_default();
        let media = crate::core::identity::trim_ows(media).to_ascii_lowercase();
        match media.as_slice() {
            b"application/json" => Kind::Json,
            b"application/x-www-form-urlencoded" => Kind::Form,
            m if m.ends_with(b"+json") && m.contains(&b'/') => Kind::Json,
            _ => Kind::Other,
        }
    }
}

/// Why a body that `fingerprint: "json"` reads was fingerprinted by its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotCanonical {
    /// Neither JSON nor a form, by its content type.
    OtherType,
    /// Not valid JSON (or UTF-8), or a form with a bad percent-escape.
    Invalid,
    /// An object names one member twice: parsers disagree on which one counts.
    DuplicateName,
    /// Nested deeper than [`json::MAX_DEPTH`].
    TooDeep,
    /// Its canonical form would be over [`GROWTH`] times the body.
    TooLarge,
}

impl NotCanonical {
    pub fn why(self) -> &'static str {
        match self {
            NotCanonical::OtherType => "its content type is neither JSON nor a form",
            NotCanonical::Invalid => "it is not valid JSON or form encoding",
            NotCanonical::DuplicateName => "an object in it names a member twice",
            NotCanonical::TooDeep => "it nests deeper than 128 levels",
            NotCanonical::TooLarge => "its canonical form would be over 3 times its size",
        }
    }
}

/// What a policy asks of a body.
#[derive(Debug, Clone, Copy)]
pub struct Asked<'p> {
    pub fingerprint: Fingerprinting,
    pub ignore: &'p [Pointer],
    pub key: Option<&'p Pointer>,
}

/// One request's body as it arrives: hashed as it comes, or held until it is whole when it
/// must be read (for its canonical form or its key).
#[derive(Debug)]
pub struct Body {
    fingerprinter: Fingerprinter,
    kind: Kind,
    held: Option<Vec<u8>>,
}

/// A whole body, read.
#[derive(Debug)]
pub struct Whole {
    pub fingerprint: Fingerprint,
    /// What the body holds at the key's pointer, if one is asked and the body is JSON.
    pub key: Option<Found>,
    /// Set when `fingerprint: "json"` fell back to a non-empty body's bytes.
    pub as_bytes: Option<NotCanonical>,
    /// The body, if it was held.
    pub held: Option<Vec<u8>>,
}

impl Body {
    /// A body under `query`, of `kind`, to be read as `asked` says.
    pub fn new(query: &[u8], kind: Kind, asked: Asked) -> Body {
        let json = asked.fingerprint == Fingerprinting::Json;
        let hold = match kind {
            Kind::Json => json || asked.key.is_some(),
            Kind::Form => json,
            Kind::Other => false,
        };
        Body {
            fingerprinter: Fingerprinter::new(query),
            kind,
            held: hold.then(Vec::new),
        }
    }

    /// Whether the body is held in this module (so the caller need not keep its own copy).
    pub fn holds(&self) -> bool {
        self.held.is_some()
    }

    pub fn update(&mut self, chunk: Vec<u8>) {
        match &mut self.held {
            // The first chunk is often the whole body: kept as it is, not copied.
            Some(held) if held.is_empty() => *held = chunk,
            Some(held) => held.extend_from_slice(&chunk),
            None => self.fingerprinter.update(&chunk),
        }
    }

    /// The body is whole: its fingerprint, and its key if `asked` names one.
    pub fn finish(self, asked: Asked) -> Whole {
        let Body {
            mut fingerprinter,
            kind,
            held,
        } = self;
        let json = asked.fingerprint == Fingerprinting::Json;
        let Some(bytes) = held else {
            let empty = fingerprinter.body_len() == 0;
            return Whole {
                as_bytes: (json && !empty).then_some(NotCanonical::OtherType),
                fingerprint: fingerprinter.finish(),
                key: None,
                held: None,
            };
        };
        let (canonical, key) = match kind {
            Kind::Json => match json::read(&bytes, asked.ignore, asked.key) {
                Ok(read) => (Ok(read.canonical), read.key),
                Err(why) => (Err(why), None),
            },
            _ => (form::canonical(&bytes, asked.ignore), None),
        };
        let as_bytes = match (&canonical, json) {
            (Ok(canonical), true) => {
                fingerprinter.update(canonical);
                None
            }
            (Err(why), true) if !bytes.is_empty() => {
                fingerprinter.update(&bytes);
                Some(*why)
            }
            _ => {
                fingerprinter.update(&bytes);
                None
            }
        };
        Whole {
            fingerprint: fingerprinter.finish(),
            key,
            as_bytes,
            held: Some(bytes),
        }
    }
}
