use super::*;
use crate::envelope::Envelope;

fn envelope(event: &str, n: usize) -> Envelope {
    let body = format!(r#"{{"event":"{event}","instance":"acme","data":{{"n":{n}}}}}"#);
    Envelope::from_webhook(body.as_bytes()).unwrap()
}

fn store(config: Config) -> Arc<Store> {
    Store::new(&config).unwrap()
}

#[test]
fn offsets_read_back_in_order() {
    let store = store(Config::default());
    let log = store.log("/acme");
    let entries: Vec<_> = (0..5).map(|n| log.append(&envelope("call", n))).collect();
    assert_eq!(log.head(), 5);
    assert_eq!(entries[0].offset, format!("{}-1", store.epoch()));
    let resume = log.resume(&store.epoch(), &entries[1].offset);
    assert_eq!(
        resume,
        Resume {
            recovered: true,
            after: 2
        }
    );
    let (batch, gap) = log.read_after(resume.after, 100);
    assert!(!gap);
    assert_eq!(
        batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![3, 4, 5]
    );
    let (batch, _) = log.read_after(2, 2);
    assert_eq!(batch.len(), 2);
}

#[test]
fn unknown_other_epoch_and_future_offsets_are_not_recovered() {
    let store = store(Config::default());
    let log = store.log("/acme");
    log.append(&envelope("call", 1));
    for offset in [
        "",
        "garbage",
        "otherepoch-1",
        &format!("{}-99", store.epoch()),
        &format!("{}-x", store.epoch()),
    ] {
        let resume = log.resume(&store.epoch(), offset);
        assert!(!resume.recovered, "{offset:?}");
        assert_eq!(resume.after, 0, "what is retained is replayed all the same");
    }
}

#[test]
fn bounds_by_count_bytes_and_total() {
    let store = store(Config {
        max_events: 3,
        ..Config::default()
    });
    let log = store.log("/acme");
    let first = log.append(&envelope("call", 0));
    for n in 1..10 {
        log.append(&envelope("call", n));
    }
    let (batch, gap) = log.read_after(0, 100);
    assert_eq!(
        batch.iter().map(|e| e.seq).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    assert!(gap, "1..=7 were evicted");
    assert!(!log.resume(&store.epoch(), &first.offset).recovered);
    let seventh = format!("{}-7", store.epoch());
    assert!(
        log.resume(&store.epoch(), &seventh).recovered,
        "7 seen, 8.. retained"
    );

    // An entry's size includes its offset, whose random epoch varies in length between
    // stores: the bounds get a little slack, far less than one entry.
    let per_event = log.read_after(0, 1).0[0].bytes();
    let slack = 16;
    let store = super::Store::new(&Config {
        max_bytes: per_event * 2 + slack,
        max_total_bytes: per_event * 3 + slack,
        ..Config::default()
    })
    .unwrap();
    let a = store.log("/a");
    let b = store.log("/b");
    for n in 0..5 {
        a.append(&envelope("call", n));
    }
    assert_eq!(a.read_after(0, 100).0.len(), 2, "per-namespace bytes");
    b.append(&envelope("call", 0));
    b.append(&envelope("call", 1));
    assert!(store.total_bytes() <= per_event * 3 + slack, "total bytes");
    assert_eq!(
        a.read_after(0, 100).0.len() + b.read_after(0, 100).0.len(),
        3
    );
    assert_eq!(
        b.read_after(0, 100).0.len(),
        2,
        "the globally oldest went first"
    );
}

#[test]
fn age_bound_and_sweep() {
    let store = store(Config {
        max_age_secs: 0,
        ..Config::default()
    });
    let log = store.log("/acme");
    log.append(&envelope("call", 0));
    std::thread::sleep(Duration::from_millis(5));
    store.sweep();
    assert!(log.read_after(0, 10).0.is_empty());
    drop(log);
    store.sweep();
    assert!(
        store.logs.lock().unwrap().is_empty(),
        "idle empty logs are forgotten"
    );
}

#[test]
fn state_for_late_joiners() {
    let store = store(Config::default());
    let log = store.log("/acme");
    assert!(log.state().is_empty());
    log.append(&envelope("connection.update", 1));
    log.append(&envelope("qrcode.updated", 2));
    log.append(&envelope("connection.update", 3));
    log.append(&envelope("messages.upsert", 4));
    let state = log.state();
    assert_eq!(state.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![2, 3]);
}

#[test]
fn a_swept_log_never_reuses_offsets() {
    let store = store(Config {
        max_age_secs: 0,
        ..Config::default()
    });
    let log = store.log("/acme");
    let old = log.append(&envelope("call", 0));
    log.append(&envelope("call", 1));
    drop(log);
    std::thread::sleep(Duration::from_millis(5));
    store.sweep();
    let log = store.log("/acme");
    let new = log.append(&envelope("call", 2));
    assert!(new.seq > 2, "numbering continues: {}", new.seq);
    assert!(
        !log.resume(&store.epoch(), &old.offset).recovered,
        "what the old log had is unknown"
    );
}

fn envelope_for(instance: &str, event: &str, pad: usize) -> Envelope {
    let body = format!(
        r#"{{"event":"{event}","instance":"{instance}","data":{{"pad":"{}"}}}}"#,
        "x".repeat(pad)
    );
    Envelope::from_webhook(body.as_bytes()).unwrap()
}

#[test]
fn the_total_bound_covers_state_and_evicts_the_oldest_across_namespaces() {
    let bound = 2 * 1024 * 1024;
    let store = store(Config {
        max_bytes: bound,
        max_total_bytes: bound,
        ..Config::default()
    });
    // 2,000 instances, each with a 6 KB connection.update: 12 MB of state before the
    // bound, which counted only events and kept every state forever.
    let logs: Vec<_> = (0..2000)
        .map(|i| {
            let log = store.log(&format!("/i{i}"));
            log.append(&envelope_for(
                &format!("i{i}"),
                "connection.update",
                6 * 1024,
            ));
            log
        })
        .collect();
    assert!(
        store.total_bytes() <= bound,
        "{} retained over a {bound} bound",
        store.total_bytes()
    );
    assert!(logs[0].state().is_empty(), "the oldest state went first");
    assert_eq!(logs[1999].state().len(), 1, "the newest state is kept");
    // Positive control: without the bound, all of it is retained.
    let unbounded = self::store(Config::default());
    for i in 0..2000 {
        unbounded.log(&format!("/i{i}")).append(&envelope_for(
            &format!("i{i}"),
            "connection.update",
            6 * 1024,
        ));
    }
    assert!(unbounded.total_bytes() > 12 * 1024 * 1024);
}

#[test]
fn stale_arrivals_are_compacted_by_the_sweep() {
    let store = store(Config {
        max_events: 2,
        ..Config::default()
    });
    let log = store.log("/acme");
    for n in 0..1000 {
        log.append(&envelope("call", n));
    }
    // Per-namespace eviction leaves stale arrivals behind the live front.
    assert!(store.arrivals_len() <= 1000);
    store.sweep();
    assert_eq!(store.arrivals_len(), 2, "only the two retained events");
}

#[test]
fn the_number_of_logs_is_bounded_and_a_held_log_is_never_dropped() {
    let store = Store::with_max_logs(&Config::default(), 3).unwrap();
    let held = store.log("/held");
    held.append(&envelope("call", 0));
    store.log("/busy").append(&envelope("call", 1));
    store.log("/empty");
    assert_eq!(store.log_count(), 3);
    store.log("/new");
    assert_eq!(store.log_count(), 3, "one idle log made room");
    let names: Vec<String> = store.logs.lock().unwrap().keys().cloned().collect();
    assert!(
        !names.contains(&"/empty".to_owned()),
        "an empty one first: {names:?}"
    );
    store.log("/newer");
    let names: Vec<String> = store.logs.lock().unwrap().keys().cloned().collect();
    assert!(
        names.contains(&"/held".to_owned()),
        "a held log stays: {names:?}"
    );
    assert_eq!(store.log_count(), 3);
    assert_eq!(held.read_after(0, 10).0.len(), 1);
}
