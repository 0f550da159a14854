//! `plot`: draws how cost grows with the work (issue 11, "Scaling with the work") as one small
//! SVG of four panels, from the CSV that `loadtest/scaling.sh` writes:
//!
//! ```text
//! series,x,delivered_per_s,p99_ms,startup_ms
//! devices,1000,6512,231,
//! backlog,1000000,5120,310,
//! backlog_restart,1000000,5890,270,412
//! ```
//!
//! `devices`: W1 with x connected devices; `backlog`: W1 on fresh accounts beside x queued
//! envelopes, on the broker that was started on the filled directory; `backlog_restart`: the
//! same after a SIGTERM and a restart. Every run is a dot; the line joins the means per x.
//! Lines starting with `#` and the header are skipped; `startup_ms` is not drawn (it is in
//! the README's table).

use std::path::Path;

use anyhow::{Context, Result, bail};
use plotters::prelude::*;

/// One measured run.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Row {
    series: String,
    x: f64,
    delivered_per_s: f64,
    p99_ms: f64,
}

/// Parses the CSV described in the module doc.
pub(crate) fn parse(text: &str) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("series,") {
            continue;
        }
        let fields: Vec<&str> = line.split(',').map(str::trim).collect();
        if fields.len() < 4 {
            bail!(
                "line {}: expected series,x,delivered_per_s,p99_ms[,startup_ms]",
                n + 1
            );
        }
        let number = |i: usize| -> Result<f64> {
            fields[i]
                .parse()
                .with_context(|| format!("line {}: field {} is not a number", n + 1, i + 1))
        };
        rows.push(Row {
            series: fields[0].to_owned(),
            x: number(1)?,
            delivered_per_s: number(2)?,
            p99_ms: number(3)?,
        });
    }
    Ok(rows)
}

/// One line of a panel: its legend, colour and (x, y) of every run.
struct Line {
    label: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

impl Line {
    /// The rows of `series`, x divided by `x_unit`, y picked by `y`.
    fn new(
        rows: &[Row],
        series: &str,
        label: &'static str,
        color: RGBColor,
        x_unit: f64,
        y: fn(&Row) -> f64,
    ) -> Line {
        let points = rows
            .iter()
            .filter(|r| r.series == series)
            .map(|r| (r.x / x_unit, y(r)))
            .collect();
        Line {
            label,
            color,
            points,
        }
    }

    /// The mean y at each x, in x order.
    fn means(&self) -> Vec<(f64, f64)> {
        let mut xs: Vec<f64> = self.points.iter().map(|p| p.0).collect();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        xs.into_iter()
            .map(|x| {
                let ys: Vec<f64> = self
                    .points
                    .iter()
                    .filter(|p| p.0 == x)
                    .map(|p| p.1)
                    .collect();
                (x, ys.iter().sum::<f64>() / ys.len() as f64)
            })
            .collect()
    }
}

fn panel(
    area: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
) -> Result<()> {
    let all = || lines.iter().flat_map(|l| l.points.iter());
    let x_max = all().map(|p| p.0).fold(0.0, f64::max).max(1.0) * 1.08;
    let y_max = all().map(|p| p.1).fold(0.0, f64::max).max(1.0) * 1.15;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 15))
        .margin(10)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_labels(6)
        .y_labels(6)
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| format!("{v:.0}"))
        .light_line_style(WHITE)
        .label_style(("sans-serif", 11))
        .draw()?;
    for line in lines {
        let color = line.color;
        chart
            .draw_series(LineSeries::new(line.means(), color.stroke_width(2)))?
            .label(line.label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 16, y)], color.stroke_width(2))
            });
        chart.draw_series(
            line.points
                .iter()
                .map(|&p| Circle::new(p, 3, color.filled())),
        )?;
    }
    if lines.len() > 1 {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 11))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.3))
            .draw()?;
    }
    Ok(())
}

/// Draws the four panels of `rows` into the SVG file `output`.
pub(crate) fn draw(rows: &[Row], output: &Path) -> Result<()> {
    const BLUE_: RGBColor = RGBColor(31, 119, 180);
    const ORANGE: RGBColor = RGBColor(230, 110, 20);
    let delivered = |r: &Row| r.delivered_per_s;
    let p99 = |r: &Row| r.p99_ms;
    let devices = |y| vec![Line::new(rows, "devices", "W1", BLUE_, 1e3, y)];
    let backlog = |y| {
        vec![
            Line::new(rows, "backlog", "first start after the fill", BLUE_, 1e6, y),
            Line::new(
                rows,
                "backlog_restart",
                "after SIGTERM + restart",
                ORANGE,
                1e6,
                y,
            ),
        ]
    };
    if rows
        .iter()
        .all(|r| r.series != "devices" && !r.series.starts_with("backlog"))
    {
        bail!("no rows of series devices, backlog or backlog_restart");
    }
    let root = SVGBackend::new(output, (820, 560)).into_drawing_area();
    root.fill(&WHITE)?;
    let areas = root.split_evenly((2, 2));
    let devices_x = "connected devices (thousands)";
    let backlog_x = "envelopes queued (millions)";
    panel(
        &areas[0],
        "W1 delivered/s",
        devices_x,
        "delivered/s",
        &devices(delivered),
    )?;
    panel(
        &areas[1],
        "W1 on fresh accounts, delivered/s",
        backlog_x,
        "delivered/s",
        &backlog(delivered),
    )?;
    panel(
        &areas[2],
        "W1 send→deliver p99",
        devices_x,
        "p99 ms",
        &devices(p99),
    )?;
    panel(
        &areas[3],
        "W1 on fresh accounts, p99",
        backlog_x,
        "p99 ms",
        &backlog(p99),
    )?;
    root.present()
        .with_context(|| format!("writing {}", output.display()))?;
    Ok(())
}

/// `sealpost-loadtest plot --input CSV --output SVG`.
pub(crate) fn plot(input: &Path, output: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(input).with_context(|| format!("reading {}", input.display()))?;
    let rows = parse(&text)?;
    draw(&rows, output)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSV: &str = "series,x,delivered_per_s,p99_ms,startup_ms\n\
        # a comment\n\
        devices,1000,6000,200,\n\
        devices,1000,7000,240,\n\
        devices,10000,3000,2900,\n\
        backlog,0,6500,230,\n\
        backlog_restart,0,6100,250,140\n\
        backlog,1000000,5000,300,\n\
        backlog_restart,1000000,5500,280,400\n";

    #[test]
    fn parses_rows_and_means() {
        let rows = parse(CSV).unwrap();
        assert_eq!(rows.len(), 7);
        assert_eq!(rows[0].series, "devices");
        let line = Line::new(&rows, "devices", "W1", BLACK, 1e3, |r| r.delivered_per_s);
        assert_eq!(line.means(), vec![(1.0, 6500.0), (10.0, 3000.0)]);
        assert!(parse("devices,1000,x,1").is_err());
        assert!(parse("devices,1000").is_err());
    }

    #[test]
    fn draws_an_svg() {
        let rows = parse(CSV).unwrap();
        let path = std::env::temp_dir().join(format!("sealpost-plot-{}.svg", std::process::id()));
        draw(&rows, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("<polyline"));
        assert!(svg.contains("envelopes queued (millions)"));
        assert!(draw(&[], &path).is_err());
    }
}
