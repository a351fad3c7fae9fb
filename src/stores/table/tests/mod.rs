use super::tally::RESERVE_IDLE;
use super::*;
use crate::stores::table::tally::{Ledger, Share};
use crate::stores::testkit::{config, MemoryKv};

/// With the default TTL, how long a record is safe from eviction.
const GRACE: Millis = EVICTION_GRACE;

fn table<'a>(kv: &'a MemoryKv, json: &str) -> Table<&'a MemoryKv> {
    let mut table = Table::new(kv, &config(json));
    table.boot().unwrap();
    table
}

fn request(tuple: u8, fingerprint: u8, token: u64) -> Claim {
    Claim {
        tuple: [tuple; 32],
        fingerprint: [fingerprint; 16],
        token,
        lease: 60_000,
        ttl: 86_400_000,
        org: 1,
    }
}

fn response(body_len: usize) -> StoredResponse {
    StoredResponse {
        status: 201,
        headers: vec![("set-cookie".into(), "a=1".into())],
        body: crate::core::record::incompressible(body_len),
    }
}

fn claim_now(table: &mut Table<&MemoryKv>, claim: &Claim, now: Millis) -> ClaimReply {
    match table.claim(claim, now) {
        Answer::Now(Ok(reply)) => reply,
        other => panic!("claim: {other:?}"),
    }
}

fn finish_now(
    table: &mut Table<&MemoryKv>,
    ticket: Ticket,
    ending: Ending<StoredResponse>,
    now: Millis,
) -> Finished {
    match table.finish(ticket, ending, now) {
        Answer::Now(Ok(reply)) => reply,
        other => panic!("finish: {other:?}"),
    }
}

fn ticket(reply: ClaimReply) -> Ticket {
    match reply {
        Verdict::Claimed(ticket) => ticket,
        other => panic!("expected a claim, got {other:?}"),
    }
}

#[test]
fn a_stored_response_replays_byte_for_byte() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, "{}");
    let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
    let reply = finish_now(&mut table, owner, Ending::Stored(response(300)), 5);
    assert_eq!(reply, Finished::Recorded(Ending::Stored(())));
    assert_eq!(
        claim_now(&mut table, &request(1, 1, 11), 6),
        Verdict::Replay(Replay {
            response: response(300),
            expires: 5 + 86_400_000
        })
    );
}

#[test]
fn two_workers_racing_on_an_absent_bucket_get_one_claim() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, "{}");
    // Worker B claims the same tuple between worker A's read and A's first write.
    *kv.interleave.borrow_mut() = Some(Box::new(|kv: &MemoryKv| {
        let mut other = Table::new(kv, &config("{}"));
        let reply = claim_now(&mut other, &request(1, 1, 20), 0);
        assert!(matches!(reply, Verdict::Claimed(_)));
    }));
    assert_eq!(
        claim_now(&mut table, &request(1, 1, 10), 0),
        Verdict::Blocked(Block::InFlight { remaining: 60_000 })
    );
}

#[test]
fn a_released_claim_is_taken_by_exactly_one_waiter() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, "{}");
    let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
    assert_eq!(
        finish_now(&mut table, owner, Ending::Released, 1),
        Finished::Recorded(Ending::Released)
    );
    assert!(matches!(
        claim_now(&mut table, &request(1, 1, 11), 2),
        Verdict::Claimed(_)
    ));
    assert!(matches!(
        claim_now(&mut table, &request(1, 1, 12), 2),
        Verdict::Blocked(Block::InFlight { .. })
    ));
}

#[test]
fn a_response_that_does_not_fit_keeps_the_record_without_it() {
    let kv = MemoryKv::default();
    let json = r#"{"capacity_bytes": 8000, "max_response_body_bytes": 1000}"#;
    let mut table = table(&kv, json);
    let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
    assert_eq!(
        finish_now(&mut table, owner, Ending::Stored(response(2000)), 1),
        Finished::Recorded(Ending::Unstored { no_room: true })
    );
    assert_eq!(
        claim_now(&mut table, &request(1, 1, 11), 2),
        Verdict::Blocked(Block::Unstored)
    );
}

#[test]
fn expired_records_give_their_bytes_back_to_the_sweeper() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 16}"#);
    let request = |tuple, fingerprint, token| Claim {
        ttl: 1_000,
        ..request(tuple, fingerprint, token)
    };
    let owner = ticket(claim_now(&mut table, &request(1, 1, 10), 0));
    finish_now(&mut table, owner, Ending::Stored(response(50_000)), 0);
    let full = kv.bytes();
    assert_eq!(table.sweep(0, 999).unwrap(), 0);
    assert_eq!(table.sweep(0, 1000).unwrap(), 1);
    assert!(kv.bytes() < full - 50_000, "{} vs {full}", kv.bytes());
    assert!(matches!(
        claim_now(&mut table, &request(1, 1, 11), 1001),
        Verdict::Claimed(_)
    ));
}

#[test]
fn memory_stays_bounded_by_the_capacity_whatever_the_number_of_keys() {
    let kv = MemoryKv::default();
    let json = r#"{"capacity_records": 64, "capacity_bytes": 80000, "max_response_body_bytes": 10000,
                   "max_share": 1}"#;
    let mut table = table(&kv, json);
    let mut stored = 0;
    let mut full = 0;
    for n in 0..5_000u64 {
        let mut claim = Claim {
            ttl: 300,
            ..request(0, 1, n + 1)
        };
        claim.tuple[..8].copy_from_slice(&n.to_le_bytes());
        claim.tuple[8] = (n % 251) as u8;
        let now = n * 10;
        match claim_now(&mut table, &claim, now) {
            Verdict::Claimed(owner) => {
                let reply = finish_now(&mut table, owner, Ending::Stored(response(2_000)), now);
                if reply == Finished::Recorded(Ending::Stored(())) {
                    stored += 1;
                }
            }
            Verdict::Blocked(Block::Full) => full += 1,
            other => panic!("{other:?}"),
        }
        if n % 8 == 0 {
            table.sweep(n / 8, now).unwrap();
        }
    }
    assert!(stored > 3_000, "stored {stored}, full {full}");
    assert!(
        kv.keys() <= 1 + 4 + 64 + LEDGER_SHARDS,
        "{} keys",
        kv.keys()
    );
    assert!(kv.bytes() <= 80_000 + 64 * 200, "{} bytes", kv.bytes());
}

#[test]
fn an_unknown_record_version_is_refused_not_overwritten() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 16}"#);
    let mut bytes = Bucket::empty().encode();
    bytes[2] = 9;
    let bucket = table.key("b", 0);
    (&kv).set(&bucket, &bytes, None).unwrap();
    assert!(matches!(
        table.claim(&request(1, 1, 10), 0),
        Answer::Now(Err(StoreError::Unreadable(_)))
    ));
    assert_eq!((&kv).get(&bucket).unwrap().unwrap().0, bytes);
}

#[test]
fn capacity_is_exact_when_not_a_multiple_of_the_bucket_size() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 4, "max_share": 1}"#);
    for n in 0..4 {
        ticket(claim_now(&mut table, &request(n, 1, u64::from(n) + 1), 0));
    }
    assert_eq!(
        claim_now(&mut table, &request(9, 1, 99), 0),
        Verdict::Blocked(Block::Full)
    );
}

/// A claim of organisation `org` for tuple `n`, all in bucket 0 of a one-bucket table.
fn of_org(org: u16, n: u8, token: u64) -> Claim {
    Claim {
        org,
        ..request(n, 1, token)
    }
}

fn store(table: &mut Table<&MemoryKv>, claim: &Claim, now: Millis) {
    let owner = ticket(claim_now(table, claim, now));
    let reply = finish_now(table, owner, Ending::Stored(response(100)), now);
    assert_eq!(reply, Finished::Recorded(Ending::Stored(())));
}

/// The bytes ledger shard `shard` counts for records: all it counts but `table`'s reserve.
fn ledger(table: &Table<&MemoryKv>, shard: u64) -> u64 {
    let counted = table
        .kv
        .get(&table.key("l", shard))
        .unwrap()
        .map_or(0, |(bytes, _)| Ledger::decode(&bytes).unwrap().total);
    counted - table.reserved(Tally::Ledger(shard)).bytes
}

/// What the share counters say organisation `org`'s records hold (less `table`'s reserve).
fn held(table: &Table<&MemoryKv>, org: u16) -> Share {
    let counted = table
        .kv
        .get(&table.key("s", u64::from(org % SHARE_SLOTS)))
        .unwrap()
        .map(|(bytes, _)| Share::decode(&bytes).unwrap())
        .unwrap_or_default();
    let reserved = table.reserved(Table::<&MemoryKv>::share_of(org));
    Share {
        records: counted.records - reserved.records,
        bytes: counted.bytes - reserved.bytes,
    }
}

#[test]
fn boot_numbers_vms_uniquely() {
    let kv = MemoryKv::default();
    let mut a = Table::new(&kv, &config("{}"));
    let mut b = Table::new(&kv, &config("{}"));
    assert_eq!(a.boot(), Ok(1));
    assert_eq!(b.boot(), Ok(2));
}

#[test]
fn another_capacity_is_another_table() {
    // A key's bucket depends on the capacity: a table of another size must not meet its records.
    let kv = MemoryKv::default();
    let mut small = table(&kv, r#"{"capacity_records": 16}"#);
    store(&mut small, &request(2, 1, 10), 0);
    let mut large = table(&kv, r#"{"capacity_records": 32}"#);
    assert!(matches!(
        claim_now(&mut large, &request(2, 1, 11), 0),
        Verdict::Claimed(_)
    ));
    assert_eq!(ledger(&large, 0), 0);
}

#[test]
fn an_owner_that_stalls_past_its_lease_while_storing_gives_its_bytes_back() {
    let kv = MemoryKv::default();
    let json = r#"{"capacity_records": 16, "max_share": 1}"#;
    let mut table = table(&kv, json);
    for n in 0..15u8 {
        store(&mut table, &request(n, 1, u64::from(n) + 1), 0);
    }
    let stalled = ticket(claim_now(&mut table, &request(100, 1, 100), 0));
    let (bytes, share) = (ledger(&table, 0), held(&table, 1));
    // Its clock says 300 ms of lease are left; another worker's, as it writes, that none is: the
    // bucket is full, so that worker's new key takes the stalled owner's entry.
    *kv.interleave.borrow_mut() = Some(Box::new(|kv: &MemoryKv| {
        let mut other = Table::new(kv, &config(r#"{"capacity_records": 16, "max_share": 1}"#));
        other.boot().unwrap();
        assert!(matches!(
            claim_now(&mut other, &request(200, 1, 200), 60_001),
            Verdict::Claimed(_)
        ));
    }));
    assert_eq!(
        finish_now(&mut table, stalled, Ending::Stored(response(500)), 59_700),
        Finished::Lost
    );
    assert_eq!(
        ledger(&table, 0),
        bytes,
        "the bytes it accounted are given back"
    );
    assert_eq!(held(&table, 1).bytes, share.bytes);
    assert!(matches!(
        claim_now(&mut table, &request(200, 1, 201), 60_002),
        Verdict::Blocked(Block::InFlight { .. })
    ));
}

// A table with no room to spare: eviction, organisations' shares, blocks counted ahead.
mod full;
