//! The formats every store shares: a record's entry (its state), and a stored response; and the
//! pieces each store's own formats are built of. All are versioned binary: a reader that meets a
//! version it does not know refuses it rather than guess, so a filter upgrade in a running Envoy
//! never misreads a record. The table's bucket and counters are in `stores::table`, etcd's value
//! in `stores::etcd`.
//!
//! Each format starts with its own two-byte magic, so that no reader takes another's bytes:
//! `IR` a stored response (here), `IB` a bucket, `IL` a ledger, `IS` a share (the table's),
//! `IE` a record's value and `IW` written bytes (etcd's).

use crate::core::identity::{Digest32, Fingerprint};
use crate::core::Millis;

const RESPONSE_MAGIC: [u8; 2] = *b"IR";
/// The version of the counter formats ([`encode_counts`]).
pub(crate) const VERSION: u8 = 1;
/// A stored response keeps its body as it came (version 3), or LZ4-compressed (version 4), so
/// that a filter that cannot decompress refuses the record rather than replay compressed bytes.
/// Versions 1 and 2 also held the record's tuple, which the claim token already proves.
const RESPONSE_VERSION: u8 = 3;
const COMPRESSED_VERSION: u8 = 4;
/// Bodies shorter than this are kept as they came: compressing would save too little.
const COMPRESS_FROM: usize = 256;
/// A format's header: its magic, its version, and a byte of its own.
pub(crate) const HEADER_LEN: usize = 4;
/// An entry as [`Entry::encode_into`] writes it.
pub(crate) const ENTRY_LEN: usize = 1 + 32 + 16 + 8 + 8 + 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Empty,
    /// Claimed; the owner is forwarding. `deadline` is the lease's end.
    InFlight,
    /// The owner ended without knowing whether the work ran; held until `deadline` (the lease).
    Held,
    /// The response is stored; `deadline` is the record's expiry.
    Complete,
    /// The work ran but its response was not stored (too large); `deadline` is the expiry.
    Unstored,
    /// Not a record: the sweeper is clearing an expired record's response until `deadline`.
    Sweeping,
}

impl State {
    fn code(self) -> u8 {
        match self {
            State::Empty => 0,
            State::InFlight => 1,
            State::Held => 2,
            State::Complete => 3,
            State::Unstored => 4,
            State::Sweeping => 5,
        }
    }

    /// Whether an entry in this state is a record (and so counts in its organisation's share).
    pub fn is_record(self) -> bool {
        !matches!(self, State::Empty | State::Sweeping)
    }

    fn from_code(code: u8) -> Option<State> {
        Some(match code {
            0 => State::Empty,
            1 => State::InFlight,
            2 => State::Held,
            3 => State::Complete,
            4 => State::Unstored,
            5 => State::Sweeping,
            _ => return None,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub state: State,
    pub tuple: Digest32,
    pub fingerprint: Fingerprint,
    /// Identifies the claim that wrote this entry; a stored response carries the same token.
    pub token: u64,
    pub deadline: Millis,
    /// Bytes of the stored response, for `Complete`.
    pub response_len: u32,
    /// The organisation's tag ([`crate::core::identity::org_tag`]), whose share this record counts in.
    pub org: u16,
    /// When a `Complete` or `Unstored` record was stored (kept in buckets only: a remote
    /// record reads 0).
    pub stored: Millis,
}

impl Entry {
    pub const EMPTY: Entry = Entry {
        state: State::Empty,
        tuple: [0; 32],
        fingerprint: [0; 16],
        token: 0,
        deadline: 0,
        response_len: 0,
        org: 0,
        stored: 0,
    };

    pub(crate) fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.state.code());
        out.extend_from_slice(&self.tuple);
        out.extend_from_slice(&self.fingerprint);
        out.extend_from_slice(&self.token.to_le_bytes());
        out.extend_from_slice(&self.deadline.to_le_bytes());
        out.extend_from_slice(&self.response_len.to_le_bytes());
    }

    pub(crate) fn read(reader: &mut Reader) -> Result<Entry, DecodeError> {
        Ok(Entry {
            state: State::from_code(reader.u8()?).ok_or(DecodeError::Malformed)?,
            tuple: reader.digest()?,
            fingerprint: reader.array()?,
            token: reader.u64()?,
            deadline: reader.u64()?,
            response_len: reader.u32()?,
            org: 0,
            stored: 0,
        })
    }

    /// An entry whose deadline has passed no longer holds its tuple: it is as if absent.
    pub fn is_live(&self, now: Millis) -> bool {
        self.state != State::Empty && self.deadline > now
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    Malformed,
    /// Written by a filter version this one does not know.
    UnknownVersion(u8),
}

/// An upstream response as it will be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl StoredResponse {
    /// Encodes with the record's claim token (unique to the attempt in the process), so a reader
    /// can prove the bytes belong to the entry that points at them.
    /// With `compress`, the body is compressed when that saves an eighth of it or more.
    pub fn encode(&self, token: u64, compress: bool) -> Vec<u8> {
        let compressed = (compress && self.body.len() >= COMPRESS_FROM)
            .then(|| lz4_flex::block::compress(&self.body))
            .filter(|d| d.len() + 4 <= self.body.len() - self.body.len() / 8);
        let body = compressed.as_deref().unwrap_or(&self.body);
        let headers_len: usize = self
            .headers
            .iter()
            .map(|(n, v)| 6 + n.len() + v.len())
            .sum();
        let mut out = Vec::with_capacity(36 + headers_len + body.len());
        out.extend_from_slice(&RESPONSE_MAGIC);
        out.push(if compressed.is_some() {
            COMPRESSED_VERSION
        } else {
            RESPONSE_VERSION
        });
        out.push(0);
        out.extend_from_slice(&token.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        out.extend_from_slice(&(self.headers.len() as u32).to_le_bytes());
        for (name, value) in &self.headers {
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(name.as_bytes());
            out.extend_from_slice(&(value.len() as u32).to_le_bytes());
            out.extend_from_slice(value.as_bytes());
        }
        if compressed.is_some() {
            out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        }
        out.extend_from_slice(body);
        out
    }

    /// Decodes a response and checks that it belongs to the claim `token`.
    pub fn decode(bytes: &[u8], token: u64) -> Result<Self, DecodeError> {
        let mut reader = Reader::new(bytes);
        if reader.take(2)? != RESPONSE_MAGIC {
            return Err(DecodeError::Malformed);
        }
        let compressed = match reader.u8()? {
            RESPONSE_VERSION => false,
            COMPRESSED_VERSION => true,
            other => return Err(DecodeError::UnknownVersion(other)),
        };
        reader.u8()?;
        if reader.u64()? != token {
            return Err(DecodeError::Malformed);
        }
        let status = reader.u16()?;
        let count = reader.u32()?;
        let mut headers = Vec::new();
        for _ in 0..count {
            let name_len = usize::from(reader.u16()?);
            let name = reader.text(name_len)?;
            let value_len = reader.u32()? as usize;
            let value = reader.text(value_len)?;
            headers.push((name, value));
        }
        let body = if compressed {
            let len = reader.u32()? as usize;
            lz4_flex::block::decompress(reader.rest(), len)
                .ok()
                .filter(|body| body.len() == len)
                .ok_or(DecodeError::Malformed)?
        } else {
            reader.rest().to_vec()
        };
        Ok(StoredResponse {
            status,
            headers,
            body,
        })
    }
}

/// A counter record: the header, then `N` little-endian `u64`s and nothing else.
pub(crate) fn encode_counts(magic: [u8; 2], counts: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 8 * counts.len());
    out.extend_from_slice(&magic);
    out.push(VERSION);
    out.push(0);
    for count in counts {
        out.extend_from_slice(&count.to_le_bytes());
    }
    out
}

pub(crate) fn decode_counts<const N: usize>(
    bytes: &[u8],
    magic: [u8; 2],
) -> Result<[u64; N], DecodeError> {
    let mut reader = Reader::new(bytes);
    check_header(&mut reader, magic, VERSION)?;
    reader.u8()?;
    let mut counts = [0; N];
    for count in counts.iter_mut() {
        *count = reader.u64()?;
    }
    if !reader.rest().is_empty() {
        return Err(DecodeError::Malformed);
    }
    Ok(counts)
}

pub(crate) fn check_header(
    reader: &mut Reader,
    magic: [u8; 2],
    version: u8,
) -> Result<(), DecodeError> {
    if reader.take(2)? != magic {
        return Err(DecodeError::Malformed);
    }
    match reader.u8()? {
        found if found == version => Ok(()),
        other => Err(DecodeError::UnknownVersion(other)),
    }
}

pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    pub(crate) fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.bytes.len() < n {
            return Err(DecodeError::Malformed);
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        self.take(N)?.try_into().map_err(|_| DecodeError::Malformed)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.array::<1>()?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn digest(&mut self) -> Result<Digest32, DecodeError> {
        self.array()
    }

    fn text(&mut self, n: usize) -> Result<String, DecodeError> {
        String::from_utf8(self.take(n)?.to_vec()).map_err(|_| DecodeError::Malformed)
    }

    pub(crate) fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.bytes)
    }
}

/// Bytes that do not compress, for tests whose sizes must hold as written.
#[cfg(test)]
pub fn incompressible(len: usize) -> Vec<u8> {
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests;
