//! Helpers shared by the end-to-end tests: where the build put the binary and the plugins.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// `target/<profile>`: the test executable lives in its `deps/` folder.
pub fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let deps = exe.parent().expect("deps dir");
    deps.parent().expect("profile dir").to_path_buf()
}

pub fn ferrite_bin() -> PathBuf {
    let p = profile_dir().join(format!("ferrite{}", std::env::consts::EXE_SUFFIX));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

pub fn dylib_name(stem: &str) -> String {
    format!(
        "{}{stem}{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    )
}

/// A workspace plugin built by `cargo build --workspace`.
pub fn workspace_plugin(stem: &str) -> PathBuf {
    let p = profile_dir().join(dylib_name(stem));
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// A test plugin built from this crate's examples.
pub fn test_plugin(name: &str) -> PathBuf {
    let p = profile_dir().join("examples").join(dylib_name(name));
    assert!(
        p.exists(),
        "{} is missing: it is built by `cargo test -p ferrite-tests`",
        p.display()
    );
    p
}

/// Copies `files` into a fresh directory (keeping their names unless renamed).
pub fn plugin_dir(files: &[(&Path, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    for (src, name) in files {
        std::fs::copy(src, dir.path().join(name)).expect("copy plugin");
    }
    dir
}

/// Runs the `ferrite` binary with a private config dir and the given plugin path.
pub fn run_ferrite(args: &[&str], plugin_path: Option<&Path>, config_home: &Path) -> Output {
    let mut cmd = Command::new(ferrite_bin());
    cmd.args(args)
        .env("XDG_CONFIG_HOME", config_home)
        .env_remove("FERRITE_PLUGIN_PATH");
    if let Some(p) = plugin_path {
        cmd.env("FERRITE_PLUGIN_PATH", p);
    }
    cmd.output().expect("running ferrite")
}

/// Largest absolute elementwise difference of two tensors of the same shape (parity checks).
pub fn max_abs_diff(got: &ferrite_plugin_api::Tensor, want: &ferrite_plugin_api::Tensor) -> f32 {
    assert_eq!(got.shape().unwrap(), want.shape().unwrap(), "shapes differ");
    let (g, w) = (got.to_vec().unwrap(), want.to_vec().unwrap());
    g.iter()
        .zip(&w)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f32::max)
}

/// Largest difference of one channel value between two images of the same size.
pub fn max_pixel_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    assert_eq!(a.dimensions(), b.dimensions(), "sizes differ");
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Six coloured squares on a grey background (three colours, each twice), captioned "a red
/// square" and so on.
pub fn toy_dataset(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let colours = [
        ("red", [220u8, 30, 30]),
        ("blue", [30, 30, 220]),
        ("green", [30, 200, 30]),
    ];
    for (i, (name, rgb)) in colours.iter().cycle().take(6).enumerate() {
        let img = image::RgbImage::from_fn(16, 16, |x, y| {
            let inside = (3 + i as u32 % 3..13).contains(&x) && (3..13).contains(&y);
            image::Rgb(if inside { *rgb } else { [128, 128, 128] })
        });
        img.save(dir.join(format!("{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("{i}.txt")), format!("a {name} square\n")).unwrap();
    }
}

/// `ferrite sample` with the settings the pipeline fixtures' generators use (their prompt, 4
/// steps, guidance 4, 16×16, the fixture's `noise.safetensors`), then the largest pixel
/// difference from `fixture/expected`. `args` go last (`--arch`, `--model`, `--sampler`,
/// `--negative-prompt`, ...).
pub fn sample_diff(fixture: &Path, expected: &str, args: &[&str]) -> u8 {
    let got = sample_image(fixture, "a photo of a red cat, best quality", args);
    let want = image::open(fixture.join(expected)).unwrap().to_rgb8();
    assert_eq!(got.dimensions(), want.dimensions());
    let worst = max_pixel_diff(&got, &want);
    println!("{expected} {args:?}: max pixel difference {worst}/255");
    worst
}

/// `ferrite sample` of `prompt` with 4 steps, guidance 4, 16×16 from `fixture`'s
/// `noise.safetensors`; `args` go last.
pub fn sample_image(fixture: &Path, prompt: &str, args: &[&str]) -> image::RgbImage {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.png");
    let noise = fixture.join("noise.safetensors");
    let mut all = vec![
        "sample",
        "--prompt",
        prompt,
        "--steps",
        "4",
        "--cfg",
        "4",
        "--width",
        "16",
        "--height",
        "16",
        "--init-noise",
        noise.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
    ];
    all.extend(args);
    let o = run_ferrite(&all, None, dir.path());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    image::open(&out).unwrap().to_rgb8()
}

/// Copies the folder `from` to `to`, with the files `keep` accepts.
pub fn copy_dir(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target, keep);
        } else if keep(&p) {
            std::fs::copy(&p, &target).unwrap();
        }
    }
}

/// Splits `dir/<part>/<stem>.safetensors` into two shards named by a
/// `<stem>.safetensors.index.json`, as the published folders split theirs (the single file goes).
pub fn shard(dir: &Path, part: &str, stem: &str) {
    use ferrite_plugin_api::{DType, Tensor, Weights};
    let single = dir.join(part).join(format!("{stem}.safetensors"));
    let w = Weights::open(single.to_str().unwrap()).unwrap();
    let keys: Vec<String> = w.infos().iter().map(|i| i.key.clone()).collect();
    let mut map = serde_json::Map::new();
    for (n, half) in keys.chunks(keys.len().div_ceil(2)).enumerate() {
        let name = format!("{stem}-0000{}-of-00002.safetensors", n + 1);
        let tensors: Vec<(String, Tensor)> = half
            .iter()
            .map(|k| (k.clone(), w.get(k, DType::F32).unwrap()))
            .collect();
        let refs: Vec<(&str, &Tensor)> = tensors.iter().map(|(k, t)| (k.as_str(), t)).collect();
        let path = dir.join(part).join(&name);
        ferrite_plugin_api::save_safetensors(path.to_str().unwrap(), &refs, &[]).unwrap();
        for k in half {
            map.insert(k.clone(), name.clone().into());
        }
    }
    drop(w);
    std::fs::remove_file(&single).unwrap();
    let index = dir
        .join(part)
        .join(format!("{stem}.safetensors.index.json"));
    let json = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(&index, json.to_string()).unwrap();
}

/// Builds a crate outside the workspace (its own Cargo.lock, `--locked`) into `target_name`
/// next to this build's target dir, checks that `libs` were built, and returns their folder.
pub fn build_outside_workspace(manifest: &Path, target_name: &str, libs: &[&str]) -> PathBuf {
    let target = profile_dir().parent().unwrap().join(target_name);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["build", "--locked", "--manifest-path"])
        .arg(manifest)
        .arg("--target-dir")
        .arg(&target)
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("running cargo");
    assert!(
        out.status.success(),
        "building {}:\n{}",
        manifest.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = target.join("debug");
    for lib in libs {
        assert!(dir.join(dylib_name(lib)).exists(), "{lib} was not built");
    }
    dir
}
