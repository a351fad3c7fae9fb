//! A request sent from the root context (`outlive_client`): what goes out, and how its answer
//! ends the claim and reaches its client.

use super::*;

const OUTLIVE: &str = r#"{"outlive_client": {"timeout": "20s"}}"#;

impl Run {
    /// A request routed to be sent from the root context, claimed: what it asks to send.
    fn sent_from_root(&mut self, exchange: &mut Exchange, body: &[u8]) -> RootRequest {
        exchange.send_from_root("app".into(), 20_000);
        let mut pairs = POST_HEADERS.to_vec();
        pairs.extend([
            (":method", b"POST".as_slice()),
            (":path", b"/v1/customers?x=1"),
            (":authority", b"api"),
            ("connection", b"keep-alive"),
            ("content-length", b"2"),
            ("x-trace", b"t-1"),
        ]);
        let step =
            exchange.on_request_headers("POST", b"/v1/customers?x=1", &headers(&pairs), false);
        assert_eq!(step, Step::Buffer);
        let step = exchange.on_request_body(body.len(), true, |from| body[from..].to_vec());
        match self.settle(exchange, step) {
            Step::SendFromRoot(request) => request,
            other => panic!("expected a send from the root context, got {other:?}"),
        }
    }

    fn answered(&mut self, exchange: &mut Exchange, answer: Answered) -> LocalReply {
        let step = exchange.on_upstream_answer(answer);
        self.settle(exchange, step);
        exchange
            .take_client_reply()
            .expect("a reply for the client")
    }

    /// What a retry of the same request gets.
    fn retry(&mut self) -> Step {
        let mut retry = self.exchange();
        self.request(&mut retry, "POST", b"{}")
    }
}

fn upstream_answer(status: &str, extra: &[(&str, &[u8])], body: &[u8]) -> Answered {
    let mut pairs = vec![(":status", status.as_bytes())];
    pairs.extend_from_slice(extra);
    Answered::Response {
        headers: headers(&pairs),
        body: body.to_vec(),
    }
}

const FROM_UPSTREAM: (&str, &[u8]) = ("x-envoy-upstream-service-time", b"3");

#[test]
fn a_request_sent_from_the_root_context_carries_the_client_s_request_less_hop_by_hop_headers() {
    let mut run = Run::new(OUTLIVE);
    let mut exchange = run.exchange();
    let request = run.sent_from_root(&mut exchange, b"{}");
    assert_eq!((request.cluster.as_str(), request.timeout), ("app", 20_000));
    assert_eq!(request.body, b"{}");
    let names: Vec<_> = request.headers.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "authorization",
            "idempotency-key",
            ":method",
            ":path",
            ":authority",
            "x-trace"
        ]
    );
    assert!(!exchange.is_owner(), "its client's stream captures nothing");
    assert_eq!(
        exchange.on_end(StreamEnd::Interrupted),
        Step::Done,
        "a client that leaves does not end the claim"
    );
    assert!(
        matches!(run.retry(), Step::Wait),
        "the claim is still in flight"
    );
}

#[test]
fn the_upstream_s_answer_to_a_request_sent_from_the_root_is_stored_and_given_to_its_client() {
    let mut run = Run::new(OUTLIVE);
    let mut exchange = run.exchange();
    run.sent_from_root(&mut exchange, b"{}");
    let answer = upstream_answer(
        "201",
        &[FROM_UPSTREAM, ("set-cookie", b"s=1")],
        b"{\"id\":7}",
    );
    let reply = run.answered(&mut exchange, answer);
    assert_eq!(
        (reply.status, reply.body.as_slice()),
        (201, b"{\"id\":7}".as_slice())
    );
    assert_eq!(
        reply.headers,
        [("set-cookie".into(), "s=1".into())],
        "the original, not a replay"
    );
    let replay = reply_of(run.retry());
    assert_eq!((replay.status, replay.body), (201, reply.body));
    assert!(replay
        .headers
        .contains(&("idempotent-replayed".into(), "true".into())));
}

#[test]
fn how_an_answer_from_the_root_context_ends_its_claim() {
    let timeout = b"upstream request timeout".as_slice();
    let refused = b"upstream connect error or disconnect/reset before headers. reset reason: \
                    connection failure"
        .as_slice();
    let reset = b"upstream connect error or disconnect/reset before headers. reset reason: \
                  connection termination"
        .as_slice();
    let held = Some((503, "idempotency_in_progress"));
    let too_large = Answered::TooLarge {
        headers: headers(&[(":status", b"201"), FROM_UPSTREAM]),
    };
    // (answer, what the client gets, what a retry gets: `None` if it runs the work again)
    let cases = [
        (upstream_answer("503", &[FROM_UPSTREAM], b"busy"), 503, None),
        (upstream_answer("504", &[], timeout), 504, held),
        (
            upstream_answer("503", &[], b"no healthy upstream"),
            503,
            None,
        ),
        (upstream_answer("503", &[], refused), 503, None),
        (upstream_answer("503", &[], reset), 503, held),
        (
            too_large,
            502,
            Some((409, "idempotency_response_not_stored")),
        ),
        (Answered::Nothing, 503, held),
        (Answered::NotSent, 503, None),
    ];
    for (answer, status, retried) in cases {
        let mut run = Run::new(OUTLIVE);
        let mut exchange = run.exchange();
        run.sent_from_root(&mut exchange, b"{}");
        let case = format!("{answer:?}");
        let reply = run.answered(&mut exchange, answer);
        assert_eq!(reply.status, status, "{case}");
        match (run.retry(), retried) {
            (Step::Forward, None) => {}
            (step, Some((status, code))) => {
                assert_eq!(code_of(step), (status, code.into()), "{case}")
            }
            (step, None) => panic!("{case}: the retry got {step:?}"),
        }
    }
}

#[test]
fn a_request_with_a_header_the_host_cannot_send_goes_through_the_router() {
    let mut run = Run::new(OUTLIVE);
    let mut exchange = run.exchange();
    exchange.send_from_root("app".into(), 20_000);
    let mut pairs = POST_HEADERS.to_vec();
    pairs.push(("x-raw", b"\xff"));
    exchange.on_request_headers("POST", b"/v1/customers", &headers(&pairs), false);
    let step = exchange.on_request_body(2, true, |_| b"{}".to_vec());
    assert_eq!(run.settle(&mut exchange, step), Step::Forward);
}

#[test]
fn a_request_with_trailers_goes_through_the_router() {
    let mut run = Run::new(OUTLIVE);
    let mut exchange = run.exchange();
    exchange.send_from_root("app".into(), 20_000);
    exchange.on_request_headers("POST", b"/v1/customers", &headers(&POST_HEADERS), false);
    assert_eq!(
        exchange.on_request_body(2, false, |_| b"{}".to_vec()),
        Step::Buffer
    );
    let step = exchange.on_request_body_end();
    assert_eq!(run.settle(&mut exchange, step), Step::Forward);
}
