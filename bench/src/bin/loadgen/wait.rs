//! `loadgen wait`: waits until a server accepts TCP connections, for scripts (`run.sh`
//! starts a server, then waits for it).

use std::time::Duration;

use clap::Args;
use evo_bench::sio::Target;
use tokio::net::TcpStream;
use tokio::time::Instant;

#[derive(Args)]
pub struct WaitArgs {
    /// Base URL of the server.
    #[arg(long, default_value = "http://127.0.0.1:8093")]
    url: String,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 60.0)]
    timeout: f64,
    /// Give up at once if this process is gone.
    #[arg(long)]
    pid: Option<u32>,
}

pub async fn wait(args: WaitArgs) -> i32 {
    let target = match Target::from_url(&args.url, "") {
        Ok(target) => target,
        Err(err) => {
            eprintln!("loadgen wait: {err}");
            return 1;
        }
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.timeout);
    loop {
        if TcpStream::connect(target.addr).await.is_ok() {
            return 0;
        }
        if let Some(pid) = args.pid
            && !std::path::Path::new(&format!("/proc/{pid}")).exists()
        {
            eprintln!(
                "loadgen wait: process {pid} exited before {} answered",
                args.url
            );
            return 1;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "loadgen wait: {} not answering after {} s",
                args.url, args.timeout
            );
            return 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
