//! The table with no room to spare: which record makes way, organisations' shares, and the
//! blocks each worker counts ahead of need.

use super::*;

#[test]
fn a_full_bucket_evicts_the_completed_record_nearest_expiry_never_a_claim_in_flight() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 16, "max_share": 1}"#);
    let in_flight = ticket(claim_now(&mut table, &of_org(1, 0, 100), 0));
    for n in 1..16u8 {
        store(&mut table, &of_org(1, n, u64::from(n)), u64::from(n) * 1000);
    }
    let bytes = kv.bytes();
    // Tuple 1, stored first, makes way; its retry then runs again.
    ticket(claim_now(&mut table, &of_org(1, 99, 99), 20_000));
    assert_eq!(table.take_evictions(), [19_000]);
    assert!(
        kv.bytes() < bytes,
        "the evicted response's bytes were given back"
    );
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 1, 101), 20_001),
        Verdict::Claimed(_)
    ));
    assert_eq!(table.take_evictions(), [18_001], "tuple 2 made way for it");
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 0, 102), 20_002),
        Verdict::Blocked(Block::InFlight { .. })
    ));
    assert_eq!(
        finish_now(&mut table, in_flight, Ending::Stored(response(1)), 20_003),
        Finished::Recorded(Ending::Stored(())),
        "the claim in flight kept its entry"
    );
}

#[test]
fn records_of_routes_with_other_ttls_each_live_and_are_evicted_by_their_own() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 16, "max_share": 1}"#);
    let with_ttl = |n: u8, ttl| Claim {
        ttl,
        ..of_org(1, n, u64::from(n) + 1)
    };
    // Eight records of a day and eight of four seconds, all stored at 0.
    for n in 0..16u8 {
        let ttl = if n < 8 { 86_400_000 } else { 4_000 };
        store(&mut table, &with_ttl(n, ttl), 0);
    }
    // A four-second record is safe for half its ttl, then the nearest expiry makes way.
    assert_eq!(
        claim_now(&mut table, &of_org(1, 99, 99), 1_999),
        Verdict::Blocked(Block::Full)
    );
    ticket(claim_now(&mut table, &of_org(1, 99, 100), 2_000));
    assert_eq!(table.take_evictions(), [2_000], "evicted at its own age");
    assert!(matches!(
        claim_now(&mut table, &with_ttl(0, 0), 3_999),
        Verdict::Replay(_)
    ));
    // Past their four seconds the short records are gone, the day-long ones replay.
    assert!(matches!(
        claim_now(&mut table, &with_ttl(9, 0), 4_000),
        Verdict::Claimed(_)
    ));
    assert!(matches!(
        claim_now(&mut table, &with_ttl(1, 0), 4_000),
        Verdict::Replay(_)
    ));
    assert!(
        table.take_evictions().is_empty(),
        "an expired record is not evicted"
    );
}

#[test]
fn a_bucket_of_claims_in_flight_is_full_and_reject_never_evicts() {
    let kv = MemoryKv::default();
    let mut evicting = table(&kv, r#"{"capacity_records": 16, "max_share": 1}"#);
    for n in 0..16u8 {
        ticket(claim_now(&mut evicting, &of_org(1, n, u64::from(n) + 1), 0));
    }
    assert_eq!(
        claim_now(&mut evicting, &of_org(1, 99, 99), 1),
        Verdict::Blocked(Block::Full)
    );
    let kv = MemoryKv::default();
    let json = r#"{"capacity_records": 16, "max_share": 1, "when_full": "reject"}"#;
    let mut rejecting = table(&kv, json);
    for n in 0..16u8 {
        store(&mut rejecting, &of_org(1, n, u64::from(n) + 1), 0);
    }
    assert_eq!(
        claim_now(&mut rejecting, &of_org(1, 99, 99), 1),
        Verdict::Blocked(Block::Full)
    );
    assert!(rejecting.take_evictions().is_empty());
}

#[test]
fn a_record_stored_within_the_grace_is_never_evicted() {
    let kv = MemoryKv::default();
    let mut table = table(&kv, r#"{"capacity_records": 16, "max_share": 1}"#);
    for n in 0..16u8 {
        store(
            &mut table,
            &of_org(1, n, u64::from(n) + 1),
            u64::from(n) * 1000,
        );
    }
    // Its client may be retrying right now: the new key is refused instead.
    assert_eq!(
        claim_now(&mut table, &of_org(1, 99, 99), GRACE - 1),
        Verdict::Blocked(Block::Full)
    );
    assert!(table.take_evictions().is_empty());
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 0, 100), GRACE - 1),
        Verdict::Replay(_)
    ));
    // The first record's grace is over: it makes way, and only it.
    ticket(claim_now(&mut table, &of_org(1, 99, 101), GRACE));
    assert_eq!(table.take_evictions(), [GRACE]);
    assert_eq!(
        claim_now(&mut table, &of_org(1, 98, 102), GRACE),
        Verdict::Blocked(Block::Full)
    );
}

#[test]
fn an_organisation_at_its_share_makes_way_with_its_own_records_and_no_one_elses() {
    let kv = MemoryKv::default();
    // 16 records, a quarter each: four.
    let mut table = table(&kv, r#"{"capacity_records": 16, "max_share": 0.25}"#);
    store(&mut table, &of_org(2, 200, 200), 0);
    for n in 0..4u8 {
        store(&mut table, &of_org(1, n, u64::from(n) + 1), u64::from(n));
    }
    assert_eq!(held(&table, 1).records, 4);
    // A fifth key, once the grace is over, evicts the organisation's oldest record, not the
    // other's.
    ticket(claim_now(&mut table, &of_org(1, 10, 10), GRACE + 100));
    assert_eq!(table.take_evictions(), [GRACE + 100]);
    assert_eq!(held(&table, 1).records, 4);
    assert!(
        matches!(
            claim_now(&mut table, &of_org(1, 0, 99), GRACE + 100),
            Verdict::Claimed(_)
        ),
        "the evicted record is gone: its retry runs again"
    );
    assert!(matches!(
        claim_now(&mut table, &of_org(2, 200, 201), GRACE + 101),
        Verdict::Replay(_)
    ));
    // With its share all in flight, it is refused, and the refused claim leaves nothing.
    for n in 11..13u8 {
        ticket(claim_now(
            &mut table,
            &of_org(1, n, u64::from(n)),
            GRACE + 102,
        ));
    }
    for token in [14, 15] {
        assert_eq!(
            claim_now(&mut table, &of_org(1, 14, token), GRACE + 103),
            Verdict::Blocked(Block::QuotaExceeded)
        );
    }
    assert_eq!(held(&table, 1).records, 4);
    // Another organisation still claims.
    assert!(matches!(
        claim_now(&mut table, &of_org(3, 30, 30), GRACE + 105),
        Verdict::Claimed(_)
    ));
}

#[test]
fn an_organisation_at_its_share_finds_its_own_record_in_the_next_buckets() {
    let kv = MemoryKv::default();
    // Two buckets (tuples of even bytes hash to the first, odd to the second); a share of 8.
    let mut table = table(&kv, r#"{"capacity_records": 32, "max_share": 0.25}"#);
    for n in 0..8u8 {
        store(&mut table, &of_org(1, 2 * n + 1, u64::from(n) + 1), 0);
    }
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 100, 100), GRACE),
        Verdict::Claimed(_)
    ));
    assert_eq!(table.take_evictions().len(), 1);
    assert_eq!(held(&table, 1).records, 8);
}

#[test]
fn shares_bytes_and_the_census_are_given_back_when_records_are_released_or_swept() {
    let kv = MemoryKv::default();
    let json = r#"{"capacity_records": 16, "max_share": 0.5}"#;
    let mut table = table(&kv, json);
    let of_org = |org, n, token| Claim {
        ttl: 1_000,
        ..of_org(org, n, token)
    };
    let released = ticket(claim_now(&mut table, &of_org(1, 1, 1), 0));
    assert_eq!(census(&mut table), (1, 0), "a claim in flight is a record");
    finish_now(&mut table, released, Ending::Released, 1);
    assert_eq!(held(&table, 1), Share::default());
    assert_eq!(census(&mut table), (0, 0));
    store(&mut table, &of_org(1, 2, 2), 0);
    let one = ledger(&table, 0);
    assert!(one > 100, "{one}");
    assert_eq!(
        held(&table, 1),
        Share {
            records: 1,
            bytes: one
        }
    );
    store(&mut table, &of_org(2, 3, 3), 0);
    assert_eq!(ledger(&table, 0), 2 * one);
    assert_eq!(census(&mut table), (2, 2 * one));
    // A claim whose owner vanished and the stored records expire, and are swept.
    ticket(claim_now(&mut table, &of_org(1, 4, 4), 0));
    assert_eq!(held(&table, 1).records, 2);
    assert_eq!(table.sweep(0, 60_000).unwrap(), 3);
    assert_eq!(held(&table, 1), Share::default());
    assert_eq!(held(&table, 2), Share::default());
    assert_eq!(ledger(&table, 0), 0);
    assert_eq!(census(&mut table), (0, 0));
}

/// The records and bytes the table's gauges report.
fn census(table: &mut Table<&MemoryKv>) -> (u64, u64) {
    let levels = table.levels(0);
    let level = |gauge| levels.iter().find(|(g, _)| *g == gauge).unwrap().1;
    (level(Gauge::RecordsHeld), level(Gauge::BytesHeld))
}

#[test]
fn workers_count_a_block_ahead_within_the_share_and_give_back_what_idles() {
    let kv = MemoryKv::default();
    // A share of 256 records: blocks of one record.
    let json = r#"{"capacity_records": 100000, "max_share": 0.00256}"#;
    let (mut one, mut two) = (table(&kv, json), table(&kv, json));
    let counted = |table: &Table<&MemoryKv>| {
        let key = table.key("s", 2);
        let (bytes, _) = table.kv.get(&key).unwrap().unwrap();
        Share::decode(&bytes).unwrap().records
    };
    ticket(claim_now(&mut one, &of_org(2, 0, 1), 0));
    assert_eq!(counted(&one), 2, "a claim and a block ahead");
    ticket(claim_now(&mut one, &of_org(2, 1, 2), 0));
    assert_eq!(counted(&one), 2, "the second claim came out of the reserve");
    ticket(claim_now(&mut one, &of_org(2, 2, 3), 0));
    for n in 3..=254u8 {
        ticket(claim_now(&mut two, &of_org(2, n, u64::from(n) + 1), 500));
    }
    // 255 records and one's reserve: the share is full, a record early.
    assert_eq!(counted(&two), 256);
    assert_eq!(
        claim_now(&mut two, &of_org(2, 255, 300), 500),
        Verdict::Blocked(Block::QuotaExceeded)
    );
    // One's reserve has been idle since its last claim; two's claims are more recent.
    one.tick(RESERVE_IDLE);
    assert_eq!(counted(&one), 255, "the idle reserve went back");
    ticket(claim_now(&mut two, &of_org(2, 255, 301), RESERVE_IDLE));
    assert_eq!(counted(&two), 256);
}

#[test]
fn a_single_tenant_table_fills_every_entry_whatever_another_worker_holds_ahead() {
    let kv = MemoryKv::default();
    // 32 buckets; tuple n lands in bucket n % 32, so 512 tuples fill every entry.
    let json = r#"{"capacity_records": 512, "max_share": 1}"#;
    let (mut one, mut two) = (table(&kv, json), table(&kv, json));
    let claim = |n: u64| {
        let mut tuple = [0; 32];
        tuple[..8].copy_from_slice(&n.to_le_bytes());
        Claim {
            tuple,
            ..request(0, 1, n + 1)
        }
    };
    ticket(claim_now(&mut one, &claim(0), 0));
    for n in 1..512 {
        ticket(claim_now(&mut two, &claim(n), 0));
    }
}

#[test]
fn an_organisation_past_its_byte_share_makes_way_with_its_own_responses() {
    let kv = MemoryKv::default();
    // The organisations' share: a tenth of 48 000 bytes. Bucket 0's shard: 6 000.
    let json = r#"{"capacity_records": 16, "max_share": 0.1, "capacity_bytes": 48000,
                   "max_response_body_bytes": 3000}"#;
    let mut table = table(&kv, json);
    let big = |table: &mut Table<&MemoryKv>, org, n: u8, now| {
        let owner = ticket(claim_now(table, &of_org(org, n, u64::from(n)), now));
        finish_now(table, owner, Ending::Stored(response(2900)), now)
    };
    assert_eq!(
        big(&mut table, 1, 1, 0),
        Finished::Recorded(Ending::Stored(()))
    );
    assert_eq!(
        big(&mut table, 2, 2, 1),
        Finished::Recorded(Ending::Stored(()))
    );
    // Organisation 1's second response does not fit its share: its first makes way.
    assert_eq!(
        big(&mut table, 1, 3, GRACE),
        Finished::Recorded(Ending::Stored(()))
    );
    assert_eq!(table.take_evictions().len(), 1);
    assert!(matches!(
        claim_now(&mut table, &of_org(2, 2, 9), GRACE + 1),
        Verdict::Replay(_)
    ));
    // Its retry, once the grace of the response that took its place is over, runs again.
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 1, 10), 2 * GRACE),
        Verdict::Claimed(_)
    ));
}

#[test]
fn a_response_that_finds_the_bytes_full_evicts_in_its_bucket() {
    let kv = MemoryKv::default();
    let json = r#"{"capacity_records": 16, "max_share": 1, "capacity_bytes": 16000,
                   "max_response_body_bytes": 1000}"#;
    let mut table = table(&kv, json);
    // The bucket's ledger shard holds 2000 bytes: one 1000-byte response fits, not two.
    let big = |table: &mut Table<&MemoryKv>, n: u8, now| {
        let owner = ticket(claim_now(table, &of_org(1, n, u64::from(n)), now));
        finish_now(table, owner, Ending::Stored(response(1000)), now)
    };
    assert_eq!(
        big(&mut table, 1, 0),
        Finished::Recorded(Ending::Stored(()))
    );
    assert_eq!(
        big(&mut table, 2, GRACE),
        Finished::Recorded(Ending::Stored(()))
    );
    assert_eq!(table.take_evictions().len(), 1);
    assert!(matches!(
        claim_now(&mut table, &of_org(1, 2, 9), GRACE + 1),
        Verdict::Replay(_)
    ));
}
