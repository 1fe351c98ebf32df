//! A real Redis, on a free port, for one test only.

use std::process::Stdio;
use std::time::Duration;

use evo_realtime::Config;
use evo_realtime::config::Secret;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::app::test_config;
use super::wait::{eventually, free_port};

pub struct RedisServer {
    child: Option<std::process::Child>,
    pub port: u16,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub async fn start() -> Self {
        Self::start_on(free_port().port()).await
    }

    /// Starts `redis-server` on `port`, with nothing persisted, and waits for PONG.
    pub async fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        let server = Self {
            child: Some(child),
            port,
            _dir: dir,
        };
        eventually("redis-server starts", async || server.answers().await).await;
        server
    }

    async fn answers(&self) -> bool {
        let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", self.port)).await else {
            return false;
        };
        let mut reply = [0u8; 7];
        let exchange = async {
            stream.write_all(b"PING\r\n").await.is_ok()
                && stream.read_exact(&mut reply).await.is_ok()
                && &reply == b"+PONG\r\n"
        };
        tokio::time::timeout(Duration::from_millis(500), exchange)
            .await
            .unwrap_or(false)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Kills the server (no shutdown, no save), as a crash or a network cut would look.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test config in Redis mode.
pub fn redis_config(upstream_url: &str, redis: &RedisServer) -> Config {
    let mut config = test_config(upstream_url);
    config.redis.url = Some(Secret::new(redis.url()));
    config
}
