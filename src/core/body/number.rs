//! A JSON number's canonical text: RFC 8785's (the number as an IEEE-754 double, written as
//! ECMAScript writes it), except that an integer written without fraction or exponent is kept
//! digit for digit. JCS would round integers past 2^53, making `9007199254740993` and
//! `9007199254740992` one request; identifiers that large are common, and two requests that
//! differ only in one must never share a record.

/// The canonical text of `literal`, which the parser has checked is JSON number syntax; `None`
/// if it is out of a double's range (JCS has no text for infinity).
pub fn canonical(literal: &str, out: &mut Vec<u8>) -> Option<()> {
    if !literal.bytes().any(|b| matches!(b, b'.' | b'e' | b'E')) {
        // `-0` is 0, as in JCS; any other integer is already as short as it can be.
        let zero = literal == "-0";
        out.extend_from_slice(if zero { b"0" } else { literal.as_bytes() });
        return Some(());
    }
    let value: f64 = literal.parse().ok()?;
    value.is_finite().then(|| write_double(value, out))
}

/// ECMAScript's `Number.prototype.toString` (ECMA-262, 7.1.12.1), which RFC 8785 adopts: the
/// shortest digits that read back as the same double, placed by the exponent's size. Rust's
/// `{:e}` gives those shortest digits.
pub fn write_double(value: f64, out: &mut Vec<u8>) {
    if value == 0.0 {
        out.push(b'0');
        return;
    }
    if value < 0.0 {
        out.push(b'-');
    }
    let scientific = format!("{:e}", value.abs());
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let digits: Vec<u8> = mantissa.bytes().filter(u8::is_ascii_digit).collect();
    let k = digits.len() as i32;
    // The decimal point goes after `n` digits: value = 0.d1d2... x 10^n.
    let n = exponent.parse::<i32>().unwrap_or(0) + 1;
    if k <= n && n <= 21 {
        out.extend_from_slice(&digits);
        out.extend(std::iter::repeat_n(b'0', (n - k) as usize));
    } else if 0 < n && n <= 21 {
        out.extend_from_slice(&digits[..n as usize]);
        out.push(b'.');
        out.extend_from_slice(&digits[n as usize..]);
    } else if -6 < n && n <= 0 {
        out.extend_from_slice(b"0.");
        out.extend(std::iter::repeat_n(b'0', (-n) as usize));
        out.extend_from_slice(&digits);
    } else {
        out.push(digits[0]);
        if k > 1 {
            out.push(b'.');
            out.extend_from_slice(&digits[1..]);
        }
        out.push(b'e');
        out.push(if n - 1 < 0 { b'-' } else { b'+' });
        out.extend_from_slice((n - 1).unsigned_abs().to_string().as_bytes());
    }
}
