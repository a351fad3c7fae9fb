//! A record's value in etcd: its entry, then its stored response if it has one, under one key
//! that a transaction creates, reads and replaces whole.

use crate::core::record::{check_header, DecodeError, Entry, Reader, HEADER_LEN};

const MAGIC: [u8; 2] = *b"IE";
/// Version 2: the 16-byte fingerprint, as in buckets of version 3.
const VERSION: u8 = 2;
/// A value's length before its stored response.
pub const ENTRY_LEN: usize = HEADER_LEN + crate::core::record::ENTRY_LEN;

/// The value that keeps `entry`, and its stored response if any.
pub fn encode(entry: &Entry, response: Option<&[u8]>) -> Vec<u8> {
    let mut out = Vec::with_capacity(ENTRY_LEN + response.map_or(0, <[u8]>::len));
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(0);
    entry.encode_into(&mut out);
    out.extend_from_slice(response.unwrap_or_default());
    out
}

/// The entry and the stored response bytes (empty if none) a value keeps.
pub fn decode(bytes: &[u8]) -> Result<(Entry, &[u8]), DecodeError> {
    let mut reader = Reader::new(bytes);
    check_header(&mut reader, MAGIC, VERSION)?;
    reader.u8()?;
    let entry = Entry::read(&mut reader)?;
    Ok((entry, reader.rest()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::record::tests::sample_entry;
    use crate::core::record::StoredResponse;

    #[test]
    fn remote_records_round_trip_with_and_without_a_response() {
        // When a record was stored is kept in buckets only.
        let entry = Entry {
            stored: 0,
            ..sample_entry()
        };
        assert_eq!(encode(&entry, Some(b"abc")).len(), ENTRY_LEN + 3);
        assert_eq!(
            decode(&encode(&entry, Some(b"abc"))),
            Ok((entry, b"abc".as_slice()))
        );
        assert_eq!(decode(&encode(&entry, None)), Ok((entry, b"".as_slice())));
        let mut bytes = encode(&entry, None);
        bytes[2] = 7;
        assert_eq!(decode(&bytes), Err(DecodeError::UnknownVersion(7)));
    }

    #[test]
    fn a_value_refuses_garbage_without_panicking_and_what_it_reads_round_trips() {
        use crate::core::garbage;
        let response = StoredResponse {
            status: 201,
            headers: vec![("content-type".into(), "application/json".into())],
            body: b"{\"id\":\"cus_1\"}".repeat(20),
        };
        let sample = encode(&sample_entry(), Some(&response.encode(7, true)));
        garbage::run("etcd values", |g| {
            let input = g.input(&[&sample], 2048);
            if let Ok((entry, rest)) = decode(&input) {
                let again = encode(&entry, Some(rest));
                assert_eq!(decode(&again), Ok((entry, rest)));
            }
        });
    }
}
