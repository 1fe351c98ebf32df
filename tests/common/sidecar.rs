//! The real binary as its own process, so a test can measure what a peer costs it: its
//! RSS (from `/proc/<pid>/status`), its open descriptors, and its wall-clock answers. The
//! test binary's own RSS says nothing about the sidecar's, so bounds are measured here.

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

use super::app::http;
use super::wait::{PATIENCE, eventually, free_port};

/// The binary under test; `EVO_REALTIME_BINARY` points the same tests at another build
/// (how the closing notes measure "before").
pub fn binary() -> String {
    std::env::var("EVO_REALTIME_BINARY")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_evo-realtime").to_owned())
}

/// A sidecar process started by the test, killed when dropped.
pub struct Sidecar {
    pub child: Child,
    pub addr: SocketAddr,
}

/// How [`Sidecar::launch`] starts the process.
#[derive(Default)]
pub struct Launch {
    /// Another binary than [`binary`].
    pub binary: Option<String>,
    /// Run under `ulimit -n` this.
    pub fd_limit: Option<u32>,
    /// Keep stdout and stderr as pipes (to read the logs after [`Sidecar::finish`]);
    /// otherwise they are discarded (`EVO_SIDECAR_LOG=debug` shows stderr instead).
    pub piped: bool,
    /// Write stderr to this file.
    pub stderr_file: Option<std::path::PathBuf>,
    /// `RUST_LOG` for the process; unset, the binary's default filter applies.
    pub log: Option<String>,
    /// Listen here instead of on a free port (a restart on the same address).
    pub listen: Option<SocketAddr>,
}

impl Sidecar {
    /// Starts the binary with only `envs` (plus `SIDECAR_LISTEN`) and waits until it serves.
    pub async fn start(envs: &[(&str, String)]) -> Self {
        let launch = Launch {
            log: Some("warn".into()),
            ..Launch::default()
        };
        Self::launch(envs, launch).await
    }

    /// [`Sidecar::start`], as `launch` says.
    pub async fn launch(envs: &[(&str, String)], launch: Launch) -> Self {
        let addr = launch.listen.unwrap_or_else(free_port);
        let program = launch.binary.unwrap_or_else(binary);
        let mut command = match launch.fd_limit {
            Some(limit) => {
                let mut sh = Command::new("sh");
                sh.arg("-c")
                    .arg(format!("ulimit -n {limit} && exec \"$0\""))
                    .arg(program);
                sh
            }
            None => Command::new(program),
        };
        let shown = std::env::var("EVO_SIDECAR_LOG").ok();
        let log = shown.clone().or(launch.log);
        let stderr = if launch.piped {
            Stdio::piped()
        } else if let Some(path) = &launch.stderr_file {
            Stdio::from(std::fs::File::create(path).unwrap())
        } else if shown.is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        };
        command.env_clear().env("SIDECAR_LISTEN", addr.to_string());
        if let Some(log) = log {
            command.env("RUST_LOG", log);
        }
        command
            .stdin(Stdio::null())
            .stdout(if launch.piped {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(stderr)
            .kill_on_drop(true);
        for (name, value) in envs {
            command.env(name, value);
        }
        let child = command.spawn().unwrap();
        let url = format!("http://{addr}/_sidecar/healthz");
        eventually("the binary serves", || async {
            http()
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status() == 200)
        })
        .await;
        Sidecar { child, addr }
    }

    /// Kills the process (SIGKILL, no drain) and waits until it is gone.
    pub async fn kill(mut self) {
        self.child.kill().await.unwrap();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let pid = self.pid().to_string();
        let status = std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the exit and returns the code and everything logged (with `piped`).
    pub async fn finish(mut self) -> (Option<i32>, String) {
        use tokio::io::AsyncReadExt;
        let status = tokio::time::timeout(PATIENCE, self.child.wait())
            .await
            .expect("exits")
            .unwrap();
        let mut logs = String::new();
        if let Some(mut stderr) = self.child.stderr.take() {
            stderr.read_to_string(&mut logs).await.unwrap();
        }
        (status.code(), logs)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// The process's resident set, KiB.
    pub fn rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmRSS:")
    }

    /// The process's peak resident set so far, KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_kib(self.pid(), "VmHWM:")
    }

    /// Waits `settle` and returns the RSS then (freed memory returns to the OS lazily).
    pub async fn settled_rss_kib(&self, settle: Duration) -> u64 {
        tokio::time::sleep(settle).await;
        self.rss_kib()
    }

    /// The process's open file descriptors.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|dir| dir.count())
            .unwrap_or(0)
    }
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(field))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kib| kib.parse().ok())
        .unwrap_or(0)
}
