//! The `evo-realtime` binary: flags, configuration, signals. Everything else is the library.
//!
//! Run with `cargo run --release` (listens on 0.0.0.0:8081, upstream http://127.0.0.1:8080).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use evo_realtime::config::{self, Config, Overrides};
use evo_realtime::{App, telemetry};

/// Exit code for configuration errors (sysexits EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Realtime Socket.IO for Evolution API: webhooks in, socket.io events out, emits to REST,
/// and a reverse proxy for everything else. Every setting also has an environment
/// variable (shown below) and a key in the TOML file; flags > env > file > defaults.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    /// TOML configuration file [env: SIDECAR_CONFIG]
    #[arg(long, value_name = "PATH", global = true)]
    config: Option<PathBuf>,
    /// Address to listen on [env: SIDECAR_LISTEN] [default: 0.0.0.0:8081]
    #[arg(long, value_name = "ADDR", global = true)]
    listen: Option<String>,
    /// Evolution API base URL [env: SIDECAR_UPSTREAM_URL] [default: http://127.0.0.1:8080]
    #[arg(long, value_name = "URL", global = true)]
    upstream_url: Option<String>,
    /// Webhook ingest path [env: SIDECAR_WEBHOOK_PATH] [default: /_sidecar/webhook]
    #[arg(long, value_name = "PATH", global = true)]
    webhook_path: Option<String>,
    /// Also emit every event on `/` [env: WEBSOCKET_GLOBAL_EVENTS] [default: false]
    #[arg(long, value_name = "BOOL", global = true)]
    global_events: Option<String>,
    /// UPPER_SNAKE events to emit, comma-separated; empty = all [env: SIDECAR_EVENTS]
    #[arg(long, value_name = "LIST", global = true)]
    events: Option<String>,
    /// Allowed socket.io CORS origins, comma-separated [env: CORS_ORIGIN] [default: *]
    #[arg(long, value_name = "LIST", global = true)]
    cors_origin: Option<String>,
    /// Log format: text or json [env: SIDECAR_LOG_FORMAT] [default: text]
    #[arg(long, value_name = "FORMAT", global = true)]
    log_format: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve (the default)
    Serve,
    /// Validate the configuration, print it with secrets masked, and exit
    CheckConfig,
    /// Probe the local /_sidecar/readyz (for Docker's HEALTHCHECK); exit 0 when ready
    Healthcheck,
    /// Print the webhook headers (per-instance credentials) for one instance, as JSON for
    /// the `headers` of Evolution's `POST /webhook/set/{instance}`
    WebhookCredential {
        /// The instance name, exactly as Evolution spells it
        instance: String,
    },
}

impl Cli {
    fn overrides(&self) -> Overrides {
        let mut flags = Overrides::new();
        let mut set = |key: &'static str, value: &Option<String>| {
            if let Some(value) = value {
                flags.insert(key, value.clone());
            }
        };
        set("listen", &self.listen);
        set("upstream.url", &self.upstream_url);
        set("webhook.path", &self.webhook_path);
        set("hub.global_events", &self.global_events);
        set("hub.events", &self.events);
        set("hub.cors_origin", &self.cors_origin);
        set("log_format", &self.log_format);
        flags
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: Vec<(String, String)> = std::env::vars().collect();
    let file = cli
        .config
        .clone()
        .or_else(|| std::env::var_os(config::ENV_CONFIG).map(PathBuf::from));
    let config = match Config::load(file.as_deref(), env, &cli.overrides()) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("evo-realtime: {err}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    match cli.command.unwrap_or(Command::Serve) {
        Command::CheckConfig => {
            print!("{}", config.to_masked_toml());
            ExitCode::SUCCESS
        }
        Command::Serve => serve(config),
        Command::Healthcheck => healthcheck(&config),
        Command::WebhookCredential { instance } => {
            match evo_realtime::webhook::instance_headers(&config.webhook, &instance) {
                Ok(headers) => {
                    println!("{headers}");
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("evo-realtime: {err}");
                    ExitCode::from(EXIT_USAGE)
                }
            }
        }
    }
}

fn healthcheck(config: &Config) -> ExitCode {
    let mut addr = config.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(match addr {
            std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let url = format!("http://{addr}/_sidecar/readyz");
    let probe = async {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(3))
            .build()?;
        client.get(&url).send().await.map(|r| r.status().as_u16())
    };
    let status = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())
        .and_then(|runtime| runtime.block_on(probe).map_err(|err| err.to_string()));
    match status {
        Ok(200) => ExitCode::SUCCESS,
        Ok(status) => {
            eprintln!("evo-realtime: {url} answered {status}");
            ExitCode::FAILURE
        }
        Err(err) => {
            eprintln!("evo-realtime: {url}: {err}");
            ExitCode::FAILURE
        }
    }
}

fn serve(config: Config) -> ExitCode {
    let rust_log = std::env::var("RUST_LOG").ok();
    telemetry::init_tracing(config.log_format, rust_log.as_deref());
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("evo-realtime: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Build (and validate) everything before binding a port.
        let app = match App::build(&config) {
            Ok(app) => app,
            Err(err) => {
                eprintln!("evo-realtime: {err}");
                // Only the operator's configuration is a usage error.
                return if err.is_config() {
                    ExitCode::from(EXIT_USAGE)
                } else {
                    ExitCode::FAILURE
                };
            }
        };
        let listener = match bind(config.listen) {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("evo-realtime: cannot listen on {}: {err}", config.listen);
                return ExitCode::FAILURE;
            }
        };
        let metrics_listener = match app.bind_metrics().await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("evo-realtime: cannot listen for metrics: {err}");
                return ExitCode::FAILURE;
            }
        };
        let local = listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_default();
        tracing::info!(
            listen = %local,
            upstream = %config.upstream.base_url(),
            webhook_path = %config.webhook.path,
            global_events = config.hub.global_events,
            metrics = %config.metrics_listen.map_or("/_sidecar/metrics".to_owned(), |a| a.to_string()),
            mode = if config.redis.url.is_some() { "redis" } else { "memory" },
            "evo-realtime serving"
        );
        match app
            .serve_with_metrics(listener, metrics_listener, shutdown_signal())
            .await
        {
            Ok(()) => {
                tracing::info!("stopped");
                ExitCode::SUCCESS
            }
            Err(err) => {
                tracing::error!(error = %err, "server failed");
                ExitCode::FAILURE
            }
        }
    })
}

/// Binds with a listen backlog of 1,024 (tokio's default is 128): a reconnect storm after a
/// deploy would otherwise overflow it, and every dropped SYN costs a client a 1 s retry.
fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

const LISTEN_BACKLOG: u32 = 1024;

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
}
