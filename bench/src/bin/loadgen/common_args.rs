//! The options every measuring mode (`fanout`, `idle`, `emit-rest`) takes: the server under
//! test, how clients connect, and the labels and output of the JSON summary.

use clap::Args;

#[derive(Args, Clone)]
pub struct Common {
    /// Base URL of the server under test: socket.io and webhooks.
    #[arg(long, default_value = "http://127.0.0.1:8093")]
    pub url: String,
    /// Sent as `?apikey=` at the handshake.
    #[arg(long, default_value = "secret")]
    pub apikey: String,
    /// The server's process id: CPU time and RSS are read from /proc/<pid>.
    #[arg(long)]
    pub pid: Option<u32>,
    /// Runtime worker threads [default: the CPUs this process may run on].
    #[arg(long)]
    pub threads: Option<usize>,
    /// Namespaces are `/<prefix><n>`, n = 0..instances.
    #[arg(long, default_value = "bench-")]
    pub instance_prefix: String,
    /// Handshakes in flight at once while clients connect. Keep it under the server's listen
    /// backlog (128 for a tokio `TcpListener::bind`), or connect times measure SYN retries.
    #[arg(long, default_value_t = 100)]
    pub connect_concurrency: usize,
    /// Copied into the JSON summary (run.sh: the scenario's name).
    #[arg(long, default_value = "")]
    pub scenario: String,
    /// Copied into the JSON summary (run.sh: ours, peer or floor).
    #[arg(long, default_value = "")]
    pub server: String,
    /// Also append the JSON summary to this file.
    #[arg(long)]
    pub json_out: Option<std::path::PathBuf>,
    /// Exit with status 2 if a delivery was lost, a client failed or nothing was accepted.
    #[arg(long)]
    pub strict: bool,
    /// Spread client connections over this many loopback source addresses (127.0.0.1,
    /// 127.0.0.2, ...); 1 lets the kernel choose. Each (source, server) pair has ~28,000
    /// ephemeral ports, so more than that many clients need more sources.
    #[arg(long, default_value_t = 1)]
    pub source_addrs: u8,
}

impl Common {
    /// The server under test, with the client source addresses of `--source-addrs`.
    pub fn target(&self) -> Result<evo_bench::sio::Target, String> {
        let mut target = evo_bench::sio::Target::from_url(&self.url, &self.apikey)?;
        if self.source_addrs > 1 {
            if !target.addr.ip().is_loopback() {
                return Err("--source-addrs needs a loopback server address".into());
            }
            target.sources = (1..=self.source_addrs)
                .map(|n| std::net::IpAddr::from([127, 0, 0, n]))
                .collect();
        }
        Ok(target)
    }
}
