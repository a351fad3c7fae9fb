//! A JSON body read once: its canonical form (RFC 8785, numbers as [`super::number`] says),
//! with the members and elements the policy ignores left out, and the value at the key's
//! pointer.
//!
//! The parser writes the canonical form as it goes and reorders an object's members when the
//! object closes, through one scratch copy of them: the output, that copy and the open objects'
//! member lists are all it holds. Nesting is bounded, so no body can exhaust the VM's stack,
//! and the output is bounded by the body's size, so no body can exhaust its memory.

use super::number;
use super::pointer::{Pointer, Reach, Step};
use super::{NotCanonical, GROWTH};
use std::borrow::Cow;
use std::cmp::Ordering;

/// Containers nested deeper than this are not read (serde_json's own limit).
pub const MAX_DEPTH: usize = 128;

/// At most this many pointers in `fingerprint_ignore`: each is one bit of a mask.
pub const MAX_IGNORED: usize = 64;

/// The value the key's pointer names.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A string's characters, or a number's canonical text.
    Text(Vec<u8>),
    /// An object, array, boolean or null: no key.
    NotText,
}

/// A body's canonical form, and the value at the key's pointer if one was asked and is there.
#[derive(Debug)]
pub struct Read {
    pub canonical: Vec<u8>,
    pub key: Option<Found>,
}

/// Reads `body`, leaving out what `ignore` points at and picking out what `key` points at.
pub fn read(body: &[u8], ignore: &[Pointer], key: Option<&Pointer>) -> Result<Read, NotCanonical> {
    let Ok(text) = std::str::from_utf8(body) else {
        return Err(NotCanonical::Invalid);
    };
    if ignore.len() > MAX_IGNORED {
        return Err(NotCanonical::Invalid);
    }
    let mut parser = Parser {
        text,
        input: body,
        at: 0,
        out: Vec::with_capacity(body.len()),
        limit: GROWTH * body.len() + 32,
        ignore,
        key,
        found: None,
        members: Vec::new(),
        scratch: Vec::new(),
    };
    let all = match ignore.len() {
        MAX_IGNORED => u64::MAX,
        n => (1 << n) - 1,
    };
    let root = Track {
        ignore: all,
        key: key.is_some(),
    };
    parser.value(0, root)?;
    parser.skip_whitespace();
    if parser.at != body.len() {
        return Err(NotCanonical::Invalid);
    }
    Ok(Read {
        canonical: parser.out,
        key: parser.found,
    })
}

/// Which pointers still reach below the value being read: a bit per ignored pointer, and the
/// key's.
#[derive(Clone, Copy, Default)]
struct Track {
    ignore: u64,
    key: bool,
}

/// What becomes of one member or element: what reaches below it, and whether it is left out
/// or is the key.
#[derive(Default)]
struct Fate {
    below: Track,
    ignored: bool,
    is_key: bool,
}

/// An object member already written: its bytes in the output, its name's among them.
struct Member {
    start: usize,
    name_end: usize,
    end: usize,
    /// Its name orders by its bytes ([`prefix_of`]): then this holds their first eight,
    /// big-endian and padded with zeros (which a plain name never holds), so that most names
    /// order by one comparison.
    prefix: Option<u64>,
}

struct Parser<'a> {
    /// The body, known to be UTF-8, and its bytes.
    text: &'a str,
    input: &'a [u8],
    at: usize,
    out: Vec<u8>,
    limit: usize,
    ignore: &'a [Pointer],
    key: Option<&'a Pointer>,
    found: Option<Found>,
    /// The members of every object being read, innermost last.
    members: Vec<Member>,
    /// Where an object's members wait while they are written back in order.
    scratch: Vec<u8>,
}

// The small steps of every value are inlined: in V8, a call for each cost a third of the time.
impl Parser<'_> {
    #[inline(always)]
    fn skip_whitespace(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.input.get(self.at) {
            self.at += 1;
        }
    }

    #[inline(always)]
    fn peek(&mut self) -> Option<u8> {
        self.skip_whitespace();
        self.input.get(self.at).copied()
    }

    #[inline(always)]
    fn expect(&mut self, byte: u8) -> Result<(), NotCanonical> {
        if self.peek() != Some(byte) {
            return Err(NotCanonical::Invalid);
        }
        self.at += 1;
        Ok(())
    }

    fn value(&mut self, depth: usize, track: Track) -> Result<(), NotCanonical> {
        match self.peek() {
            Some(b'{') => self.object(depth, track)?,
            Some(b'[') => self.array(depth, track)?,
            Some(b'"') => self.string()?,
            Some(b't') => self.literal(b"true")?,
            Some(b'f') => self.literal(b"false")?,
            Some(b'n') => self.literal(b"null")?,
            Some(b'-' | b'0'..=b'9') => self.number()?,
            _ => return Err(NotCanonical::Invalid),
        }
        if self.out.len() > self.limit {
            return Err(NotCanonical::TooLarge);
        }
        Ok(())
    }

    /// What the pointers make of `step`, taken from a value at `depth` that `track` reaches.
    #[inline(always)]
    fn fate(&self, depth: usize, track: Track, step: Step) -> Fate {
        let mut fate = Fate::default();
        let mut bits = track.ignore;
        while bits != 0 {
            let i = bits.trailing_zeros() as usize;
            bits &= bits - 1;
            match self.ignore.get(i).map(|p| p.reach(depth, step)) {
                Some(Reach::Here) => fate.ignored = true,
                Some(Reach::Below) => fate.below.ignore |= 1 << i,
                _ => {}
            }
        }
        if track.key {
            match self.key.map(|p| p.reach(depth, step)) {
                Some(Reach::Here) => fate.is_key = true,
                Some(Reach::Below) => fate.below.key = true,
                _ => {}
            }
        }
        fate
    }

    /// Reads one member or element at `fate`: written, picked as the key, or left out. Returns
    /// whether it stays.
    #[inline(always)]
    fn entry(&mut self, depth: usize, fate: Fate, mark: usize) -> Result<bool, NotCanonical> {
        let start = self.out.len();
        self.value(depth + 1, fate.below)?;
        if fate.is_key {
            self.found = Some(found_in(&self.out[start..]));
        }
        if fate.ignored {
            self.out.truncate(mark);
        }
        Ok(!fate.ignored)
    }

    fn object(&mut self, depth: usize, track: Track) -> Result<(), NotCanonical> {
        if depth >= MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.at += 1;
        self.out.push(b'{');
        let (open, base) = (self.out.len(), self.members.len());
        if self.peek() == Some(b'}') {
            self.at += 1;
            self.out.push(b'}');
            return Ok(());
        }
        loop {
            let mark = self.out.len();
            if self.members.len() > base {
                self.out.push(b',');
            }
            let start = self.out.len();
            if self.peek() != Some(b'"') {
                return Err(NotCanonical::Invalid);
            }
            self.string()?;
            let name_end = self.out.len();
            self.expect(b':')?;
            self.out.push(b':');
            let fate = if track.ignore != 0 || track.key {
                let name = unescape(&self.out[start + 1..name_end - 1]).into_owned();
                self.fate(depth, track, Step::Member(&name))
            } else {
                Fate::default()
            };
            if self.entry(depth, fate, mark)? {
                let end = self.out.len();
                let prefix = prefix_of(&self.out[start + 1..name_end - 1]);
                self.members.push(Member {
                    start,
                    name_end,
                    end,
                    prefix,
                });
            }
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b'}') => break,
                _ => return Err(NotCanonical::Invalid),
            }
        }
        self.at += 1;
        let sorted = self.sort_members(open, base);
        self.members.truncate(base);
        sorted?;
        self.out.push(b'}');
        Ok(())
    }

    /// Puts the members written since `open` in canonical order: by name, compared as UTF-16
    /// code units. Two members of one name make the body ambiguous (parsers disagree on which
    /// wins), so it has no canonical form.
    fn sort_members(&mut self, open: usize, base: usize) -> Result<(), NotCanonical> {
        let members = &mut self.members[base..];
        // Plain names with distinct prefixes order by their prefixes alone, and cannot repeat.
        let by_prefix = |members: &[Member]| {
            members
                .windows(2)
                .all(|pair| match (pair[0].prefix, pair[1].prefix) {
                    (Some(p), Some(q)) => p < q,
                    _ => false,
                })
        };
        if by_prefix(members) {
            return Ok(());
        }
        members.sort_unstable_by_key(|member| member.prefix);
        if !by_prefix(members) {
            let out = &self.out;
            let name = |m: &Member| &out[m.start + 1..m.name_end - 1];
            let order = |a: &Member, b: &Member| match (a.prefix, b.prefix) {
                (Some(_), Some(_)) => name(a).cmp(name(b)),
                _ => utf16_order(name(a), name(b)),
            };
            // Two equal names are refused below, so a stable sort would change nothing.
            members.sort_unstable_by(order);
            if members
                .windows(2)
                .any(|pair| order(&pair[0], &pair[1]) == Ordering::Equal)
            {
                return Err(NotCanonical::DuplicateName);
            }
        }
        self.scratch.clear();
        for (i, member) in members.iter().enumerate() {
            if i > 0 {
                self.scratch.push(b',');
            }
            self.scratch
                .extend_from_slice(&self.out[member.start..member.end]);
        }
        // The members and the commas between them: as many bytes as they were written in.
        match self.out.get_mut(open..) {
            Some(written) if written.len() == self.scratch.len() => {
                written.copy_from_slice(&self.scratch);
                Ok(())
            }
            _ => Err(NotCanonical::Invalid),
        }
    }

    fn array(&mut self, depth: usize, track: Track) -> Result<(), NotCanonical> {
        if depth >= MAX_DEPTH {
            return Err(NotCanonical::TooDeep);
        }
        self.at += 1;
        self.out.push(b'[');
        if self.peek() == Some(b']') {
            self.at += 1;
            self.out.push(b']');
            return Ok(());
        }
        let mut kept = 0;
        for index in 0.. {
            let mark = self.out.len();
            if kept > 0 {
                self.out.push(b',');
            }
            let fate = if track.ignore != 0 || track.key {
                self.fate(depth, track, Step::Element(index))
            } else {
                Fate::default()
            };
            if self.entry(depth, fate, mark)? {
                kept += 1;
            }
            match self.peek() {
                Some(b',') => self.at += 1,
                Some(b']') => break,
                _ => return Err(NotCanonical::Invalid),
            }
        }
        self.at += 1;
        self.out.push(b']');
        Ok(())
    }

    #[inline(always)]
    fn literal(&mut self, word: &[u8]) -> Result<(), NotCanonical> {
        if !self.input[self.at..].starts_with(word) {
            return Err(NotCanonical::Invalid);
        }
        self.at += word.len();
        self.out.extend_from_slice(word);
        Ok(())
    }

    #[inline(always)]
    fn number(&mut self) -> Result<(), NotCanonical> {
        let start = self.at;
        let digits = |parser: &mut Self| {
            let rest = &parser.input[parser.at..];
            let n = rest
                .iter()
                .position(|b| !b.is_ascii_digit())
                .unwrap_or(rest.len());
            parser.at += n;
            n
        };
        if self.input.get(self.at) == Some(&b'-') {
            self.at += 1;
        }
        let leading_zero = self.input.get(self.at) == Some(&b'0');
        match digits(self) {
            0 => return Err(NotCanonical::Invalid),
            n if n > 1 && leading_zero => return Err(NotCanonical::Invalid),
            _ => {}
        }
        let mut shape = number::Shape::Integer;
        if self.input.get(self.at) == Some(&b'.') {
            shape = number::Shape::Decimal {
                dot: self.at - start,
            };
            self.at += 1;
            if digits(self) == 0 {
                return Err(NotCanonical::Invalid);
            }
        }
        if let Some(b'e' | b'E') = self.input.get(self.at) {
            shape = number::Shape::Exponent;
            self.at += 1;
            if let Some(b'+' | b'-') = self.input.get(self.at) {
                self.at += 1;
            }
            if digits(self) == 0 {
                return Err(NotCanonical::Invalid);
            }
        }
        let literal = self.text.get(start..self.at).ok_or(NotCanonical::Invalid)?;
        number::canonical(literal, shape, &mut self.out).ok_or(NotCanonical::Invalid)
    }

    /// A string, written in JCS's escaping: `\"`, `\\`, the short escapes for controls that
    /// have one, `\u00xx` for the other controls, every other character as itself. The body is
    /// known to be UTF-8, so runs of plain bytes are copied whole.
    fn string(&mut self) -> Result<(), NotCanonical> {
        let open = self.at;
        self.at += 1;
        let rest = &self.input[self.at..];
        let run = rest
            .iter()
            .position(|b| SPECIAL_IN_STRINGS[usize::from(*b)])
            .unwrap_or(rest.len());
        if rest.get(run) == Some(&b'"') {
            // Most strings have nothing to rewrite: quotes and all, copied at once.
            self.at += run + 1;
            self.out.extend_from_slice(&self.input[open..self.at]);
            return Ok(());
        }
        self.out.push(b'"');
        loop {
            let rest = &self.input[self.at..];
            let run = rest
                .iter()
                .position(|b| SPECIAL_IN_STRINGS[usize::from(*b)])
                .unwrap_or(rest.len());
            self.out.extend_from_slice(&rest[..run]);
            self.at += run;
            match self.input.get(self.at) {
                Some(b'"') => {
                    self.at += 1;
                    self.out.push(b'"');
                    return Ok(());
                }
                Some(b'\\') => {
                    let c = self.escape()?;
                    write_char(c, &mut self.out);
                }
                // The end of the body, or a raw control character.
                _ => return Err(NotCanonical::Invalid),
            }
        }
    }

    /// The character an escape after a backslash stands for.
    fn escape(&mut self) -> Result<char, NotCanonical> {
        let c = match self.input.get(self.at + 1) {
            Some(b'"') => '"',
            Some(b'\\') => '\\',
            Some(b'/') => '/',
            Some(b'b') => '\u{8}',
            Some(b'f') => '\u{c}',
            Some(b'n') => '\n',
            Some(b'r') => '\r',
            Some(b't') => '\t',
            Some(b'u') => {
                let unit = self.hex4(self.at + 2)?;
                self.at += 6;
                return match unit {
                    0xd800..=0xdbff => {
                        // A high surrogate must be followed by its low one, escaped too.
                        if self.input.get(self.at..self.at + 2) != Some(b"\\u") {
                            return Err(NotCanonical::Invalid);
                        }
                        let low = self.hex4(self.at + 2)?;
                        if !(0xdc00..=0xdfff).contains(&low) {
                            return Err(NotCanonical::Invalid);
                        }
                        self.at += 6;
                        let code = 0x10000 + ((unit - 0xd800) << 10) + (low - 0xdc00);
                        char::from_u32(code).ok_or(NotCanonical::Invalid)
                    }
                    unit => char::from_u32(unit).ok_or(NotCanonical::Invalid),
                };
            }
            _ => return Err(NotCanonical::Invalid),
        };
        self.at += 2;
        Ok(c)
    }

    fn hex4(&self, at: usize) -> Result<u32, NotCanonical> {
        let digits = self.input.get(at..at + 4).ok_or(NotCanonical::Invalid)?;
        digits.iter().try_fold(0u32, |acc, b| {
            let digit = (*b as char).to_digit(16).ok_or(NotCanonical::Invalid)?;
            Ok(acc << 4 | digit)
        })
    }
}

/// The bytes that end a run of a string's plain bytes: its quote, an escape, a control.
const SPECIAL_IN_STRINGS: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 0x20 {
        table[b] = true;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

fn write_char(c: char, out: &mut Vec<u8>) {
    match c {
        '"' => out.extend_from_slice(b"\\\""),
        '\\' => out.extend_from_slice(b"\\\\"),
        '\u{8}' => out.extend_from_slice(b"\\b"),
        '\t' => out.extend_from_slice(b"\\t"),
        '\n' => out.extend_from_slice(b"\\n"),
        '\u{c}' => out.extend_from_slice(b"\\f"),
        '\r' => out.extend_from_slice(b"\\r"),
        c if (c as u32) < 0x20 => {
            out.extend_from_slice(format!("\\u{:04x}", c as u32).as_bytes());
        }
        c => {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
}

/// The characters of a string in canonical escaping (between its quotes).
fn unescape(canonical: &[u8]) -> Cow<'_, str> {
    if !canonical.contains(&b'\\') {
        return String::from_utf8_lossy(canonical);
    }
    let mut out = Vec::with_capacity(canonical.len());
    let mut bytes = canonical.iter().copied();
    while let Some(b) = bytes.next() {
        if b != b'\\' {
            out.push(b);
            continue;
        }
        match bytes.next() {
            Some(b'b') => out.push(0x08),
            Some(b't') => out.push(b'\t'),
            Some(b'n') => out.push(b'\n'),
            Some(b'f') => out.push(0x0c),
            Some(b'r') => out.push(b'\r'),
            // `\u00xx`: a control character.
            Some(b'u') => {
                let hex: Vec<u8> = bytes.by_ref().take(4).collect();
                let code = std::str::from_utf8(&hex)
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                out.extend(code);
            }
            Some(other) => out.push(other),
            None => {}
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

/// A plain name's first eight bytes, big-endian and padded with zeros; `None` for a name that
/// is not plain. A name (in canonical escaping) is plain when it orders by its bytes: UTF-8's
/// byte order is UTF-16's except where a character from U+E000 meets one past U+FFFF, and
/// escapes change the bytes.
#[inline(always)]
fn prefix_of(name: &[u8]) -> Option<u64> {
    let mut prefix = 0u64;
    for (i, b) in name.iter().enumerate() {
        if *b == b'\\' || *b >= 0xee {
            return None;
        }
        if i < 8 {
            prefix |= u64::from(*b) << (56 - 8 * i);
        }
    }
    Some(prefix)
}

/// RFC 8785's order of member names: by UTF-16 code units.
fn utf16_order(a: &[u8], b: &[u8]) -> Ordering {
    unescape(a).encode_utf16().cmp(unescape(b).encode_utf16())
}

/// What the canonical form of one value makes of it as a key.
fn found_in(canonical: &[u8]) -> Found {
    match canonical.first() {
        Some(b'"') => {
            let inner = &canonical[1..canonical.len().saturating_sub(1).max(1)];
            Found::Text(unescape(inner).into_owned().into_bytes())
        }
        Some(b'-' | b'0'..=b'9') => Found::Text(canonical.to_vec()),
        _ => Found::NotText,
    }
}
