use super::*;

fn sample_entry() -> Entry {
    Entry {
        state: State::Complete,
        tuple: [7; 32],
        fingerprint: [9; 16],
        token: 0xdead_beef_0000_0001,
        deadline: 1_700_000_000_000,
        response_len: 1234,
        org: 0,
        stored: 1_699_999_000_000,
    }
}

#[test]
fn buckets_round_trip() {
    let mut bucket = Bucket::empty();
    bucket.entries[3] = Entry {
        org: 0xbeef,
        ..sample_entry()
    };
    bucket.entries[15].state = State::Held;
    assert_eq!(Bucket::decode(&bucket.encode()), Ok(bucket));
}

#[test]
fn remote_records_round_trip_with_and_without_a_response() {
    // When a record was stored is kept in buckets only.
    let entry = Entry {
        stored: 0,
        ..sample_entry()
    };
    assert_eq!(
        entry.encode_remote(Some(b"abc")).len(),
        REMOTE_ENTRY_LEN + 3
    );
    assert_eq!(
        Entry::decode_remote(&entry.encode_remote(Some(b"abc"))),
        Ok((entry, b"abc".as_slice()))
    );
    assert_eq!(
        Entry::decode_remote(&entry.encode_remote(None)),
        Ok((entry, b"".as_slice()))
    );
    let mut bytes = entry.encode_remote(None);
    bytes[2] = 7;
    assert_eq!(
        Entry::decode_remote(&bytes),
        Err(DecodeError::UnknownVersion(7))
    );
}

#[test]
fn responses_round_trip_byte_for_byte() {
    let response = StoredResponse {
        status: 201,
        headers: vec![
            ("set-cookie".into(), "a=1; Path=/".into()),
            ("set-cookie".into(), "b=2".into()),
            ("content-type".into(), "application/octet-stream".into()),
        ],
        body: (0..=255u8).cycle().take(5000).collect(),
    };
    let bytes = response.encode(42, true);
    assert_eq!(StoredResponse::decode(&bytes, 42), Ok(response));
}

#[test]
fn a_body_that_compresses_is_stored_compressed_and_replays_byte_for_byte() {
    let json = br#"{"id":"cus_000001","fullName":"Jane Doe","email":"jane@example.com"},"#;
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: json.repeat(16),
    };
    let bytes = response.encode(42, true);
    assert_eq!(bytes[2], COMPRESSED_VERSION);
    assert!(
        bytes.len() < response.body.len() / 4,
        "{} bytes",
        bytes.len()
    );
    assert_eq!(StoredResponse::decode(&bytes, 42), Ok(response));
    // Random bytes do not compress: kept as they came, in the version that says so.
    let noise = StoredResponse {
        status: 200,
        headers: vec![],
        body: incompressible(4096),
    };
    let bytes = noise.encode(42, true);
    assert_eq!(bytes[2], RESPONSE_VERSION);
    assert_eq!(StoredResponse::decode(&bytes, 42), Ok(noise));
}

#[test]
fn a_compressed_body_that_does_not_decompress_to_its_length_is_malformed() {
    let response = StoredResponse {
        status: 200,
        headers: vec![],
        body: vec![b'a'; 1000],
    };
    let mut bytes = response.encode(42, true);
    assert_eq!(bytes[2], COMPRESSED_VERSION);
    bytes.truncate(bytes.len() - 1);
    assert_eq!(
        StoredResponse::decode(&bytes, 42),
        Err(DecodeError::Malformed)
    );
}

#[test]
fn a_response_is_refused_for_another_claim() {
    let response = StoredResponse {
        status: 200,
        headers: vec![],
        body: b"x".to_vec(),
    };
    let bytes = response.encode(42, true);
    assert_eq!(StoredResponse::decode(&bytes, 42), Ok(response));
    assert_eq!(
        StoredResponse::decode(&bytes, 43),
        Err(DecodeError::Malformed)
    );
}

#[test]
fn unknown_versions_are_refused_not_guessed() {
    let mut bytes = Bucket::empty().encode();
    bytes[2] = 1;
    assert_eq!(Bucket::decode(&bytes), Err(DecodeError::UnknownVersion(1)));
    let mut bytes = StoredResponse {
        status: 200,
        headers: vec![],
        body: vec![],
    }
    .encode(0, true);
    bytes[2] = 9;
    assert_eq!(
        StoredResponse::decode(&bytes, 0),
        Err(DecodeError::UnknownVersion(9))
    );
}

#[test]
fn truncated_or_foreign_bytes_are_malformed() {
    let bytes = Bucket::empty().encode();
    assert_eq!(
        Bucket::decode(&bytes[..bytes.len() - 1]),
        Err(DecodeError::Malformed)
    );
    assert_eq!(Bucket::decode(b""), Err(DecodeError::Malformed));
    assert_eq!(Bucket::decode(b"hello world"), Err(DecodeError::Malformed));
    let response = StoredResponse {
        status: 200,
        headers: vec![("a".into(), "b".into())],
        body: vec![],
    }
    .encode(0, true);
    for cut in 0..response.len() - 1 {
        assert!(StoredResponse::decode(&response[..cut], 0).is_err());
    }
}

#[test]
fn ledgers_and_shares_round_trip_and_check_their_length() {
    let ledger = Ledger { total: 123_456 };
    assert_eq!(Ledger::decode(&ledger.encode()), Ok(ledger));
    let mut long = ledger.encode();
    long.push(0);
    assert_eq!(Ledger::decode(&long), Err(DecodeError::Malformed));
    let share = Share {
        records: 7,
        bytes: 1 << 40,
    };
    assert_eq!(Share::decode(&share.encode()), Ok(share));
    let mut long = share.encode();
    long.push(0);
    assert_eq!(Share::decode(&long), Err(DecodeError::Malformed));
}

#[test]
fn written_bytes_drop_out_with_their_window_and_round_trip() {
    let mut written = Written::default();
    written.add(100, 10);
    written.add(100, 5);
    written.add(105, 1);
    assert_eq!(written.since(100), 16);
    assert_eq!(written.since(101), 1);
    // Window 116 takes window 100's slot: what was written then is gone.
    written.add(116, 7);
    assert_eq!(written.since(0), 8);
    assert_eq!(Written::decode(&written.encode()), Ok(written));
    let mut long = written.encode();
    long.push(0);
    assert_eq!(Written::decode(&long), Err(DecodeError::Malformed));
}

#[test]
fn expired_entries_are_not_live() {
    let entry = sample_entry();
    assert!(entry.is_live(entry.deadline - 1));
    assert!(!entry.is_live(entry.deadline));
    assert!(!Entry::EMPTY.is_live(0));
}

#[test]
fn every_stored_format_refuses_garbage_without_panicking_and_what_it_reads_round_trips() {
    use crate::core::garbage;
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{\"id\":\"cus_1\",\"name\":\"Jane\"}".repeat(20),
    };
    let mut bucket = Bucket::empty();
    bucket.entries[3] = sample_entry();
    let samples = [
        bucket.encode(),
        response.encode(7, true),
        response.encode(7, false),
        Ledger { total: 5 }.encode(),
        Share {
            records: 2,
            bytes: 900,
        }
        .encode(),
        Written::default().encode(),
        sample_entry().encode_remote(Some(&response.encode(7, true))),
    ];
    garbage::run("stored formats", |g| {
        let input = match g.below(4) {
            0 => g.bytes(2048),
            _ => {
                let sample = g.below(samples.len());
                g.mutate(&samples[sample])
            }
        };
        if let Ok(bucket) = Bucket::decode(&input) {
            assert_eq!(Bucket::decode(&bucket.encode()), Ok(bucket));
        }
        if let Ok(read) = StoredResponse::decode(&input, 7) {
            assert_eq!(StoredResponse::decode(&read.encode(7, true), 7), Ok(read));
        }
        if let Ok((entry, rest)) = Entry::decode_remote(&input) {
            let again = entry.encode_remote(Some(rest));
            assert_eq!(Entry::decode_remote(&again), Ok((entry, rest)));
        }
        let _ = (Ledger::decode(&input), Share::decode(&input));
        let _ = Written::decode(&input);
    });
}
