//! Reading a document into the structs that declare its fields. serde does the reading; this
//! splits a document among those structs by the names serde knows, and names the field in every
//! error, nested ones as `etcd.timeout`.

use crate::core::Millis;
use serde::de::{self, Deserialize, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};
use std::fmt;

pub type Fields = Map<String, Value>;

#[derive(Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub reason: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: `{}`: {}",
            self.field, self.reason
        )
    }
}

pub(super) fn invalid(field: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError {
        field: field.to_string(),
        reason: reason.into(),
    }
}

pub(super) fn unknown(name: &str) -> ConfigError {
    match name {
        "" => invalid("\"\"", "unknown field (an empty name)"),
        _ => invalid(name, "unknown field"),
    }
}

/// The fields of a JSON document that must be an object; a blank one is `{}`.
pub(super) fn object(json: &[u8]) -> Result<Fields, ConfigError> {
    if json.iter().all(u8::is_ascii_whitespace) {
        return Ok(Fields::new());
    }
    let document: Value =
        serde_json::from_slice(json).map_err(|e| invalid("(document)", e.to_string()))?;
    match document {
        Value::Object(fields) => Ok(fields),
        _ => Err(invalid("(document)", "expected a JSON object")),
    }
}

/// Reads `fields` into `T`, naming the field that is wrong.
pub(super) fn read<T: DeserializeOwned>(fields: Fields) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(Value::Object(fields)).map_err(|error| ConfigError {
        field: error.path().to_string(),
        reason: error.into_inner().to_string(),
    })
}

/// The field names `T` declares, as serde reads them.
pub(super) fn names<'de, T: Deserialize<'de>>() -> &'static [&'static str] {
    let mut asked = Names(&[]);
    // It only ever fails: it asks for the names and reads nothing.
    let _ = T::deserialize(&mut asked);
    asked.0
}

struct Names(&'static [&'static str]);

impl<'de> Deserializer<'de> for &mut Names {
    type Error = de::value::Error;

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        self.0 = fields;
        Err(de::Error::custom("only the names were asked for"))
    }

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

/// Parses "250ms", "30s", "5m", "24h" (and "0s").
pub(super) fn parse_duration(text: &str) -> Result<Millis, String> {
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let scale: Millis = match unit {
        "ms" => 1,
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        _ => {
            return Err(format!(
                "`{text}`: expected a duration like \"500ms\", \"30s\", \"5m\" or \"24h\""
            ))
        }
    };
    digits
        .parse::<Millis>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .filter(|ms| *ms <= 366 * 24 * 3_600_000)
        .ok_or_else(|| format!("`{text}` is not a duration of at most 366 days"))
}

/// A field written as a duration.
pub(super) fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
    parse_duration(&String::deserialize(d)?).map_err(de::Error::custom)
}

/// A field written as a duration that must be longer than 0s.
pub(super) fn positive_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Millis, D::Error> {
    match duration(d)? {
        0 => Err(de::Error::custom("must be longer than 0s")),
        ms => Ok(ms),
    }
}
