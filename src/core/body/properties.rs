//! Properties of the canonical form: random JSON values, each written many ways, have one
//! form; any change of a value, type or array order gives another; the readers survive garbage.

use super::form;
use super::json;
use super::number;
use super::pointer::Pointer;
use super::tests::{canonical, pointers};
use crate::core::garbage::{self, Garbage};

#[derive(Clone, Debug)]
enum Value {
    Null,
    Bool(bool),
    /// Integers within 2^53, which every spelling reads exactly.
    Int(i64),
    /// Integers past 2^53, written digit for digit.
    Big(String),
    Double(f64),
    Str(String),
    Array(Vec<Value>),
    Object(Vec<(String, Value)>),
}

const CHARS: [char; 14] = [
    'a', 'Z', '0', ' ', '"', '\\', '/', '\u{1}', '\n', 'é', '€', '😀', '\u{fb33}', '\u{e000}',
];

fn text(g: &mut Garbage) -> String {
    (0..g.below(5))
        .map(|_| CHARS[g.below(CHARS.len())])
        .collect()
}

fn double(g: &mut Garbage) -> f64 {
    let mantissa = (g.below(2_000_001) as f64 - 1_000_000.0) / 1000.0;
    let value = mantissa * 10f64.powi(g.below(60) as i32 - 30);
    if value == 0.0 {
        0.5
    } else {
        value
    }
}

fn value(g: &mut Garbage, depth: usize) -> Value {
    match g.below(if depth > 3 { 6 } else { 8 }) {
        0 => Value::Null,
        1 => Value::Bool(g.below(2) == 1),
        2 => Value::Int(g.below(1 << 53) as i64 - (1 << 52)),
        3 => Value::Big(format!(
            "{}{:015}",
            9_007_199_254 + g.below(1 << 30),
            g.below(1 << 40)
        )),
        4 => Value::Double(double(g)),
        5 => Value::Str(text(g)),
        6 => Value::Array((0..g.below(4)).map(|_| value(g, depth + 1)).collect()),
        _ => {
            let mut members: Vec<(String, Value)> = Vec::new();
            for _ in 0..g.below(5) {
                let name = text(g);
                if !members.iter().any(|(n, _)| *n == name) {
                    members.push((name, value(g, depth + 1)));
                }
            }
            Value::Object(members)
        }
    }
}

/// Writes `v` as some serialiser might: `g` picks whitespace, member order, escapes and number
/// spellings; without `g`, one plain way.
fn write(v: &Value, g: &mut Option<&mut Garbage>, out: &mut String) {
    let mut pick = |n: usize| g.as_mut().map_or(0, |g| g.below(n));
    let space = ["", " ", "\n\t ", "\r\n"][pick(4)];
    out.push_str(space);
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(n) => match pick(4) {
            0 => out.push_str(&n.to_string()),
            1 => out.push_str(&format!("{n}.0")),
            2 => out.push_str(&format!("{n}e0")),
            _ => out.push_str(&format!("{n}.000E+0")),
        },
        Value::Big(digits) => out.push_str(digits),
        Value::Double(x) => match pick(5) {
            0 => {
                let mut es = Vec::new();
                number::write_double(*x, &mut es);
                out.push_str(std::str::from_utf8(&es).unwrap());
            }
            1 => out.push_str(&format!("{x:e}")),
            2 => out.push_str(&format!("{x:E}").replace("E", "E+").replace("E+-", "E-")),
            3 => {
                let shown = format!("{x}");
                out.push_str(&shown);
                if !shown.contains('.') {
                    out.push_str(".0");
                }
            }
            _ => {
                let scientific = format!("{x:e}");
                let (mantissa, exponent) = scientific.split_once('e').unwrap();
                let exponent: i32 = exponent.parse().unwrap();
                let zero = if mantissa.contains('.') { "0" } else { ".0" };
                let sign = if exponent < 0 { '-' } else { '+' };
                out.push_str(&format!("{mantissa}{zero}E{sign}{:03}", exponent.abs()));
            }
        },
        Value::Str(s) => {
            out.push('"');
            for c in s.chars() {
                let escape = pick(3);
                match c {
                    '"' => out.push_str(["\\\"", "\\u0022"][escape % 2]),
                    '\\' => out.push_str(["\\\\", "\\u005C"][escape % 2]),
                    '\n' => out.push_str(["\\n", "\\u000a"][escape % 2]),
                    '\u{1}' => out.push_str(["\\u0001", "\\u0001"][escape % 2]),
                    '/' if escape == 1 => out.push_str("\\/"),
                    c if escape == 2 => {
                        let mut units = [0; 2];
                        for unit in c.encode_utf16(&mut units) {
                            out.push_str(&format!("\\u{unit:04X}"));
                        }
                    }
                    c => out.push(c),
                }
            }
            out.push('"');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, g, out);
            }
            out.push(']');
        }
        Value::Object(members) => {
            let mut order: Vec<usize> = (0..members.len()).collect();
            if let Some(g) = g.as_mut() {
                for i in (1..order.len()).rev() {
                    order.swap(i, g.below(i + 1));
                }
            }
            out.push('{');
            for (i, at) in order.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(&Value::Str(members[at].0.clone()), g, out);
                out.push(':');
                write(&members[at].1, g, out);
            }
            out.push('}');
        }
    }
    let mut pick = |n: usize| g.as_mut().map_or(0, |g| g.below(n));
    out.push_str(["", " ", "\n"][pick(3)]);
}

fn plain(v: &Value) -> String {
    let mut out = String::new();
    write(v, &mut None, &mut out);
    out
}

/// `v` with one value, type or array order changed; `None` if it has nothing to change.
fn changed(v: &Value, g: &mut Garbage) -> Option<Value> {
    Some(match v {
        Value::Null => Value::Bool(false),
        Value::Bool(b) => Value::Bool(!b),
        Value::Int(n) if g.below(2) == 0 => Value::Str(n.to_string()),
        Value::Int(n) => Value::Int(n + 1),
        Value::Big(digits) => Value::Big(format!("{digits}7")),
        Value::Double(x) if x + 1.0 != *x => Value::Double(x + 1.0),
        Value::Double(x) => Value::Double(x * 2.0),
        Value::Str(s) => Value::Str(format!("{s}a")),
        Value::Array(items) if items.is_empty() => Value::Array(vec![Value::Null]),
        Value::Array(items) => {
            let mut items = items.clone();
            let (i, j) = (g.below(items.len()), g.below(items.len()));
            if i != j && plain(&items[i]) != plain(&items[j]) && g.below(2) == 0 {
                items.swap(i, j);
            } else {
                items[i] = changed(&items[i], g)?;
            }
            Value::Array(items)
        }
        Value::Object(members) if members.is_empty() => return None,
        Value::Object(members) => {
            let mut members = members.clone();
            let at = g.below(members.len());
            members[at].1 = changed(&members[at].1, g)?;
            Value::Object(members)
        }
    })
}

#[test]
fn every_serialisation_of_a_value_has_one_canonical_form() {
    garbage::run(
        "every_serialisation_of_a_value_has_one_canonical_form",
        |g| {
            let v = value(g, 0);
            let expected = canonical(&plain(&v)).unwrap();
            assert_eq!(
                canonical(&expected).unwrap(),
                expected,
                "canonical forms are fixed points"
            );
            for _ in 0..4 {
                let mut written = String::new();
                write(&v, &mut Some(&mut *g), &mut written);
                assert_eq!(canonical(&written), Ok(expected.clone()), "{written}");
            }
        },
    );
}

#[test]
fn any_change_of_a_value_type_or_array_order_changes_the_canonical_form() {
    garbage::run("any_change_of_a_value_type_or_array_order", |g| {
        let v = value(g, 0);
        if let Some(other) = changed(&v, g) {
            assert_ne!(
                canonical(&plain(&v)),
                canonical(&plain(&other)),
                "{v:?} / {other:?}"
            );
        }
    });
}

#[test]
fn the_readers_survive_garbage() {
    let sample = br#"{"id":"evt_1","a":[1,2.5e3,{"b":null}],"s":"\u00e9\ud83d\ude00","t":true}"#;
    let ignore = pointers(&["/a/2/b", "/s"]);
    let at = Pointer::parse("/id").unwrap();
    garbage::run("the_readers_survive_garbage", |g| {
        let body = match g.below(3) {
            0 => g.bytes(256),
            1 => g.mutate(sample),
            _ => g.mutate(b"a=1&b=%20x+y&c[]=3"),
        };
        if let Ok(read) = json::read(&body, &ignore, Some(&at)) {
            let again = json::read(&read.canonical, &[], None).unwrap();
            assert_eq!(again.canonical, read.canonical);
        }
        if let Ok(out) = form::canonical(&body, &ignore) {
            assert_eq!(form::canonical(&out, &[]).unwrap(), out);
        }
    });
}

#[test]
fn short_decimals_are_written_as_their_doubles_are() {
    garbage::run("short_decimals_are_written_as_their_doubles_are", |g| {
        let digits = |g: &mut Garbage, n: usize| -> String {
            (0..n)
                .map(|_| char::from(b'0' + g.below(10) as u8))
                .collect()
        };
        let int = match g.below(3) {
            0 => "0".to_string(),
            _ => {
                let (lead, more) = (1 + g.below(9), g.below(12));
                format!("{lead}{}", digits(g, more))
            }
        };
        let sign = if g.below(2) == 0 { "" } else { "-" };
        let places = 1 + g.below(20);
        let literal = format!("{sign}{int}.{}", digits(g, places));
        let (mut fast, mut slow) = (Vec::new(), Vec::new());
        let dot = literal.find('.').unwrap();
        number::canonical(&literal, number::Shape::Decimal { dot }, &mut fast).unwrap();
        number::write_double(literal.parse().unwrap(), &mut slow);
        assert_eq!(fast, slow, "{literal}");
    });
}
