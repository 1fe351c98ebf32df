use std::time::Duration;

use super::*;
use crate::setting::Secret;

#[test]
fn routing_keys_are_everything_or_the_filtered_events_and_deletions() {
    assert_eq!(routing_keys(&[]), ["#"]);
    let events = [
        "MESSAGES_UPSERT",
        "GROUP_PARTICIPANTS_UPDATE",
        "NOT_AN_EVENT",
    ];
    let events: Vec<String> = events.iter().map(|e| (*e).to_owned()).collect();
    assert_eq!(
        routing_keys(&events),
        [
            "group-participants.update",
            "instance.delete",
            "messages.upsert",
            "remove.instance"
        ],
        "dotted wire names (what Evolution routes by), deletions always, unknown names dropped"
    );
}

#[test]
fn backoff_grows_to_its_cap_with_jitter_and_resets() {
    let (min, max) = (Duration::from_millis(100), Duration::from_secs(10));
    let mut backoff = Backoff::new(min, max);
    let mut windows = Vec::new();
    for _ in 0..20 {
        windows.push(backoff.window);
        let pause = backoff.next_pause();
        let window = *windows.last().unwrap();
        assert!(
            pause <= window && pause >= window / 2,
            "{pause:?} in {window:?}"
        );
        assert!(pause <= max);
    }
    assert_eq!(windows[0], min);
    assert_eq!(windows[1], min * 2);
    assert_eq!(*windows.last().unwrap(), max, "capped");
    backoff.reset();
    assert!(backoff.next_pause() <= min);
}

fn config(url: &str) -> Config {
    Config {
        url: Some(Secret::new(url)),
        ..Config::default()
    }
}

#[test]
fn validation_names_the_key_and_never_shows_the_url() {
    assert!(Config::default().validate().is_ok(), "off by default");
    assert!(
        config("amqp://guest:guest@localhost:5672/%2f")
            .validate()
            .is_ok()
    );
    assert!(
        config("amqps://user:pw@rabbit.example.com/vhost")
            .validate()
            .is_ok()
    );
    let err = config("http://user:hunter2@localhost")
        .validate()
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("amqp.url") && !err.contains("hunter2"),
        "{err}"
    );
    let mut bad = config("amqp://localhost");
    bad.queue = "amq.mine".into();
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("amqp.queue")
    );
    let mut bad = config("amqp://localhost");
    bad.exchange = vec![];
    assert!(
        bad.validate()
            .unwrap_err()
            .to_string()
            .contains("amqp.exchange")
    );
    for prefetch in [0, MAX_PREFETCH + 1] {
        let mut bad = config("amqp://localhost");
        bad.prefetch = prefetch;
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("amqp.prefetch")
        );
    }
}

#[test]
fn outcome_labels_are_distinct() {
    let all = [
        Outcome::Published,
        Outcome::Duplicate,
        Outcome::Filtered,
        Outcome::TooLarge,
        Outcome::BadJson,
        Outcome::BadEnvelope,
        Outcome::NotRetained,
    ];
    let labels: std::collections::HashSet<_> = all.iter().map(|o| o.label()).collect();
    assert_eq!(labels.len(), all.len());
}
