use super::*;

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn load(
    file: Option<&str>,
    vars: &[(&str, &str)],
    flags: &[(&'static str, &str)],
) -> Result<Config, Error> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sidecar.toml");
    if let Some(text) = file {
        std::fs::write(&path, text).unwrap();
    }
    let flags: Overrides = flags.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
    Config::load(file.map(|_| path.as_path()), env(vars), &flags)
}

#[test]
fn defaults() {
    let config = load(None, &[], &[]).unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:8081");
    assert_eq!(config.upstream.url, "http://127.0.0.1:8080");
    assert!(config.auth.api_key.is_none());
    assert!(!config.hub.global_events);
    assert!(config.hub.events.is_empty());
    assert_eq!(config.hub.cors_origin, vec!["*"]);
    assert_eq!(config.webhook.path, "/_sidecar/webhook");
    assert_eq!(config.webhook.jwt_leeway_secs, 1200);
    assert_eq!(config.webhook.secret_header, "x-webhook-secret");
    assert_eq!(config.webhook.max_body_bytes, 64 * 1024 * 1024);
    assert_eq!(config.auth.token_cache_ttl_secs, 60);
}

#[test]
fn precedence_flags_over_env_over_file_over_defaults() {
    let file = r#"
        listen = "127.0.0.1:1000"
        [upstream]
        url = "http://file:1"
        [hub]
        events = ["CALL"]
        global_events = true
        [webhook]
        jwt_leeway_secs = 5
    "#;
    let config = load(
        Some(file),
        &[
            ("SIDECAR_LISTEN", "127.0.0.1:2000"),
            ("SIDECAR_UPSTREAM_URL", "http://env:2"),
            ("SIDECAR_EVENTS", "MESSAGES_UPSERT, CONNECTION_UPDATE"),
            ("UNRELATED", "x"),
        ],
        &[("listen", "127.0.0.1:3000")],
    )
    .unwrap();
    assert_eq!(config.listen.to_string(), "127.0.0.1:3000", "flag wins");
    assert_eq!(config.upstream.url, "http://env:2", "env beats file");
    assert_eq!(
        config.hub.events,
        vec!["MESSAGES_UPSERT", "CONNECTION_UPDATE"]
    );
    assert!(config.hub.global_events, "file beats default");
    assert_eq!(config.webhook.jwt_leeway_secs, 5);
}

#[test]
fn env_values_are_read_leniently() {
    let config = load(
        None,
        &[
            ("WEBSOCKET_GLOBAL_EVENTS", "true"),
            ("SIDECAR_WEBHOOK_JWT_LEEWAY_SECS", "60"),
            ("AUTHENTICATION_API_KEY", "123456"),
            ("CORS_ORIGIN", "https://a.example,https://b.example"),
            ("SIDECAR_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/8"),
        ],
        &[],
    )
    .unwrap();
    assert!(config.hub.global_events);
    assert_eq!(config.webhook.jwt_leeway_secs, 60);
    assert_eq!(config.auth.api_key.unwrap().expose(), "123456");
    assert_eq!(config.hub.cors_origin.len(), 2);
    assert_eq!(config.webhook.allowed_cidrs, vec!["10.0.0.0/8"]);
}

#[test]
fn bad_values_name_the_variable() {
    let message = |vars: &[(&str, &str)]| load(None, vars, &[]).unwrap_err().to_string();
    let text = message(&[("SIDECAR_LISTEN", "nowhere")]);
    assert!(
        text.starts_with("SIDECAR_LISTEN=\"nowhere\" is not valid"),
        "{text}"
    );
    let text = message(&[("SIDECAR_TOKEN_CACHE_TTL_SECS", "soon")]);
    assert!(
        text.starts_with("SIDECAR_TOKEN_CACHE_TTL_SECS=\"soon\" is not valid"),
        "{text}"
    );
    let text = message(&[("SIDECAR_UPSTREAM_URL", "ftp://x")]);
    assert!(
        text.starts_with("SIDECAR_UPSTREAM_URL (upstream.url)=\"ftp://x\" is not valid"),
        "{text}"
    );
    let text = message(&[("SIDECAR_EVENTS", "messages.upsert")]);
    assert!(text.starts_with("SIDECAR_EVENTS (hub.events)="), "{text}");
    let text = message(&[("SIDECAR_WEBHOOK_ALLOWED_CIDRS", "10.0.0.0/99")]);
    assert!(
        text.starts_with("SIDECAR_WEBHOOK_ALLOWED_CIDRS (webhook.allowed_cidrs)="),
        "{text}"
    );
    let text = message(&[("WEBSOCKET_GLOBAL_EVENTS", "maybe")]);
    assert!(
        text.starts_with("WEBSOCKET_GLOBAL_EVENTS=\"maybe\" is not valid"),
        "{text}"
    );
}

#[test]
fn file_errors_name_the_key_and_unknown_keys_are_refused() {
    let err = load(Some("[webhook]\nmax_body_bytes = \"big\"\n"), &[], &[]).unwrap_err();
    assert!(err.to_string().contains("webhook.max_body_bytes"), "{err}");
    let err = load(Some("[webhook]\nmax_body_byte = 1\n"), &[], &[]).unwrap_err();
    assert!(err.to_string().contains("max_body_byte"), "{err}");
}

#[test]
fn secrets_are_masked() {
    let config = load(
        None,
        &[
            ("AUTHENTICATION_API_KEY", "topsecret"),
            ("SIDECAR_WEBHOOK_SECRET", "hush"),
        ],
        &[],
    )
    .unwrap();
    let printed = format!("{config:?}\n{}", config.to_masked_toml());
    assert!(
        !printed.contains("topsecret") && !printed.contains("hush"),
        "{printed}"
    );
    assert!(printed.contains("***"));
}

/// The rows of README.md's configuration tables: `(NAME, key)` from lines that begin
/// `| `NAME` | `key` |`. Whole cells: `SIDECAR_WEBHOOK_PATH_TOKEN` is not a row for
/// `SIDECAR_WEBHOOK_PATH`.
fn readme_rows(readme: &str) -> Vec<(&str, &str)> {
    readme
        .lines()
        .filter_map(|line| {
            let mut cells = line.trim().strip_prefix('|')?.split('|').map(str::trim);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let key = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            Some((name, key))
        })
        .collect()
}

/// What config.example.toml documents: `(section.key, NAME)` for each paragraph (lines
/// between blank lines) with an `# env: NAME` line, the key being the one the paragraph
/// sets, as `key = ...` or, for a default that is unset, `# key = ...`, under the last
/// `[section]` header above it.
fn example_entries(example: &str) -> Vec<(String, String)> {
    let is_key = |word: &str| {
        !word.is_empty()
            && word
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    let mut section = String::new();
    let mut entries = Vec::new();
    for paragraph in example.split("\n\n") {
        let mut names = Vec::new();
        let mut keys = Vec::new();
        for line in paragraph.lines().map(str::trim) {
            if let Some(header) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                section = header.to_owned();
            } else if let Some(rest) = line.strip_prefix("# env: ") {
                names.extend(rest.split_whitespace().next());
            } else {
                let setting = line.strip_prefix("# ").unwrap_or(line);
                if let Some((key, _)) = setting.split_once(" = ")
                    && is_key(key)
                {
                    keys.push(key);
                }
            }
        }
        if let Some(name) = names.first() {
            assert!(
                names.len() == 1 && keys.len() == 1,
                "config.example.toml: one `# env:` line and one key per paragraph: {paragraph}"
            );
            let key = match section.as_str() {
                "" => keys[0].to_owned(),
                section => format!("{section}.{}", keys[0]),
            };
            entries.push((key, (*name).to_owned()));
        }
    }
    entries
}

#[test]
fn every_variable_is_documented() {
    let readme = readme_rows(include_str!("../../README.md"));
    let example = example_entries(include_str!("../../config.example.toml"));
    for var in ENV_VARS {
        assert!(
            readme.contains(&(var.name, var.key)),
            "README.md has no row `| `{}` | `{}` |`",
            var.name,
            var.key
        );
        assert!(
            example.contains(&(var.key.to_owned(), var.name.to_owned())),
            "config.example.toml does not document {} as `# env: {}` with `{} = ` under its section",
            var.key,
            var.name,
            var.key.rsplit('.').next().unwrap_or(var.key)
        );
    }
    // Nothing documented that the configuration does not know.
    for (key, name) in &example {
        assert!(
            ENV_VARS
                .iter()
                .any(|var| var.key == key && var.name == name),
            "config.example.toml documents an unknown {key} ({name})"
        );
    }
}

/// The parsers above find what is there and nothing else (the test fails on a missing
/// whole name, not only a missing substring).
#[test]
fn documentation_is_matched_by_whole_names() {
    let readme = "| `SIDECAR_WEBHOOK_PATH_TOKEN` | `webhook.path_token` | unset | x |\n";
    let rows = readme_rows(readme);
    assert_eq!(
        rows,
        vec![("SIDECAR_WEBHOOK_PATH_TOKEN", "webhook.path_token")]
    );
    assert!(!rows.contains(&("SIDECAR_WEBHOOK_PATH", "webhook.path")));

    let example = "[upstream]\n# env: SIDECAR_UPSTREAM_URL\nurl = \"http://x\"\n\n\
                   [webhook]\n# env: SIDECAR_WEBHOOK_JWT_SECRET (secret)\n# jwt_secret = \"...\"\n\n\
                   [redis]\n# env: SIDECAR_REDIS_URL\n# timeout_ms = 1\n";
    let entries = example_entries(example);
    let entry = |key: &str, name: &str| (key.to_owned(), name.to_owned());
    assert!(entries.contains(&entry("upstream.url", "SIDECAR_UPSTREAM_URL")));
    assert!(entries.contains(&entry("webhook.jwt_secret", "SIDECAR_WEBHOOK_JWT_SECRET")));
    // `url =` under [upstream] does not document redis.url, nor `jwt_secret =` webhook.secret.
    assert!(!entries.contains(&entry("redis.url", "SIDECAR_REDIS_URL")));
    assert!(!entries.iter().any(|(key, _)| key == "webhook.secret"));
    assert!(
        !entries
            .iter()
            .any(|(_, name)| name == "SIDECAR_WEBHOOK_SECRET")
    );
}

#[test]
fn flags_are_named_as_typed_and_empty_credentials_refused() {
    let err = load(None, &[], &[("hub.global_events", "maybe")]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("--global-events=\"maybe\" is not valid"),
        "{err}"
    );
    let err = load(None, &[("SIDECAR_WEBHOOK_SECRET", "")], &[]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("SIDECAR_WEBHOOK_SECRET (webhook.secret)"),
        "{err}"
    );
    let err = load(None, &[("SIDECAR_WEBHOOK_JWT_SECRET", "")], &[]).unwrap_err();
    assert!(err.to_string().contains("must not be empty"), "{err}");
    let err = load(None, &[("SIDECAR_UPSTREAM_CONNECT_TIMEOUT_SECS", "0")], &[]).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("SIDECAR_UPSTREAM_CONNECT_TIMEOUT_SECS"),
        "{err}"
    );
}

#[test]
fn the_example_file_is_accepted() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config.example.toml");
    let config = Config::load(Some(Path::new(path)), Vec::new(), &Overrides::new()).unwrap();
    assert_eq!(config.listen.to_string(), "0.0.0.0:8081");
}

#[test]
fn values_that_cannot_work_are_refused_not_clamped() {
    for (name, value) in [
        ("SIDECAR_AUTH_LOOKUP_TIMEOUT_SECS", "0"),
        ("SIDECAR_PING_INTERVAL_SECS", "0"),
        ("SIDECAR_PING_TIMEOUT_SECS", "0"),
    ] {
        let err = Config::load(
            None,
            [(name.to_owned(), value.to_owned())],
            &Overrides::new(),
        )
        .expect_err(name);
        assert!(err.is_config(), "{err}");
        assert!(
            err.to_string().starts_with(&format!("{name} (")),
            "the message names the variable: {err}"
        );
    }
    // Positive control: 1 s works.
    Config::load(
        None,
        [(
            "SIDECAR_AUTH_LOOKUP_TIMEOUT_SECS".to_owned(),
            "1".to_owned(),
        )],
        &Overrides::new(),
    )
    .expect("1 s is valid");
}

#[test]
fn amqp_settings_from_env_and_file() {
    let config = load(None, &[], &[]).unwrap();
    assert!(config.amqp.url.is_none(), "off unless set");
    assert_eq!(config.amqp.exchange, vec!["evolution_exchange"]);
    assert_eq!(config.amqp.queue, "evo-realtime");
    assert_eq!(config.amqp.prefetch, 256);

    let config = load(
        Some("[amqp]\nexchange = [\"acme\", \"beta\"]\nqueue = \"from-file\"\n"),
        &[
            ("SIDECAR_AMQP_URL", "amqp://evo:rabbitpw@rabbit:5672/%2f"),
            ("SIDECAR_AMQP_EXCHANGE", "acme, beta ,gamma"),
            ("SIDECAR_AMQP_PREFETCH", "32"),
        ],
        &[],
    )
    .unwrap();
    assert_eq!(
        config.amqp.exchange,
        vec!["acme", "beta", "gamma"],
        "env beats file"
    );
    assert_eq!(config.amqp.queue, "from-file");
    assert_eq!(config.amqp.prefetch, 32);
    let printed = format!("{config:?}\n{}", config.to_masked_toml());
    assert!(
        !printed.contains("rabbitpw"),
        "the URL is a secret: {printed}"
    );

    let message = |vars: &[(&str, &str)]| load(None, vars, &[]).unwrap_err().to_string();
    let text = message(&[("SIDECAR_AMQP_URL", "http://evo:rabbitpw@rabbit")]);
    assert!(
        text.starts_with("SIDECAR_AMQP_URL (amqp.url)=\"***\" is not valid")
            && !text.contains("rabbitpw"),
        "{text}"
    );
    let url = ("SIDECAR_AMQP_URL", "amqp://rabbit");
    let text = message(&[url, ("SIDECAR_AMQP_PREFETCH", "0")]);
    assert!(
        text.starts_with("SIDECAR_AMQP_PREFETCH (amqp.prefetch)="),
        "{text}"
    );
    let text = message(&[url, ("SIDECAR_AMQP_PREFETCH", "70000")]);
    assert!(text.starts_with("SIDECAR_AMQP_PREFETCH="), "{text}");
    let text = message(&[url, ("SIDECAR_AMQP_QUEUE", "amq.gen-1")]);
    assert!(
        text.starts_with("SIDECAR_AMQP_QUEUE (amqp.queue)="),
        "{text}"
    );
    let text = message(&[url, ("SIDECAR_AMQP_EXCHANGE", " , ")]);
    assert!(
        text.starts_with("SIDECAR_AMQP_EXCHANGE (amqp.exchange)="),
        "{text}"
    );
}
