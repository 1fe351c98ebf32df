use super::*;

fn parse(body: &str) -> Result<Envelope, Error> {
    Envelope::from_webhook(body.as_bytes())
}

#[test]
fn name_forms() {
    let check = |dotted: &str, snake: &str, kebab: &str| {
        let name = EventName::parse(dotted).unwrap();
        assert_eq!(name.upper_snake(), snake, "{dotted}");
        assert_eq!(name.kebab(), kebab, "{dotted}");
    };
    check("messages.upsert", "MESSAGES_UPSERT", "messages-upsert");
    check(
        "group-participants.update",
        "GROUP_PARTICIPANTS_UPDATE",
        "group-participants-update",
    );
    check("call", "CALL", "call");
    check("qrcode.updated", "QRCODE_UPDATED", "qrcode-updated");
    check("remove.instance", "REMOVE_INSTANCE", "remove-instance");
}

#[test]
fn event_name_rule() {
    for bad in [
        "",
        "connect",
        "disconnect",
        "a b",
        "a/b",
        "é",
        &"x".repeat(65),
    ] {
        assert!(EventName::parse(bad).is_err(), "{bad:?}");
    }
    assert!(is_filter_name("MESSAGES_UPSERT"));
    assert!(!is_filter_name("messages.upsert"));
    assert!(!is_filter_name(""));
}

#[test]
fn instance_name_rule() {
    for good in [
        "acme",
        "acme-support",
        "Acme Support 2",
        "ação",
        "a.b",
        // `%` is only special in URL paths, where the sidecar percent-encodes the name:
        // this one reaches Evolution as `a%252F`, its own name, never as `a/`.
        "a%2F",
        &"x".repeat(128),
    ] {
        assert!(InstanceName::parse(good).is_ok(), "{good:?}");
    }
    for bad in [
        "",
        ".",
        "..",
        "a/b",
        "a\\b",
        "a\nb",
        "a\u{7f}",
        &"x".repeat(129),
    ] {
        assert!(InstanceName::parse(bad).is_err(), "{bad:?}");
    }
    assert_eq!(
        InstanceName::from_namespace("/acme").unwrap().as_str(),
        "acme"
    );
    assert!(InstanceName::from_namespace("/").is_none());
}

#[test]
fn reorders_known_keys_and_drops_destination() {
    let body = r#"{"apikey":null,"destination":"https://x","sender":"s","date_time":"d","server_url":"u","data":{"z":1,"a":[2]},"instance":"acme","event":"messages.upsert"}"#;
    let envelope = parse(body).unwrap();
    assert_eq!(envelope.event.as_str(), "messages.upsert");
    assert_eq!(envelope.instance.as_str(), "acme");
    assert_eq!(
        envelope.payload.get(),
        r#"{"event":"messages.upsert","instance":"acme","data":{"z":1,"a":[2]},"server_url":"u","date_time":"d","sender":"s","apikey":null}"#
    );
}

#[test]
fn unknown_keys_keep_their_side_and_absent_keys_stay_absent() {
    let body = r#"{"first":1,"event":"call","extra":{"k":"v"},"instance":"acme","last":"x"}"#;
    let envelope = parse(body).unwrap();
    assert_eq!(
        envelope.payload.get(),
        r#"{"first":1,"event":"call","instance":"acme","extra":{"k":"v"},"last":"x"}"#
    );
}

#[test]
fn values_travel_byte_for_byte() {
    let body = "{\"event\":\"call\",\"instance\":\"acme\",\"data\":{\"n\":1.50,\"s\":\"\\u00e9\\n\",\"big\":123456789012345678901234567890}}";
    let envelope = parse(body).unwrap();
    assert_eq!(
        envelope.payload.get(),
        "{\"event\":\"call\",\"instance\":\"acme\",\"data\":{\"n\":1.50,\"s\":\"\\u00e9\\n\",\"big\":123456789012345678901234567890}}"
    );
}

#[test]
fn rejects_bad_bodies() {
    let syntax = |body: &[u8]| {
        assert!(
            matches!(Envelope::from_webhook(body), Err(Error::Syntax(_))),
            "{:?}",
            String::from_utf8_lossy(body)
        )
    };
    let semantic = |body: &str| assert!(matches!(parse(body), Err(Error::Semantic(_))), "{body}");
    syntax(b"\xff\xfe");
    syntax(br#"{"event":"call","#);
    syntax(b"[1,2]");
    syntax(br#""text""#);
    syntax(br#"{"event":"call","event":"x","instance":"a"}"#);
    syntax(br#"{"event":"call","instance":"a","instance":"b"}"#);
    syntax(br#"{"event":"call","instance":"a"} trailing"#);
    semantic(r#"{"instance":"a"}"#);
    semantic(r#"{"event":"call"}"#);
    semantic(r#"{"event":1,"instance":"a"}"#);
    semantic(r#"{"event":"call","instance":["a"]}"#);
    semantic(r#"{"event":"call","instance":"a/b"}"#);
    semantic(r#"{"event":"call","instance":".."}"#);
}

#[test]
fn fixtures_parse() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/webhooks");
    let mut seen = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "json") {
            let body = std::fs::read(&path).unwrap();
            let envelope = Envelope::from_webhook(&body).unwrap();
            assert!(!envelope.payload.get().contains("\"destination\""));
            seen += 1;
        }
    }
    assert!(seen >= 6);
}

#[test]
fn evolution_events_are_known_in_every_form() {
    assert_eq!(evolution_event("MESSAGES_UPSERT"), Some("messages.upsert"));
    assert_eq!(
        evolution_event("messaging-history.set"),
        Some("messaging-history.set")
    );
    assert_eq!(
        evolution_event("MESSAGING_HISTORY_SET"),
        Some("messaging-history.set")
    );
    assert_eq!(evolution_event("MESAGES_UPSERT"), None);
    assert_eq!(evolution_event("Messages-Upsert"), Some("messages.upsert"));
    assert_eq!(evolution_event("messages.upsert.x"), None);
    assert_eq!(evolution_event(""), None);
    // Non-ASCII bytes are compared as they are, as `upper_snake` leaves them.
    assert_eq!(evolution_event("messages.upsért"), None);
    assert_eq!(closest_evolution_event("MESAGES_UPSERT"), "messages.upsert");
    assert_eq!(
        closest_evolution_event("conection.update"),
        "connection.update"
    );
    let mut sorted = EVOLUTION_EVENTS.to_vec();
    sorted.sort_unstable();
    assert_eq!(sorted, EVOLUTION_EVENTS, "kept sorted");
    for name in EVOLUTION_EVENTS {
        assert!(EventName::parse(name).is_ok(), "{name}");
    }
}

#[test]
fn every_name_evolution_accepts_is_an_instance() {
    for name in ["T.Up-1_2", "tê-ünï", "t x", "ns?q", "#hash", "50%off"] {
        let instance = InstanceName::parse(name).unwrap_or_else(|err| panic!("{name}: {err}"));
        assert_eq!(instance.namespace(), format!("/{name}"));
        assert_eq!(
            InstanceName::from_namespace(&format!("/{name}")),
            Some(instance)
        );
    }
    for unsafe_name in ["a/b", "a\\b", "..", ".", "", "a\nb"] {
        assert!(InstanceName::parse(unsafe_name).is_err(), "{unsafe_name:?}");
    }
}

/// The in-place comparison agrees with the definition: same UPPER_SNAKE form.
#[test]
fn evolution_event_agrees_with_comparing_upper_snake_forms() {
    let by_definition = |name: &str| {
        let upper = upper_snake(name);
        EVOLUTION_EVENTS
            .iter()
            .copied()
            .find(|known| upper_snake(known) == upper)
    };
    let mut names: Vec<String> = Vec::new();
    for known in EVOLUTION_EVENTS {
        names.push(known.to_string());
        names.push(upper_snake(known));
        names.push(known.replace('.', "-"));
        names.push(known.to_ascii_uppercase().replace('_', "."));
        names.push(format!("{known}x"));
        names.push(known[..known.len() - 1].to_string());
        names.push(known.replacen('e', "é", 1));
    }
    for name in &names {
        assert_eq!(evolution_event(name), by_definition(name), "{name:?}");
    }
    // Positive control: the forms above do name known events.
    assert!(
        names
            .iter()
            .filter(|n| evolution_event(n).is_some())
            .count()
            >= 4 * EVOLUTION_EVENTS.len()
    );
}
