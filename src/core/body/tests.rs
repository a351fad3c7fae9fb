use super::json::{self, Found, MAX_DEPTH};
use super::*;
use crate::core::identity::fingerprint_of;

pub(super) fn canonical(body: &str) -> Result<String, NotCanonical> {
    json::read(body.as_bytes(), &[], None).map(|read| String::from_utf8(read.canonical).unwrap())
}

pub(super) fn pointers(texts: &[&str]) -> Vec<Pointer> {
    texts.iter().map(|t| Pointer::parse(t).unwrap()).collect()
}

fn without(body: &str, ignore: &[&str]) -> String {
    let read = json::read(body.as_bytes(), &pointers(ignore), None).unwrap();
    String::from_utf8(read.canonical).unwrap()
}

fn key(body: &str, at: &str) -> Option<Found> {
    let at = Pointer::parse(at).unwrap();
    json::read(body.as_bytes(), &[], Some(&at)).unwrap().key
}

fn form(body: &str, ignore: &[&str]) -> Result<String, NotCanonical> {
    form::canonical(body.as_bytes(), &pointers(ignore)).map(|out| String::from_utf8(out).unwrap())
}

#[test]
fn rfc_8785s_example_is_canonicalised_as_the_rfc_shows() {
    let input = r#"{
      "numbers": [333333333.33333329, 1E30, 4.50, 2e-3, 0.000000000000000000000000001],
      "string": "\u20ac$\u000F\u000aA'\u0042\u0022\u005c\\\"\/",
      "literals": [null, true, false]
    }"#;
    assert_eq!(
        canonical(input).unwrap(),
        r#"{"literals":[null,true,false],"numbers":[333333333.3333333,1e+30,4.5,0.002,1e-27],"string":"€$\u000f\nA'B\"\\\\\"/"}"#
    );
}

#[test]
fn members_sort_by_utf16_code_units_as_rfc_8785s_example_does() {
    let input = r#"{"\u20ac":1,"\r":2,"\ufb33":3,"1":4,"\ud83d\ude00":5,"\u0080":6,"\u00f6":7}"#;
    assert_eq!(
        canonical(input).unwrap(),
        "{\"\\r\":2,\"1\":4,\"\u{80}\":6,\"ö\":7,\"€\":1,\"😀\":5,\"\u{fb33}\":3}"
    );
}

#[test]
fn numbers_are_written_as_ecmascript_writes_doubles() {
    for (literal, expected) in [
        ("1.0", "1"),
        ("1e0", "1"),
        ("10E-1", "1"),
        ("-0.0", "0"),
        ("-0", "0"),
        ("1e2", "100"),
        ("1.5e+2", "150"),
        ("1e20", "100000000000000000000"),
        ("1e21", "1e+21"),
        ("1.25e21", "1.25e+21"),
        ("0.000001", "0.000001"),
        ("1e-7", "1e-7"),
        ("1.23e-18", "1.23e-18"),
        ("0.30000000000000004", "0.30000000000000004"),
        ("5e-324", "5e-324"),
        ("1.7976931348623157e308", "1.7976931348623157e+308"),
        ("-12.5", "-12.5"),
        ("123456789.0", "123456789"),
    ] {
        assert_eq!(canonical(literal).unwrap(), expected, "{literal}");
    }
}

#[test]
fn integers_keep_every_digit_where_a_double_would_round_them() {
    assert_eq!(canonical("9007199254740993").unwrap(), "9007199254740993");
    assert_ne!(canonical("9007199254740993"), canonical("9007199254740992"));
    assert_eq!(
        canonical("-123456789012345678901234567890").unwrap(),
        "-123456789012345678901234567890"
    );
}

#[test]
fn numbers_past_a_doubles_range_have_no_canonical_form() {
    assert_eq!(canonical("1e400"), Err(NotCanonical::Invalid));
}

#[test]
fn escapes_and_the_characters_they_stand_for_are_one_string() {
    assert_eq!(canonical(r#""caf\u00e9""#), canonical("\"café\""));
    assert_eq!(canonical(r#""\ud83d\ude00""#), canonical("\"😀\""));
    assert_eq!(canonical(r#""a\/b""#).unwrap(), r#""a/b""#);
    assert_eq!(
        canonical(r#""\u0001\u001f\b""#).unwrap(),
        r#""\u0001\u001f\b""#
    );
    assert_ne!(canonical(r#""a""#), canonical(r#""A""#));
}

#[test]
fn what_is_not_json_has_no_canonical_form() {
    for body in [
        "",
        "{",
        "[1,]",
        "{\"a\":1,}",
        "01",
        "1.",
        ".5",
        "-",
        "+1",
        "NaN",
        "tru",
        "\"\\x\"",
        "\"\u{1}\"",
        "{\"a\" 1}",
        "{1:2}",
        "[1 2]",
        "1 2",
        "\"\\ud800\"",
        "\"\\udc00\"",
        "\"\\ud800\\u0041\"",
        "\u{feff}{}",
        "\"unterminated",
    ] {
        assert_eq!(canonical(body), Err(NotCanonical::Invalid), "{body:?}");
    }
    assert_eq!(
        json::read(b"\"\xff\"", &[], None).map(|_| ()),
        Err(NotCanonical::Invalid)
    );
}

#[test]
fn a_member_named_twice_makes_a_body_ambiguous() {
    for body in [
        r#"{"a":1,"a":2}"#,
        r#"{"b":0,"a":1,"\u0061":1}"#,
        r#"[{"x":{"y":1,"y":1}}]"#,
    ] {
        assert_eq!(canonical(body), Err(NotCanonical::DuplicateName), "{body}");
    }
}

#[test]
fn nesting_is_bounded_whatever_the_body() {
    let at_limit = format!("{}{}", "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
    assert_eq!(canonical(&at_limit).unwrap(), at_limit);
    let over = format!("{}{}", "[".repeat(MAX_DEPTH + 1), "]".repeat(MAX_DEPTH + 1));
    assert_eq!(canonical(&over), Err(NotCanonical::TooDeep));
    // A mebibyte of `[` and of `{"a":`, on a stack smaller than the VM's.
    let deep = std::thread::Builder::new()
        .stack_size(256 << 10)
        .spawn(|| {
            let brackets = vec![b'['; 1 << 20];
            let objects = b"{\"a\":".repeat((1 << 20) / 5);
            [brackets, objects].map(|body| json::read(&body, &[], None).map(|_| ()))
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(
        deep,
        [Err(NotCanonical::TooDeep), Err(NotCanonical::TooDeep)]
    );
}

#[test]
fn a_canonical_form_larger_than_its_bound_is_refused() {
    let numbers = format!("[{}]", vec!["1e20"; 1000].join(","));
    assert_eq!(canonical(&numbers), Err(NotCanonical::TooLarge));
}

#[test]
fn ignored_pointers_leave_members_and_elements_out() {
    let body = r#"{"amount":5,"sent_at":"12:00","meta":{"request_id":"r1","note":"n"},"items":[{"ts":1},{"ts":2}]}"#;
    assert_eq!(
        without(body, &["/sent_at", "/meta/request_id", "/items/0"]),
        r#"{"amount":5,"items":[{"ts":2}],"meta":{"note":"n"}}"#
    );
    assert_eq!(
        without(
            body,
            &["/absent", "/meta/absent/deeper", "/items/9", "/amount/x"]
        ),
        canonical(body).unwrap()
    );
    assert_eq!(
        without(r#"{"a/b":1,"m~n":2,"c":3}"#, &["/a~1b", "/m~0n"]),
        r#"{"c":3}"#
    );
    assert_eq!(
        without(r#"{"0":1,"x":[5]}"#, &["/0", "/x/00"]),
        r#"{"x":[5]}"#
    );
}

#[test]
fn the_key_is_a_strings_characters_or_a_numbers_canonical_text() {
    let body =
        r#"{"id":"evt_\u0031","data":{"object":{"id":12.0}},"list":[{"k":"x"}],"flag":true}"#;
    assert_eq!(key(body, "/id"), Some(Found::Text(b"evt_1".to_vec())));
    assert_eq!(
        key(body, "/data/object/id"),
        Some(Found::Text(b"12".to_vec()))
    );
    assert_eq!(key(body, "/list/0/k"), Some(Found::Text(b"x".to_vec())));
    assert_eq!(key(body, "/flag"), Some(Found::NotText));
    assert_eq!(key(body, "/data"), Some(Found::NotText));
    assert_eq!(key(body, "/missing"), None);
    assert_eq!(key(r#"["a"]"#, "/id"), None);
}

#[test]
fn pointers_are_read_as_rfc_6901_writes_them() {
    assert!(Pointer::parse("a").is_err());
    assert!(Pointer::parse("/a~2").is_err());
    assert!(Pointer::parse("").unwrap().is_root());
    assert_eq!(Pointer::parse("/a~1b").unwrap().single_name(), Some("a/b"));
    assert_eq!(Pointer::parse("/a/b").unwrap().single_name(), None);
}

#[test]
fn forms_sort_by_name_and_decode_one_way() {
    assert_eq!(form("b=2&a=1&b=1", &[]).unwrap(), "a=1&b=2&b=1");
    assert_eq!(form("a=x+y", &[]), form("a=x%20y", &[]));
    assert_eq!(form("a=%7e%2A", &[]), form("a=~*", &[]));
    assert_eq!(form("a=%7e", &[]).unwrap(), "a=%7E");
    assert_eq!(form("a&&b=", &[]).unwrap(), "a=&b=");
    assert_ne!(form("a=1", &[]), form("a=2", &[]));
    assert_eq!(form("%zz=1", &[]), Err(NotCanonical::Invalid));
    assert_eq!(form("a=%+1", &[]), Err(NotCanonical::Invalid));
    assert_eq!(form("a=%4", &[]), Err(NotCanonical::Invalid));
}

#[test]
fn forms_leave_out_ignored_names_and_keep_positional_arrays_in_order() {
    assert_eq!(
        form("sent_at=1&a=2&metadata[r]=3", &["/sent_at", "/metadata[r]"]).unwrap(),
        "a=2"
    );
    assert_eq!(
        form("items[][b]=1&items[][a]=2", &[]).unwrap(),
        "items%5B%5D%5Bb%5D=1&items%5B%5D%5Ba%5D=2"
    );
}

#[test]
fn content_types_say_which_bodies_are_read() {
    for (value, kind) in [
        (Some(&b"application/json"[..]), Kind::Json),
        (Some(b"Application/JSON; charset=utf-8"), Kind::Json),
        (Some(b"application/vnd.api+json"), Kind::Json),
        (Some(b" application/x-www-form-urlencoded "), Kind::Form),
        (Some(b"text/plain"), Kind::Other),
        (Some(b"+json"), Kind::Other),
        (None, Kind::Other),
    ] {
        assert_eq!(Kind::of(value), kind, "{value:?}");
    }
}

fn whole(query: &[u8], kind: Kind, asked: Asked, chunks: &[&[u8]]) -> Whole {
    let mut body = Body::new(query, kind, asked);
    for chunk in chunks {
        body.update(chunk.to_vec());
    }
    body.finish(asked)
}

const BYTES: Asked = Asked {
    fingerprint: Fingerprinting::Bytes,
    ignore: &[],
    key: None,
};
const JSON: Asked = Asked {
    fingerprint: Fingerprinting::Json,
    ignore: &[],
    key: None,
};

#[test]
fn bytes_fingerprint_a_body_as_it_comes_whatever_its_type() {
    for kind in [Kind::Json, Kind::Form, Kind::Other] {
        let read = whole(b"q", kind, BYTES, &[b"{\"a\":", b"1}"]);
        assert_eq!(read.fingerprint, fingerprint_of(b"q", b"{\"a\":1}"));
        assert_eq!((read.as_bytes, read.held), (None, None));
    }
}

#[test]
fn json_fingerprints_a_body_by_its_canonical_form_and_holds_it() {
    let read = whole(b"q", Kind::Json, JSON, &[b"{ \"b\":1,", b" \"a\":2 }"]);
    assert_eq!(read.fingerprint, fingerprint_of(b"q", b"{\"a\":2,\"b\":1}"));
    assert_eq!(read.held.as_deref(), Some(&b"{ \"b\":1, \"a\":2 }"[..]));
    let form = whole(b"", Kind::Form, JSON, &[b"b=1&a=2"]);
    assert_eq!(form.fingerprint, fingerprint_of(b"", b"a=2&b=1"));
}

#[test]
fn json_falls_back_to_the_bytes_of_a_body_it_cannot_read_and_says_why() {
    let other = whole(b"", Kind::Other, JSON, &[b"{\"a\":1}"]);
    assert_eq!(other.as_bytes, Some(NotCanonical::OtherType));
    assert_eq!(other.fingerprint, fingerprint_of(b"", b"{\"a\":1}"));
    let invalid = whole(b"", Kind::Json, JSON, &[b"{\"a\":"]);
    assert_eq!(invalid.as_bytes, Some(NotCanonical::Invalid));
    assert_eq!(invalid.fingerprint, fingerprint_of(b"", b"{\"a\":"));
    for kind in [Kind::Json, Kind::Other] {
        assert_eq!(
            whole(b"", kind, JSON, &[]).as_bytes,
            None,
            "an empty body is no fallback"
        );
    }
}

#[test]
fn a_key_in_the_body_is_read_whatever_the_fingerprint() {
    let at = Pointer::parse("/id").unwrap();
    let asked = Asked {
        key: Some(&at),
        ..BYTES
    };
    let read = whole(b"", Kind::Json, asked, &[b"{\"id\":\"evt_1\", \"x\":1}"]);
    assert_eq!(read.key, Some(Found::Text(b"evt_1".to_vec())));
    assert_eq!(
        read.fingerprint,
        fingerprint_of(b"", b"{\"id\":\"evt_1\", \"x\":1}")
    );
    assert_eq!(
        whole(b"", Kind::Other, asked, &[b"{\"id\":\"evt_1\"}"]).key,
        None
    );
}
