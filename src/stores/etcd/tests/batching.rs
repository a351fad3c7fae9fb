//! What goes out together: claims past a worker's calls, finishes, followers of a key being
//! asked about; and what the calls measure.

use super::*;

/// Each finish sent by `call`, once etcd has answered it.
fn finishes_of(world: &mut World, store: &mut Envoy, call: CallId, now: Millis) -> Vec<Resumed> {
    let (method, message) = world.calls.get(call);
    let answer = world.etcd.answer(method, &message);
    assert_eq!(store.resume(call, Ok(answer), now), Some(Resumed::Nothing));
    store
        .take_moved_on()
        .into_iter()
        .map(|(_, resumed)| resumed)
        .collect()
}

#[test]
fn a_batch_etcd_refuses_whole_goes_out_again_finish_by_finish() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    for ticket in tickets(&mut world, &mut a, 2) {
        assert_eq!(a.finish(ticket, Ending::Released, 10), Answer::Queued);
    }
    world.tick_granting(&mut a, 20);
    let batch = world.calls.last();
    let sent = world.calls.sent.borrow().len();
    let too_large = CallFailed {
        status: 3,
        message: "etcdserver: request is too large".into(),
    };
    assert_eq!(a.resume(batch, Err(too_large), 30), Some(Resumed::Nothing));
    let resent: Vec<CallId> = (a.take_moved_on().into_iter())
        .map(|(_, resumed)| match resumed {
            Resumed::Finish(Answer::Later(call)) => call,
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        resent,
        [Calls::id(sent), Calls::id(sent + 1)],
        "one call each"
    );
    for call in resent {
        let released = world.settle(&mut a, Resumed::Finish(Answer::Later(call)), 40);
        let done = Resumed::Finish(Answer::Now(Ok(Finished::Recorded(Ending::Released))));
        assert_eq!(released, done);
    }
    assert!(world.etcd.keys.is_empty(), "both released");
}

#[test]
fn claims_made_while_four_claim_calls_are_out_go_out_together_from_the_root_context_s_tick() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let claim = |n: u8, token: u64| Claim {
        tuple: [n; 32],
        ..claim_of(1, token)
    };
    tickets(&mut world, &mut a, 1); // the claim lease, granted
    let sent = world.calls.sent.borrow().len();
    for n in 2..6 {
        assert!(matches!(a.claim(&claim(n, n.into()), 10), Answer::Later(call) if !parked(call)));
    }
    assert_eq!(
        world.calls.sent.borrow().len(),
        sent + 4,
        "four claim calls"
    );
    // Three more wait, one of them a second claim of a key already waiting.
    let waiting: Vec<CallId> = [(6, 6), (7, 7), (6, 66)]
        .map(|(n, token)| match a.claim(&claim(n, token), 10) {
            Answer::Later(call) if parked(call) => call,
            other => panic!("{other:?}"),
        })
        .to_vec();
    assert_eq!(world.calls.sent.borrow().len(), sent + 4, "no call yet");
    // A claim call ends, in its request's callback: nothing is sent from there, where a call
    // would end with that request.
    let first = Resumed::Claim(Answer::Later(Calls::id(sent)));
    claimed(world.settle(&mut a, first, 15));
    assert_eq!(world.calls.sent.borrow().len(), sent + 4);
    // The tick sends them, though three claim calls are still unanswered (their requests may
    // have left, taking the calls with them): keys 6 and 7 in one batch. The second claim of
    // key 6 follows the first, and asks once the first's answer is in.
    let (_, moved) = world.tick_granting(&mut a, 20);
    assert_eq!(world.calls.sent.borrow().len(), sent + 5);
    assert_eq!(moved.len(), 0, "the follower waits");
    let batch = Calls::id(sent + 4);
    assert_eq!(
        FakeEtcd::keys_of(wire::TXN, &world.calls.get(batch).1).len(),
        2
    );
    let (method, message) = world.calls.get(batch);
    let answer = world.etcd.answer(method, &message);
    assert_eq!(a.resume(batch, Ok(answer), 30), Some(Resumed::Nothing));
    let moved = a.take_moved_on();
    let answered: Vec<CallId> = moved.iter().map(|(id, _)| *id).collect();
    assert_eq!(answered, waiting, "the batch's two, then the follower");
    let revision = world.etcd.keys[&a.key(&[6; 32])].1;
    let [first, seventh, second] = <[_; 3]>::try_from(moved).unwrap();
    for (_, resumed) in [first, seventh] {
        assert_eq!(claimed(resumed).handle, Handle::Revision(revision));
    }
    // The second claim of key 6 finds the first's (sent at 20, for a lease of 60 s).
    assert_eq!(
        world.settle(&mut a, second.1, 40),
        Resumed::Claim(Answer::Now(Ok(Verdict::Blocked(Block::InFlight {
            remaining: 59_980
        }))))
    );
}

#[test]
fn the_finishes_of_a_tick_go_out_in_one_transaction_and_each_lands() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let mut tickets = tickets(&mut world, &mut a, 4);
    // The first waits for the record lease, and goes on alone once it is granted.
    let first = tickets.pop().unwrap();
    finish(&mut world, &mut a, first, Ending::Stored(response()), 10);
    for ticket in tickets {
        assert_eq!(
            a.finish(ticket, Ending::Stored(response()), 10),
            Answer::Queued
        );
    }
    let sent = world.calls.sent.borrow().len();
    assert_eq!(world.tick_granting(&mut a, 20).0, vec![]);
    assert_eq!(world.calls.sent.borrow().len(), sent + 1, "one call");
    let batch = world.calls.last();
    let finishes = finishes_of(&mut world, &mut a, batch, 30);
    let stored = || Resumed::Finish(Answer::Now(Ok(Finished::Recorded(Ending::Stored(())))));
    assert_eq!(finishes, vec![stored(), stored(), stored()]);
    for n in 1..=3u8 {
        let retry = Claim {
            tuple: [n; 32],
            ..claim_of(1, 99)
        };
        let replay = Resumed::Claim(b.claim(&retry, 40));
        assert_eq!(
            world.settle(&mut b, replay, 40),
            Resumed::Claim(Answer::Now(Ok(replay_stored_at(10))))
        );
    }
}

#[test]
fn every_call_is_timed_and_sized_and_what_waits_is_gauged() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    tickets(&mut world, &mut a, 1); // the claim lease, granted
    a.take_samples();
    let sent = world.calls.sent.borrow().len();
    for n in 2..8 {
        let claim = Claim {
            tuple: [n; 32],
            ..claim_of(1, n.into())
        };
        a.claim(&claim, 10);
    }
    let level = |a: &mut Envoy, gauge| {
        let levels = a.levels(10);
        levels.iter().find(|(g, _)| *g == gauge).unwrap().1
    };
    assert_eq!(level(&mut a, Gauge::EtcdCallsInFlight), 4);
    assert_eq!(
        level(&mut a, Gauge::EtcdClaimsQueued),
        2,
        "past four calls, claims wait"
    );
    world.calls.micros.set(1_500);
    let first = Resumed::Claim(Answer::Later(Calls::id(sent)));
    claimed(world.settle(&mut a, first, 15));
    world.tick_granting(&mut a, 20);
    assert_eq!(level(&mut a, Gauge::EtcdClaimsQueued), 0);
    assert_eq!(
        a.take_samples(),
        [
            [(Histogram::EtcdBatchOps, 1); 4].as_slice(),
            &[
                (Histogram::EtcdCallMicros, 1_500),
                (Histogram::EtcdBatchOps, 2)
            ],
        ]
        .concat(),
        "four calls of one claim each, one answered 1.5 ms later, then the two that waited"
    );
}

#[test]
fn what_waits_for_the_root_context_goes_out_when_it_wakes_not_on_its_next_tick() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let claim = |n: u8| Claim {
        tuple: [n; 32],
        ..claim_of(1, n.into())
    };
    // The claim lease and the record lease, granted.
    let mut owners = tickets(&mut world, &mut a, 1);
    finish(
        &mut world,
        &mut a,
        owners.remove(0),
        Ending::Stored(response()),
        5,
    );
    assert!(!a.wants_root(), "nothing waits");
    for n in 2..8 {
        a.claim(&claim(n), 10);
    }
    assert!(a.wants_root(), "two claims wait past four calls");
    let sent = world.calls.sent.borrow().len();
    assert_eq!(a.root_woke(11), vec![]);
    assert_eq!(
        world.calls.sent.borrow().len(),
        sent + 1,
        "both in one call"
    );
    assert!(!a.wants_root());
    let batch = world.calls.last();
    let owners: Vec<Ticket> = finishes_of(&mut world, &mut a, batch, 12)
        .into_iter()
        .map(claimed)
        .collect();
    // The first finish goes out at once; the second waits for it, then goes when it answers.
    a.finish(owners[0], Ending::Stored(response()), 13);
    assert!(a.wants_root(), "no finish in flight");
    assert_eq!(a.root_woke(13), vec![]);
    let first = world.calls.last();
    a.finish(owners[1], Ending::Stored(response()), 14);
    assert!(
        !a.wants_root(),
        "a finish is in flight: the next gathers behind it"
    );
    let (method, message) = world.calls.get(first);
    let answer = world.etcd.answer(method, &message);
    a.resume(first, Ok(answer), 15);
    assert!(a.wants_root());
    assert_eq!(a.root_woke(15), vec![]);
    assert_eq!(world.calls.last(), first + 4, "sent without a tick");
}

#[test]
fn a_burst_of_replays_of_a_record_not_in_the_cache_makes_one_call() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let ticket = world.claim_on(&mut a, 10, 0);
    finish(&mut world, &mut a, ticket, Ending::Stored(response()), 10);
    let sent = world.calls.sent.borrow().len();
    let txns = |world: &World| {
        let calls = world.calls.sent.borrow();
        calls[sent..]
            .iter()
            .filter(|(method, _)| *method == wire::TXN)
            .count()
    };
    let answers: Vec<_> = (20..25)
        .map(|token| b.claim(&claim_of(1, token), 20))
        .collect();
    let Answer::Later(first) = answers[0] else {
        panic!("{:?}", answers[0]);
    };
    assert_eq!(
        world.settle(&mut b, Resumed::Claim(Answer::Later(first)), 21),
        Resumed::Claim(Answer::Now(Ok(replay_stored_at(10))))
    );
    assert_eq!(txns(&world), 1, "one claim for the five");
    let followers: Vec<CallId> = answers[1..]
        .iter()
        .map(|answer| match answer {
            Answer::Later(id) if parked(*id) => *id,
            other => panic!("{other:?}"),
        })
        .collect();
    let moved = b.take_moved_on();
    assert_eq!(
        moved.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        followers
    );
    for (_, resumed) in moved {
        assert_eq!(
            resumed,
            Resumed::Claim(Answer::Now(Ok(replay_stored_at(10))))
        );
    }
    assert_eq!(txns(&world), 1, "the rest from the copy it left");
}

#[test]
fn while_most_claims_find_a_record_they_read_first_and_those_that_wait_read_together() {
    let mut world = World::new();
    let mut a = world.envoy(JSON);
    let mut b = world.envoy(JSON);
    let claim = |n: u8| Claim {
        tuple: [n; 32],
        ..claim_of(1, n.into())
    };
    for n in 1..=40 {
        let first = Resumed::Claim(a.claim(&claim(n), 0));
        let ticket = claimed(world.settle(&mut a, first, 0));
        finish(&mut world, &mut a, ticket, Ending::Stored(response()), 10);
    }
    // Claims made at once on `b`, which holds no copy; whether each of its calls to the KV
    // service made etcd write.
    let mut claims = |world: &mut World, tuples: &[u8], now: Millis| {
        let sent = world.calls.sent.borrow().len();
        let answers: Vec<_> = tuples.iter().map(|n| b.claim(&claim(*n), now)).collect();
        let settled: Vec<Resumed> = answers
            .into_iter()
            .map(|answer| world.settle(&mut b, Resumed::Claim(answer), now))
            .collect();
        let calls = world.calls.sent.borrow();
        let kv = calls[sent..]
            .iter()
            .filter(|(method, _)| *method != wire::GRANT);
        let writes = kv.map(|(method, message)| FakeEtcd::writes(*method, message));
        (settled, writes.collect::<Vec<bool>>())
    };
    let replays = |count| {
        let replay = || Resumed::Claim(Answer::Now(Ok(replay_stored_at(10))));
        std::iter::repeat_with(replay)
            .take(count)
            .collect::<Vec<_>>()
    };
    // At first a claim is a transaction, a write even when its compare fails and it only reads
    // the record back: four alone, the twenty past them nested in one.
    let first: Vec<u8> = (1..=24).collect();
    assert_eq!(claims(&mut world, &first, 20), (replays(24), vec![true; 5]));
    // Then 24 of the last 32 found a record: claims read first, four alone and the four past
    // them in one transaction of reads only, none a write.
    let second: Vec<u8> = (25..=32).collect();
    assert_eq!(
        claims(&mut world, &second, 30),
        (replays(8), vec![false; 5])
    );
    // A first POST among them reads, finds nothing, and claims.
    let (settled, writes) = claims(&mut world, &[99], 40);
    assert!(matches!(
        settled[..],
        [Resumed::Claim(Answer::Now(Ok(Verdict::Claimed(_))))]
    ));
    assert_eq!(writes, [false, true]);
}
