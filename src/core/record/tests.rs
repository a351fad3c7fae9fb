use super::*;

/// A complete record's entry, for the format tests of every store.
pub(crate) fn sample_entry() -> Entry {
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
    assert_eq!(
        StoredResponse::decode(b"hello world", 0),
        Err(DecodeError::Malformed)
    );
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
fn expired_entries_are_not_live() {
    let entry = sample_entry();
    assert!(entry.is_live(entry.deadline - 1));
    assert!(!entry.is_live(entry.deadline));
    assert!(!Entry::EMPTY.is_live(0));
}

#[test]
fn a_stored_response_refuses_garbage_without_panicking_and_what_it_reads_round_trips() {
    use crate::core::garbage;
    let response = StoredResponse {
        status: 201,
        headers: vec![("content-type".into(), "application/json".into())],
        body: b"{\"id\":\"cus_1\",\"name\":\"Jane\"}".repeat(20),
    };
    let samples = [response.encode(7, true), response.encode(7, false)];
    garbage::run("stored responses", |g| {
        let input = g.input(&samples, 2048);
        if let Ok(read) = StoredResponse::decode(&input, 7) {
            assert_eq!(StoredResponse::decode(&read.encode(7, true), 7), Ok(read));
        }
    });
}
