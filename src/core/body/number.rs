//! A JSON number's canonical text: RFC 8785's (the number as an IEEE-754 double, written as
//! ECMAScript writes it), except that an integer written without fraction or exponent is kept
//! digit for digit. JCS would round integers past 2^53, making `9007199254740993` and
//! `9007199254740992` one request; identifiers that large are common, and two requests that
//! differ only in one must never share a record.

/// What the parser saw of a number literal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// Digits alone (and a sign).
    Integer,
    /// A fraction, its `.` at this offset, and no exponent.
    Decimal {
        dot: usize,
    },
    Exponent,
}

/// The canonical text of `literal`, which the parser has checked is JSON number syntax of
/// `shape`; `None` if it is out of a double's range (JCS has no text for infinity).
pub fn canonical(literal: &str, shape: Shape, out: &mut Vec<u8>) -> Option<()> {
    match shape {
        // `-0` is 0, as in JCS; any other integer is already as short as it can be.
        Shape::Integer if literal == "-0" => out.push(b'0'),
        Shape::Integer => out.extend_from_slice(literal.as_bytes()),
        Shape::Decimal { dot } if short_decimal(literal, dot, out) => {}
        _ => {
            let value: f64 = literal.parse().ok()?;
            if !value.is_finite() {
                return None;
            }
            write_double(value, out);
        }
    }
    Some(())
}

/// The common case without a double: a decimal with no exponent and at most 15 significant
/// digits is, less its trailing zeros, the shortest text of its double (any such decimal comes
/// back from its double unchanged), and ECMAScript writes it as it is unless it is below 1e-6.
fn short_decimal(literal: &str, dot: usize, out: &mut Vec<u8>) -> bool {
    let bytes = literal.as_bytes();
    let (Some(whole), Some(fraction)) = (bytes.get(..dot), bytes.get(dot + 1..)) else {
        return false;
    };
    let (negative, int) = match whole {
        [b'-', int @ ..] => (true, int),
        int => (false, int),
    };
    let kept = fraction
        .iter()
        .rposition(|b| *b != b'0')
        .map_or(0, |at| at + 1);
    let fraction = &fraction[..kept];
    let zero_int = int == b"0";
    let leading_zeros = fraction.iter().take_while(|b| **b == b'0').count();
    let significant = if zero_int {
        fraction.len() - leading_zeros
    } else {
        int.len() + fraction.len()
    };
    if significant > 15 || (zero_int && leading_zeros >= 6) {
        return false;
    }
    if zero_int && fraction.is_empty() {
        out.push(b'0');
        return true;
    }
    if negative {
        out.push(b'-');
    }
    out.extend_from_slice(int);
    if !fraction.is_empty() {
        out.push(b'.');
        out.extend_from_slice(fraction);
    }
    true
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
