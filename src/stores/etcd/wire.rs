//! etcd's v3 JSON gateway on the wire: the bodies the store sends, and what it reads from the
//! answers. Keys and values travel base64-encoded, int64 fields as strings.

use crate::core::Millis;
use serde_json::{json, Value};

pub const GRANT: &str = "/v3/lease/grant";
pub const RANGE: &str = "/v3/kv/range";
pub const TXN: &str = "/v3/kv/txn";

/// The records' keys live under this, after `key_prefix`: a filter with another record format
/// never meets the records of this one (as the table's format is in its keys too).
pub const RECORD_FORMAT: &str = "r2/";

/// A record's key as the gateway carries it: `prefix`, the format and the tuple in hex,
/// base64-encoded.
pub fn key(prefix: &str, tuple: &[u8; 32]) -> String {
    let mut key = format!("{prefix}{RECORD_FORMAT}");
    for byte in tuple {
        key.push_str(&format!("{byte:02x}"));
    }
    b64(key.as_bytes())
}

/// A lease of `length`, in whole seconds.
pub fn grant(length: Millis) -> Value {
    json!({ "TTL": length.div_ceil(1000) })
}

pub fn range(key: &str) -> Value {
    json!({ "key": key })
}

/// Puts `value` at `key` if the key is absent (or, with `takeover`, if its `mod_revision` is
/// still that one), else reads the key back in the same round trip.
pub fn claim(key: &str, value: &[u8], lease: Option<i64>, takeover: Option<u64>) -> Value {
    let compare = match takeover {
        None => json!({"key": key, "result": "EQUAL", "target": "CREATE", "create_revision": "0"}),
        Some(revision) => {
            json!({"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision.to_string()})
        }
    };
    json!({
        "compare": [compare],
        "success": [put(key, value, lease)],
        "failure": [{"request_range": {"key": key}}],
    })
}

/// Puts `value` at `key` (deletes the key for `None`) if its `mod_revision` is still `revision`,
/// else reads the key back.
pub fn finish(key: &str, revision: u64, value: Option<&[u8]>, lease: Option<i64>) -> Value {
    let compare = json!({"key": key, "result": "EQUAL", "target": "MOD", "mod_revision": revision.to_string()});
    let success = match value {
        Some(value) => put(key, value, lease),
        None => json!({"request_delete_range": {"key": key}}),
    };
    json!({
        "compare": [compare],
        "success": [success],
        "failure": [{"request_range": {"key": key}}],
    })
}

/// Deletes `key` if it holds exactly `value`, else reads whether it exists.
pub fn revoke(key: &str, value: &[u8]) -> Value {
    json!({
        "compare": [{"key": key, "result": "EQUAL", "target": "VALUE", "value": b64(value)}],
        "success": [{"request_delete_range": {"key": key}}],
        "failure": [{"request_range": {"key": key, "keys_only": true}}],
    })
}

fn put(key: &str, value: &[u8], lease: Option<i64>) -> Value {
    let mut put = json!({"key": key, "value": b64(value)});
    if let Some(lease) = lease {
        put["lease"] = json!(lease.to_string());
    }
    json!({ "request_put": put })
}

/// A failed transaction has no `succeeded` member at all.
pub fn succeeded(answer: &Value) -> bool {
    answer.get("succeeded").and_then(Value::as_bool) == Some(true)
}

/// Whether a failed transaction's read found its key.
pub fn key_found(answer: &Value) -> bool {
    answer
        .pointer("/responses/0/response_range/kvs/0")
        .is_some()
}

/// The read a failed claim's transaction made.
pub fn failed_read(answer: &Value) -> Value {
    answer
        .pointer("/responses/0/response_range")
        .cloned()
        .unwrap_or(Value::Null)
}

pub fn revision_of(answer: &Value) -> Option<u64> {
    answer.pointer("/header/revision").and_then(int64)
}

pub fn lease_of(answer: &Value) -> Option<i64> {
    answer.get("ID").and_then(int64).map(|id| id as i64)
}

/// A read's first key: its value and `mod_revision`.
pub fn first_kv(range: &Value) -> Option<(Vec<u8>, u64)> {
    let kv = range.pointer("/kvs/0")?;
    let value = unb64(kv.get("value").and_then(Value::as_str).unwrap_or(""))?;
    let revision = kv.get("mod_revision").and_then(int64)?;
    Some((value, revision))
}

/// etcd's int64 fields travel as strings (they exceed 2^53).
fn int64(value: &Value) -> Option<u64> {
    match value {
        Value::String(text) => text.parse().ok(),
        Value::Number(number) => number.as_u64(),
        _ => None,
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

pub fn b64(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(B64[(n >> (18 - 6 * i) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

pub fn unb64(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut n = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = B64.iter().position(|b| *b == c)? as u32;
        n = n << 6 | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((n >> bits & 0xff) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_round_trips() {
        for len in 0..40 {
            let bytes: Vec<u8> = (0..len as u8).map(|b| b.wrapping_mul(37)).collect();
            assert_eq!(unb64(&b64(&bytes)).unwrap(), bytes);
        }
        assert_eq!(b64(b"foob"), "Zm9vYg==");
        assert_eq!(b64(b"fooba"), "Zm9vYmE=");
        assert_eq!(b64(b"foobar"), "Zm9vYmFy");
    }
}
