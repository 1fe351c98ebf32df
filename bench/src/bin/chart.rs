//! Run with: cargo run --release -p evo-bench --bin chart -- --out bench/charts/soak-rss.svg bench/results/<run>/results.jsonl
//!
//! Draws the server's RSS over time from `loadgen soak` summaries (JSON lines with
//! `rss_series`): one line per run, labelled by its `server` (the soak's mode: memory,
//! redis), MiB against seconds since the first webhook, and a vertical marker per
//! intervention (the Redis restart); written as an SVG small enough to commit.

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
