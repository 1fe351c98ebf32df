//! A real RabbitMQ on free ports, with its own node name, data directory, Erlang cookie and
//! epmd, so it never talks to (or collides with) a broker already running on the machine.
//! Its whole process tree is killed when it is dropped, and by a watchdog if the test
//! process dies first. Publishing goes through [`Publisher`], the way Evolution publishes.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use evo_realtime::Config;
use evo_realtime::config::Secret;
use lapin::options::{BasicPublishOptions, ExchangeDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection, ConnectionProperties, ExchangeKind};

use super::wait::free_port;

/// Debian's server script (the `/usr/sbin` wrapper would `su` to the `rabbitmq` user, which
/// cannot write the test's directory).
const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const CTL: &str = "/usr/lib/rabbitmq/bin/rabbitmqctl";
/// A cold start takes 5-15 s on two busy cores.
const START_PATIENCE: Duration = Duration::from_secs(90);

pub struct RabbitMq {
    pub port: u16,
    dist_port: u16,
    epmd_port: u16,
    dir: tempfile::TempDir,
    /// `epmd` and the broker, each the leader of its own process group.
    epmd: Option<Child>,
    broker: Option<Child>,
    /// How long the last start took until the broker accepted an AMQP connection.
    pub started_in: Duration,
}

impl RabbitMq {
    /// Starts a broker with a fresh data directory on free ports and waits until it
    /// accepts AMQP connections.
    pub async fn start() -> Self {
        let mut broker = Self {
            port: free_port().port(),
            dist_port: free_port().port(),
            epmd_port: free_port().port(),
            dir: tempfile::tempdir().unwrap(),
            epmd: None,
            broker: None,
            started_in: Duration::ZERO,
        };
        broker.write_files();
        broker.boot().await;
        broker
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write_files(&self) {
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(self.path(sub)).unwrap();
        }
        // No plugins (no management listener on a fixed port); no system config.
        std::fs::write(self.path("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(self.path("rabbitmq.conf"), "log.console = false\n").unwrap();
        std::fs::write(self.path("env.conf"), "").unwrap();
        let cookie = self.path("home/.erlang.cookie");
        std::fs::write(&cookie, format!("evotest{}", self.port)).unwrap();
        let mut permissions = std::fs::metadata(&cookie).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o400);
        std::fs::set_permissions(&cookie, permissions).unwrap();
    }

    /// The environment of the server and of `rabbitmqctl`: everything in the tempdir.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command
            .env_clear()
            .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
            .env("HOME", self.path("home"))
            .env("LANG", "C.UTF-8")
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env("RABBITMQ_NODENAME", self.node())
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("RABBITMQ_MNESIA_BASE", self.path("mnesia"))
            .env("RABBITMQ_LOG_BASE", self.path("log"))
            .env("RABBITMQ_CONFIG_FILE", self.path("rabbitmq"))
            .env(
                "RABBITMQ_ADVANCED_CONFIG_FILE",
                self.path("advanced.config"),
            )
            .env("RABBITMQ_CONF_ENV_FILE", self.path("env.conf"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                self.path("enabled_plugins"),
            )
            .env("RABBITMQ_PID_FILE", self.path("pid"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command
    }

    fn node(&self) -> String {
        format!("evo-test-{}@localhost", self.port)
    }

    /// Starts epmd (foreground, on its own port) and the broker, each in a process group
    /// of its own, and waits for an AMQP connection.
    async fn boot(&mut self) {
        let started = Instant::now();
        let epmd = Command::new("epmd")
            .args(["-port", &self.epmd_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("epmd is installed (erlang-base, with rabbitmq-server)");
        watchdog(epmd.id());
        self.epmd = Some(epmd);
        let broker = self
            .command(SERVER)
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server is installed (tests/setup.sh installs it)");
        watchdog(broker.id());
        self.broker = Some(broker);
        let url = self.url();
        loop {
            let attempt = tokio::time::timeout(
                Duration::from_secs(2),
                Connection::connect(&url, ConnectionProperties::default()),
            )
            .await;
            if let Ok(Ok(connection)) = attempt {
                let _ = connection.close(200, "ready".into()).await;
                break;
            }
            assert!(
                started.elapsed() < START_PATIENCE,
                "rabbitmq-server did not start within {START_PATIENCE:?}; logs in {}",
                self.path("log").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.started_in = started.elapsed();
        println!(
            "rabbitmq-server on port {} started in {:?}",
            self.port, self.started_in
        );
    }

    /// Kills the broker (SIGKILL to its process group: no clean shutdown), as a crash
    /// would look, and waits until its port is free. The data directory stays.
    pub async fn kill(&mut self) {
        for child in [self.broker.take(), self.epmd.take()].into_iter().flatten() {
            kill_group(child);
        }
        let free = || std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err();
        for _ in 0..200 {
            if free() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the killed broker still accepts connections");
    }

    /// Stops the broker cleanly (`rabbitmqctl stop`: connections closed, queues flushed), as
    /// a restart for an upgrade or a deploy does, and waits until its port is free.
    pub async fn stop(&mut self) {
        let status = self
            .command(CTL)
            .args(["-n", &self.node(), "stop"])
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl stop failed");
        self.kill().await;
    }

    /// Starts the stopped broker again on the same ports and data (durable queues, their
    /// messages and bindings survive).
    pub async fn restart(&mut self) {
        assert!(self.broker.is_none(), "kill it first");
        self.boot().await;
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Sets a policy with `rabbitmqctl` (e.g. a dead-letter exchange on a queue).
    pub fn set_policy(&self, name: &str, pattern: &str, definition: &str) {
        let status = self
            .command(CTL)
            .args(["-n", &self.node(), "set_policy", name, pattern, definition])
            .args(["--apply-to", "queues"])
            .status()
            .unwrap();
        assert!(status.success(), "rabbitmqctl set_policy failed");
    }

    /// A connection that publishes as Evolution does.
    pub async fn publisher(&self) -> Publisher {
        let connection = Connection::connect(&self.url(), ConnectionProperties::default())
            .await
            .expect("the broker accepts a connection");
        let channel = connection.create_channel().await.unwrap();
        Publisher {
            _connection: connection,
            channel,
        }
    }
}

impl Drop for RabbitMq {
    fn drop(&mut self) {
        for child in [self.broker.take(), self.epmd.take()].into_iter().flatten() {
            kill_group(child);
        }
    }
}

/// SIGKILL to the whole process group led by `child` (the server script, beam.smp, its
/// helpers), then reaps the leader.
fn kill_group(mut child: Child) {
    let _ = Command::new("/bin/kill")
        .args(["-KILL", "--", &format!("-{}", child.id())])
        .stderr(Stdio::null())
        .status();
    let _ = child.wait();
}

/// A detached shell that kills the process group `group` once this test process is gone,
/// so a broker shared through a `static` (never dropped) dies with the test binary.
fn watchdog(group: u32) {
    let script = format!(
        "while kill -0 {parent} 2>/dev/null; do sleep 0.5; done; /bin/kill -KILL -- -{group} 2>/dev/null",
        parent = std::process::id(),
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
}

/// One channel that publishes the way Evolution's `RabbitmqController` does.
pub struct Publisher {
    _connection: Connection,
    channel: lapin::Channel,
}

impl Publisher {
    /// Declares a topic exchange with Evolution's arguments (durable, not auto-deleted).
    pub async fn declare_exchange(&self, exchange: &str) {
        let options = ExchangeDeclareOptions {
            durable: true,
            auto_delete: false,
            ..ExchangeDeclareOptions::default()
        };
        self.channel
            .exchange_declare(
                exchange.into(),
                ExchangeKind::Topic,
                options,
                FieldTable::default(),
            )
            .await
            .unwrap();
    }

    /// Publishes `body` with routing key `event` and no message properties (no
    /// `persistent`, no `content-type`), as Evolution does.
    pub async fn publish(&self, exchange: &str, event: &str, body: &[u8]) {
        self.channel
            .basic_publish(
                exchange.into(),
                event.into(),
                BasicPublishOptions::default(),
                body,
                BasicProperties::default(),
            )
            .await
            .unwrap();
    }

    pub fn channel(&self) -> &lapin::Channel {
        &self.channel
    }
}

/// `config` consuming from `broker`: `exchange`, and a queue of the test's own.
pub fn with_amqp(mut config: Config, broker: &RabbitMq, exchange: &str, queue: &str) -> Config {
    config.amqp.url = Some(Secret::new(broker.url()));
    config.amqp.exchange = vec![exchange.to_owned()];
    config.amqp.queue = queue.to_owned();
    config
}

/// Evolution's AMQP body for a webhook body: the same keys in Evolution's order
/// (`event, instance, data, server_url, date_time, sender, apikey`), no `destination`;
/// every value's bytes as they were.
pub fn amqp_body(webhook_body: &str) -> String {
    use serde_json::value::RawValue;
    type Raw = Option<Box<RawValue>>;
    /// Present (`null` included) is `Some`; only an absent key is `None`.
    fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Raw, D::Error> {
        <Box<RawValue> as serde::Deserialize>::deserialize(d).map(Some)
    }
    #[derive(serde::Deserialize, serde::Serialize)]
    struct Message {
        event: Box<RawValue>,
        instance: Box<RawValue>,
        #[serde(
            default,
            deserialize_with = "present",
            skip_serializing_if = "Option::is_none"
        )]
        data: Raw,
        #[serde(
            default,
            deserialize_with = "present",
            skip_serializing_if = "Option::is_none"
        )]
        server_url: Raw,
        #[serde(
            default,
            deserialize_with = "present",
            skip_serializing_if = "Option::is_none"
        )]
        date_time: Raw,
        #[serde(
            default,
            deserialize_with = "present",
            skip_serializing_if = "Option::is_none"
        )]
        sender: Raw,
        #[serde(
            default,
            deserialize_with = "present",
            skip_serializing_if = "Option::is_none"
        )]
        apikey: Raw,
    }
    let message: Message = serde_json::from_str(webhook_body).unwrap();
    serde_json::to_string(&message).unwrap()
}
