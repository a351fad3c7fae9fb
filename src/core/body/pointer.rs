//! JSON Pointers (RFC 6901): where in a body the key is, and which members do not count.

use std::fmt;

/// A parsed pointer: its reference tokens, unescaped (`~1` is `/`, `~0` is `~`).
#[derive(Clone, PartialEq, Eq)]
pub struct Pointer {
    text: String,
    tokens: Vec<Token>,
}

#[derive(Clone, PartialEq, Eq)]
struct Token {
    name: String,
    /// The array index the token names, if it is one (`0`, or digits with no leading zero).
    index: Option<usize>,
}

/// What a pointer names under a path: nothing, something below, or the path itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    Off,
    Below,
    Here,
}

/// Where a value is in the document, from the root: a member's name or an element's index.
#[derive(Debug, Clone, Copy)]
pub enum Step<'a> {
    Member(&'a str),
    Element(usize),
}

impl Pointer {
    /// Reads `text`, which is `""` (the whole document) or `/`-separated tokens.
    pub fn parse(text: &str) -> Result<Pointer, String> {
        if text.is_empty() {
            return Ok(Pointer {
                text: String::new(),
                tokens: Vec::new(),
            });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(format!(
                "`{text}` is not a JSON Pointer: it must start with /"
            ));
        };
        let tokens = rest
            .split('/')
            .map(|raw| {
                let name = unescape(raw)
                    .ok_or_else(|| format!("`{text}`: `~` must be followed by 0 or 1"))?;
                let index = (name == "0" || (!name.starts_with('0') && !name.is_empty()))
                    .then(|| name.parse().ok())
                    .flatten();
                Ok(Token { name, index })
            })
            .collect::<Result<_, String>>()?;
        Ok(Pointer {
            text: text.to_string(),
            tokens,
        })
    }

    pub fn is_root(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The name of a form parameter this pointer names: its only token.
    pub fn single_name(&self) -> Option<&str> {
        match self.tokens.as_slice() {
            [only] => Some(&only.name),
            _ => None,
        }
    }

    /// Whether the pointer names `step`, taken at `depth` (0 for the root's members) from a
    /// path the pointer names `Below`.
    pub fn reach(&self, depth: usize, step: Step) -> Reach {
        let Some(token) = self.tokens.get(depth) else {
            return Reach::Off;
        };
        let matches = match step {
            Step::Member(name) => token.name == name,
            Step::Element(index) => token.index == Some(index),
        };
        match (matches, depth + 1 == self.tokens.len()) {
            (false, _) => Reach::Off,
            (true, true) => Reach::Here,
            (true, false) => Reach::Below,
        }
    }
}

fn unescape(raw: &str) -> Option<String> {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '~' => match chars.next() {
                Some('0') => out.push('~'),
                Some('1') => out.push('/'),
                _ => return None,
            },
            c => out.push(c),
        }
    }
    Some(out)
}

impl fmt::Display for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Pointer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pointer({:?})", self.text)
    }
}
