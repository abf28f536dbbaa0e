//! How long the app takes to build a frame, idle and while the demo trains on its background
//! thread (egui_kittest drives it headless: the UI pass, no rendering). Prints figures and the
//! ratio to the idle frames; asserts nothing. A real window's figures, rendering included, come
//! from `ferrite gui --screenshots DIR --start` under Xvfb.
//!
//!     cargo run --release -p ferrite-tests --example bench_gui -- [seconds]

use std::time::{Duration, Instant};

use egui_kittest::Harness;
use egui_kittest::kittest::Queryable;
use ferrite::gui::{App, AppOptions, Tab};

/// Steps the app at about 60 frames a second for `seconds`; the time of each step.
fn frames(h: &mut Harness<'_, App>, seconds: f64) -> Vec<Duration> {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut out = Vec::new();
    while Instant::now() < end {
        let t = Instant::now();
        h.step();
        out.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(16));
    }
    out
}

fn summary(v: &mut [Duration]) -> (f64, f64, f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mean = v.iter().map(|d| ms(*d)).sum::<f64>() / v.len() as f64;
    let q = |p: f64| ms(v[((v.len() - 1) as f64 * p) as usize]);
    (mean, q(0.5), q(0.95), q(1.0))
}

fn main() -> anyhow::Result<()> {
    let seconds: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20.0);
    let dir = tempfile::tempdir()?;
    let root = dir.path();
    let presets = ferrite::config::presets_dir();
    ferrite::train::demo::build_model(&presets.join("demo-model"), &root.join("model"), 0)?;
    ferrite::train::demo::build_dataset(&root.join("data"), 16, 4, 0)?;
    let mut config = ferrite::config::TrainConfig::load_unchecked(None, Some("demo"), &[])?;
    config.sample_after = 2.0;
    let path = root.join("demo.toml");
    std::fs::write(&path, config.to_toml())?;
    let app = App::new(AppOptions {
        plugin_dirs: vec![ferrite_tests::profile_dir()],
        settings_path: Some(root.join("settings.toml")),
        config: Some(path),
        ferrite_bin: Some(ferrite_tests::ferrite_bin()),
    });
    let mut h = Harness::builder()
        .with_size([1280.0, 900.0])
        .build_ui_state(|ui, app: &mut App| app.show(ui), app);
    h.state_mut().tab = Tab::Run;
    h.run();
    let mut idle = frames(&mut h, seconds / 4.0);
    h.get_by_label("Start training").click_accesskit();
    h.run();
    let mut training = frames(&mut h, seconds);
    let run = &h.state().run;
    println!(
        "demo training in the background: reached step {} with {} sample prompt(s) shown",
        run.step,
        run.samples.len()
    );
    h.state_mut().run.stop();
    while h.state().run.active() {
        std::thread::sleep(Duration::from_millis(50));
        h.step();
    }
    let (im, imed, ip95, imax) = summary(&mut idle);
    let (tm, tmed, tp95, tmax) = summary(&mut training);
    println!("UI pass per frame (Run tab: charts, samples, log)");
    println!(
        "  idle      {:>5} frames: mean {im:.2} ms, median {imed:.2} ms, p95 {ip95:.2} ms, max {imax:.2} ms",
        idle.len()
    );
    println!(
        "  training  {:>5} frames: mean {tm:.2} ms, median {tmed:.2} ms, p95 {tp95:.2} ms, max {tmax:.2} ms",
        training.len()
    );
    println!(
        "  training / idle: mean {:.2}x, p95 {:.2}x",
        tm / im,
        tp95 / ip95
    );
    Ok(())
}
