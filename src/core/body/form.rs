//! A form body (`application/x-www-form-urlencoded`, what Stripe-style SDKs send) in canonical
//! form: each name and value decoded and encoded again one way (WHATWG's serialiser: `*-._`
//! and alphanumerics as themselves, space as `+`, every other byte as `%XX`), the parameters
//! the policy ignores left out, and the rest in a stable order by name, so that a name
//! repeated keeps its values' order.
//!
//! Order is kept whole when a name holds `[]`: Rack and PHP build arrays of objects from
//! `items[][a]=1&items[][b]=2&items[][a]=3` by position, so sorting those names would make two
//! different requests one.

use super::pointer::Pointer;
use super::{NotCanonical, GROWTH};

pub fn canonical(body: &[u8], ignore: &[Pointer]) -> Result<Vec<u8>, NotCanonical> {
    let mut pairs = Vec::new();
    for pair in body.split(|b| *b == b'&').filter(|pair| !pair.is_empty()) {
        let (name, value) = match pair.iter().position(|b| *b == b'=') {
            Some(at) => (&pair[..at], &pair[at + 1..]),
            None => (pair, &b""[..]),
        };
        let name = decode(name)?;
        let ignored = ignore
            .iter()
            .any(|p| p.single_name().is_some_and(|n| n.as_bytes() == name));
        if !ignored {
            pairs.push((name, decode(value)?));
        }
    }
    if !pairs
        .iter()
        .any(|(name, _)| name.windows(2).any(|w| w == b"[]"))
    {
        pairs.sort_by(|a, b| a.0.cmp(&b.0));
    }
    let mut out = Vec::with_capacity(body.len());
    for (i, (name, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(b'&');
        }
        encode(name, &mut out);
        out.push(b'=');
        encode(value, &mut out);
    }
    if out.len() > GROWTH * body.len() + 32 {
        return Err(NotCanonical::TooLarge);
    }
    Ok(out)
}

fn decode(raw: &[u8]) -> Result<Vec<u8>, NotCanonical> {
    let mut out = Vec::with_capacity(raw.len());
    let mut at = 0;
    while let Some(b) = raw.get(at) {
        match b {
            b'+' => out.push(b' '),
            b'%' => {
                let digit = |at: usize| {
                    let b = *raw.get(at).ok_or(NotCanonical::Invalid)?;
                    (b as char).to_digit(16).ok_or(NotCanonical::Invalid)
                };
                out.push((digit(at + 1)? << 4 | digit(at + 2)?) as u8);
                at += 2;
            }
            b => out.push(*b),
        }
        at += 1;
    }
    Ok(out)
}

fn encode(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    for b in bytes {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => out.push(*b),
            b' ' => out.push(b'+'),
            b => out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]),
        }
    }
}
