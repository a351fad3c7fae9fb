use super::fake::*;
use super::*;
use crate::core::lifecycle::{Block, Verdict};
use crate::core::store::CallFailed;

#[test]
fn a_claim_is_one_create_if_absent_transaction_under_a_shared_lease() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    world.claim_on(&mut a, 10, 0);
    assert_eq!(world.etcd.leases, 1);
    // Another Envoy, same request: the transaction fails and returns the claim in flight.
    let second = Resumed::Claim(b.claim(&claim_of(1, 20), 5));
    assert_eq!(
        world.settle(&mut b, second, 5),
        Resumed::Claim(Answer::Now(Ok(Verdict::Blocked(Block::InFlight {
            remaining: 59_995
        }))))
    );
    let third = Resumed::Claim(b.claim(&claim_of(2, 30), 6));
    assert_eq!(
        world.settle(&mut b, third, 6),
        Resumed::Claim(Answer::Now(Ok(Verdict::Blocked(Block::Conflict))))
    );
}

#[test]
fn a_stored_record_replays_on_another_envoy_and_then_from_its_cache() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    assert_eq!(
        finish(&mut world, &mut a, ticket, Ending::Stored(response()), 10),
        Finished::Recorded(Ending::Stored(()))
    );
    world.assert_replays(&mut b, 20, 20, 10);
    let before = world.answered;
    assert_eq!(
        b.claim(&claim_of(1, 21), 30),
        Answer::Now(Ok(replay_stored_at(10)))
    );
    assert_eq!(world.answered, before, "served from the local cache");
    assert_eq!(
        a.claim(&claim_of(1, 22), 30),
        Answer::Now(Ok(replay_stored_at(10)))
    );
}

#[test]
fn past_its_share_an_organisation_s_records_live_a_lease_and_count_as_evicted() {
    let mut world = World::new();
    let json = r#"{"ttl": "1h", "lease": "10s",
        "etcd": {"cluster": "etcd", "max_value_bytes": 1024, "max_share_bytes": 1024}}"#;
    let mut envoy = world.envoy(json);
    // Stores a response for organisation `org` under tuple `n`; when its record expires.
    let mut store = |world: &mut World, org: u16, n: u8, now: Millis| {
        let claim = Claim {
            tuple: [n; 32],
            org,
            ttl: 3_600_000,
            lease: 10_000,
            ..claim_of(1, u64::from(n))
        };
        let first = Resumed::Claim(envoy.claim(&claim, now));
        let ticket = claimed(world.settle(&mut envoy, first, now));
        let reply = finish(world, &mut envoy, ticket, Ending::Stored(response()), now);
        assert_eq!(reply, Finished::Recorded(Ending::Stored(())));
        let key = envoy.key(&claim.tuple);
        let (entry, _) = crate::stores::etcd::value::decode(&world.etcd.keys[&key].0).unwrap();
        (entry.deadline - now, envoy.take_evictions())
    };
    let (hour, lease) = (3_600_000, 10_000);
    let lives: Vec<Millis> = (1..=8).map(|n| store(&mut world, 1, n, 0).0).collect();
    let kept = lives.iter().filter(|life| **life == hour).count();
    assert!(
        (3..8).contains(&kept),
        "1 KiB holds a few records: {lives:?}"
    );
    assert!(lives[kept..].iter().all(|life| *life == lease), "{lives:?}");
    assert_eq!(store(&mut world, 1, 9, 0), (lease, vec![lease]));
    assert_eq!(
        store(&mut world, 2, 10, 0),
        (hour, vec![]),
        "another organisation"
    );
    // Once the first records' leases have surely ended, the share has room again.
    let later = hour + 5 * hour / 8;
    assert_eq!(store(&mut world, 1, 11, later), (hour, vec![]));
}

#[test]
fn a_route_s_own_ttl_and_lease_decide_its_records_deadlines() {
    let mut world = World::new();
    let mut envoy = world.envoy(r#"{"ttl": "1h", "lease": "10s", "etcd": {"cluster": "etcd"}}"#);
    let deadline = |world: &World, envoy: &Envoy, claim: &Claim| {
        let key = envoy.key(&claim.tuple);
        crate::stores::etcd::value::decode(&world.etcd.keys[&key].0)
            .unwrap()
            .0
            .deadline
    };
    let route = |n: u8| Claim {
        tuple: [n; 32],
        ttl: 600_000,
        lease: 5_000,
        ..claim_of(1, u64::from(n))
    };
    let (stored, held) = (route(1), route(2));
    let first = Resumed::Claim(envoy.claim(&stored, 0));
    let ticket = claimed(world.settle(&mut envoy, first, 0));
    assert_eq!(
        deadline(&world, &envoy, &stored),
        5_000,
        "claimed for the route's lease"
    );
    finish(
        &mut world,
        &mut envoy,
        ticket,
        Ending::Stored(response()),
        100,
    );
    assert_eq!(
        deadline(&world, &envoy, &stored),
        600_100,
        "kept for the route's ttl"
    );
    let first = Resumed::Claim(envoy.claim(&held, 200));
    let ticket = claimed(world.settle(&mut envoy, first, 200));
    finish(&mut world, &mut envoy, ticket, Ending::Held, 300);
    assert_eq!(
        deadline(&world, &envoy, &held),
        5_300,
        "held for the route's lease"
    );
}

#[test]
fn a_waiting_request_reads_the_record_and_claims_only_once_it_is_gone() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    let sent = world.calls.sent.borrow().len();
    assert_eq!(b.poll(&claim_of(1, 20), false, 5), None);
    assert_eq!(
        world.calls.sent.borrow().len(),
        sent,
        "a near poll makes no call"
    );
    let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 5).unwrap());
    assert_eq!(world.calls.get(Calls::id(sent)).0, wire::RANGE);
    assert_eq!(
        world.settle(&mut b, look, 5),
        Resumed::Claim(Answer::Now(Ok(Verdict::Blocked(Block::InFlight {
            remaining: 59_995
        }))))
    );
    assert_eq!(
        finish(&mut world, &mut a, ticket, Ending::Stored(response()), 10),
        Finished::Recorded(Ending::Stored(()))
    );
    // A duplicate on the original's Envoy finds the record there, without a call.
    let sent = world.calls.sent.borrow().len();
    assert_eq!(
        a.poll(&claim_of(1, 11), false, 11),
        Some(Answer::Now(Ok(replay_stored_at(10))))
    );
    assert_eq!(world.calls.sent.borrow().len(), sent);
    let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 12).unwrap());
    assert_eq!(
        world.settle(&mut b, look, 12),
        Resumed::Claim(Answer::Now(Ok(replay_stored_at(10))))
    );
}

#[test]
fn a_waiting_request_claims_a_released_record() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    assert_eq!(
        finish(&mut world, &mut a, ticket, Ending::Released, 1),
        Finished::Recorded(Ending::Released)
    );
    let sent = world.calls.sent.borrow().len();
    let look = Resumed::Claim(b.poll(&claim_of(1, 20), true, 2).unwrap());
    let ticket = claimed(world.settle(&mut b, look, 2));
    assert_eq!(ticket.claim.token, 20);
    let methods: Vec<Method> = world.calls.sent.borrow()[sent..]
        .iter()
        .map(|(method, _)| *method)
        .collect();
    // B's first claim needs a lease of its own: leases are cached per Envoy.
    assert_eq!(methods, [wire::RANGE, wire::GRANT, wire::TXN]);
}

#[test]
fn a_finish_etcd_did_not_take_is_sent_again_while_the_claim_lasts() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    assert_eq!(
        a.finish(ticket, Ending::Stored(response()), 10),
        Answer::Queued
    );
    assert_eq!(world.tick_granting(&mut a, 10).0, vec![]);
    let sent = world.calls.sent.borrow().len();
    let unavailable = Err(CallFailed {
        status: 14,
        message: "etcdserver: leader changed".into(),
    });
    assert!(matches!(
        a.resume(world.calls.last(), unavailable, 20),
        Some(Resumed::Finish(Answer::Now(Err(StoreError::Remote(_)))))
    ));
    assert_eq!(a.tick(500), vec![]);
    assert_eq!(world.calls.sent.borrow().len(), sent, "not before a second");
    assert_eq!(a.tick(1_020), vec![]);
    let again = world.calls.sent.borrow().len();
    assert_eq!(again, sent + 1, "sent again");
    let resumed = world.settle(
        &mut a,
        Resumed::Finish(Answer::Later(world.calls.last())),
        1_030,
    );
    assert_eq!(
        resumed,
        Resumed::Finish(Answer::Now(Ok(Finished::Recorded(Ending::Stored(())))))
    );
    world.assert_replays(&mut b, 20, 1_040, 10);
}

#[test]
fn a_finish_sent_again_after_its_answer_was_lost_finds_its_own_write_and_is_done() {
    for (ending, recorded) in [
        (Ending::Stored(response()), Ending::Stored(())),
        (Ending::Released, Ending::Released),
    ] {
        let mut world = World::new();
        let mut a = world.envoy(JSON);
        let ticket = world.claim_on(&mut a, 10, 0);
        assert_eq!(a.finish(ticket, ending, 10), Answer::Queued);
        assert_eq!(world.tick_granting(&mut a, 10).0, vec![]);
        // etcd applies the finish, but its answer never reaches the Envoy.
        let lost = world.answer_last(&mut a, false, 20);
        assert!(
            matches!(lost, Some(Resumed::Finish(Answer::Now(Err(_))))),
            "{lost:?}"
        );
        assert_eq!(a.tick(1_020), vec![]);
        let again = world.calls.last();
        let resumed = world.settle(&mut a, Resumed::Finish(Answer::Later(again)), 1_030);
        assert_eq!(
            resumed,
            Resumed::Finish(Answer::Now(Ok(Finished::Recorded(recorded)))),
            "not a lost claim"
        );
    }
}

#[test]
fn a_finish_that_keeps_failing_is_given_up_a_lease_after_the_response() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    a.finish(ticket, Ending::Stored(response()), 10);
    let (mut sends, mut reported) = (0, 0);
    for now in (10..70_000).step_by(20) {
        let mut next = world.calls.sent.borrow().len();
        a.tick(now);
        // The finish fails each time; the leases it and the next window's claims need come.
        while next < world.calls.sent.borrow().len() {
            let call = Calls::id(next);
            next += 1;
            if world.calls.get(call).0 == wire::GRANT {
                let answer = world.etcd.answer(wire::GRANT, &world.calls.get(call).1);
                assert_eq!(a.resume(call, Ok(answer), now), Some(Resumed::Nothing));
                continue;
            }
            match a.resume(call, Err(lost()), now) {
                Some(Resumed::Finish(Answer::Now(Err(_)))) => {
                    (sends, reported) = (sends + 1, reported + 1)
                }
                Some(Resumed::Finish(Answer::Queued)) => sends += 1,
                other => panic!("{other:?}"),
            }
        }
    }
    // Every second while the claim's lease (60 s) runs from the response, then no more;
    // the first failure and giving up are reported, the rest are quiet.
    assert_eq!(sends, 60);
    assert_eq!(reported, 2);
    assert_eq!(a.retries.bytes, 0);
}

#[test]
fn a_claim_whose_answer_was_lost_is_revoked_once_it_has_landed() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    world.claim_sent(&mut a, 10, 0);
    // etcd applied it; A never heard back and answered its client 503.
    let lost = world.answer_last(&mut a, false, 500);
    assert!(matches!(lost, Some(Resumed::Claim(Answer::Now(Err(_))))));
    assert_eq!(world.etcd.keys.len(), 1, "the claim landed");
    let sent = world.calls.sent.borrow().len();
    assert_eq!(a.tick(1_000), vec![]);
    assert_eq!(world.calls.sent.borrow().len(), sent, "not before a second");
    a.tick(1_500);
    assert_eq!(world.last_method(), wire::TXN);
    assert_eq!(
        world.answer_last(&mut a, true, 1_510),
        Some(Resumed::Nothing)
    );
    assert!(world.etcd.keys.is_empty(), "revoked");
    assert_eq!(a.retries.revokes, 0);
    // The retry, on any Envoy, runs the work instead of waiting for the lease.
    world.claim_on(&mut b, 20, 1_520);
}

#[test]
fn a_lost_claim_that_lands_late_is_revoked_when_it_does() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    world.claim_sent(&mut a, 10, 0);
    let late = world.calls.get(world.calls.last());
    a.resume(world.calls.last(), Err(lost()), 500);
    a.tick(1_500);
    // Not there yet: looked for again a second later, then at doubling intervals.
    assert_eq!(
        world.answer_last(&mut a, true, 1_510),
        Some(Resumed::Nothing)
    );
    world.etcd.answer(late.0, &late.1);
    assert_eq!(world.etcd.keys.len(), 1, "the lost claim landed late");
    let sent = world.calls.sent.borrow().len();
    a.tick(2_000);
    assert_eq!(world.calls.sent.borrow().len(), sent);
    a.tick(2_510);
    assert_eq!(
        world.answer_last(&mut a, true, 2_520),
        Some(Resumed::Nothing)
    );
    assert!(world.etcd.keys.is_empty());
}

#[test]
fn revoking_leaves_another_claim_alone_and_a_refused_claim_is_not_revoked() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    world.claim_sent(&mut a, 10, 0);
    a.resume(world.calls.last(), Err(lost()), 500);
    world.claim_on(&mut b, 20, 600);
    a.tick(1_500);
    assert_eq!(
        world.answer_last(&mut a, true, 1_510),
        Some(Resumed::Nothing)
    );
    assert_eq!(world.etcd.keys.len(), 1, "B's claim stays");
    assert_eq!(a.retries.revokes, 0, "done: the key is someone else's");

    // A claim etcd refused was not applied: nothing to revoke.
    world.claim_sent(&mut a, 11, 2_000);
    a.resume(world.calls.last(), Err(nospace()), 2_010);
    let sent = world.calls.sent.borrow().len();
    a.tick(10_000);
    assert_eq!(world.calls.sent.borrow().len(), sent);
}

#[test]
fn a_released_claim_is_deleted_only_if_still_ours() {
    let mut world = World::new();
    let mut store = world.envoy(JSON);
    let ticket = world.claim_on(&mut store, 10, 0);
    // Past the lease, another request takes the record over.
    let later = Resumed::Claim(store.claim(&claim_of(1, 11), 60_001));
    claimed(world.settle(&mut store, later, 60_001));
    assert_eq!(
        finish(&mut world, &mut store, ticket, Ending::Released, 60_002),
        Finished::Lost
    );
    assert_eq!(world.etcd.keys.len(), 1, "the newer claim is untouched");
}

#[test]
fn a_release_lets_the_retry_claim_again() {
    let mut world = World::new();
    let mut store = world.envoy(JSON);
    let ticket = world.claim_on(&mut store, 10, 0);
    assert_eq!(
        finish(&mut world, &mut store, ticket, Ending::Released, 1),
        Finished::Recorded(Ending::Released)
    );
    let retry = Resumed::Claim(store.claim(&claim_of(1, 11), 2));
    claimed(world.settle(&mut store, retry, 2));
}

#[test]
fn a_value_over_the_limit_keeps_the_record_without_its_response() {
    let mut world = World::new();
    let json = r#"{"etcd": {"cluster": "etcd", "max_value_bytes": 1024}}"#;
    let mut store = world.envoy(json);
    let ticket = world.claim_on(&mut store, 10, 0);
    let mut big = response();
    big.body = crate::core::record::incompressible(2048);
    assert_eq!(
        finish(&mut world, &mut store, ticket, Ending::Stored(big), 1),
        Finished::Recorded(Ending::Unstored { no_room: false })
    );
    let retry = Resumed::Claim(store.claim(&claim_of(1, 11), 2));
    assert_eq!(
        world.settle(&mut store, retry, 2),
        Resumed::Claim(Answer::Now(Ok(Verdict::Blocked(Block::Unstored))))
    );
}

fn nospace() -> CallFailed {
    CallFailed {
        status: 8,
        message: "etcdserver: mvcc: database space exceeded".into(),
    }
}

#[test]
fn etcd_errors_fail_the_operation() {
    let mut world = World::new();
    let mut store = world.envoy(JSON);
    world.claim_sent(&mut store, 10, 0);
    let call = world.calls.last();
    match store.resume(call, Err(nospace()), 1) {
        Some(Resumed::Claim(Answer::Now(Err(StoreError::Remote(what))))) => {
            assert!(what.contains("space exceeded"), "{what}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(store.resume(call, Ok(Vec::new()), 1), None, "answered once");
}

#[test]
fn garbage_answers_from_etcd_fail_the_claim_without_panicking() {
    use crate::core::garbage;
    use crate::core::record::{Entry, State};
    let entry = Entry {
        state: State::Complete,
        tuple: [1; 32],
        fingerprint: [1; 16],
        token: 9,
        deadline: 10_000_000,
        response_len: 0,
        org: 1,
        stored: 0,
    };
    let record = super::value::encode(&entry, Some(&response().encode(9, true)));
    use super::wire::{KeyValue, RangeResponse, Response, ResponseOp, TxnResponse};
    use prost::Message;
    let answer = |succeeded: bool, value: Vec<u8>| {
        let range = RangeResponse {
            header: None,
            kvs: vec![KeyValue {
                key: b"x".to_vec(),
                mod_revision: 6,
                value,
            }],
        };
        TxnResponse {
            header: None,
            succeeded,
            responses: vec![ResponseOp {
                response: Some(Response::Range(range)),
            }],
        }
        .encode_to_vec()
    };
    let won = answer(true, Vec::new());
    garbage::run("etcd answers", |g| {
        let mut world = World::new();
        let mut store = world.envoy(JSON);
        world.claim_sent(&mut store, 10, 0);
        let message = match g.below(4) {
            0 => g.bytes(512),
            1 => g.mutate(&won),
            2 => g.mutate(&answer(false, record.clone())),
            _ => answer(false, g.mutate(&record)),
        };
        let answer = store.resume(world.calls.last(), Ok(message), 1);
        assert!(matches!(answer, Some(Resumed::Claim(_))), "{answer:?}");
    });
}

#[test]
fn claims_that_find_no_lease_wait_for_one_grant_and_the_next_is_granted_ahead() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let claim = |n: u8| Claim {
        tuple: [n; 32],
        ..claim_of(1, u64::from(n))
    };
    let waiting: Vec<CallId> = (0..32)
        .map(|n| match a.claim(&claim(n), 0) {
            Answer::Later(call) if parked(call) => call,
            other => panic!("{other:?}"),
        })
        .collect();
    assert!(
        world.calls.sent.borrow().is_empty(),
        "no call a request's end could cancel"
    );
    let (_, moved) = world.tick_granting(&mut a, 20);
    assert_eq!(world.etcd.leases, 1, "one grant for 32 claims");
    let went_on: Vec<CallId> = moved.iter().map(|(call, _)| *call).collect();
    assert_eq!(went_on, waiting);
    for (_, resumed) in moved {
        claimed(world.settle(&mut a, resumed, 20));
    }
    // The claim lease's window is 7.5 s: in its second half, its successor comes ahead, once.
    for now in (40..7_500).step_by(20) {
        world.tick_granting(&mut a, now);
    }
    assert_eq!(world.etcd.leases, 2);
    let first = Resumed::Claim(a.claim(&claim(40), 7_500));
    claimed(world.settle(&mut a, first, 7_500));
    assert_eq!(
        world.etcd.leases, 2,
        "the next window's claim found its lease"
    );
    // A kind unused in a window is not granted ahead for the next.
    for now in (7_500..22_500).step_by(20) {
        world.tick_granting(&mut a, now);
    }
    assert_eq!(world.etcd.leases, 3);
}

#[test]
fn a_grant_failed_twice_fails_the_claims_waiting_for_it_and_for_a_moment_those_after() {
    let world = World::new();
    let mut a = world.envoy(JSON);
    let Answer::Later(waiting) = a.claim(&claim_of(1, 10), 0) else {
        panic!("expected to wait for a lease");
    };
    // The first failure (a member refusing, say) is asked again on the next tick.
    a.tick(20);
    assert_eq!(world.last_method(), wire::GRANT);
    assert_eq!(
        a.resume(world.calls.last(), Err(lost()), 30),
        Some(Resumed::Nothing)
    );
    assert_eq!(a.take_moved_on(), vec![], "still waiting");
    a.tick(40);
    assert_eq!(world.calls.sent.borrow().len(), 2, "asked again");
    assert_eq!(
        a.resume(world.calls.last(), Err(lost()), 50),
        Some(Resumed::Nothing)
    );
    let moved = a.take_moved_on();
    assert!(
        matches!(moved[..], [(call, Resumed::Claim(Answer::Now(Err(_))))] if call == waiting),
        "{moved:?}"
    );
    assert!(matches!(
        a.claim(&claim_of(1, 11), 200),
        Answer::Now(Err(StoreError::Remote(_)))
    ));
    a.tick(200);
    assert_eq!(
        world.calls.sent.borrow().len(),
        2,
        "no grant within the backoff"
    );
    assert!(matches!(a.claim(&claim_of(1, 12), 300), Answer::Later(call) if parked(call)));
}

/// Claims of tuples 1..=count on `store`, won: their tickets.
fn tickets(world: &mut World, store: &mut Envoy, count: u8) -> Vec<Ticket> {
    (1..=count)
        .map(|n| {
            let claim = Claim {
                tuple: [n; 32],
                ..claim_of(1, u64::from(n) * 10)
            };
            let first = Resumed::Claim(store.claim(&claim, 0));
            claimed(world.settle(store, first, 0))
        })
        .collect()
}

mod batching;
