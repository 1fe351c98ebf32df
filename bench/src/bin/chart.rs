//! Run with: cargo run --release -p evo-bench --bin chart -- --out bench/charts/soak-rss.svg bench/results/<run>/results.jsonl
//!     or:  bench/charts.sh bench/results/<run>/results.jsonl   (the run.sh charts)
//!
//! `--kind soak` (the default) draws the server's RSS over time from `loadgen soak`
//! summaries (JSON lines with `rss_series`): one line per run, labelled by its `server` (the
//! soak's mode: memory, redis), MiB against seconds since the first webhook, and a vertical
//! marker per intervention (the Redis restart). `--kind rss` draws RSS against connections
//! from `run.sh`'s idle websocket runs, `--kind cpu` CPU per delivery against the webhook
//! rate from its fanout runs over 1,000 clients (fanout-500, rate-*, fanout-max): one line
//! per server, the median of repeated runs at each point. Written as SVGs small enough to
//! commit; `--csv` also writes the points.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Parser;
use plotters::prelude::*;
use serde_json::Value;

#[derive(Parser)]
#[command(about = "SVG chart of server RSS over time from loadgen soak results (JSON lines)")]
struct Cli {
    /// results.jsonl files; each `"mode":"soak"` line is one series.
    #[arg(required = true)]
    results: Vec<PathBuf>,
    /// The SVG to write.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "evo-realtime soak: server RSS over time")]
    title: String,
    #[arg(long, default_value_t = 900)]
    width: u32,
    #[arg(long, default_value_t = 420)]
    height: u32,
    /// What to draw: `soak` (RSS over time), `rss` (RSS against connections) or `cpu` (CPU
    /// per delivery against the webhook rate).
    #[arg(long, default_value = "soak", value_parser = ["soak", "rss", "cpu"])]
    kind: String,
    /// Also write the points drawn as CSV (`series,x,y`).
    #[arg(long)]
    csv: Option<PathBuf>,
}

/// The axes of a chart of points per server (`rss`, `cpu`).
struct Axes {
    x: &'static str,
    y: &'static str,
}

/// Reads `run.sh` results: per server, the points of the runs `point` accepts (x, y), the
/// median y of the runs at each x (x rounded to `x_step`, so repeated runs at one rate meet).
fn points_per_server(
    paths: &[PathBuf],
    x_step: f64,
    point: impl Fn(&Value) -> Option<(f64, f64)>,
) -> Result<BTreeMap<String, Vec<(f64, f64)>>, String> {
    let mut groups: BTreeMap<String, BTreeMap<i64, Vec<f64>>> = BTreeMap::new();
    for path in paths {
        let text =
            std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
        for line in text.lines() {
            let Ok(run) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let Some((x, y)) = point(&run) else { continue };
            let server = run["server"].as_str().unwrap_or("server").to_owned();
            let key = (x / x_step).round() as i64;
            groups
                .entry(server)
                .or_default()
                .entry(key)
                .or_default()
                .push(y);
        }
    }
    let series: BTreeMap<String, Vec<(f64, f64)>> = groups
        .into_iter()
        .map(|(server, by_x)| {
            let points = by_x
                .into_iter()
                .filter_map(|(key, ys)| {
                    Some((key as f64 * x_step, evo_bench::report::median(&ys)?))
                })
                .collect();
            (label(&server), points)
        })
        .collect();
    if series.is_empty() {
        return Err("no matching runs in the results".into());
    }
    Ok(series)
}

/// The legend's name for a run.sh server column.
fn label(server: &str) -> String {
    match server {
        "ours" => "evo-realtime".to_owned(),
        "peer" => "Node socket.io peer".to_owned(),
        "floor" => "floor (tokio-tungstenite)".to_owned(),
        other => other.to_owned(),
    }
}

/// An idle websocket run: (connections, RSS after they connected, MiB).
fn rss_point(run: &Value) -> Option<(f64, f64)> {
    if run["mode"] != "idle"
        || run["config"]["transport"].as_str().unwrap_or("websocket") != "websocket"
    {
        return None;
    }
    let connected = run["clients"]["connected"].as_f64()?;
    let rss = run["server_stats"]["rss_after_kib"].as_f64()? / 1024.0;
    (connected > 0.0).then_some((connected, rss))
}

/// A fanout run over 1,000 clients and 10 instances, not recovering: (webhooks accepted
/// per second, server CPU ms per 1,000 deliveries).
fn cpu_point(run: &Value) -> Option<(f64, f64)> {
    let config = &run["config"];
    let scenario = run["scenario"].as_str()?;
    let wanted =
        scenario == "fanout-500" || scenario == "fanout-max" || scenario.starts_with("rate-");
    if run["mode"] != "fanout" || !wanted || config["recovering"] == true {
        return None;
    }
    let rate = run["webhooks"]["accepted_per_s"].as_f64()?;
    let cpu = run["server_stats"]["cpu_ms_per_1k"].as_f64()?;
    Some((rate, cpu))
}

/// One line per server with a marker at each point, both axes from zero.
fn draw_xy(
    cli: &Cli,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
    axes: &Axes,
) -> Result<(), Box<dyn std::error::Error>> {
    let points = series.values().flatten();
    let x_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points.map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(&cli.out, (cli.width, cli.height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&cli.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..x_max * 1.05, 0.0..y_max * 1.15)?;
    chart
        .configure_mesh()
        .x_desc(axes.x)
        .y_desc(axes.y)
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (name, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(name.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart.draw_series(
            points
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, color.filled())),
        )?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

fn write_csv(
    path: &PathBuf,
    series: &BTreeMap<String, Vec<(f64, f64)>>,
    axes: &Axes,
) -> std::io::Result<()> {
    let mut text = format!("series,{},{}\n", axes.x, axes.y);
    for (name, points) in series {
        for (x, y) in points {
            text.push_str(&format!("{name},{x:.1},{y:.3}\n"));
        }
    }
    std::fs::write(path, text)
}

/// What the chart shows.
#[derive(Default)]
struct Data {
    /// label → (seconds, MiB).
    series: BTreeMap<String, Vec<(f64, f64)>>,
    /// (label, seconds): interventions during a run, such as the Redis restart.
    marks: Vec<(String, f64)>,
}

fn read(paths: &[PathBuf]) -> Result<Data, String> {
    let mut data = Data::default();
    for path in paths {
        let text =
            std::fs::read_to_string(path).map_err(|err| format!("{}: {err}", path.display()))?;
        for (n, line) in text.lines().enumerate() {
            let run: Value = serde_json::from_str(line)
                .map_err(|err| format!("{}:{}: {err}", path.display(), n + 1))?;
            let Some(samples) = run["rss_series"].as_array() else {
                continue;
            };
            let label = run["server"].as_str().unwrap_or("server").to_owned();
            let points = samples
                .iter()
                .filter_map(|s| Some((s[0].as_f64()?, s[1].as_f64()? / 1024.0)))
                .collect();
            data.series.insert(label.clone(), points);
            for mark in run["interventions"].as_array().into_iter().flatten() {
                if let Some(at) = mark["at_s"].as_f64() {
                    let what = mark["label"].as_str().unwrap_or("event");
                    data.marks.push((format!("{label}: {what}"), at));
                }
            }
        }
    }
    if data.series.is_empty() {
        return Err("no soak results with an rss_series".into());
    }
    Ok(data)
}

fn draw(cli: &Cli, data: &Data) -> Result<(), Box<dyn std::error::Error>> {
    let series = &data.series;
    let points = series.values().flatten();
    let t_max = points.clone().map(|p| p.0).fold(1.0, f64::max);
    let mib_max = points.map(|p| p.1).fold(1.0, f64::max);
    let root = SVGBackend::new(&cli.out, (cli.width, cli.height)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(&cli.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(52)
        // Zero-based, so the eye reads growth as a share of the whole.
        .build_cartesian_2d(0.0..t_max * 1.02, 0.0..mib_max * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("seconds since the first webhook")
        .y_desc("RSS MiB")
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
    for (i, (label, points)) in series.iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
    }
    for (what, at) in &data.marks {
        let (at, grey) = (*at, BLACK.mix(0.5));
        chart
            .draw_series(LineSeries::new(vec![(at, 0.0), (at, mib_max * 1.1)], grey))?
            .label(format!("{what} ({at:.0} s)"))
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], grey));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK.mix(0.3))
        .draw()?;
    root.present()?;
    Ok(())
}

fn main() {
    let cli = Cli::parse();
    if cli.kind != "soak" {
        let (axes, series) = if cli.kind == "rss" {
            let axes = Axes {
                x: "idle websocket connections",
                y: "server RSS MiB",
            };
            (axes, points_per_server(&cli.results, 100.0, rss_point))
        } else {
            let axes = Axes {
                x: "webhooks/s accepted (1,000 clients over 10 namespaces)",
                y: "server CPU ms per 1,000 deliveries",
            };
            (axes, points_per_server(&cli.results, 10.0, cpu_point))
        };
        let drawn = series.map_err(Into::into).and_then(|series| {
            draw_xy(&cli, &series, &axes)?;
            if let Some(csv) = &cli.csv {
                write_csv(csv, &series, &axes)?;
            }
            Ok::<_, Box<dyn std::error::Error>>(series)
        });
        match drawn {
            Ok(series) => {
                for (name, points) in &series {
                    println!("{name}: {points:?}");
                }
                println!("wrote {}", cli.out.display());
            }
            Err(err) => {
                eprintln!("chart: {err}");
                std::process::exit(1);
            }
        }
        return;
    }
    let outcome = read(&cli.results).map_err(Into::into).and_then(|data| {
        draw(&cli, &data)?;
        Ok::<_, Box<dyn std::error::Error>>(data)
    });
    match outcome {
        Ok(data) => {
            for (label, points) in &data.series {
                println!("{label}: {} samples", points.len());
            }
            println!("wrote {}", cli.out.display());
        }
        Err(err) => {
            eprintln!("chart: {err}");
            std::process::exit(1);
        }
    }
}
